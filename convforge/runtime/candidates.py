"""What ``convforge tune`` tries: each backend's settings that matter, as option sets.

    pool, skipped = candidates(["m.onnx", "m.int8.onnx"], batch_sizes=(1, 8))

A :class:`Candidate` is one backend x file x option set x batch size; its
options are exactly what :func:`convforge.runtime.backends.create` gets. Each
backend says which option sets are worth timing
(:meth:`~convforge.runtime.backends.base.Backend.tune_variants`) and which of
its options change numerics (``numeric_options``): candidates that differ only
in others (threads, hints, profiles, CUDA graphs) share one accuracy check.

Every lowered precision (bf16, tf32, fp16 casts) is an explicit option, so each
gets its own accuracy check and the plan names it; a backend's defaults compute
the file's own precision. One exception: ort-trt runs an fp32 file in TF32,
which ONNX Runtime's TensorRT provider cannot turn off, so there is no option
for it; the backend labels its precision ``tf32`` and the plan says so, after
the accuracy check every candidate gets (one per file).

GPU option sets appear only when the backend (``torch``: its CUDA device) is
available. A backend that is not available is left out with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convforge.contract import read_info
from convforge.overrides import ModelOverrides
from convforge.runtime import backends
from convforge.runtime.backends.options import PROFILE_OPTIONS


@dataclass(frozen=True)
class Candidate:
    """One configuration to time: :meth:`create` (``backends.create(backend, file, **opts)``)
    at ``batch_size``."""

    backend: str
    file: str
    batch_size: int
    options: tuple[tuple[str, object], ...]  # sorted (key, value): hashable
    overrides: ModelOverrides | None = None  # what the file is read with (--mean, ...)

    def create(self) -> backends.Backend:
        """This configuration's backend, not loaded yet."""
        return backends.create(self.backend, self.file, overrides=self.overrides, **self.opts)

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def accuracy_key(self) -> tuple:
        numeric = backends.backend_class(self.backend).numeric_options
        return self.backend, self.file, tuple((k, v) for k, v in self.options if k in numeric)

    @property
    def label(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend} {Path(self.file).name} {settings}".strip()


def candidates(files, batch_sizes, names=None, overrides=None) -> tuple[list[Candidate], list[str]]:
    """Every (backend, file, options, batch size) worth timing, and the backends left out
    with why. ``names``: the backends to try (default: every one, if available here);
    an unknown name is a UserError listing the names. ``overrides`` (a
    :class:`~convforge.overrides.ModelOverrides`) win over each file's metadata."""
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
            info = read_info(path, overrides)
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
                for opts in cls.tune_variants(bs, batch_sizes, fp32):
                    if info.spec.batch is not None:  # TensorRT builds for that batch alone
                        opts = {k: v for k, v in opts.items() if k not in PROFILE_OPTIONS}
                    options = tuple(sorted(opts.items()))
                    out.append(Candidate(name, str(path), bs, options, overrides))
    return out, skipped
