"""The pipeline's steps and the bookkeeping that lets a run reuse and resume them.

    run = Run(recipe, Path("runs/default"), force=False)
    for step in STEPS:    # data, init, pretrain, train, compress, export, tune, bench
        run.run(step)

Each step has a fingerprint: a hash of its own recipe settings and the
fingerprints of the steps it reads from. A step writes its files through
:meth:`Run.output` (staged under temporary names); when it finishes, they
replace their old versions together with its stamp: its result (a small JSON
record the report is built from) with the fingerprint, in
``<run>/.steps/<name>.json``. A step that fails leaves no new file and
every old one as it was. A later run
with the same fingerprint, and every output still there, reuses the stamp
instead of running again; a changed setting upstream changes every
fingerprint below it, so exactly the steps that depend on it rerun.
``force`` reruns everything.

An interrupted run has no stamp for the step it was in. Training and
compression run in ``.steps/<name>.partial`` and replace ``<name>/`` whole
when they are done; interrupted, they resume from that folder (training from
its ``last.pt``, compression from its finished rounds) when they were started
with the same fingerprint (``.steps/<name>.started``). The other steps are
short and start over, so nothing half-written is ever reused.

The optional compress step makes the train step's ``best.pt`` smaller
(``compress/small.pt``); export then writes ``small.onnx`` and its variants
beside ``model.onnx`` and its own, and tune and bench take every file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convforge import __version__
from convforge.files import Staging, ensure_dir, together, write_text
from convforge.pipeline import deploy
from convforge.pipeline.recipe import Recipe

STAMPS = ".steps"
INITS = ("small", "xavier", "kaiming")
INIT_ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]  # the steps whose outputs it reads
    settings: Callable[[Recipe], object]  # the recipe's part that shapes its outputs
    body: Callable[[Run], dict]  # does the work; returns the result record ("outputs": files)
    wanted: Callable[[Recipe], bool] = lambda recipe: True


class Run:
    """One run folder: the recipe, the steps' results so far, and how to say progress."""

    def __init__(self, recipe: Recipe, out: Path, force: bool = False, log=print,
                 progress: bool = True):  # fmt: skip
        self.recipe, self.out, self.force, self.log = recipe, ensure_dir(out), force, log
        self.progress = progress  # the training log and progress bars
        self.results: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}
        self.reused: list[str] = []
        self.started_fingerprint: str | None = None  # of the step running now
        self.staging: Staging | None = None  # the running step's files, until it finishes
        self._data = None

    def run(self, step: Step) -> None:
        """Run ``step``, or reuse its stamp when nothing it depends on changed."""
        if not step.wanted(self.recipe):
            return
        fp = self.fingerprint(step)
        stamps = ensure_dir(self.out / STAMPS)
        stamp = stamps / f"{step.name}.json"
        old = _read_json(stamp)
        if (
            not self.force
            and old.get("fingerprint") == fp
            and all((self.out / f).exists() for f in old["result"].get("outputs", []))
        ):
            self.log(f"{step.name}: reused ({old['seconds']:.0f} s saved; --force reruns it)")
            self.results[step.name] = old["result"]
            self.reused.append(step.name)
            return
        self.log(f"{step.name}: running ...")
        started = time.perf_counter()
        self.started_fingerprint = fp
        try:
            with together() as self.staging:  # its outputs, then its stamp, or nothing
                result = step.body(self)
                seconds = time.perf_counter() - started
                finished = datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                )
                record = {"fingerprint": fp, "seconds": round(seconds, 1),
                          "finished": finished, "result": result}  # fmt: skip
                self.output(stamp.relative_to(self.out)).write_text(
                    json.dumps(record, indent=2) + "\n", encoding="utf-8"
                )
        finally:
            self.staging = None
        self.results[step.name] = result
        self.log(f"{step.name}: done in {seconds:.0f} s")

    def fingerprint(self, step: Step) -> str:
        settings = step.settings(self.recipe)
        if dataclasses.is_dataclass(settings):
            settings = dataclasses.asdict(settings)
        upstream = {name: self.fingerprints.get(name) for name in step.inputs}
        text = json.dumps({"step": step.name, "settings": settings, "upstream": upstream},
                          sort_keys=True, default=str)  # fmt: skip
        self.fingerprints[step.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self.fingerprints[step.name]

    def output(self, name: str | Path) -> Path:
        """Where the running step writes its file ``name`` (relative to the run folder): a
        temporary path that becomes ``<run>/<name>`` when the step finishes."""
        return self.staging.file(self.out / name)

    def data(self):
        """The training dataset, split as the train step splits it (loaded once)."""
        from convforge.builder.data.sources import load_dataset

        if self._data is None:
            cfg = self.recipe.train
            self._data = load_dataset(cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.seed)
        return self._data

    def val_images(self) -> tuple[list, list[int]]:
        """The validation split as raw uint8 pixels (HxW or HxWxC) and its labels."""
        val = self.data().val
        images = []
        for i in range(len(val)):
            x = val.load(i).numpy()
            images.append(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
        return images, list(val.targets)

    def model_files(self) -> list[str]:
        """The exported .onnx files: the original fp32 first, then its variants, then the
        compressed model's fp32 and variants (when the recipe compresses)."""
        export = self.results["export"]
        exports = [export] + ([export["small"]] if "small" in export else [])
        return [f for e in exports for f in deploy.exported_files(e)]

    # -- the partial folder of a long step (training, compression) ------------------------

    def partial(self, name: str) -> Path:
        """The folder step ``name`` works in until it finishes and the folder becomes
        ``<run>/<name>``."""
        return self.out / STAMPS / f"{name}.partial"

    def resumable(self, name: str) -> bool:
        """Whether ``name``'s partial folder holds an interrupted run of these very settings
        (and ``force`` is off)."""
        started = _read_text(self.out / STAMPS / f"{name}.started")
        same = started == self.started_fingerprint
        return same and not self.force and self.partial(name).exists()

    def start_afresh(self, name: str) -> Path:
        """``name``'s partial folder, emptied (created) and stamped with the running step's
        fingerprint, so an interruption from here on resumes."""
        partial = self.partial(name)
        if partial.exists():
            shutil.rmtree(partial)
        write_text(self.out / STAMPS / f"{name}.started", self.started_fingerprint)
        return ensure_dir(partial)


# -- data --------------------------------------------------------------------------------------


def _data(run: Run) -> dict:
    """A grid of training images with augmented views, and one validation image to predict."""
    from PIL import Image

    from convforge.builder.data.images import channel_stats
    from convforge.builder.data.preview import preview_grid

    cfg, report = run.recipe.train, run.recipe.report
    bundle = run.data()
    aug = cfg.augment.resolved(flip_safe=bundle.flip_safe)
    stats = channel_stats(bundle.train, seed=cfg.seed)
    preview_grid(bundle.train, aug, cfg.input_size, stats.mean, stats.std, bundle.native_size,
                 run.output("data.png"), samples=report.samples, variants=report.variants,
                 seed=cfg.seed)  # fmt: skip
    images, labels = run.val_images()
    sample = "sample.png"
    Image.fromarray(images[0]).save(run.output(sample), format="PNG")
    return {
        "description": bundle.description,
        "classes": list(bundle.classes),
        "train_images": len(bundle.train),
        "val_images": len(bundle.val),
        "augment": dataclasses.asdict(aug),
        "grid": "data.png",
        "sample": sample,
        "sample_class": bundle.classes[labels[0]],
        "outputs": ["data.png", sample],
    }


# -- init --------------------------------------------------------------------------------------


def _init(run: Run) -> dict:
    """The lecture's init experiment, as ``convforge diagnose init`` runs it, per activation."""
    from convforge.builder import ModelConfig
    from convforge.builder import diagnose_init as di

    seeds = run.recipe.report.init_seeds
    result: dict = {"seeds": seeds, "activations": {}, "outputs": []}
    for activation in INIT_ACTIVATIONS:
        config = ModelConfig("plain", stem="small", norm="none", activation=activation)
        runs = di.run_init_experiment(config, list(INITS))
        plot = f"init-{activation}.png"
        di.plot_init_experiment(runs, run.output(plot))
        result["activations"][activation] = {
            "table": di.format_runs(runs),
            "ratios": {r.config.init: r.depth_ratio for r in runs},
            "spread": di.ratio_spread(config, list(INITS), range(seeds)),
            "plot": plot,
        }
        result["outputs"].append(plot)
    return result


# -- training ----------------------------------------------------------------------------------


def _train_run(run: Run, name: str, start: Callable[[object], object]) -> dict:
    """Train into ``<run>/<name>``, which the finished step replaces whole (an older folder
    stays until then). Training happens in ``.steps/<name>.partial``: its last.pt is resumed
    when the same run was interrupted, else the folder is cleared and ``start(folder)``
    trains afresh."""
    from convforge.builder.training.trainer import train

    partial = run.partial(name)
    last = partial / "last.pt"
    if run.resumable(name) and last.exists():
        run.log(f"{name}: resuming the interrupted run from {last}")
        result = train(None, None, resume=last, progress=run.progress)
    else:
        result = start(run.start_afresh(name))
    run.staging.adopt(partial, run.out / name)  # kept for resuming if the step fails
    best = result.history[result.best_epoch - 1]
    return {
        "folder": name,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_run,
        "stopped_early": result.stopped_early,
        "images_per_s": best["images_per_s"],
        "history": result.history,
        "checkpoint": f"{name}/best.pt",
        "outputs": [f"{name}/best.pt", f"{name}/metrics.csv", f"{name}/curves.png"],
    }


def _pretrain(run: Run) -> dict:
    from convforge.builder.training.trainer import train

    cfg = run.recipe.pretrain

    def start(folder):
        out = dataclasses.replace(cfg, out=str(folder))
        return train(run.recipe.model_config(cfg), out, progress=run.progress)

    return _train_run(run, "pretrain", start)


def _train(run: Run) -> dict:
    from convforge.builder.finetune import finetune
    from convforge.builder.training.trainer import train

    recipe = run.recipe

    def start(folder):
        cfg = dataclasses.replace(recipe.train, out=str(folder))
        if recipe.finetune is None:
            return train(recipe.model_config(recipe.train), cfg, progress=run.progress)
        pretrained = run.out / run.results["pretrain"]["checkpoint"]
        opts = dataclasses.replace(recipe.finetune, pretrained=str(pretrained))
        return finetune(opts, cfg, log=run.log, progress=run.progress)

    result = _train_run(run, "train", start)
    if recipe.finetune is not None:
        result["transfer"] = _transfer_record(run.partial("train") / "best.pt")
    return result


def _transfer_record(checkpoint: Path) -> dict:
    """What fine-tuning decided (from the checkpoint, so a resumed run knows it too)."""
    from convforge.builder.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).transfer or {}


def _training_settings(key: str):
    def settings(recipe: Recipe) -> dict:
        return {
            "model": recipe.model,
            "train": dataclasses.asdict(getattr(recipe, key)),
            "finetune": key == "train" and recipe.finetune and dataclasses.asdict(recipe.finetune),
            "version": __version__,
        }

    return settings


def _data_settings(recipe: Recipe) -> dict:
    train = dataclasses.asdict(recipe.train)
    keep = ("dataset", "input_size", "val_fraction", "seed", "augment")
    return {
        "train": {k: train[k] for k in keep},
        "report": [recipe.report.samples, recipe.report.variants],
    }


STEPS = (
    Step("data", (), _data_settings, _data),
    Step(
        "init",
        (),
        lambda r: [r.report.init_seeds, __version__],
        _init,
        wanted=lambda r: r.report.init_diagnostic,
    ),  # fmt: skip
    Step(
        "pretrain",
        (),
        _training_settings("pretrain"),
        _pretrain,
        wanted=lambda r: r.pretrain is not None,
    ),  # fmt: skip
    Step("train", ("pretrain",), _training_settings("train"), _train),
    Step(
        "compress",
        ("train",),
        lambda r: [r.compress, __version__],
        deploy.compress_step,
        wanted=lambda r: r.compress is not None,
    ),  # fmt: skip
    Step("export", ("train", "compress"), lambda r: [r.export, __version__], deploy.export_step),
    Step("tune", ("export",), lambda r: [r.tune.settings, r.tune.backends], deploy.tune_step),
    Step("bench", ("export",), lambda r: [r.bench.settings, r.bench.backends], deploy.bench_step),
)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        return {}
    return data


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
