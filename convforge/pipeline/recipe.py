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
    finetune: FinetuneOptions fields but pretrained (the pretrain stage's best.pt)
    export:   ExportOptions fields
    tune:     TuneConfig fields, and backends: available or a list
    bench:    BenchConfig fields, and backends
    report:   ReportOptions fields

``pretrain`` and ``finetune`` come together or not at all. A key that is not
a field, a value of the wrong type, an unknown model, dataset, backend or
choice is a :class:`~convforge.errors.UserError` that names the file, the key
and what is accepted, before anything runs. :data:`Recipe` with no argument
is the default recipe (``recipes/default.yaml`` spells it out).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from convforge.builder.data import synthetic
from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.sources import parse_spec
from convforge.builder.finetune import FinetuneOptions
from convforge.builder.registry import ModelConfig, list_models
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.errors import UserError, check_choice, check_int
from convforge.export.exporter import ExportOptions
from convforge.runtime.backends import BACKENDS
from convforge.runtime.bench import BenchConfig
from convforge.runtime.tune import TuneConfig
from convforge.settings import setting

MODEL_SKIP = ("num_classes", "in_channels")  # the data decides these
TRAIN_SKIP = ("out",)  # the pipeline decides where each run goes
FINETUNE_SKIP = ("pretrained", "arch")  # the pretrain stage's checkpoint


@dataclass
class ReportOptions:
    samples: int = setting(6, "rows of the data grid: training images, each with its views")
    variants: int = setting(5, "augmented views per row of the data grid")
    init_diagnostic: bool = setting(True, "run the lecture's init experiment for the report")
    init_seeds: int = setting(10, "seeds of the init experiment (its depth ratio varies by draw)")


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
    finetune: FinetuneOptions | None = None  # pretrained: the pretrain stage's best.pt
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
        """The model the train (or pretrain) stage builds, before the data sets its classes."""
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
    top = ("name", "description", "model", "train", "pretrain", "finetune", "export", "tune",
           "bench", "report")  # fmt: skip
    data = _mapping(data, "the recipe", top)
    default = Recipe()
    name = _value(data.get("name", default.name), str, "name")
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"name must be a plain folder name, got {name!r}")
    model = _model(data.get("model", {"arch": "resnet18"}))
    train = _train(data.get("train", {}), "train")
    pretrain = finetune = None
    if ("pretrain" in data) != ("finetune" in data):
        raise UserError("pretrain and finetune come together (a transfer recipe) or not at all")
    if "pretrain" in data:
        pretrain = _train(data["pretrain"], "pretrain")
        finetune = _settings(FinetuneOptions, data["finetune"], "finetune", FINETUNE_SKIP,
                             pretrained="")  # fmt: skip
        _checked("finetune.strategy",
                 lambda: check_choice("strategy", finetune.strategy, _strategies()))  # fmt: skip
    recipe = Recipe(
        name=name,
        description=_value(data.get("description", ""), str, "description"),
        model=model,
        train=train,
        pretrain=pretrain,
        finetune=finetune,
        export=_export(data.get("export", {})),
        tune=_runtime(TuneConfig, data.get("tune", {}), "tune", default.tune),
        bench=_runtime(BenchConfig, data.get("bench", {}), "bench", default.bench),
        report=_settings(ReportOptions, data.get("report", {}), "report"),
    )
    for key, run in (("train", train), ("pretrain", pretrain)):
        if run is not None:
            _checked(f"model (for {key})", lambda r=run: recipe.model_config(r).resolved())
    for name_ in ("samples", "variants", "init_seeds"):
        check_int(f"report.{name_}", getattr(recipe.report, name_))
    return recipe


# -- sections --------------------------------------------------------------------------------


def _model(data) -> dict:
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_SKIP]
    data = _mapping(data, "model", fields)
    if "arch" not in data:
        raise UserError("model.arch is missing; name a model (see `convforge models`)")
    hints = typing.get_type_hints(ModelConfig)
    out = {k: _value(v, hints[k], f"model.{k}") for k, v in data.items()}
    _checked("model.arch", lambda: check_choice("model", out["arch"], list_models()))
    return out  # the rest is checked with the input size (parse_recipe)


def _train(data, where: str) -> TrainConfig:
    data = dict(_mapping(data, where, [f.name for f in dataclasses.fields(TrainConfig)
                                       if f.name not in TRAIN_SKIP]))  # fmt: skip
    augment = _settings(AugmentConfig, data.pop("augment", {}), f"{where}.augment")
    cfg = _settings(TrainConfig, data, where, TRAIN_SKIP, augment=augment)
    _checked(f"{where}.dataset", lambda: _dataset(cfg.dataset))
    _checked(where, cfg.resolved)
    _checked(f"{where}.augment", augment.resolved)
    return cfg


def _dataset(spec: str) -> None:
    """UserError for an unknown kind, a missing path or (synthetic) a bad option."""
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        synthetic.parse_options(arg)


def _export(data) -> ExportOptions:
    opts = _settings(ExportOptions, data, "export", ("triton_repo",))
    _checked("export", opts.check)
    return opts


def _runtime(cls, data, where: str, default: Runtime) -> Runtime:
    data = dict(_mapping(data, where, [f.name for f in dataclasses.fields(cls)] + ["backends"]))
    names = data.pop("backends", "available")
    if names == "available":
        backends = None
    else:
        backends = _value(names, list[str], f"{where}.backends")
        for name in backends:
            check_choice(f"backend in {where}.backends", name, [*BACKENDS, "available"])
    settings = dataclasses.replace(default.settings, **_values(cls, data, where))
    if isinstance(settings, TuneConfig):
        _checked(where, settings.check)
    else:
        for bs in settings.batch_sizes:
            check_int(f"{where}.batch_sizes entry", bs)
        check_int(f"{where}.iters", settings.iters)
    return Runtime(settings, backends)


# -- checking one mapping --------------------------------------------------------------------


def _settings(cls, data, where: str, skip: tuple[str, ...] = (), **fixed):
    """``cls(**data, **fixed)``, each key a field of ``cls`` (not in ``skip``) of its type."""
    return cls(**_values(cls, data, where, (*skip, *fixed)), **fixed)


def _values(cls, data, where: str, skip: tuple[str, ...] = ()) -> dict:
    """``data`` checked: each key a field of ``cls`` not in ``skip``, each value of its type."""
    hints = typing.get_type_hints(cls)
    data = _mapping(data, where, [f.name for f in dataclasses.fields(cls) if f.name not in skip])
    return {k: _value(v, hints[k], f"{where}.{k}") for k, v in data.items()}


def _mapping(data, where: str, accepted) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {_shown(data)}")
    for key in data:
        if key not in accepted:
            prefix = "" if where == "the recipe" else f"{where}."
            raise UserError(f"unknown key {prefix}{key}; accepted: {', '.join(accepted)}")
    return data


def _value(value, hint, key: str):
    """``value`` as type ``hint`` (a tuple from a YAML list), or a UserError naming ``key``."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _value(value, hint, key)
    if origin in (tuple, list):
        if not isinstance(value, list) or not value:
            raise UserError(f"{key} must be a non-empty list, e.g. [1, 8], got {_shown(value)}")
        return origin(_value(v, args[0], f"{key} entry") for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, e.g. {{depth: 10}}, got {_shown(value)}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {_type_name(hint)}, got {_shown(value)}")
    return value


def _checked(where: str, check) -> None:
    """Run ``check``; a UserError it raises is prefixed with ``where``."""
    try:
        check()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _strategies() -> tuple[str, ...]:
    from convforge.builder.transfer import STRATEGIES

    return STRATEGIES
