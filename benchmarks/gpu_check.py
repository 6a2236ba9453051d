"""The GPU check: one prepared run for a lent H100/H200, inside the device's 600 s a command.

    python benchmarks/gpu_check.py [--budget-seconds 480] [--out PATH] [--only PATTERN ...]
    python benchmarks/gpu_check.py --dry-run     # the steps in order; touches no GPU

The run is a plan, a list of steps in order of value. Each step runs only while the budget
lasts (its estimate must fit in what is left); one that does not fit, or whose inputs
(the export, the reference) are missing, is recorded as skipped with the reason. The JSON
is rewritten atomically (temp file + os.replace) before and after every step, so a run
cut off at the device's limit keeps every finished step, and the step it was in says
``running`` (``cut off`` when SIGTERM or Ctrl-C stopped it).

1. ``tests:runtime``: ``pytest tests/runtime -m gpu`` (the GPU backends' tests, the
   conformance suite's included), capped at a third of the budget.
2. ``export``: ResNet-50 at 224 px (random weights, non-trivial BatchNorm statistics)
   exported by convforge, fp32 (+ ``.pt2``) and fp16; its time counts against the budget.
3. ``reference``: torch fp32 (TF32 off) logits of 256 fixed random inputs. Every later
   step reports the top-1 agreement of its backend with these, on the same inputs.
4. ``tensorrt`` fp16, then ``ort-trt`` fp16: an engine built for batch 1 (min = opt =
   max = 1) timed at batch 1, then one built for 256 timed at 256. Batch-1 verdicts come
   only from engines tuned for batch 1.
5. ``ort-cuda`` fp16 without, then with CUDA graphs, at batch 1 and 256.
6. ``torch`` fp16 + channels_last + CUDA graphs at batch 1 and 256, also end to end with
   fp16 host inputs (half the bytes to copy; on the same instance, no reload).
7. fp32: ``tensorrt`` (TF32 off) and ``ort-trt`` (TensorRT's TF32 stays on there: its
   agreement shows what that costs) at 256, ``ort-cuda`` (TF32 off) at 1 and 256.
8. The ``torch.compile`` configurations (slowest to load; no fp16 host-input rerun).
9. ``tests:other``: every other GPU test (the trainer's), last.

Between steps: ``gc.collect()`` and ``torch.cuda.empty_cache()``. Timings are end to end
(host<->device copies included) and compute-only (the batch staged on the GPU); the goals
on an H100/H200 (compute-only): batch 1 at <= 0.7 ms, batch 256 at >= 15,000 images/s.
``--only`` runs the steps matching its patterns (``'ort-*'``, ``'torch*'``) and the steps
they need, for a second call on the same warm machine (its engine caches are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
GOAL_BATCH1_MS = 0.7
GOAL_BATCH256_IPS = 15_000.0
AGREEMENT_INPUTS = 256  # fixed random inputs every backend's top-1 is compared on
AGREEMENT_SEED = 1234
# One engine per verdict: min = opt = max, so TensorRT tunes for the batch it is judged at.
B1 = {"min_batch": 1, "opt_batch": 1, "max_batch": 1}
B256 = {"min_batch": 256, "opt_batch": 256, "max_batch": 256}


@dataclass
class Step:
    """One step of the plan: ``action(state)`` returns what it measured (a dict merged into
    the step's JSON entry); ``needs`` names the earlier steps it cannot run without,
    ``uses`` those it reads when they ran (``--only`` selects both); ``estimate_s`` is what
    it must find left in the budget to start."""

    name: str
    estimate_s: float
    action: Callable[[State], dict]
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    describe: dict = field(default_factory=dict)  # backend/file/options/batches, for the JSON


@dataclass
class State:
    """What the steps share: the budget's end, the exported files, the reference logits,
    the records so far. ``folder`` holds the exported files."""

    budget_end: float
    folder: Path
    start: float = field(default_factory=time.perf_counter)
    files: dict[str, Path] = field(default_factory=dict)
    inputs: object = None  # float32 [AGREEMENT_INPUTS, 3, 224, 224]
    reference: object = None  # torch fp32 logits for ``inputs``
    records: list[dict] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_end - time.perf_counter()


# -- the plan ----------------------------------------------------------------------------


def build_plan() -> list[Step]:
    """Every step, in the order they run (by value: what only a GPU can answer first)."""
    plan = [
        Step("tests:runtime", 90, _tests(["tests/runtime"], share=1 / 3)),
        Step("export", 60, _export),
        Step("reference", 20, _reference, needs=("export",)),
    ]
    for name in ("tensorrt", "ort-trt"):
        plan += [
            _bench(f"{name} fp16 b1", name, "fp16", B1, (1,), estimate=90),
            _bench(f"{name} fp16 b256", name, "fp16", B256, (256,), estimate=120),
        ]
    plan += [
        _bench("ort-cuda fp16", "ort-cuda", "fp16", {}, (1, 256), estimate=30),
        _bench("ort-cuda fp16 cuda-graph", "ort-cuda", "fp16", {"cuda_graph": True}, (1, 256)),
        _bench("torch fp16 cl graphs", "torch", "fp32", _torch(cuda_graphs=True), (1, 256)),
        _bench("tensorrt fp32 b256", "tensorrt", "fp32", B256, (256,), estimate=120),
        _bench("ort-trt fp32 b256", "ort-trt", "fp32", B256, (256,), estimate=120),
        _bench("ort-cuda fp32", "ort-cuda", "fp32", {}, (1, 256), estimate=30),
        _bench("torch fp16 cl compile", "torch", "fp32", _torch(compile=True), (1, 256), 90),
        _bench(
            "torch bf16 cl compile", "torch", "fp32", _torch("bf16", compile=True), (1, 256), 90
        ),
        _bench(
            "torch fp16 cl compile graphs",
            "torch",
            "fp32",
            _torch(compile=True, cuda_graphs=True),
            (1, 256),
            90,
        ),
        Step("tests:other", 120, _tests(["tests", "--ignore=tests/runtime"], share=1.0)),
    ]
    return plan


def select(plan: list[Step], patterns: list[str]) -> list[Step]:
    """The steps matching any of ``patterns`` (fnmatch) and every step they need, in plan
    order; the whole plan when there are no patterns."""
    if not patterns:
        return plan
    by_name = {s.name: s for s in plan}
    wanted = {s.name for s in plan if any(fnmatch.fnmatch(s.name, p) for p in patterns)}
    todo = list(wanted)
    while todo:
        step = by_name[todo.pop()]
        for need in step.needs + step.uses:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [s for s in plan if s.name in wanted]


def _torch(dtype: str = "fp16", **flags) -> dict:
    return {"device": "cuda", "dtype": dtype, "channels_last": True, **flags}


def _bench(
    title: str,
    backend: str,
    file: str,
    options: dict,
    batches: tuple[int, ...],
    estimate: float = 30,
) -> Step:
    """A timing step of ``backend`` on the ``file`` export (fp32/fp16) at ``batches``."""
    return Step(
        title,
        estimate,
        lambda state: bench_step(state, backend, file, options, batches),
        needs=("export",),
        uses=("reference",),
        describe={"backend": backend, "file": file, "options": options, "batches": batches},
    )


# -- running it --------------------------------------------------------------------------


def run_plan(plan: list[Step], state: State, result: dict, out: Path, dry_run: bool) -> dict:
    """Run ``plan`` in order, recording each step in ``result["steps"]`` and rewriting
    ``out`` before and after each. A step that raises is ``failed`` (the next one runs);
    KeyboardInterrupt/SystemExit mark it ``cut off``, are written, and propagate."""
    entries = [{"name": s.name, **s.describe, "status": "pending"} for s in plan]
    result["steps"] = entries
    write_json(out, result)
    for step, entry in zip(plan, entries, strict=True):
        if dry_run:
            entry.update(status="dry-run", estimate_s=step.estimate_s)
            write_json(out, result)
            continue
        done = {e["name"] for e in entries if e["status"] == "done"}
        missing = [n for n in step.needs if n not in done]
        if missing:
            entry.update(status="skipped", why=f"needs {', '.join(missing)}, which did not run")
        elif state.left() < step.estimate_s:
            why = f"over the time budget ({state.left():.0f} s left, needs ~{step.estimate_s:.0f})"
            entry.update(status="skipped", why=why)
        else:
            _run_step(step, entry, state, result, out)
        write_json(out, result)
    return result


def _run_step(step: Step, entry: dict, state: State, result: dict, out: Path) -> None:
    entry.update(status="running", started_at_s=round(time.perf_counter() - state.start, 1))
    write_json(out, result)  # a run killed now still says which step it was in
    t = time.perf_counter()
    try:
        entry.update(step.action(state))
        entry["status"] = "done"
    except Exception as e:  # noqa: BLE001 (one failing step is a result, the next one runs)
        lines = str(e).strip().splitlines()
        entry.update(status="failed", why=f"{type(e).__name__}: {lines[0] if lines else ''}")
    except BaseException:
        entry.update(status="cut off", why="the run was stopped during this step")
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - t, 1)
        result["records"] = state.records
        result["verdicts"] = verdicts(state.records)
        write_json(out, result)
        _free_gpu_memory()
    print(f"[{entry['seconds']:6.1f} s] {step.name}: {entry['status']}", flush=True)


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` atomically: a reader (or a kill) sees the previous file
    or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _free_gpu_memory() -> None:
    """What one step held goes back before the next (torch's cache included)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the steps ---------------------------------------------------------------------------


def _tests(paths: list[str], share: float) -> Callable[[State], dict]:
    def run(state: State) -> dict:
        limit = max(30.0, min(state.left() * share, state.left() - 30))
        command = [sys.executable, "-m", "pytest", *paths, "-m", "gpu", "-q", "-rs"]
        command += ["-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            out, code = out or "", f"timeout after {limit:.0f} s"
        lines = [line for line in out.splitlines() if line.strip()]
        summary = lines[-1] if lines else ""
        return {"command": " ".join(command[2:]), "exit_code": code, "summary": summary,
                "tail": lines[-40:]}  # fmt: skip

    return run


def _export(state: State) -> dict:
    """ResNet-50 fp32 (+ .pt2) and its fp16 variant, with convforge's exporter."""
    import onnx
    import torch

    from convforge import contract
    from convforge.builder import create_model
    from convforge.export import export_onnx
    from convforge.export.onnx_export import serialize
    from convforge.export.precision import to_fp16

    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.2)
    info = contract.metadata(
        arch="resnet50",
        classes=[str(i) for i in range(1000)],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        input_size=224,
        resize_size=256,
        channels=3,
        source_sha256="",
    )
    fp32 = state.folder / "resnet50.onnx"
    export_onnx(model, fp32, input_size=(3, 224, 224), metadata=info)
    fp16 = state.folder / "resnet50.fp16.onnx"
    fp16.write_bytes(serialize(to_fp16(onnx.load(fp32))))
    state.files.update(fp32=fp32, fp16=fp16)
    return {"files": {k: p.name for k, p in state.files.items()}}


def _reference(state: State) -> dict:
    """torch fp32 (TF32 off) logits of the agreement inputs: what every backend is
    compared with."""
    from convforge.contract import read_info
    from convforge.runtime import backends, bench

    path = state.files["fp32"]
    rng = np.random.default_rng(AGREEMENT_SEED)
    state.inputs = bench.random_batch(rng, read_info(path).spec, AGREEMENT_INPUTS)
    backend = backends.create("torch", str(path), device="cuda", dtype="fp32", tf32=False)
    with backend:
        state.reference = np.asarray(backend.run(state.inputs), dtype=np.float32)
    return {"inputs": AGREEMENT_INPUTS, "by": "torch fp32 cuda, TF32 off"}


def bench_step(state: State, name: str, file: str, options: dict, batches: tuple[int, ...]) -> dict:
    """Time backend ``name`` on the ``file`` export at ``batches`` (one instance per batch
    size where an instance runs one size only), and measure its top-1 agreement with the
    reference on the first instance. Appends the records to ``state.records``."""
    from convforge.runtime import backends, bench

    ok, why = backends.backend_class(name).available()
    if not ok:
        raise RuntimeError(f"{name} is not available here: {why}")
    path = str(state.files[file])
    cfg = bench.BenchConfig(
        batch_sizes=batches, warmup_iters=10, warmup_seconds=0.5, iters=30, seconds=1.0
    )
    half_host = name == "torch" and options.get("dtype") == "fp16" and not options.get("compile")
    summary, agreement, instances = [], [], []

    def keep(rows: list[dict]) -> None:  # at once: a later failure keeps these on disk
        for r in rows:
            state.records.append({**r, "options": options, "file": file})
            summary.append(
                f"b{r['batch_size']} {r['timing']}: p50 {r['p50_ms']:.3f} ms, "
                f"{r['throughput_ips']:.0f} images/s"
            )
            print(f"  {name} {file} {summary[-1]}", flush=True)

    def each(backend, batch, rows: list[dict]) -> None:
        # bench's own per-size measurement, so these numbers mean what bench's do
        keep(rows)
        if half_host:  # on this instance: a compiled program would recompile
            keep([_fp16_host_input(backend, batch, cfg)])
        if not instances:
            instances.append(backend)  # the first instance: agreement is measured on it
        last = backend.single_batch_size or len(batch) == max(batches)
        if backend is instances[0] and last:  # after its last batch size
            agreement.append(top1_agreement(state, backend, len(batch)))

    bench.bench_backend(name, path, cfg, each, **options)
    return {"records": len(summary), "summary": summary,
            "agreement": agreement[0] if agreement else None}  # fmt: skip


def _fp16_host_input(backend, batch, cfg) -> dict:
    """End to end with a float16 host batch: what halving the host-to-device copy buys."""
    from convforge.runtime import bench

    half = batch.astype("float16")
    backend.run(half)
    samples = bench.timed(lambda: backend.run(half), cfg)
    return {
        **backend.describe(),
        "batch_size": len(batch),
        "timing": "end-to-end, fp16 host input",
        **bench.latency_stats(samples, len(batch)),
    }


def top1_agreement(state: State, backend, chunk: int) -> dict | None:
    """Top-1 agreement of ``backend`` with the torch fp32 reference on the same inputs,
    run ``chunk`` at a time (an instance's batch size); None without a reference."""
    if state.reference is None:
        return None
    dtype = backend.input_dtypes[0]  # an fp16-input file takes float16
    outputs = []
    try:
        for start in range(0, len(state.inputs), chunk):
            part = np.ascontiguousarray(state.inputs[start : start + chunk], dtype=dtype)
            if len(part) < chunk and backend.single_batch_size:
                break  # a captured graph runs its own size only
            outputs.append(np.asarray(backend.run(part), dtype=np.float32))
    except Exception as e:  # noqa: BLE001 (the timings stand without it)
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
    logits = np.concatenate(outputs)
    return agreement_of(state.reference[: len(logits)], logits)


def agreement_of(reference, logits) -> dict:
    """``top1``: the fraction of inputs whose arg-max class matches the reference's;
    ``max_abs_diff``: the largest logit difference."""
    same = np.argmax(reference, axis=1) == np.argmax(logits, axis=1)
    return {
        "inputs": len(same),
        "top1": round(float(same.mean()), 4),
        "max_abs_diff": round(float(np.abs(reference - logits).max()), 4),
    }


# -- verdicts ----------------------------------------------------------------------------


def verdicts(records: list[dict]) -> dict:
    """The best compute-only batch-1 p50 and batch-256 throughput, each only from a
    configuration built for that batch: an engine profile tuned for another batch
    (``opt_batch``) does not count."""

    def best(batch: int, key: str, pick):
        rows = [
            r
            for r in records
            if r["batch_size"] == batch
            and r["timing"] == "compute-only"
            and r["options"].get("opt_batch", batch) == batch
        ]
        if not rows:
            return None
        r = pick(rows, key=lambda r: r[key])
        return {"value": round(r[key], 3), "backend": r["backend"], "options": r["options"],
                "file": r["file"], "precision": r.get("precision")}  # fmt: skip

    b1 = best(1, "p50_ms", min)
    b256 = best(256, "throughput_ips", max)
    return {
        "batch1_p50_ms": b1,
        "batch1_goal_ms": GOAL_BATCH1_MS,
        "batch1_met": b1 is not None and b1["value"] <= GOAL_BATCH1_MS,
        "batch256_images_per_s": b256,
        "batch256_goal_ips": GOAL_BATCH256_IPS,
        "batch256_met": b256 is not None and b256["value"] >= GOAL_BATCH256_IPS,
    }


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON (rewritten per step)")
    parser.add_argument("--budget-seconds", type=float, default=480.0)
    parser.add_argument(
        "--only", action="append", default=[], metavar="PATTERN",
        help="run the steps matching PATTERN (fnmatch; repeatable) and those they need",
    )  # fmt: skip
    parser.add_argument("--skip-tests", action="store_true", help="leave out the pytest steps")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the steps in order and write the JSON "
        "skeleton after each, touching no GPU",
    )  # fmt: skip
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    plan = select(build_plan(), args.only)
    if args.skip_tests:
        plan = [s for s in plan if not s.name.startswith("tests:")]
    result: dict = {
        "budget_seconds": args.budget_seconds,
        "dry_run": args.dry_run,
        "plan": [s.name for s in plan],
    }
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check needs a CUDA device (--dry-run lists the steps without one)")
        result.update(_environment())
    for i, step in enumerate(plan, 1):
        print(f"{i:2d}. {step.name} (~{step.estimate_s:.0f} s)", flush=True)
    # A command stopped with SIGTERM (a timeout) becomes SystemExit, so the step in flight
    # is written as cut off before the process ends. SIGKILL leaves it "running".
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = State(budget_end=start + args.budget_seconds, folder=Path(tmp), start=start)
            result.update(records=state.records, verdicts=verdicts(state.records))
            run_plan(plan, state, result, out, args.dry_run)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.dry_run:
        print(json.dumps(result["verdicts"], indent=2))
    print(f"wrote {out}")
    return 0


def _environment() -> dict:
    """The machine, library versions and GPU stack this run measured."""
    from convforge.runtime import gpu_stack
    from convforge.runtime.environment import environment

    return {"environment": environment(), "gpu_stack": gpu_stack.report().as_dict()}


if __name__ == "__main__":
    sys.exit(main())
