"""The backend lifecycle every runtime backend shares (Polygraphy-runner style).

    backend = OrtCpu("model.onnx", threads=2)   # cheap: parses and checks the options
    ok, why = backend.available()               # is the package/device here? if not, why
    backend.load()                              # builds/compiles; may be slow
    logits = backend.run(batch)                 # float32 [N, C, H, W] -> float32 [N, K]
    other = backend.sibling()                   # another loaded instance, for another thread
    backend.close()                             # idempotent

or ``with OrtCpu(path) as b: b.run(x)`` (load on enter, close on exit).

Each backend declares its options once, as a dataclass ``Options`` of typed
fields (:mod:`.options`); the constructor parses what it is given into
``self.options`` or raises a one-line UserError. :meth:`Backend.run` checks
the batch (type, dtype, rank, channels, spatial size, non-empty) against the
model's declared input before the backend sees it. What a backend can do
beyond ``run`` is declared, not probed: :class:`DeviceResident` for backends
that keep a batch on the device (the bench's compute-only timing), and
:attr:`Backend.single_batch_size` for instances that run one batch size only.
Heavy libraries are imported inside each backend's methods, never at module
level: ``convforge.runtime`` imports without torch, onnxruntime or TensorRT.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from convforge.contract import InputSpec
from convforge.errors import UserError
from convforge.runtime.backends.options import NoOptions, parse_options

__all__ = ["Backend", "BackendUnavailable", "DeviceResident", "InputSpec", "check_batch"]


class BackendUnavailable(UserError):
    """The requested backend cannot run here; the message says why. Never a silent fallback."""


class Backend:
    """Base class: subclasses set ``name`` and ``Options`` and implement the ``_`` hooks."""

    name: str = "base"  # the name used in the CLI and in JSON records, e.g. "ort-cpu"
    Options: type = NoOptions  # a frozen dataclass of setting() fields (see .options)
    device_resident: bool = False  # True: stage/run_device_resident/fetch (DeviceResident)
    suffixes: tuple[str, ...] = (".onnx",)  # the files it runs
    fp32_only: bool = False  # True: runs fp32 files only (tune leaves the others out)

    def __init__(self, path: str, **options) -> None:
        self.path = str(path)
        self.options = parse_options(self.Options, options, self.name)
        self._given = dict(options)  # as given: for sibling(), and which options were set
        self.spec: InputSpec | None = None  # set by load()
        self.info = None  # the file's ModelInfo, for backends that read it in load()
        self.precision: str = "fp32"  # the precision that actually runs (set by load)
        self._loaded = False

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this backend can run on this machine, else (False, why not)."""
        raise NotImplementedError

    @classmethod
    def reads(cls, path: str) -> list[str]:
        """The files a run of ``path`` reads, ``path`` first: what a plan hashes, since
        they decide what runs (the torch backend adds the ``.pt2`` program it runs)."""
        return [str(path)]

    @classmethod
    def runs(cls, path: str) -> bool:
        """Whether this backend runs files like ``path`` (by suffix: .onnx, .pt2)."""
        return Path(path).suffix in cls.suffixes

    @property
    def input_dtypes(self) -> tuple[type, ...]:
        """The numpy dtypes :meth:`run` takes (float32; a half-precision engine may take
        float16 too, halving the host-to-device copy; a file whose input format is uint8
        takes uint8 pixels only)."""
        if self.spec is not None and self.spec.dtype in ("uint8", "float16"):
            return (np.dtype(self.spec.dtype).type,)  # the graph's own input type
        return (np.float32,)

    @property
    def single_batch_size(self) -> bool:
        """True when a loaded instance runs one batch size only (e.g. a captured CUDA graph):
        whoever runs several sizes needs one instance per size."""
        return False

    def load(self) -> Backend:
        """Build the engine/session (may be slow). Raises BackendUnavailable if it cannot run;
        a failed load releases whatever it had acquired."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        if not self.runs(self.path):
            raise UserError(
                f"{self.name} runs {' and '.join(self.suffixes)} files, got {self.path}"
            )
        try:
            self.spec = self._load()
        except BaseException:
            self._close()
            raise
        self._loaded = True
        return self

    def sibling(self) -> Backend:
        """Another loaded instance of this backend for another thread: same file, same
        options (as given to this one's constructor).

        Call it on a loaded instance, in the thread that will run the new one (serve's
        runner threads do: CUDA state such as the current device is per thread). The
        default creates and loads a fresh one; a backend whose loaded state several threads
        can share (a TensorRT engine, one execution context each) overrides it.
        """
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before sibling()")
        return type(self)(self.path, **self._given).load()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32 [N, K]) for ``batch``: float32 [N, C, H, W], preprocessed, or
        uint8 [N, H, W, C] pixels for a file whose input format is uint8 (``self.spec``)."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before run()")
        self.check(batch)
        return self._run(np.ascontiguousarray(batch))

    def check(self, batch) -> None:
        """UserError naming what is wrong when ``batch`` does not fit the loaded model."""
        check_batch(batch, self.spec, self.input_dtypes)

    def close(self) -> None:
        """Release the engine/session; calling it again (or before load) does nothing."""
        if self._loaded:
            self._close()
        self._loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    def load_graph(self) -> Backend:
        """Load any ONNX graph, not only an image classifier, for :meth:`run_feeds` (the
        latency of detection or segmentation models, several inputs: bench --shapes).
        Backends without :meth:`_load_graph` say so in one line."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        try:
            self._load_graph()
        except BaseException:
            self._close()
            raise
        self._loaded = True
        return self

    def run_feeds(self, feeds: dict) -> list:
        """Every output, for ``feeds`` (input name -> array), after :meth:`load_graph`."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What ran: backend, precision and backend-specific settings (for bench records)."""
        return {"backend": self.name, "precision": self.precision}

    # -- hooks -----------------------------------------------------------------------------

    def _load(self) -> InputSpec:
        raise NotImplementedError

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _load_graph(self) -> None:
        raise UserError(
            f"{self.name} runs image classifiers only; ort-cpu and openvino run any ONNX graph"
        )

    def _close(self) -> None:
        pass


class DeviceResident(abc.ABC):
    """A backend that can keep a batch on its device, for compute-only timing.

    Mixed into a Backend it sets ``device_resident``, which the bench reads (a
    backend that is device-resident only on some devices overrides it).

    :meth:`stage` copies a batch to the device once; :meth:`run_device_resident`
    then runs on it with no host<->device copies (launch, device compute and
    the synchronization that ends the run); :meth:`fetch` copies the logits
    of the last run to the host.
    """

    device_resident = True

    @abc.abstractmethod
    def stage(self, batch: np.ndarray) -> None: ...

    @abc.abstractmethod
    def run_device_resident(self) -> None: ...

    @abc.abstractmethod
    def fetch(self) -> np.ndarray: ...


def check_batch(batch, spec: InputSpec, dtypes=(np.float32,)) -> None:
    """UserError naming what is wrong when ``batch`` does not fit ``spec`` and ``dtypes``."""
    if not isinstance(batch, np.ndarray):
        raise UserError(f"input must be a numpy array, got {type(batch).__name__}")
    if batch.dtype not in dtypes:
        accepted = " or ".join(np.dtype(d).name for d in dtypes)
        raise UserError(f"input must be {accepted}, got {batch.dtype}")
    expected = "[N, " + ", ".join(map(str, spec.sample_shape)) + f"] ({spec.layout})"
    if batch.ndim != 4:
        raise UserError(f"input must be a 4-D batch {expected}, got shape {list(batch.shape)}")
    n = batch.shape[0]
    h, w, c = batch.shape[1:] if spec.layout == "NHWC" else (*batch.shape[2:], batch.shape[1])
    if n == 0:
        raise UserError("input batch is empty")
    if not spec.takes(n):
        raise UserError(
            f"model takes batches of exactly {spec.batch} (its batch dimension is fixed), got {n}"
        )
    if c != spec.channels:
        raise UserError(f"model takes {spec.channels}-channel images {expected}, got {c} channels")
    if (h, w) != (spec.height, spec.width):
        raise UserError(f"model takes {spec.height}x{spec.width} images {expected}, got {h}x{w}")
