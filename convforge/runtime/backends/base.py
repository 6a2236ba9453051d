"""The backend lifecycle every runtime backend shares (Polygraphy-runner style).

    backend = OrtCpu("model.onnx", threads=2)   # cheap: stores settings only
    ok, why = backend.available()               # is the package/device here? if not, why
    backend.load()                              # builds/compiles; may be slow
    logits = backend.run(batch)                 # float32 [N, C, H, W] -> float32 [N, K]
    backend.close()

or ``with OrtCpu(path) as b: b.run(x)`` (load on enter, close on exit).
:meth:`Backend.run` checks the batch (dtype, rank, channels, spatial size,
non-empty) against the model's declared input before handing it to the
backend, so a wrong input is a clear UserError, never a backend traceback.
Heavy libraries are imported inside each backend's methods, never at module
level: ``convforge.runtime`` imports without torch, onnxruntime or TensorRT.
"""

from __future__ import annotations

import numpy as np

from convforge.contract import InputSpec
from convforge.errors import UserError

__all__ = ["Backend", "BackendUnavailable", "InputSpec", "check_batch"]


class BackendUnavailable(UserError):
    """The requested backend cannot run here; the message says why. Never a silent fallback."""


class Backend:
    """Base class: subclasses set ``name`` and implement the ``_``-prefixed hooks."""

    name: str = "base"  # the name used in the CLI and in JSON records, e.g. "ort-cpu"

    def __init__(self, path: str, **options) -> None:
        self.path = str(path)
        self.options = options
        self.spec: InputSpec | None = None  # set by load()
        self.precision: str = "fp32"  # the precision that actually runs (set by load)
        self._loaded = False

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this backend can run on this machine, else (False, why not)."""
        raise NotImplementedError

    def load(self) -> Backend:
        """Build the engine/session (may be slow). Raises BackendUnavailable if it cannot run."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        self.spec = self._load()
        self._loaded = True
        return self

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32 [N, K]) for ``batch`` (float32 [N, C, H, W], preprocessed)."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before run()")
        check_batch(batch, self.spec)
        return self._run(np.ascontiguousarray(batch))

    def close(self) -> None:
        if self._loaded:
            self._close()
        self._loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What ran: backend, precision and backend-specific settings (for bench records)."""
        return {"backend": self.name, "precision": self.precision}

    # -- hooks -----------------------------------------------------------------------------

    def _load(self) -> InputSpec:
        raise NotImplementedError

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        pass


def check_batch(batch, spec: InputSpec) -> None:
    """UserError naming what is wrong when ``batch`` does not fit ``spec``."""
    if not isinstance(batch, np.ndarray):
        raise UserError(f"input must be a numpy array, got {type(batch).__name__}")
    if batch.dtype != np.float32:
        raise UserError(f"input must be float32, got {batch.dtype}")
    expected = f"[N, {spec.channels}, {spec.height}, {spec.width}]"
    if batch.ndim != 4:
        raise UserError(f"input must be a 4-D batch {expected}, got shape {list(batch.shape)}")
    n, c, h, w = batch.shape
    if n == 0:
        raise UserError("input batch is empty")
    if c != spec.channels:
        raise UserError(f"model takes {spec.channels}-channel images {expected}, got {c} channels")
    if (h, w) != (spec.height, spec.width):
        raise UserError(f"model takes {spec.height}x{spec.width} images {expected}, got {h}x{w}")
