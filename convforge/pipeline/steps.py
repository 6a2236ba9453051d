"""The pipeline's stages and the bookkeeping that lets a run reuse and resume them.

    run = Run(recipe, Path("runs/default"), force=False)
    for stage in STAGES:    # data, init, pretrain, train, export, tune, bench
        run.run(stage)

Each stage has a fingerprint: a hash of its own recipe settings and the
fingerprints of the stages it reads from. A stage writes its files through
:meth:`Run.output` (staged under temporary names); when it finishes, they
replace their old versions together with its stamp: its result (a small JSON
record the report is built from) with the fingerprint, in
``<run>/.stages/<name>.json``. A stage that fails leaves no new file and
every old one as it was. A later run
with the same fingerprint, and every output still there, reuses the stamp
instead of running again; a changed setting upstream changes every
fingerprint below it, so exactly the stages that depend on it rerun.
``force`` reruns everything.

An interrupted run has no stamp for the stage it was in. Training runs in
``.stages/<name>.partial`` and replaces ``<name>/`` whole when it is done;
interrupted, it resumes from that folder's ``last.pt`` when it was started
with the same fingerprint (``.stages/<name>.started``). The other stages are
short and start over, so nothing half-written is ever reused.
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
from convforge.pipeline.recipe import Recipe

STAMPS = ".stages"
INITS = ("small", "xavier", "kaiming")
INIT_ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # the stages whose outputs it reads
    settings: Callable[[Recipe], object]  # the recipe's part that shapes its outputs
    body: Callable[[Run], dict]  # does the work; returns the result record ("outputs": files)
    wanted: Callable[[Recipe], bool] = lambda recipe: True


class Run:
    """One run folder: the recipe, the stages' results so far, and how to say progress."""

    def __init__(self, recipe: Recipe, out: Path, force: bool = False, log=print,
                 progress: bool = True):  # fmt: skip
        self.recipe, self.out, self.force, self.log = recipe, ensure_dir(out), force, log
        self.progress = progress  # the training log and progress bars
        self.results: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}
        self.reused: list[str] = []
        self.started_fingerprint: str | None = None  # of the stage running now
        self.staging: Staging | None = None  # the running stage's files, until it finishes
        self._data = None

    def run(self, stage: Stage) -> None:
        """Run ``stage``, or reuse its stamp when nothing it depends on changed."""
        if not stage.wanted(self.recipe):
            return
        fp = self.fingerprint(stage)
        stamps = ensure_dir(self.out / STAMPS)
        stamp = stamps / f"{stage.name}.json"
        old = _read_json(stamp)
        if (
            not self.force
            and old.get("fingerprint") == fp
            and all((self.out / f).exists() for f in old["result"].get("outputs", []))
        ):
            self.log(f"{stage.name}: reused ({old['seconds']:.0f} s saved; --force reruns it)")
            self.results[stage.name] = old["result"]
            self.reused.append(stage.name)
            return
        self.log(f"{stage.name}: running ...")
        started = time.perf_counter()
        self.started_fingerprint = fp
        try:
            with together() as self.staging:  # its outputs, then its stamp, or nothing
                result = stage.body(self)
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
        self.results[stage.name] = result
        self.log(f"{stage.name}: done in {seconds:.0f} s")

    def fingerprint(self, stage: Stage) -> str:
        settings = stage.settings(self.recipe)
        if dataclasses.is_dataclass(settings):
            settings = dataclasses.asdict(settings)
        upstream = {name: self.fingerprints.get(name) for name in stage.inputs}
        text = json.dumps({"stage": stage.name, "settings": settings, "upstream": upstream},
                          sort_keys=True, default=str)  # fmt: skip
        self.fingerprints[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self.fingerprints[stage.name]

    def output(self, name: str | Path) -> Path:
        """Where the running stage writes its file ``name`` (relative to the run folder): a
        temporary path that becomes ``<run>/<name>`` when the stage finishes."""
        return self.staging.file(self.out / name)

    def data(self):
        """The training dataset, split as the train stage splits it (loaded once)."""
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
        """The exported .onnx files: fp32 first, then its variants."""
        export = self.results["export"]
        return [export["onnx"], *(v["path"] for v in export["variants"].values())]


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
    """Train into ``<run>/<name>``, which the finished stage replaces whole (an older folder
    stays until then). Training happens in ``.stages/<name>.partial``: its last.pt is resumed
    when the same run was interrupted, else the folder is cleared and ``start(folder)``
    trains afresh."""
    from convforge.builder.training.trainer import train

    partial = _partial(run, name)
    started = run.out / STAMPS / f"{name}.started"
    last = partial / "last.pt"
    if not run.force and last.exists() and _read_text(started) == run.started_fingerprint:
        run.log(f"{name}: resuming the interrupted run from {last}")
        result = train(None, None, resume=last, progress=run.progress)
    else:
        if partial.exists():
            shutil.rmtree(partial)
        write_text(started, run.started_fingerprint)
        result = start(partial)
    run.staging.adopt(partial, run.out / name)  # kept for resuming if the stage fails
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
        result["transfer"] = _transfer_record(_partial(run, "train") / "best.pt")
    return result


def _partial(run: Run, name: str) -> Path:
    """The folder training ``name`` runs in until the stage finishes and it becomes
    ``<run>/<name>``."""
    return run.out / STAMPS / f"{name}.partial"


def _transfer_record(checkpoint: Path) -> dict:
    """What fine-tuning decided (from the checkpoint, so a resumed run knows it too)."""
    from convforge.builder.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).transfer or {}


# -- export, tune, bench -----------------------------------------------------------------------


def _export(run: Run) -> dict:
    from convforge.export import export_checkpoint

    checkpoint = run.out / run.results["train"]["checkpoint"]
    report = export_checkpoint(
        checkpoint, run.out / "model.onnx", run.recipe.export, staging=run.staging
    )
    record = report.as_dict()
    run.output("export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    run.output("export.txt").write_text(report.format() + "\n", encoding="utf-8")
    files = [report.onnx, *(v["path"] for v in record["variants"].values())]
    record["outputs"] = [Path(f).name for f in files] + ["export.json", "export.txt"]
    record["text"] = report.format()
    record["onnx"] = str(Path(report.onnx).resolve())
    for v in record["variants"].values():
        v["path"] = str(Path(v["path"]).resolve())
    return record


def _tune(run: Run) -> dict:
    from convforge.runtime.tune import tune

    images, labels = run.val_images()
    section = run.recipe.tune
    plan = tune(run.model_files(), images, labels, section.settings, section.backends,
                progress=run.progress, dataset=run.recipe.train.dataset)  # fmt: skip
    plan.write(run.output("plan.json"))
    return {"plan": "plan.json", "outputs": ["plan.json"]}


def _bench(run: Run) -> dict:
    from convforge.runtime import bench
    from convforge.runtime.environment import environment

    section = run.recipe.bench
    # A backend the recipe names that cannot run one of the files (torch: fp32 only) is
    # listed as not run in the report, as with every backend available here.
    records, skipped = bench.bench_matrix(
        run.model_files(), section.backends, section.settings, labelled=run.val_images(),
        skip_failures=True,
    )  # fmt: skip
    env = environment()
    bench.write_json(run.output("bench.json"), records, env)
    bench.plot(run.output("latency.png"), records)
    return {
        "records": records,
        "skipped": skipped,
        "environment": env,
        "plot": "latency.png",
        "outputs": ["bench.json", "latency.png"],
    }


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


STAGES = (
    Stage("data", (), _data_settings, _data),
    Stage(
        "init",
        (),
        lambda r: [r.report.init_seeds, __version__],
        _init,
        wanted=lambda r: r.report.init_diagnostic,
    ),  # fmt: skip
    Stage(
        "pretrain",
        (),
        _training_settings("pretrain"),
        _pretrain,
        wanted=lambda r: r.pretrain is not None,
    ),  # fmt: skip
    Stage("train", ("pretrain",), _training_settings("train"), _train),
    Stage("export", ("train",), lambda r: [r.export, __version__], _export),
    Stage("tune", ("export",), lambda r: [r.tune.settings, r.tune.backends], _tune),
    Stage("bench", ("export",), lambda r: [r.bench.settings, r.bench.backends], _bench),
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
