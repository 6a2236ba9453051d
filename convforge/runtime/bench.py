"""``convforge bench``: latency and throughput per backend x batch size, honestly measured.

For each backend and batch size: load (build/compile time recorded apart),
one first inference (timed apart: it pays lazy initialization), warm-up
(``warmup_iters`` and at least ``warmup_seconds``), then the measured run
(``iters`` and at least ``seconds``). Each iteration is one synchronous
``run`` of a fixed random batch: end to end, host<->device copies included
on GPUs. Backends that can keep inputs on the device (those declaring
:class:`~.backends.DeviceResident`) are measured a second time compute-only,
and the record says which (``timing``: ``end-to-end`` or ``compute-only``).
A backend whose instance runs one batch size only (``single_batch_size``,
e.g. a captured CUDA graph) gets a fresh instance per batch size.

Every record is flat (``backend``, ``precision``, ``batch_size``, ``timing``,
``p50_ms`` ... ``throughput_ips``) and carries the environment it ran in.
A coefficient of variation above 10% marks the record ``unstable``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import read_info
from convforge.errors import UserError
from convforge.files import atomic_write
from convforge.runtime import backends
from convforge.runtime.evaluate import accuracy
from convforge.runtime.model import load
from convforge.settings import setting

UNSTABLE_CV = 0.10  # std / mean above this is flagged
PERCENTILES = (50, 90, 95, 99)


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = setting((1, 8, 32), "batch sizes to measure", minimum=1)
    warmup_iters: int = setting(10, "warm-up runs, at least ...", minimum=0)
    warmup_seconds: float = setting(1.0, "... lasting at least this many seconds", minimum=0)
    iters: int = setting(50, "measured runs, at least ...", minimum=1)
    seconds: float = setting(2.0, "... lasting at least this many seconds", minimum=0)
    seed: int = setting(0, "seed of the random input batches", minimum=0)


def latency_stats(samples_ms: list[float], batch_size: int) -> dict:
    """mean/std/min/percentiles/max in ms, throughput in images/s, cv, unstable flag."""
    if not samples_ms:
        raise ValueError("no samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    stats = {
        "iterations": len(a),
        "mean_ms": mean,
        "std_ms": std,
        "min_ms": float(a.min()),
        **{f"p{q}_ms": float(np.percentile(a, q)) for q in PERCENTILES},
        "max_ms": float(a.max()),
        "throughput_ips": batch_size * 1000.0 / float(np.median(a)),
        "cv": std / mean if mean > 0 else 0.0,
    }
    stats["unstable"] = stats["cv"] > UNSTABLE_CV
    return stats


def timed(fn, cfg: BenchConfig) -> list[float]:
    """Warm-up, then the measured calls of ``fn``: milliseconds per call."""
    start = time.perf_counter()
    done = 0
    while done < cfg.warmup_iters or time.perf_counter() - start < cfg.warmup_seconds:
        fn()
        done += 1
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < cfg.iters or time.perf_counter() - start < cfg.seconds:
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return samples


def bench_backend(
    name: str, path: str, cfg: BenchConfig, each=None, overrides=None, **options
) -> list[dict]:
    """Records for one backend over ``cfg.batch_sizes``. ``each(backend, batch, records)``,
    if given, is called with each batch size's records while its instance is still loaded
    (a benchmark keeps them at once, or adds its own measurements on that instance).
    ``overrides``: the :class:`~convforge.overrides.ModelOverrides` the file is read with."""
    first = backends.create(name, path, overrides=overrides, **options)
    if first.single_batch_size:
        groups = [(bs,) for bs in cfg.batch_sizes]
    else:
        groups = [tuple(cfg.batch_sizes)]
    rng = np.random.default_rng(cfg.seed)
    records = []
    for i, sizes in enumerate(groups):
        backend = first if i == 0 else backends.create(name, path, overrides=overrides, **options)
        t = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - t
        try:
            for bs in sizes:
                batch = random_batch(rng, backend.spec, bs)
                rows = _bench_size(backend, batch, load_s, cfg)
                records += rows
                if each is not None:
                    each(backend, batch, rows)
        finally:
            backend.close()
    return records


def _bench_size(backend, batch: np.ndarray, load_s: float, cfg: BenchConfig) -> list[dict]:
    bs = len(batch)
    t = time.perf_counter()
    backend.run(batch)
    first_ms = (time.perf_counter() - t) * 1e3
    base = {
        **backend.describe(),
        "batch_size": bs,
        "load_s": round(load_s, 3),
        "first_inference_ms": round(first_ms, 3),
    }
    samples = timed(lambda: backend.run(batch), cfg)
    records = [{**base, "timing": "end-to-end", **latency_stats(samples, bs)}]
    if backend.device_resident:
        backend.stage(batch)
        samples = timed(backend.run_device_resident, cfg)
        records.append({**base, "timing": "compute-only", **latency_stats(samples, bs)})
    return records


def bench_matrix(
    models: list[str],
    names: list[str] | None,
    cfg: BenchConfig,
    options: dict[str, dict] | None = None,
    labelled: tuple[list, list[int]] | None = None,
    skip_failures: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
    overrides=None,
) -> tuple[list[dict], list[str]]:
    """Records for every model file x backend x batch size, and what was skipped, why.

    ``names``: the backends to run; each must run every file (a failure is
    raised, unless ``skip_failures``: then it is skipped with the reason, as
    the pipeline's report lists). ``None``: every backend available here; one
    that cannot run a file is skipped with the reason. A file that is not an
    image classifier (several inputs, outputs of any shape) is timed on random
    inputs of its declared types with :func:`bench_graph` (``shapes`` sets its
    dynamic dims; no accuracy, no batch sizes). ``options[name]`` go to backend ``name``
    for the timing and the accuracy alike. ``labelled`` (raw images, labels)
    adds each record's ``top1_accuracy``. ``overrides`` (a
    :class:`~convforge.overrides.ModelOverrides`: ``--mean``, ``--labels``, ...) win over
    each file's metadata. UserError when nothing ran.
    """
    options = options or {}
    skipped: list[str] = []
    explicit = names is not None
    if not explicit:
        backends.check_onnxruntime_builds()
        names = []
        for name in backends.BACKENDS:
            ok, why = backends.backend_class(name).available()
            (names.append(name) if ok else skipped.append(f"{name} ({why})"))
    records = []
    for path in models:
        why = _not_a_classifier(path, overrides)
        if why is None:
            sizes = _sizes_that_fit(path, cfg.batch_sizes, skipped, overrides)
            if not sizes:
                continue
            run = functools.partial(_bench_classifier, path=path, labelled=labelled,
                                    cfg=dataclasses.replace(cfg, batch_sizes=sizes),
                                    overrides=overrides)  # fmt: skip
        else:
            from convforge.runtime.any_graph import graph_inputs, random_feeds

            # A shape mistake is the user's, not a backend's: said once, before any runs.
            random_feeds(graph_inputs(path), shapes or {}, np.random.default_rng(0), path)
            run = functools.partial(bench_graph, path=path, cfg=cfg, shapes=shapes or {})
            if labelled is not None:
                skipped.append(f"accuracy on {Path(path).name} (not an image classifier: {why})")
        for name in names:
            try:
                rs = run(name, **options.get(name, {}))
            except UserError as e:
                if explicit and not skip_failures:
                    raise
                skipped.append(f"{name} on {path} ({e})")
                continue
            records += [{"model": str(path), **r} for r in rs]
    if not records:
        raise UserError("no backend could run: " + "; ".join(skipped))
    return records, skipped


def _bench_classifier(
    name: str, path: str, cfg: BenchConfig, labelled, overrides=None, **options
) -> list[dict]:
    """bench_backend's records, each with its top-1 on ``labelled`` when given."""
    records = bench_backend(name, path, cfg, overrides=overrides, **options)
    if labelled is None:
        return records
    with load(path, backend=name, overrides=overrides, **options) as model:
        acc = accuracy(model, *labelled)
    return [{**r, "top1_accuracy": acc} for r in records]


def bench_graph(name: str, path: str, cfg: BenchConfig, shapes: dict, **options) -> list[dict]:
    """One record: backend ``name`` on any ONNX graph, fed random inputs of its declared
    types and shapes (:mod:`convforge.runtime.any_graph`; ``shapes`` sets dynamic dims).
    ``batch_size`` is the first dimension of the first input."""
    from convforge.runtime.any_graph import graph_inputs, random_feeds

    feeds = random_feeds(graph_inputs(path), shapes, np.random.default_rng(cfg.seed), path)
    backend = backends.create(name, path, **options)
    t = time.perf_counter()
    backend.load_graph()
    load_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        backend.run_feeds(feeds)
        first_ms = (time.perf_counter() - t) * 1e3
        samples = timed(lambda: backend.run_feeds(feeds), cfg)
        first_input = next(iter(feeds.values()), np.zeros(()))
        bs = first_input.shape[0] if first_input.ndim else 1
        return [{
            **backend.describe(),
            "batch_size": bs,
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "load_s": round(load_s, 3),
            "first_inference_ms": round(first_ms, 3),
            "timing": "end-to-end",
            **latency_stats(samples, bs),
        }]  # fmt: skip
    finally:
        backend.close()


def _not_a_classifier(path: str, overrides=None) -> str | None:
    """Why ``path`` is not an image classifier convforge can feed images, or None if it is
    (or cannot be read: the backends then say why)."""
    if not Path(path).is_file() or Path(path).suffix != ".onnx":
        return None
    try:
        read_info(path, overrides)
    except UserError as e:
        return str(e)
    return None


def _sizes_that_fit(path: str, sizes: tuple[int, ...], skipped: list[str],
                    overrides=None) -> tuple[int, ...]:  # fmt: skip
    """The batch sizes a file takes (all but those a fixed batch dimension refuses, each
    noted in ``skipped``); a file that cannot be read is left to the backends to report."""
    try:
        spec = read_info(path, overrides).spec
    except UserError:
        return sizes
    for bs in sizes:
        if not spec.takes(bs):
            skipped.append(
                f"batch {bs} on {Path(path).name} (its batch dimension is fixed at {spec.batch})"
            )
    return tuple(bs for bs in sizes if spec.takes(bs))


def random_batch(rng: np.random.Generator, spec, n: int) -> np.ndarray:
    """``n`` random inputs in the file's input format (``spec``, an InputSpec): standard
    normal float32 [n, C, H, W], or uint8 pixels [n, H, W, C] for a uint8-input file."""
    if spec.dtype == "uint8":
        return rng.integers(0, 256, spec.shape(n), dtype=np.uint8)
    return rng.standard_normal(spec.shape(n)).astype(spec.dtype)


def compare(records: list[dict], baseline: list[dict], threshold: float) -> list[dict]:
    """Records whose p50 is more than ``threshold`` (0.1 = 10%) slower than the baseline's."""
    key = ("backend", "precision", "batch_size", "timing")
    base = {tuple(r.get(k) for k in key): r for r in baseline}
    regressions = []
    for r in records:
        old = base.get(tuple(r.get(k) for k in key))
        if old and r["p50_ms"] > old["p50_ms"] * (1 + threshold):
            regressions.append(
                {
                    **{k: r[k] for k in key},
                    "p50_ms": r["p50_ms"],
                    "baseline_p50_ms": old["p50_ms"],
                    "slowdown": r["p50_ms"] / old["p50_ms"],
                }
            )
    return regressions


def read_records(path) -> list[dict]:
    """A bench JSON file's records (a list, or {"records": [...]})."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read baseline {path}: {e}") from None
    records = data["records"] if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise UserError(f"{path} holds no list of bench records")
    return records


def write_json(path, records: list[dict], env: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump({"environment": env, "records": records}, f, indent=2)


def write_csv(path, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def format_table(records: list[dict]) -> str:
    from convforge.console import format_table as table

    rows = [
        [
            r["backend"],
            r["precision"],
            r["timing"],
            r["batch_size"],
            round(r["p50_ms"], 3),
            round(r["p90_ms"], 3),
            round(r["p99_ms"], 3),
            round(r["mean_ms"], 3),
            round(r["throughput_ips"], 1),
            "unstable" if r["unstable"] else "",
        ]
        for r in records
    ]
    headers = [
        "backend",
        "precision",
        "timing",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "images/s",
        "",
    ]
    return table(headers, rows)


def plot(path, records: list[dict]) -> None:
    """PNG: p50 latency vs batch size per backend (left), latency histograms (right)."""
    from convforge.plots import pyplot, save_png

    plt = pyplot()
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(13, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["backend"], r["precision"], r["timing"], Path(r.get("model", "")).name)
        groups.setdefault(key, []).append(r)
    files = list(dict.fromkeys(k[3] for k in groups))
    # One colour per backend x precision x timing, one line style per file.
    colours = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(k[:3] for k in groups))}
    styles = ("-", "--", ":", "-.")
    for (backend, precision, timing, name), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["batch_size"])
        label = f"{backend} {precision}" + (" (compute)" if timing == "compute-only" else "")
        label += f", {name}" if len(files) > 1 else ""
        bs = [r["batch_size"] for r in rs]
        style = {"marker": "o", "label": label, "color": colours[(backend, precision, timing)],
                 "linestyle": styles[files.index(name) % len(styles)]}  # fmt: skip
        ax_lat.plot(bs, [r["p50_ms"] for r in rs], **style)
        ax_tp.plot(bs, [r["throughput_ips"] for r in rs], **style)
    sizes = sorted({r["batch_size"] for r in records})
    for ax, ylabel in ((ax_lat, "p50 latency (ms)"), (ax_tp, "throughput (images/s)")):
        ax.set(xlabel="batch size", ylabel=ylabel, xscale="log")
        ax.set_xticks(sizes, [str(s) for s in sizes])  # the sizes run, not 2x10^0
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    ax_tp.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    save_png(fig, path)


def bench_plan(plan, cfg: BenchConfig, labelled=None, overrides=None) -> list[dict]:
    """Bench records of ``plan``'s configuration at each of ``cfg.batch_sizes`` (the entry
    closest to each), like :func:`bench_matrix`'s, plus
    ``plan_batch_size``; ``labelled`` (raw images, labels) adds ``top1_accuracy``;
    ``overrides`` as :func:`bench_matrix` takes them."""
    records = []
    for bs in cfg.batch_sizes:
        entry = plan.entry(bs)
        plan.check_file(entry)
        one = dataclasses.replace(cfg, batch_sizes=(bs,))
        rs = bench_backend(entry.backend, entry.file, one, overrides=overrides, **entry.options)
        if labelled is not None:
            with load(entry.file, entry.backend, overrides=overrides, **entry.options) as model:
                acc = accuracy(model, *labelled)
            rs = [{**r, "top1_accuracy": acc} for r in rs]
        records += [{"model": entry.file, "plan_batch_size": entry.batch_size, **r} for r in rs]
    return records
