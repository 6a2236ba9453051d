"""``convforge tune``: the fastest backend x file x settings per batch size, within an
accuracy budget, measured on this machine (after Triton's Model Analyzer).

    plan = tune(["m.onnx", "m.int8.onnx"], images, labels, TuneConfig(batch_sizes=(1, 8)))
    plan.write("plan.json")

1. Candidates: every backend available here (or each one named) x every file
   it runs x the settings of its own that matter
   (:mod:`convforge.runtime.candidates`). A backend that cannot take part is
   listed in ``Plan.skipped`` with its reason, never replaced by another.
2. Accuracy: the reference is the fp32 file's top-1 on the checked images
   (at most ``max_images``, a seeded sample) through ort-cpu, or the first
   backend that loads it. That is the first fp32 file given that is no
   compressed model: exports of ``convforge compress``'s checkpoints are
   candidates like the others, judged against the original, so the plan
   answers "the fastest file within ``max_drop`` of what I trained",
   whatever its size or precision (their records name their ``compressed``
   summary: speedup, MACs, params, and whether they came from the
   reference's checkpoint). A candidate's top-1 is computed once per backend,
   file and options that change numerics (each backend's ``numeric_options``: thread
   counts, hints or profiles do not). Without labels, top-1 agreement with
   the reference is measured instead (the reference agrees 100%). A
   candidate more than ``max_drop`` points below the reference is rejected.
3. Speed, per batch size, on real images (the checked images, preprocessed
   for each file, the first ``batch_size`` of them): each surviving candidate
   is loaded as a fresh instance (single-batch-size backends need one per
   size), warmed up, then timed in interleaved rounds: in each round every
   candidate runs ``MIN_ITERS`` to ``iters`` times in turn, starting from a
   rotating position, so slow drifts of a noisy machine hit all of them alike.
   Each turn opens with one untimed run: the engine that ran before may leave
   threads spinning for a while (ONNX Runtime's do by default), which made the
   first call of a turn ~2x slower (benchmarks/ort_int8_batch1.py).
   p50 is the median of the round medians; p99 is over every run. After
   round one, candidates slower than ``prune_ratio`` x the best are dropped;
   when the remaining rounds would overrun the batch size's share of
   ``budget_seconds``, the slower half goes. Every drop is recorded with its
   reason. One round always runs: a tiny budget is exceeded rather than left
   without a measurement.
4. The plan (:class:`~convforge.runtime.plan.Plan`): per batch size, the
   measured candidate with the lowest p50; every candidate with its outcome
   (chosen, measured, pruned, rejected, failed) and why.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convforge.contract import read_info, sha256_of
from convforge.errors import UserError
from convforge.runtime import backends
from convforge.runtime.candidates import Candidate, candidates
from convforge.runtime.environment import environment
from convforge.runtime.evaluate import top1
from convforge.runtime.plan import Plan, PlanEntry
from convforge.runtime.preprocess import preprocess
from convforge.settings import check_ranges, setting

MIN_ITERS = 3  # timed runs per candidate per round, even when the budget is spent
WARMUP_ITERS = 3  # untimed runs after the first inference, before round one


@dataclass
class TuneConfig:
    batch_sizes: tuple[int, ...] = setting((1, 8, 32), "batch sizes to plan for", minimum=1)
    max_drop: float = setting(
        0.5, "largest top-1 drop below the fp32 file allowed, in points", minimum=0
    )
    budget_seconds: float = setting(
        300.0, "time for the whole search (at least one round runs)", minimum=0.001
    )
    max_images: int = setting(
        500, "images the accuracy check uses, at most (a seeded sample)", minimum=1
    )
    rounds: int = setting(5, "interleaved timing rounds per batch size", minimum=1)
    iters: int = setting(
        20, f"timed runs per candidate per round, at most (at least {MIN_ITERS})", minimum=1
    )
    prune_ratio: float = setting(
        2.0, "after round one, drop candidates this many x the best", minimum=1
    )
    seed: int = setting(0, "seed of the image sample", minimum=0)

    def check(self) -> TuneConfig:
        """Self, or a UserError naming the setting out of its declared range."""
        return check_ranges(self)


def tune(files, images, labels=None, cfg: TuneConfig | None = None, names=None,
         progress: bool = False, dataset: str | None = None, overrides=None) -> Plan:  # fmt: skip
    """Search as the module says. ``images``: raw images (paths, PIL images or uint8
    arrays); ``labels``: their classes, or None to compare with the fp32 file's top-1;
    ``names``: the backends to try (default: all available); ``dataset``: recorded in
    the plan; ``overrides`` (a :class:`~convforge.overrides.ModelOverrides`: ``--mean``,
    ``--labels``, ...) win over every file's metadata, for each candidate. UserError when
    a file is unreadable, none is fp32, or nothing could run."""
    from tqdm import tqdm

    cfg = (cfg or TuneConfig()).check()
    cfg = dataclasses.replace(cfg, batch_sizes=tuple(sorted(set(cfg.batch_sizes))))
    start = time.perf_counter()
    files, infos = _with_reference_first(files, overrides)
    reference = files[0]
    images, labels = _sample(images, labels, cfg)
    batches = _preprocessed(images, infos)
    pool, skipped = candidates(files, cfg.batch_sizes, names, overrides)
    # Every file a candidate reads (a torch .pt2 too), hashed before any runs: the plan
    # runs only what was measured (Plan.check_file).
    reads = [f for c in pool for f in backends.backend_class(c.backend).reads(c.file)]
    hashes = {f: sha256_of(f) for f in dict.fromkeys(files + reads) if Path(f).is_file()}
    keys = list(dict.fromkeys(c.accuracy_key for c in pool))
    bar = tqdm(total=len(keys) + len(cfg.batch_sizes) * cfg.rounds, desc="tune", unit="step",
               leave=False, disable=None if progress else True)  # fmt: skip
    chunk = max(cfg.batch_sizes)
    name = "ort-cpu" if backends.backend_class("ort-cpu").available()[0] else "auto"
    ref, _ = backends.load_backend(name, reference, overrides=overrides)
    try:
        ref_top1 = top1(ref, batches[reference], chunk)
    finally:
        ref.close()
    truth = ref_top1 if labels is None else labels
    ref_acc = float(np.mean(ref_top1 == truth))
    accuracy = {}  # accuracy key -> (top-1 or None, why it could not run, precision)
    for key in keys:
        first = next(c for c in pool if c.accuracy_key == key)
        bar.set_description(f"accuracy: {first.label}")
        accuracy[key] = _accuracy(first, batches[first.file], truth, chunk)
        bar.update(1)
    records = _measure(pool, batches, accuracy, ref_acc, cfg, start, bar)
    for r in records:
        r["compressed"] = _compressed(infos[r["file"]], infos[reference])
    bar.close()
    entries = [_entry(r) for r in _choose(records)]
    if not entries:
        why = "; ".join(f"{r['backend']} {Path(r['file']).name}: {r['why']}" for r in records)
        raise UserError(f"no candidate ran within the accuracy budget: {why or 'none found'}")
    return Plan(
        model=reference,
        files=hashes,
        entries=entries,
        accuracy={
            "metric": "top1" if labels is not None else "agreement",
            "dataset": dataset,
            "images": len(images),
            "reference": ref_acc,
            "reference_backend": ref.name,
            "max_drop_points": cfg.max_drop,
        },
        search={
            "batch_sizes": list(cfg.batch_sizes),
            "budget_seconds": cfg.budget_seconds,
            "seconds": round(time.perf_counter() - start, 1),
            "rounds": cfg.rounds,
            "iters": cfg.iters,
            "prune_ratio": cfg.prune_ratio,
            "candidates": len(pool),
        },
        environment=environment(),
        candidates=records,
        skipped=skipped,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _with_reference_first(files, overrides=None) -> tuple[list[str], dict]:
    """``files`` resolved, once each, the accuracy reference first: the first fp32 one that
    is no compressed model; and their ModelInfo. UserError when there is none."""
    files = list(dict.fromkeys(str(Path(f).resolve()) for f in files))
    infos = {f: read_info(f, overrides) for f in files}
    fp32 = [f for f in files if infos[f].precision == "fp32"]
    reference = next((f for f in fp32 if infos[f].compressed is None), None)
    if reference is None and fp32:
        raise UserError(
            "tune needs the original fp32 file as the accuracy reference, and every fp32 file "
            f"given is compressed ({', '.join(Path(f).name for f in fp32)}): add the export of "
            "the checkpoint they were compressed from"
        )
    if reference is None:
        raise UserError("tune needs the fp32 file among its files: it is the accuracy reference")
    return [reference] + [f for f in files if f != reference], infos


def _compressed(info, reference) -> dict | None:
    """A compressed file's summary for its records (``convforge.compressed`` key: speedup,
    macs, params), and whether it was compressed from the checkpoint the reference file was
    exported from; None for any other file."""
    own = info.compressed
    if own is None:
        return None
    origin = own.get("source_sha256") == reference.metadata.get("source_sha256")
    return {**{k: own.get(k) for k in ("speedup", "macs", "params")}, "from_reference": origin}


def _sample(images, labels, cfg: TuneConfig) -> tuple[list, np.ndarray | None]:
    """At most ``cfg.max_images`` of the images (and their labels), a seeded random pick."""
    if not len(images):
        raise UserError("tune needs at least one image to check accuracy on")
    pick = sorted(np.random.default_rng(cfg.seed).permutation(len(images))[: cfg.max_images])
    chosen = [images[i] for i in pick]
    return chosen, None if labels is None else np.asarray([labels[i] for i in pick])


def _measure(pool, batches, accuracy, ref_acc, cfg: TuneConfig, start, bar) -> list[dict]:
    """One record per candidate; those within the accuracy budget raced batch size by batch
    size, each size given an equal share of what is left of ``cfg.budget_seconds``."""
    records: list[dict] = []
    for i, bs in enumerate(cfg.batch_sizes):
        share = (cfg.budget_seconds - (time.perf_counter() - start)) / (len(cfg.batch_sizes) - i)
        timed = []
        for c in (c for c in pool if c.batch_size == bs):
            records.append(_record(c, accuracy[c.accuracy_key], ref_acc, cfg.max_drop))
            if records[-1]["status"] == "measured":
                bar.set_description(f"batch {bs}: load {c.label}")
                timed += _load(c, batches[c.file], records[-1])
        bar.update(cfg.rounds - _race(timed, time.perf_counter() + share, cfg, bar))
    return records


def _accuracy(c: Candidate, batch, truth, chunk: int) -> tuple[float | None, str, str | None]:
    """(top-1 or None, why it could not run, the precision that ran or None)."""
    try:
        with c.create() as b:
            return float(np.mean(top1(b, batch, chunk) == truth)), "", b.precision
    except Exception as e:  # noqa: BLE001 -- recorded with its reason, shown in the table
        return None, _reason(e), None


def _preprocessed(images, infos: dict) -> dict:
    """file -> its preprocessed batch of ``images``; files that preprocess alike (an fp32
    file and its fp16/int8 variants) share one array."""
    done: dict[tuple, np.ndarray] = {}
    out = {}
    for f, info in infos.items():
        key = (info.spec, tuple(info.mean), tuple(info.std), info.resize_size)
        if key not in done:
            done[key] = preprocess(images, info)
        out[f] = done[key]
    return out


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"


def _record(c: Candidate, accuracy: tuple, ref_acc: float, max_drop: float) -> dict:
    """The candidate's record before timing: status measured (to be timed), failed or
    rejected, with why, and the precision its accuracy check ran in (a rejected bf16
    candidate says bf16)."""
    top, why, precision = accuracy
    delta = None if top is None else round((top - ref_acc) * 100, 4)
    status = "failed" if top is None else "measured"
    if delta is not None and delta < -max_drop:
        status, why = "rejected", f"top-1 {delta:+.2f} points (at most -{max_drop} allowed)"
    return {
        "batch_size": c.batch_size, "backend": c.backend, "file": c.file, "options": c.opts,
        "precision": precision, "settings": None, "accuracy": top, "accuracy_delta_points": delta,
        "p50_ms": None, "p99_ms": None, "throughput_ips": None, "rounds": 0,
        "status": status, "why": why,
    }  # fmt: skip


@dataclass
class _Timed:
    record: dict
    backend: backends.Backend
    batch: np.ndarray
    rounds: list[list[float]] = field(default_factory=list)  # ms per run, per round


def _load(c: Candidate, images: np.ndarray, record: dict) -> list[_Timed]:
    """[the loaded, warmed-up candidate], or [] with the record marked failed."""
    batch = np.resize(images, (c.batch_size, *images.shape[1:]))  # repeats when too few
    backend = c.create()
    try:
        backend.load()
        for _ in range(1 + WARMUP_ITERS):
            backend.run(batch)
    except Exception as e:  # noqa: BLE001 -- recorded with its reason, shown in the table
        backend.close()
        record.update(status="failed", why=_reason(e))
        return []
    record.update(precision=backend.precision, settings=backend.describe())
    return [_Timed(record, backend, batch)]


def _race(alive: list[_Timed], deadline: float, cfg: TuneConfig, bar) -> int:
    """Interleaved rounds until ``cfg.rounds`` or the deadline (after one round at
    least), pruning as the module says; fills the records; returns the rounds run."""
    done = 0
    try:
        while alive and done < cfg.rounds and (done == 0 or time.perf_counter() < deadline):
            left = max(deadline - time.perf_counter(), 0.0)
            slot = left / ((cfg.rounds - done) * len(alive))
            bar.set_description(f"batch {len(alive[0].batch)}: round {done + 1}, {len(alive)} left")
            shift = done % len(alive)
            for t in alive[shift:] + alive[:shift]:
                t.rounds.append(_timed_round(t.backend, t.batch, slot, cfg.iters))
            done += 1
            bar.update(1)
            for t in alive:
                _summarize(t.record, t.rounds)
            alive = _prune(alive, done, deadline - time.perf_counter(), cfg)
    finally:
        for t in alive:
            t.backend.close()
    return done


def _prune(alive: list[_Timed], done: int, left: float, cfg: TuneConfig) -> list[_Timed]:
    """The candidates that go on after round ``done``; the others are closed and marked."""
    medians = {id(t): float(np.median(t.rounds[-1])) for t in alive}
    best = min(medians.values())
    kept = sorted(alive, key=lambda t: medians[id(t)])
    drop = {}
    if done == 1:
        for t in kept:
            if medians[id(t)] > cfg.prune_ratio * best:
                drop[id(t)] = f"pruned after round 1: {medians[id(t)] / best:.1f}x the best p50"
        kept = [t for t in kept if id(t) not in drop]
    # Successive halving: the least the remaining rounds cost must fit in the time left.
    while len(kept) > 1 and (cfg.rounds - done) * MIN_ITERS * sum(
        medians[id(t)] / 1e3 for t in kept
    ) > left:  # fmt: skip
        half = (len(kept) + 1) // 2
        for t in kept[half:]:
            drop[id(t)] = f"pruned after round {done} to fit the budget (slower half)"
        kept = kept[:half]
    for t in alive:
        if id(t) in drop:
            t.record.update(status="pruned", why=drop[id(t)])
            t.backend.close()
    return [t for t in alive if id(t) not in drop]


def _timed_round(backend, batch, slot: float, iters: int) -> list[float]:
    samples: list[float] = []
    backend.run(batch)  # untimed: see "Each turn opens" in the module docstring
    start = time.perf_counter()
    while len(samples) < MIN_ITERS or (len(samples) < iters and time.perf_counter() - start < slot):
        t = time.perf_counter()
        backend.run(batch)
        samples.append((time.perf_counter() - t) * 1e3)
    return samples


def _summarize(record: dict, rounds: list[list[float]]) -> None:
    p50 = float(np.median([np.median(r) for r in rounds]))
    record.update(
        p50_ms=p50,
        p99_ms=float(np.percentile(np.concatenate(rounds), 99)),
        throughput_ips=record["batch_size"] * 1000.0 / p50,
        rounds=len(rounds),
    )


def _choose(records: list[dict]) -> list[dict]:
    """Per batch size, the measured record with the lowest p50, marked ``chosen``."""
    chosen = []
    for bs in sorted({r["batch_size"] for r in records}):
        measured = [r for r in records if r["batch_size"] == bs and r["status"] == "measured"]
        if measured:
            best = min(measured, key=lambda r: r["p50_ms"])
            best.update(status="chosen", why="lowest p50 within the accuracy budget")
            chosen.append(best)
    return chosen


def _entry(r: dict) -> PlanEntry:
    return PlanEntry(**{f: r[f] for f in PlanEntry.__dataclass_fields__})
