"""A pipeline recipe: one YAML file that names every choice of a run, checked on load.

    recipe = load_recipe("recipes/default.yaml")   # UserError: one line, the key and why

The sections are the settings dataclasses the commands already use, so a
recipe key is the command-line option without its dashes:

    name: default                  # the run folder's default name: runs/<name>
    description: ...
    model:    ModelConfig fields (arch, stem, activation, norm, init, options, ...);
              classes and channels come from the data
    train:    TrainConfig fields, with augment: AugmentConfig fields
    pretrain: TrainConfig fields (transfer recipes: trained first, on its own dataset)
    finetune: FinetuneOptions fields but pretrained (the pretrain step's best.pt)
    compress: CompressOptions fields but checkpoint, out and work (optional: the train
              step's best.pt made smaller, exported and tuned beside the original)
    export:   ExportOptions fields
    tune:     TuneConfig fields, and backends: available or a list
    bench:    BenchConfig fields, and backends
    report:   ReportOptions fields

``pretrain`` and ``finetune`` come together or not at all. Each section is
read by :func:`convforge.settings.parse`: a key that is not a field, a value
of the wrong type or out of its range, an unknown model, dataset, backend or
choice is a :class:`~convforge.errors.UserError` that names the file, the key
(``train.epochs``) and what is accepted, before anything runs. :data:`Recipe` with no argument
is the default recipe (``recipes/default.yaml`` spells it out).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convforge.builder.data import synthetic
from convforge.builder.data.sources import parse_spec
from convforge.builder.finetune import FinetuneOptions
from convforge.builder.registry import ModelConfig, list_models
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.errors import UserError, check_choice
from convforge.export.exporter import ExportOptions
from convforge.runtime.backends import BACKENDS
from convforge.runtime.bench import BenchConfig
from convforge.runtime.tune import TuneConfig
from convforge.settings import coerce, flag, parse, setting

if TYPE_CHECKING:  # imported when a recipe has a compress section: it brings Torch-Pruning
    from convforge.builder.compress.job import CompressOptions

MODEL_SKIP = ("num_classes", "in_channels")  # the data decides these
TRAIN_SKIP = ("out",)  # the pipeline decides where each run goes
FINETUNE_SKIP = ("pretrained", "arch")  # the pretrain step's checkpoint
COMPRESS_SKIP = ("checkpoint", "out", "work")  # the train step's best.pt -> compress/small.pt


@dataclass
class ReportOptions:
    samples: int = setting(
        6, "rows of the data grid: training images, each with its views", minimum=1
    )
    variants: int = setting(5, "augmented views per row of the data grid", minimum=1)
    init_diagnostic: bool = setting(True, "run the lecture's init experiment for the report")
    init_seeds: int = setting(
        10, "seeds of the init experiment (its depth ratio varies by draw)", minimum=1
    )


@dataclass
class Runtime:
    """A tune or bench section: its settings and the backends it uses."""

    settings: TuneConfig | BenchConfig
    backends: list[str] | None = None  # None: every backend available here


@dataclass
class Recipe:
    name: str = "default"
    description: str = "The small-stem ResNet-18 on scikit-learn's digits (this is convforge demo)"
    model: dict = field(default_factory=lambda: {"arch": "resnet18", "stem": "auto"})
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: TrainConfig | None = None
    finetune: FinetuneOptions | None = None  # pretrained: the pretrain step's best.pt
    compress: CompressOptions | None = None  # checkpoint: the train step's best.pt
    export: ExportOptions = field(
        default_factory=lambda: ExportOptions(fp16=True, int8=True, input_format="uint8")
    )
    tune: Runtime = field(
        default_factory=lambda: Runtime(TuneConfig(batch_sizes=(1, 8), budget_seconds=40.0))
    )
    bench: Runtime = field(
        default_factory=lambda: Runtime(
            BenchConfig(batch_sizes=(1, 8), warmup_seconds=0.3, seconds=0.7, iters=20)
        )
    )
    report: ReportOptions = field(default_factory=ReportOptions)

    def model_config(self, train: TrainConfig | None = None) -> ModelConfig:
        """The model the train (or pretrain) step builds, before the data sets its classes."""
        fields = dict(self.model)
        arch, stem = fields.pop("arch"), fields.pop("stem", "auto")
        options = fields.pop("options", None)
        size = (train or self.pretrain or self.train).input_size
        return recipe_model(arch, size, stem=stem, options=options, **fields)


def load_recipe(path) -> Recipe:
    """The recipe in the YAML file ``path``, every key and value checked (module docstring)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist (see recipes/ for examples)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    try:
        return parse_recipe(data)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def parse_recipe(data) -> Recipe:
    """A :class:`Recipe` from the mapping a YAML file holds; UserError naming the bad key."""
    top = ("name", "description", "model", "train", "pretrain", "finetune", "compress",
           "export", "tune", "bench", "report")  # fmt: skip
    data = _mapping(data, "the recipe", top)
    default = Recipe()
    name = coerce(str, data.get("name", default.name), "name")
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"name must be a plain folder name, got {name!r}")
    model = _model(data.get("model", {"arch": "resnet18"}))
    train = _train(data.get("train", {}), "train")
    pretrain = finetune = None
    if ("pretrain" in data) != ("finetune" in data):
        raise UserError("pretrain and finetune come together (a transfer recipe) or not at all")
    if "pretrain" in data:
        pretrain = _train(data["pretrain"], "pretrain")
        finetune = parse(FinetuneOptions, data["finetune"], "finetune.", skip=FINETUNE_SKIP,
                         fixed={"pretrained": ""})  # fmt: skip
        _checked("finetune.strategy",
                 lambda: check_choice("strategy", finetune.strategy, _strategies()))  # fmt: skip
    recipe = Recipe(
        name=name,
        description=coerce(str, data.get("description", ""), "description"),
        model=model,
        train=train,
        pretrain=pretrain,
        finetune=finetune,
        compress=_compress(data["compress"]) if "compress" in data else None,
        export=parse(ExportOptions, data.get("export"), "export.", skip=("triton_repo",)),
        tune=_runtime(TuneConfig, data.get("tune"), "tune", default.tune),
        bench=_runtime(BenchConfig, data.get("bench"), "bench", default.bench),
        report=parse(ReportOptions, data.get("report"), "report."),
    )
    for key, run in (("train", train), ("pretrain", pretrain)):
        if run is not None:
            _checked(f"model (for {key})", lambda r=run: recipe.model_config(r).resolved())
    return recipe


# -- sections --------------------------------------------------------------------------------


def _model(data) -> dict:
    """The model section as given (a dict: the data sets classes and channels later)."""
    if isinstance(data, dict) and "arch" not in data:
        raise UserError("model.arch is missing; name a model (see `convforge models`)")
    # stem "auto" is the recipe's own word: recipe_model picks small or imagenet by input size
    given = data
    if isinstance(data, dict):
        given = {k: v for k, v in data.items() if (k, v) != ("stem", "auto")}
    cfg = parse(ModelConfig, given, "model.", skip=MODEL_SKIP)
    _checked("model.arch", lambda: check_choice("model", cfg.arch, list_models()))
    # the rest is checked with the input size
    return {k: getattr(cfg, k) if k in given else data[k] for k in data}


def _train(data, where: str) -> TrainConfig:
    cfg = parse(TrainConfig, data, f"{where}.", skip=TRAIN_SKIP)  # augment: a nested mapping
    _checked(f"{where}.dataset", lambda: _dataset(cfg.dataset))
    _checked(where, cfg.resolved)
    _checked(f"{where}.augment", cfg.augment.resolved)
    return cfg


def _compress(data) -> CompressOptions:
    """The compress section: CompressOptions with the input and output left to the step."""
    from convforge.builder.compress.job import CompressOptions

    cfg = parse(CompressOptions, data, "compress.", skip=COMPRESS_SKIP,
                fixed={"checkpoint": ""})  # fmt: skip
    as_keys(cfg.check, CompressOptions, "compress.")
    check_choice("compress.backend", cfg.backend, [*BACKENDS, "auto"])
    if cfg.dataset is not None:
        _checked("compress.dataset", lambda: _dataset(cfg.dataset))
    return cfg


def as_keys(call, cls, where: str):
    """``call()``; a UserError it raises that names ``cls``'s command-line options
    (``--max-drop``) is raised again naming them as recipe keys (``compress.max_drop``)."""
    try:
        return call()
    except UserError as e:
        raise UserError(keyed(str(e), cls, where)) from None


def keyed(text: str, cls, where: str) -> str:
    """``text`` with each command-line option of ``cls`` (``--max-drop``) written as its
    recipe key (``where`` + ``max_drop``); other words as they were."""
    keys = {flag(f): where + f.name for f in dataclasses.fields(cls)}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: keys.get(m.group(0), m.group(0)), text)


def _dataset(spec: str) -> None:
    """UserError for an unknown kind, a missing path or (synthetic) a bad option."""
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        synthetic.parse_options(arg)


def _runtime(cls, data, where: str, default: Runtime) -> Runtime:
    """A tune or bench section: the default recipe's settings with the keys given."""
    data = dict(_mapping(data, where, [f.name for f in dataclasses.fields(cls)] + ["backends"]))
    names = data.pop("backends", "available")
    backends = None
    if names != "available":
        backends = list(coerce(tuple[str, ...], names, f"{where}.backends"))
        for name in backends:
            check_choice(f"backend in {where}.backends", name, [*BACKENDS, "available"])
    settings = parse(cls, {**dataclasses.asdict(default.settings), **data}, f"{where}.")
    return Runtime(settings, backends)


def _mapping(data, where: str, accepted) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}"
        )
    for key in data:
        if key not in accepted:
            prefix = "" if where == "the recipe" else f"{where}."
            raise UserError(f"unknown key {prefix}{key}; accepted: {', '.join(accepted)}")
    return data


def _checked(where: str, check) -> None:
    """Run ``check``; a UserError it raises is prefixed with ``where``."""
    try:
        check()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _strategies() -> tuple[str, ...]:
    from convforge.builder.transfer import STRATEGIES

    return STRATEGIES
