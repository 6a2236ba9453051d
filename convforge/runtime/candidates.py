"""What ``convforge tune`` tries: each backend's settings that matter, as option sets.

    pool, skipped = candidates(["m.onnx", "m.int8.onnx"], batch_sizes=(1, 8))

A :class:`Candidate` is one backend x file x option set x batch size; its
options are exactly what :func:`convforge.runtime.backends.create` gets.
:data:`VARIANTS` says, per backend, which option sets are worth timing:

* ort-cpu: threads (all physical cores, the default, and 1) x graph
  optimization level (all, basic);
* openvino: the LATENCY and THROUGHPUT performance hints, each in f32 and, for
  an fp32 file on a CPU with native bf16, in bf16. Streams and a static-shape
  compile are left out: the backend runs one synchronous infer request, which
  one stream serves, and a static-shape compile per batch size measured no gain
  here (commit 6ea1095 reverted it). bf16 is not tried on fp16 files (the same
  bf16 compute from coarser weights) nor on int8 ones (little left in float);
* torch: the CPU program, contiguous and channels_last, and bf16 (channels_last)
  on a CPU with native bf16; on CUDA fp32 and fp16, with and without CUDA
  graphs; fp32 files only (export writes the .pt2 program for the fp32 model alone);
* ort-cuda: with and without a CUDA graph;
* ort-trt and tensorrt: a TensorRT profile tuned for each batch size (and, for
  tensorrt on an fp32 file, TF32 on and off). fp16 and int8 engines come from
  the fp16/int8 files given: precision is the file's, never an option.

Every lowered precision (bf16, tf32, fp16 casts) is an explicit option here, so
each gets its own accuracy check (``NUMERIC_OPTIONS``) and the plan names it; a
backend's defaults compute the file's own precision. One exception: ort-trt runs
an fp32 file in TF32, which ONNX Runtime's TensorRT provider cannot turn off, so
there is no option for it; the backend labels its precision ``tf32`` and the
plan says so, after the accuracy check every candidate gets (one per file).

GPU option sets appear only when the backend (``torch``: its CUDA device) is
available. A backend that is not available is left out with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convforge.contract import read_info
from convforge.runtime import backends
from convforge.runtime.backends.options import PROFILE_OPTIONS

# Options that can change a backend's results (precision, math mode, graph rewrites);
# candidates differing only in others (threads, hints, profiles, CUDA graphs) share one
# accuracy check.
NUMERIC_OPTIONS = {
    "ort-cpu": ("graph_optimization",),
    "ort-cuda": ("tf32",),
    "ort-trt": (),  # always TF32 on an fp32 file (no switch): one check per file
    "tensorrt": ("tf32",),
    "openvino": ("precision",),
    "torch": ("device", "dtype", "tf32"),
}


@dataclass(frozen=True)
class Candidate:
    """One configuration to time: ``backends.create(backend, file, **opts)`` at ``batch_size``."""

    backend: str
    file: str
    batch_size: int
    options: tuple[tuple[str, object], ...]  # sorted (key, value): hashable

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def accuracy_key(self) -> tuple:
        numeric = NUMERIC_OPTIONS[self.backend]
        return self.backend, self.file, tuple((k, v) for k, v in self.options if k in numeric)

    @property
    def label(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend} {Path(self.file).name} {settings}".strip()


def _cpu_threads() -> list[dict]:
    from convforge.runtime.backends.ort import physical_cores

    return [{}, {"threads": 1}] if physical_cores()[0] > 1 else [{}]


def _trt_profile(bs: int, sizes) -> dict:
    # One engine tuned for this batch (opt) that still takes every planned size.
    return {"min_batch": 1, "opt_batch": bs, "max_batch": max(sizes)}


def _openvino(bs, sizes, fp32) -> list[dict]:
    from convforge.runtime.backends.openvino import native_bf16

    precisions = ("f32", "bf16") if fp32 and native_bf16() else ("f32",)
    return [{"hint": h, "precision": p} for p in precisions for h in ("LATENCY", "THROUGHPUT")]


def _torch(bs, sizes, fp32) -> list[dict]:
    from convforge.runtime.backends.torch_program import native_bf16

    ok_cuda, _ = backends.backend_class("torch").available("cuda")
    out = [{}, {"channels_last": True}]  # the CPU: slow for CNNs, kept so the plan says so
    if native_bf16():  # emulated bf16 is slower than fp32: not worth timing
        out.append({"dtype": "bf16", "channels_last": True})
    if ok_cuda and fp32:  # the .pt2 is fp32 only; dtype casts it on the GPU
        out += [
            {"device": "cuda", "dtype": d, "channels_last": True, "cuda_graphs": g}
            for d in ("fp32", "fp16")
            for g in (False, True)
        ]
    return out


# backend -> (batch size, every batch size, file is fp32) -> the option sets worth timing
VARIANTS = {
    "ort-cpu": lambda bs, sizes, fp32: [
        {**t, "graph_optimization": g} for g in ("all", "basic") for t in _cpu_threads()
    ],
    "openvino": _openvino,
    "torch": _torch,
    "ort-cuda": lambda bs, sizes, fp32: [{"cuda_graph": False}, {"cuda_graph": True}],
    "ort-trt": lambda bs, sizes, fp32: [_trt_profile(bs, sizes)],
    "tensorrt": lambda bs, sizes, fp32: [
        {**_trt_profile(bs, sizes), "tf32": t} for t in ((False, True) if fp32 else (False,))
    ],
}


def candidates(files, batch_sizes, names=None) -> tuple[list[Candidate], list[str]]:
    """Every (backend, file, options, batch size) worth timing, and the backends left out
    with why. ``names``: the backends to try (default: every one, if available here);
    an unknown name is a UserError listing the names."""
    names = list(backends.BACKENDS) if names is None else names
    out, skipped = [], []
    for name in names:
        cls = backends.backend_class(name)
        ok, why = cls.available()
        if not ok:
            skipped.append(f"{name} ({why})")
            continue
        for path in files:
            if not cls.runs(path):
                skipped.append(f"{name} on {Path(path).name} (runs {', '.join(cls.suffixes)})")
                continue
            info = read_info(path)
            precision = info.precision
            fp32 = precision == "fp32"
            if cls.fp32_only and not fp32:
                skipped.append(
                    f"{name} on {Path(path).name} (runs fp32 files; this is {precision})"
                )
                continue
            for bs in batch_sizes:
                if not info.spec.takes(bs):  # a fixed batch dimension: only its own size
                    fixed = info.spec.batch
                    note = f"batch {bs} on {Path(path).name} (its batch is fixed at {fixed})"
                    skipped += [] if note in skipped else [note]
                    continue
                for opts in VARIANTS[name](bs, batch_sizes, fp32):
                    if info.spec.batch is not None:  # TensorRT builds for that batch alone
                        opts = {k: v for k, v in opts.items() if k not in PROFILE_OPTIONS}
                    out.append(Candidate(name, str(path), bs, tuple(sorted(opts.items()))))
    return out, skipped
