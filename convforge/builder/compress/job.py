"""``convforge compress``: a trained checkpoint -> a smaller one within an accuracy budget.

In ``rounds`` rounds the model is pruned (:mod:`.pruning`, structured: whole
channels go, so every backend runs the smaller network with its ordinary
kernels) towards the target, one geometric step of MACs per round, then
fine-tuned by the builder's trainer for ``epochs``, distilled from the
original model. After each round the model's top-1 on the checkpoint's own
validation split is checked against the original's: the output is the last
round within ``max_drop`` points (rounds only prune more, so the first round
that fails ends the search). With a latency target the MAC target comes from
the original's measured latency, and rounds continue until the measured
latency meets it.

Everything a round makes is kept in the work folder (``OUT.rounds/``:
``options.json``, ``roundN/pruned.pt``, the trainer's run files, ``roundN/result.json``),
so an interrupted compress run resumes where it stopped; the folder goes when
the command ends, with or without a result. The output is a convforge
checkpoint whose ``model_config.widths`` holds the pruned widths and whose
``compress`` entry records the original, every round and the one kept.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from convforge.builder.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_weights_file,
    save_checkpoint,
)
from convforge.builder.compress.pruning import (
    IMPORTANCES,
    macs_and_params,
    norm_groups,
    prune_to,
)
from convforge.builder.data import augment
from convforge.builder.registry import build_model
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.distill import Distillation
from convforge.builder.training.state import configs_from
from convforge.builder.training.trainer import load_data, train
from convforge.builder.widths import changed_widths
from convforge.contract import sha256_of
from convforge.errors import UserError
from convforge.files import ensure_dir, write_text
from convforge.settings import check_ranges, setting

LatencyProbe = Callable[[nn.Module], float]  # a model -> its batch-1 latency in ms, measured
EXTRA_ROUNDS = 3  # latency target: rounds after ``rounds`` while the measured latency misses it
TAYLOR_BATCHES = 4  # training batches whose gradients rank channels for --importance taylor


@dataclass
class CompressOptions:
    checkpoint: str = setting(
        help="the trained convforge checkpoint (.pt) to make smaller", cli=False
    )
    out: str = setting("small.pt", "the compressed checkpoint to write", cli=False)
    speedup: float | None = setting(
        None, "target: the original's MACs / the compressed model's, > 1 (e.g. 2.0)"
    )
    latency_ms: float | None = setting(
        None, "target: batch-1 latency in ms on --backend, measured on this machine"
    )
    backend: str = setting("auto", "the backend --latency-ms is measured on")
    max_drop: float = setting(
        0.5, "top-1 points the result may lose against the original", minimum=0.0, maximum=100.0
    )
    importance: str = setting(
        "l2",
        "how channels are ranked: l1 or l2 (weight magnitude), bn (BatchNorm scale), "
        "taylor (first-order loss change)",
        choices=IMPORTANCES,
    )
    round_to: int = setting(
        16,
        "keep pruned widths multiples of this (1: any width); int8 CPU kernels work in "
        "blocks of 16 channels, so an odd width runs as the next multiple",
        minimum=1, maximum=1024,
    )  # fmt: skip
    rounds: int = setting(3, "pruning rounds, each followed by fine-tuning", minimum=1)
    epochs: int = setting(3, "fine-tuning epochs per round (0: prune only)", minimum=0)
    distill_weight: float = setting(
        0.5, "weight of the original model's outputs in the fine-tuning loss (0: labels only)",
        minimum=0.0, maximum=1.0,
    )  # fmt: skip
    temperature: float = setting(4.0, "distillation temperature", minimum=0.01)
    lr: float | None = setting(
        None, "fine-tuning peak learning rate; default: a tenth of the checkpoint's", minimum=0.0
    )
    batch_size: int | None = setting(
        None, "fine-tuning batch size; default: the checkpoint's", minimum=1
    )
    dataset: str | None = setting(
        None, "fine-tune and evaluate on this dataset; default: the checkpoint's own split"
    )
    work: str | None = setting(None, "folder of the rounds (resumable); default: OUT.rounds")

    def check(self) -> CompressOptions:
        """Self, or a UserError naming the option that is wrong and what it accepts."""
        check_ranges(self)
        if (self.speedup is None) == (self.latency_ms is None):
            raise UserError("give one target: --speedup X (MAC reduction) or --latency-ms T")
        if self.speedup is not None and not self.speedup > 1.0:
            raise UserError(f"--speedup must be > 1 (2.0 halves the MACs), got {self.speedup:g}")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise UserError(f"--latency-ms must be > 0, got {self.latency_ms:g}")
        if not str(self.out).endswith(".pt"):
            raise UserError(f"--out must name a .pt file, got {self.out!r}")
        return self

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(str(self.out) + ".rounds")


@dataclass
class CompressResult:
    out: Path  # the compressed checkpoint
    record: dict  # its ``compress`` entry (original, rounds, kept, options)
    seconds: float  # wall time of this invocation
    peak_memory_mb: float  # the process's peak resident memory


def compress(
    opts: CompressOptions,
    latency: LatencyProbe | None = None,
    log=print,
    progress: bool = True,
) -> CompressResult:
    """Compress as the module says. ``latency`` measures a model (required with
    ``latency_ms``; optional otherwise: each round's latency is then recorded too).
    UserError on bad options, when the checkpoint cannot be fine-tuned, or when no round
    stays within ``max_drop`` (then nothing is written and the work folder goes)."""
    opts = opts.check()
    if opts.latency_ms is not None and latency is None:
        raise ValueError("a latency target needs a latency probe")
    started = time.perf_counter()
    job = _Job(opts, latency, log, progress)
    try:
        kept = job.search()
    except UserError:
        shutil.rmtree(opts.work_dir, ignore_errors=True)
        raise
    record = job.record(kept)
    out = Path(opts.out)
    payload = read_weights_file(opts.work_dir / f"round{kept['round']}" / "model.pt")
    save_checkpoint(out, {**payload, "compress": record})
    shutil.rmtree(opts.work_dir, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return CompressResult(out, record, time.perf_counter() - started, round(peak, 1))


class _Job:
    """One compress call: the original, its data and teacher, and the rounds."""

    def __init__(self, opts: CompressOptions, latency: LatencyProbe | None, log, progress):
        self.opts, self.latency, self.log, self.progress = opts, latency, log, progress
        self.source = load_checkpoint(opts.checkpoint)
        self.model_cfg, trained = configs_from(self.source)
        self.cfg = _finetune_config(opts, trained)
        self.work = opts.work_dir
        _claim(self.work, opts, self.source)
        self.bundle = load_data(self.cfg, channels=self.model_cfg.in_channels)
        if len(self.bundle.classes) != self.model_cfg.num_classes:
            raise UserError(
                f"{self.cfg.dataset} has {len(self.bundle.classes)} classes; the model "
                f"predicts {self.model_cfg.num_classes}"
            )
        self.teacher = self.source.build_model().eval()
        size = self.source.data_config["input_size"]
        self.example = torch.zeros(1, self.model_cfg.in_channels, size, size)
        macs, params = macs_and_params(self.teacher, self.example)
        self.original = {"macs": macs, "params": params, "top1": self.top1(self.teacher)}
        if latency is not None:
            self.original["latency_ms"] = latency(self.teacher)
        self.log(
            f"original: {macs / 1e9:.3f} GMACs, {params / 1e6:.2f} M params, "
            f"top-1 {self.original['top1']:.2%}"
            + (f", {self.original['latency_ms']:.2f} ms" if latency else "")
        )
        self.rounds: list[dict] = []
        self.round_to = _round_to(opts.round_to, self.teacher, self.log)

    # -- the search ----------------------------------------------------------------------

    def search(self) -> dict:
        """Run (or resume) the rounds; the kept round's result. UserError if none passes."""
        opts, original = self.opts, self.original
        goal = opts.speedup
        if goal is None:
            goal = original["latency_ms"] / opts.latency_ms
            if goal <= 1.0:
                raise UserError(
                    f"the original already runs in {original['latency_ms']:.2f} ms, within "
                    f"--latency-ms {opts.latency_ms:g}: nothing to compress"
                )
        model, kept = self.teacher, None
        for r in range(1, opts.rounds + EXTRA_ROUNDS + 1):
            if r > opts.rounds:
                if opts.latency_ms is None or kept["latency_ms"] <= opts.latency_ms:
                    break  # the MAC target is the last planned round's; latency is met
                # Latency falls more slowly than MACs: aim the next round by what was missed.
                goal = kept["speedup"] * kept["latency_ms"] / opts.latency_ms
                target = original["macs"] / goal
            else:
                target = original["macs"] / goal ** (r / opts.rounds)
            try:
                result, model = self.round(r, model, int(target))
            except _OutOfReach as e:
                if r <= opts.rounds:
                    raise
                self.log(f"round {r}: {e}")  # a latency round: the kept round stands
                break
            self.rounds.append(result)
            if not result["passed"]:
                break
            kept = result
        if kept is None:
            first = self.rounds[0]
            raise UserError(
                f"no pruning stayed within --max-drop {opts.max_drop:g}: the smallest "
                f"({first['speedup']:.2f}x fewer MACs) lost "
                f"{100 * (original['top1'] - first['top1']):.2f} points "
                f"({original['top1']:.2%} -> {first['top1']:.2%}); nothing written"
            )
        last = self.rounds[-1]
        if last is not kept:
            self.log(
                f"kept round {kept['round']} ({kept['speedup']:.2f}x fewer MACs): round "
                f"{last['round']} ({last['speedup']:.2f}x) lost "
                f"{100 * (original['top1'] - last['top1']):.2f} points, more than "
                f"--max-drop {opts.max_drop:g}"
            )
        elif opts.latency_ms is not None and kept["latency_ms"] > opts.latency_ms:
            self.log(
                f"latency target missed: {kept['latency_ms']:.2f} ms after {kept['round']} "
                f"rounds, --latency-ms {opts.latency_ms:g}; kept the fastest within --max-drop"
            )
        return kept

    def round(self, r: int, previous: nn.Module, target_macs: int) -> tuple[dict, nn.Module]:
        """Round ``r`` from the ``previous`` round's model (done rounds are read back)."""
        folder = ensure_dir(self.work / f"round{r}")
        done = folder / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            self.log(_line(result, self.original, "done before"))
            return result, load_checkpoint(folder / "model.pt").build_model()
        t0 = time.perf_counter()
        pruned = folder / "pruned.pt"
        if not pruned.exists():
            model = copy.deepcopy(previous)
            reached = prune_to(model, self.example, target_macs, self.opts.importance,
                               loss_batches=self.taylor_batches(model),
                               round_to=self.round_to)  # fmt: skip
            if reached > target_macs:
                raise _OutOfReach(self.unreachable(reached, target_macs))
            save_checkpoint(pruned, self.payload(model, epoch=0))
        model = self.finetune(folder, load_checkpoint(pruned))
        model.eval()
        macs, params = macs_and_params(model, self.example)
        result = {
            "round": r,
            "target_macs": target_macs,
            "macs": macs,
            "params": params,
            "speedup": round(self.original["macs"] / macs, 3),
            "top1": self.top1(model),
        }
        if self.latency is not None:
            result["latency_ms"] = self.latency(model)
        result["passed"] = self.original["top1"] - result["top1"] <= self.opts.max_drop / 100
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_text(done, json.dumps(result, indent=2) + "\n")
        self.log(_line(result, self.original, f"{result['seconds']:.0f} s"))
        return result, model

    def finetune(self, folder: Path, pruned: Checkpoint) -> nn.Module:
        """The pruned model fine-tuned (resumed if its run was interrupted); its final
        epoch's weights, also written as ``folder/model.pt``."""
        if self.opts.epochs == 0:
            shutil.copyfile(pruned.path, folder / "model.pt")
            return pruned.build_model()
        last = folder / "last.pt"
        distill = None
        if self.opts.distill_weight > 0:
            distill = Distillation(copy.deepcopy(self.teacher), self.opts.distill_weight,
                                   self.opts.temperature)  # fmt: skip
        cfg = dataclasses.replace(self.cfg, out=str(folder))
        if last.exists():
            train(pruned.model_config, cfg, resume=last, bundle=self.bundle, distill=distill,
                  progress=self.progress)  # fmt: skip
        else:
            train(pruned.model_config, cfg, model=pruned.build_model(), bundle=self.bundle,
                  data_cfg=self.source.data_config, distill=distill,
                  extra={"compressed_from": str(self.opts.checkpoint)},
                  progress=self.progress)  # fmt: skip
        # The final epoch's weights, not the best epoch's: the gate reads the validation
        # split, and choosing an epoch by it as well would flatter the result.
        final = read_weights_file(last)
        for key in ("optimizer_state", "scheduler_state", "scaler_state", "rng_state"):
            final.pop(key, None)
        save_checkpoint(folder / "model.pt", final)
        return load_checkpoint(folder / "model.pt").build_model()

    # -- helpers -------------------------------------------------------------------------

    def payload(self, model: nn.Module, epoch: int) -> dict:
        """A checkpoint of ``model`` (pruned) that rebuilds from its config alone."""
        cfg = dataclasses.replace(
            self.model_cfg, widths=changed_widths(model, build_model(self.model_cfg))
        )
        return {
            "model_state": model.state_dict(),
            "model_config": dataclasses.asdict(cfg),
            "data_config": self.source.data_config,
            "train_config": dataclasses.asdict(self.cfg),
            "epoch": epoch,
        }

    def unreachable(self, reached: int, target: int) -> str:
        """Why a round's MAC target is out of this model's reach, and what gets further."""
        speedup = self.original["macs"] / reached
        why = f"pruned to widths that are multiples of {self.round_to}, " if self.round_to else ""
        hint = " (a smaller --round-to, or 1 for any width, gets further)" if self.round_to else ""
        return (
            f"{why}this model gets no smaller than {reached / 1e6:.2f} M MACs "
            f"({speedup:.2f}x fewer), short of the round's target "
            f"{self.original['macs'] / target:.2f}x; ask for less{hint}"
        )

    def taylor_batches(self, model: nn.Module) -> list | None:
        """A few seeded training batches for ``--importance taylor`` (None otherwise)."""
        if self.opts.importance != "taylor":
            return None
        loader = self.loader(self.bundle.train, shuffle=True)
        return [batch for batch, _ in zip(loader, range(TAYLOR_BATCHES), strict=False)]

    def loader(self, split, shuffle: bool = False) -> DataLoader:
        d = self.source.data_config
        tf = augment.eval_transform(d["input_size"], d["mean"], d["std"], d.get("native_size"))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(split.with_transform(tf), batch_size=self.cfg.batch_size,
                          shuffle=shuffle, generator=gen)  # fmt: skip

    @torch.no_grad()
    def top1(self, model: nn.Module) -> float:
        """Top-1 accuracy of ``model`` on the validation split, in [0, 1]."""
        model.eval()
        correct = total = 0
        for images, labels in self.loader(self.bundle.val):
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.shape[0]
        if total == 0:
            raise UserError("the validation split is empty; compress needs one to check accuracy")
        return correct / total

    def record(self, kept: dict) -> dict:
        """The output's ``compress`` entry (docs/file-contract.md)."""
        opts = self.opts
        target = (
            {"speedup": opts.speedup}
            if opts.speedup is not None
            else {"latency_ms": opts.latency_ms, "backend": opts.backend}
        )
        return {
            "source": str(opts.checkpoint),
            "source_sha256": sha256_of(opts.checkpoint),
            "target": target,
            "max_drop": opts.max_drop,
            "importance": opts.importance,
            "round_to": self.round_to or 1,
            "planned_rounds": opts.rounds,
            "epochs": opts.epochs,
            "distill_weight": opts.distill_weight,
            "dataset": self.cfg.dataset,
            "original": self.original,
            "rounds": self.rounds,
            "kept": kept["round"],
            **{k: kept[k] for k in ("macs", "params", "speedup", "top1")},
        }


class _OutOfReach(UserError):
    """A round's MAC target is beyond what pruning this model can reach."""


def _finetune_config(opts: CompressOptions, trained: TrainConfig) -> TrainConfig:
    """The trainer's settings for one round: the original's, shorter and gentler."""
    lr = opts.lr if opts.lr is not None else 0.1 * trained.resolved().lr
    return dataclasses.replace(
        trained,
        dataset=opts.dataset or trained.dataset,
        epochs=max(opts.epochs, 1),
        lr=lr,
        batch_size=opts.batch_size or trained.batch_size,
        warmup_epochs=0.0,  # the weights are trained already: no ramp from a tenth
        patience=0,
    ).resolved()


# What changes a round's result; a work folder made with other values is not reused.
_FINGERPRINT = ("importance", "round_to", "rounds", "epochs", "distill_weight", "temperature", "lr",
                "batch_size", "dataset", "speedup", "latency_ms", "backend")  # fmt: skip


def _round_to(asked: int, model: nn.Module, log) -> int | None:
    """The ``round_to`` for :func:`prune_to`: None for 1, and for a model with a group norm
    of several groups, whose widths stay multiples of its groups instead (said in a line)."""
    if asked == 1:
        return None
    groups = norm_groups(model)
    if groups > 1:
        log(f"widths stay multiples of the group norm's {groups} groups, not of "
            f"--round-to {asked}")  # fmt: skip
        return None
    return asked


def _claim(work: Path, opts: CompressOptions, source: Checkpoint) -> None:
    """Start ``work`` or check that it holds rounds of this very job; UserError if not."""
    want = {k: getattr(opts, k) for k in _FINGERPRINT}
    want["source_sha256"] = sha256_of(source.path)
    stamp = work / "options.json"
    if stamp.exists():
        have = json.loads(stamp.read_text())
        if have != want:
            differ = sorted(k for k in want if have.get(k) != want[k])
            raise UserError(
                f"{work} holds rounds of another compress run (differs in "
                f"{', '.join(differ)}); remove it or choose --work"
            )
        return
    ensure_dir(work)
    write_text(stamp, json.dumps(want, indent=2) + "\n")


def _line(result: dict, original: dict, note: str) -> str:
    latency = f", {result['latency_ms']:.2f} ms" if "latency_ms" in result else ""
    verdict = "ok" if result["passed"] else "over --max-drop"
    drop = 100 * (original["top1"] - result["top1"])
    return (
        f"round {result['round']}: {result['speedup']:.2f}x fewer MACs "
        f"({result['macs'] / 1e9:.3f} GMACs, {result['params'] / 1e6:.2f} M params), "
        f"top-1 {result['top1']:.2%} ({-drop:+.2f} pt){latency}: {verdict} ({note})"
    )
