"""The backend lifecycle every runtime backend shares (Polygraphy-runner style).

    backend = OrtCpu("model.onnx", threads=2)   # cheap: parses and checks the options
    ok, why = backend.available()               # is the package/device here? if not, why
    backend.load()                              # builds/compiles; may be slow
    logits = backend.run(batch)                 # float32 [N, C, H, W] -> float32 [N, K]
    other = backend.sibling()                   # another loaded instance, for another thread
    backend.close()                             # idempotent

or ``with OrtCpu(path) as b: b.run(x)`` (load on enter, close on exit).

Each backend is one class in one module, registered by one line in
:data:`convforge.runtime.backends.BACKENDS`, and declares what the rest of the
package needs to know about it as class attributes: ``library`` (the module
whose version its speed depends on), ``extra`` (the pip extra that installs
it), ``gpu``, ``numeric_options`` (the options that change its results) and
:meth:`Backend.tune_variants` (the option sets ``convforge tune`` times).
Its options are declared once, as a dataclass ``Options`` of typed fields
(:mod:`.options`); the constructor parses what it is given into
``self.options`` or raises a one-line UserError. :meth:`Backend.load` reads
the file's info once and hands it to ``_load(info)``. :meth:`Backend.run` checks
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

from convforge.contract import InputSpec, ModelInfo, read_info
from convforge.errors import UserError
from convforge.runtime.backends.options import NoOptions, parse_options

__all__ = [
    "Backend",
    "BackendUnavailable",
    "DeviceResident",
    "InputSpec",
    "check_batch",
    "refuse_asymmetric_int8",
    "tune_profile",
]


class BackendUnavailable(UserError):
    """The requested backend cannot run here; the message says why. Never a silent fallback."""


class Backend:
    """Base class: subclasses set ``name``, the facts below and ``Options``, and implement
    the ``_`` hooks."""

    name: str = "base"  # the name used in the CLI and in JSON records, e.g. "ort-cpu"
    # Facts every backend declares (tests/runtime/test_backends.py checks each one does):
    library: str  # the module whose version its speed depends on: a plan records it
    extra: str  # the pip extra(s) that install it, e.g. "cpu", "gpu,tensorrt"
    gpu: bool  # runs on an NVIDIA GPU (choosing it checks the onnxruntime install first)
    numeric_options: tuple[str, ...]  # options that can change results: tune checks the
    # accuracy of each of their values; the others (threads, hints, profiles) share one check
    Options: type = NoOptions  # a frozen dataclass of setting() fields (see .options)
    suffixes: tuple[str, ...] = (".onnx",)  # the files it runs
    fp32_only: bool = False  # True: runs fp32 files only (tune leaves the others out)
    symmetric_int8_only: bool = False  # True: load() refuses other int8 (TensorRT's parser)

    @property
    def device_resident(self) -> bool:
        """Whether this instance can keep a batch on its device (stage/run_device_resident/
        fetch): a backend that mixes in :class:`DeviceResident`; one that is so only on some
        devices overrides this. A property, not a class attribute: ``class B(Backend,
        DeviceResident)`` would find a Backend attribute first, as it once did, and the
        GPU backends went without compute-only timing."""
        return isinstance(self, DeviceResident)

    def __init__(self, path: str, overrides=None, **options) -> None:
        self.path = str(path)
        # what the user says about the file (--mean, --labels, ...): every read_info of it
        self.overrides = overrides  # a convforge.overrides.ModelOverrides, or None
        self.options = parse_options(self.Options, options, self.name)
        self._given = dict(options)  # as given: for sibling(), and which options were set
        self.spec: InputSpec | None = None  # set by load()
        self.info: ModelInfo | None = None  # the file's info, set by load()
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

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """The option sets ``convforge tune`` times at ``batch_size`` (``batch_sizes``: every
        size it times; ``fp32``: the file is fp32): the settings worth trying here, each a
        dict of :attr:`Options` fields. Default: the backend's defaults only."""
        return [{}]

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
        a failed load releases whatever it had acquired.

        The file's info is read once (:meth:`_read_info`), refused here when the backend
        takes symmetric int8 only and the file is other int8, set as :attr:`info` with its
        precision as :attr:`precision` (a backend that runs another one says so in
        ``_load``), and handed to ``_load(info)``, which returns the input spec."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        if not self.runs(self.path):
            raise UserError(
                f"{self.name} runs {' and '.join(self.suffixes)} files, got {self.path}"
            )
        info = self._read_info()
        if self.symmetric_int8_only:
            refuse_asymmetric_int8(self.name, info)
        self.info, self.precision = info, info.precision
        try:
            self.spec = self._load(info)
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
        return type(self)(self.path, overrides=self.overrides, **self._given).load()

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
        self.info = None  # not a classifier: no input spec
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

    def _read_info(self) -> ModelInfo:
        """The info of the file this instance runs, read with :attr:`overrides` (hook: the
        torch backend reads the ``.onnx`` beside its program)."""
        return read_info(self.path, self.overrides)

    def _load(self, info: ModelInfo) -> InputSpec:
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

    Mixed into a Backend it makes ``device_resident`` true, which the bench reads (a
    backend that is device-resident only on some devices overrides it).

    :meth:`stage` copies a batch to the device once; :meth:`run_device_resident`
    then runs on it with no host<->device copies (launch, device compute and
    the synchronization that ends the run); :meth:`fetch` copies the logits
    of the last run to the host.
    """

    @abc.abstractmethod
    def stage(self, batch: np.ndarray) -> None: ...

    @abc.abstractmethod
    def run_device_resident(self) -> None: ...

    @abc.abstractmethod
    def fetch(self) -> np.ndarray: ...


def refuse_asymmetric_int8(backend: str, info: ModelInfo) -> None:
    """BackendUnavailable when ``info`` is an int8 file TensorRT's parser would reject
    (what :attr:`Backend.symmetric_int8_only` asks :meth:`Backend.load` to check).

    TensorRT quantizes symmetrically: every Q/DQ zero point must be an int8 zero.
    convforge's ``--int8-target cpu`` export (uint8 activations with zero points,
    ONNX Runtime's fast CPU scheme) is not; ``--int8-target tensorrt`` is.
    """
    if info.precision != "int8":
        return
    asymmetric = info.int8_symmetric is False or (
        info.int8_symmetric is None and info.int8_target == "cpu"
    )
    if asymmetric:
        what = (
            "an int8 export for the cpu target (uint8 activations with zero points)"
            if info.int8_target == "cpu"
            else "int8 with non-zero or uint8 zero points"
        )
        raise BackendUnavailable(
            f"{backend} cannot run {Path(info.path).name}: it is {what}, which TensorRT "
            "rejects (symmetric int8 only); re-export with --int8-target tensorrt"
        )


def tune_profile(batch_size: int, batch_sizes) -> dict:
    """The batch-profile options (:class:`~.options.BatchProfile`) a TensorRT backend is
    tuned with at ``batch_size``: one engine tuned for that batch (opt) that still takes
    every size in ``batch_sizes``."""
    return {"min_batch": 1, "opt_batch": batch_size, "max_batch": max(batch_sizes)}


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
