"""TensorRT backend: ONNX -> serialized engine (cached on disk) -> execute_async_v3, no torch.

    with TensorRT("model.fp16.onnx", max_batch=32) as b:
        logits = b.run(batch)             # end to end: host -> GPU -> host
        b.stage(batch); b.run_device_resident(); b.fetch()   # compute-only timing
        out = b.run_device(cuda_tensor)   # a torch CUDA tensor in, zero-copy (torch optional)

The engine is built from the file and cached by :mod:`.tensorrt_engine` for one
optimization profile over the batch range of the file's input (the shared
:class:`~.options.BatchProfile`; a file whose batch dimension is fixed at b gets (b, b,
b), and a batch option that says otherwise is a UserError); precision comes from the ONNX
itself, never from builder flags. An int8 file whose Q/DQ is not symmetric int8 (the
``cpu`` export target: uint8 activations with zero points) is refused before the build
(:attr:`~.base.Backend.symmetric_int8_only`): TensorRT's parser rejects non-zero zero
points.

Checked at every step, since TensorRT reports failure by return value, not exception:
``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return False on
failure; each is checked. Tensor addresses must be device memory with at least 256-byte
alignment (``IExecutionContext::setTensorAddress``): this backend's own buffers come from
``cudaMalloc``; a caller's torch tensor is checked before binding. TensorRT needs an
address for every I/O tensor: outputs other than the class scores (the file's ``output``)
go to scratch buffers.

Device memory and the stream come from cuda-python (``cuda.bindings.runtime``, or
``cuda.cudart`` before cuda-python 12.6.1), which the ``tensorrt`` extra installs:
torch is not needed. Each instance has its own non-blocking stream, device buffers and
page-locked (pinned) host staging buffers, grown on demand in powers of two of rows, so
``run`` is two DMA copies and the engine queued on one stream with one synchronization.
:meth:`TensorRT.sibling` makes another instance for another thread that shares the
deserialized engine (one execution context each, as TensorRT's thread-safety rules ask);
the engine goes when the last instance sharing it closes. Each thread that uses an
instance sets CUDA's current device to ``device_id`` first.

Engines are cached under ``~/.cache/convforge/tensorrt/`` (option ``cache_dir``), keyed
by :func:`~.tensorrt_engine.engine_cache_key` (sha256 of the ONNX bytes, GPU name,
TensorRT version, profile). TensorRT and cuda-python are imported only inside functions.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import ModelInfo
from convforge.errors import UserError
from convforge.extras import extra_hint
from convforge.runtime.backends.base import (
    Backend,
    BackendUnavailable,
    DeviceResident,
    InputSpec,
    tune_profile,
)
from convforge.runtime.backends.cuda_runtime import (
    ALIGNMENT,
    Allocation,
    check_device_tensor,
    cuda_call,
    cudart,
)
from convforge.runtime.backends.options import BatchProfile
from convforge.runtime.backends.tensorrt_engine import EngineSpec, SharedEngine, load_engine
from convforge.settings import setting

# Where TensorRT comes from: the tensorrt extra's hint names NVIDIA's package index (PyPI has
# the bindings only as wheels; its tensorrt packages are source distributions that fetch the
# libraries from NVIDIA's index while installing), or a JetPack or NGC container image.
WHERE = extra_hint("tensorrt")
INSTALL_HINT = f"tensorrt is not installed: {WHERE}"
DEFAULT_CACHE_DIR = "~/.cache/convforge/tensorrt"


def tensorrt_import_error() -> str | None:
    """None when ``import tensorrt`` works, else why not in one line, with where to get it.

    Tells "not installed" from "installed but does not load": TensorRT's Python package
    imports its native libraries (``libnvinfer.so.N``) as it loads, so bindings without
    them (a ``tensorrt-cu*-bindings`` wheel alone, a wheel for another CUDA or TensorRT
    major) fail with the loader's message, which is kept.
    """
    try:
        import tensorrt  # noqa: F401

        return None
    except ModuleNotFoundError as e:
        if e.name != "tensorrt":
            error = e  # the package is there; something it imports is not
        elif importlib.util.find_spec("tensorrt_bindings") is None:
            return INSTALL_HINT
        else:  # the bindings wheel's module, without the tensorrt package around it
            try:
                import tensorrt_bindings  # noqa: F401
            except Exception as inner:  # noqa: BLE001 (the loader raises ImportError/OSError)
                error = inner
            else:
                return f"tensorrt_bindings is installed without the tensorrt package: {WHERE}"
    except Exception as e:  # noqa: BLE001 (ImportError from the loader, OSError from ctypes)
        error = e
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"tensorrt's Python bindings are installed but do not load ({reason}): {WHERE}"


def bind(context, name: str, address: int) -> None:
    """``set_tensor_address`` for ``name``; RuntimeError if TensorRT refuses it."""
    if address % ALIGNMENT:
        raise UserError(
            f"tensor {name!r} at address {address:#x} is not {ALIGNMENT}-byte aligned, as "
            "TensorRT requires; pass a tensor that starts its own allocation"
        )
    if not context.set_tensor_address(name, address):
        raise RuntimeError(f"TensorRT refused the address of tensor {name!r} (see its log)")


def set_shape(context, name: str, shape: tuple[int, ...]) -> None:
    """``set_input_shape`` for the model input ``name``; UserError if TensorRT rejects it."""
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise UserError(f"TensorRT rejected input shape {list(shape)} (see its log)")


class TensorRT(Backend, DeviceResident):
    name = "tensorrt"
    library = "tensorrt"
    extra = "tensorrt"
    gpu = True
    numeric_options = ("tf32",)
    symmetric_int8_only = True  # TensorRT's parser rejects non-zero zero points

    @dataclass(frozen=True)
    class Options(BatchProfile):
        cache_dir: str = setting(DEFAULT_CACHE_DIR, "engine and timing caches")
        device_id: int = setting(0, "CUDA device", minimum=0)
        tf32: bool = setting(False, "let fp32 layers use TF32 (TensorRT's default; off: fp32)")

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.profile = self.options.profile(self.name)  # (b, b, b) on load for a fixed batch
        self.cache_dir = Path(self.options.cache_dir).expanduser()
        self.device_id = self.options.device_id
        self.engine_path: Path | None = None
        self.cache_hit: bool | None = None
        self.build_seconds: float | None = None
        self.trt_version: str | None = None
        self.gpu_name: str | None = None
        self._rt = None  # cuda-python runtime module
        self._shared: SharedEngine | None = None
        self._context = None
        self._stream = None
        self._output_name: str | None = None  # the class scores, among the engine's outputs
        self._dtypes: dict[str, np.dtype] = {}  # every I/O tensor (input first)
        self._device: dict[str, Allocation] = {}  # this instance's device buffer per tensor
        self._host_in: Allocation | None = None  # pinned staging, input
        self._host_out: Allocation | None = None  # pinned staging, class scores
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # batch -> tensor shapes
        self._shape_n: int | None = None  # the batch size the context's input shape is for
        self._bound: dict[str, int] = {}  # tensor -> the address the context holds
        self._staged: int | None = None
        self._thread = threading.local()  # .device_set: cudaSetDevice done in this thread

    # -- availability ----------------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        why = tensorrt_import_error()
        if why:
            return False, why
        try:
            rt = cudart()
        except ImportError:
            return False, f"cuda-bindings (cuda-python) is not installed: {WHERE}"
        try:
            count = cuda_call(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except RuntimeError as e:
            return False, f"no CUDA device: {e}"
        if not count:
            return False, "no CUDA device: cudaGetDeviceCount() is 0"
        return True, ""

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """A TensorRT profile tuned for each batch size and, on an fp32 file, TF32 on and
        off. fp16 and int8 engines come from the fp16/int8 files given: precision is the
        file's, never an option."""
        profile = tune_profile(batch_size, batch_sizes)
        return [{**profile, "tf32": t} for t in ((False, True) if fp32 else (False,))]

    # -- load ------------------------------------------------------------------------------

    def _load(self, info: ModelInfo) -> InputSpec:
        import tensorrt as trt

        self._input_name = info.input_name  # from the graph (torch's default is input.1)
        self.profile = self.options.for_file(self.name, info, self._given)
        if self.options.tf32 and info.precision == "fp32":
            self.precision = "tf32"
        rt = self._rt = cudart()
        self._on_device()
        props = cuda_call(rt, rt.cudaGetDeviceProperties(self.device_id), "device properties")
        name = props.name
        self.gpu_name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\0")
        self.trt_version = trt.__version__
        want = EngineSpec(
            self.path, info.input_name, info.spec, self.profile, self.options.tf32, self.gpu_name
        )
        cached = load_engine(trt, want, self.cache_dir)
        self.engine_path, self.cache_hit = cached.path, cached.hit
        self.build_seconds = cached.build_seconds
        self._io_tensors(trt, cached.shared.engine, info)
        self._shared = cached.shared
        self._open_context()
        return info.spec

    def _io_tensors(self, trt, engine, info: ModelInfo) -> None:
        """The engine's I/O names and numpy dtypes, and which output holds the class scores
        (the file's, as read_info chose it; any other output is bound to a scratch buffer,
        since TensorRT needs an address for every I/O tensor)."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self._input_name] or info.output_name not in outputs:
            raise BackendUnavailable(
                f"{self.name} expected the input {self._input_name!r} and an output "
                f"{info.output_name!r} in the engine for {self.path}; it has inputs {inputs} "
                f"and outputs {outputs}"
            )
        self._output_name = info.output_name
        dtypes = {}
        for n in [*inputs, *outputs]:
            trt_type = engine.get_tensor_dtype(n)
            try:
                dtypes[n] = np.dtype(trt.nptype(trt_type))
            except TypeError:  # bf16, fp8, int4: no numpy type to stage or return them in
                raise BackendUnavailable(
                    f"{self.name} cannot return tensor {n!r} of {self.path}: its type "
                    f"{trt_type} has no numpy equivalent"
                ) from None
        self._dtypes = dtypes

    def _open_context(self) -> None:
        """This instance's execution context (from the shared engine), its own stream and
        its buffers (allocated on first use): what an instance does not share."""
        rt = self._rt
        self._on_device()
        self._context = self._shared.new_context()
        # Non-blocking: no implicit synchronization with the legacy default stream, which
        # other libraries in the process (or another instance's plain cudaMemcpy) may use.
        self._stream = cuda_call(
            rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"
        )
        self._device = {n: Allocation(rt) for n in self._dtypes}
        self._host_in, self._host_out = Allocation(rt, pinned=True), Allocation(rt, pinned=True)

    def sibling(self) -> TensorRT:
        """Another loaded instance for another thread, sharing this one's deserialized engine
        (and runtime) with its own execution context, stream and buffers: ``serve
        --instances N`` deserializes one engine, not N. Call it in the thread that will run
        the new instance: it sets CUDA's current device there. The engine is released when
        the last instance sharing it is closed."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before sibling()")
        other = type(self)(self.path, overrides=self.overrides, **self._given)
        for attr in ("info", "spec", "precision", "profile", "engine_path", "cache_hit",
                     "build_seconds", "trt_version", "gpu_name", "_input_name", "_output_name",
                     "_dtypes", "_rt", "_shared"):  # fmt: skip
            setattr(other, attr, getattr(self, attr))
        try:
            other._open_context()
        except BaseException:
            other._close()
            raise
        other._loaded = True
        return other

    # -- run -------------------------------------------------------------------------------

    def _on_device(self) -> None:
        """``cudaSetDevice(device_id)`` once in each thread that uses this instance: CUDA's
        current device is per thread, and TensorRT launches its kernels on the current one."""
        if not getattr(self._thread, "device_set", False):
            cuda_call(self._rt, self._rt.cudaSetDevice(self.device_id), "cudaSetDevice")
            self._thread.device_set = True

    def _check_batch_size(self, n: int) -> None:
        lo, _, hi = self.profile
        if not lo <= n <= hi:
            raise UserError(
                f"batch of {n} is outside the TensorRT profile [{lo}, {hi}] (min_batch..max_batch);"
                f" rebuild with max_batch={n} or send smaller batches"
            )

    def _shapes_for(self, n: int) -> dict[str, tuple[int, ...]]:
        """Set the context's input shape for a batch of ``n``; every I/O tensor's shape."""
        if self._shape_n != n:
            set_shape(self._context, self._input_name, self.spec.shape(n))
            self._shape_n = n
        if n not in self._shapes:
            ctx = self._context
            shapes = {
                name: tuple(int(d) for d in ctx.get_tensor_shape(name)) for name in self._dtypes
            }
            for name, shape in shapes.items():
                if any(d < 0 for d in shape):
                    raise UserError(
                        f"{self.path}: output {name!r} has a data-dependent shape "
                        f"{list(shape)}, which the tensorrt backend does not run"
                    )
            self._shapes[n] = shapes
        return self._shapes[n]

    def _rows(self, n: int) -> int:
        """Rows to allocate for a batch of ``n``: the next power of two, up to max_batch, so
        that a batcher sending every size from 1 to 32 reallocates a few times, not 32."""
        return max(n, min(self.profile[2], 1 << (n - 1).bit_length()))

    def _prepare(self, n: int, addresses: dict[str, int] | None = None) -> tuple[int, ...]:
        """Shape the context for a batch of ``n`` and bind every I/O tensor: to
        ``addresses`` (name -> device pointer, a caller's tensors) where given, else to this
        instance's device buffers, grown to fit (cudaMalloc aligns to 256 bytes or more).
        Returns the class scores' shape."""
        shapes = self._shapes_for(n)
        given = addresses or {}
        rows = self._rows(n)
        for name, shape in shapes.items():
            address = given.get(name)
            if address is None:
                nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
                address = self._device[name].reserve(nbytes * rows // n)
            if self._bound.get(name) != address:
                bind(self._context, name, address)
                self._bound[name] = address
        return shapes[self._output_name]

    def _copy_in(self, batch: np.ndarray) -> None:
        """Queue ``batch`` -> pinned staging -> device input buffer on this stream."""
        n = batch.shape[0]
        host, dtype = self._host_in, self._dtypes[self._input_name]
        host.reserve(batch.size * dtype.itemsize * self._rows(n) // n)
        staged = host.array(dtype, batch.shape)
        np.copyto(staged, batch, casting="same_kind")
        rt = self._rt
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        x = self._device[self._input_name].ptr
        cuda_call(rt, rt.cudaMemcpyAsync(x, host.ptr, staged.nbytes, kind, self._stream),
                  "host-to-device copy")  # fmt: skip

    def _copy_out(self, n: int, out_shape: tuple[int, ...]) -> np.ndarray:
        """Queue device scores -> pinned staging; the staging view (valid after a sync)."""
        host = self._host_out
        dtype = self._dtypes[self._output_name]
        host.reserve(int(np.prod(out_shape)) * dtype.itemsize * self._rows(n) // n)
        out = host.array(dtype, out_shape)
        rt = self._rt
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        y = self._device[self._output_name].ptr
        cuda_call(rt, rt.cudaMemcpyAsync(out.ctypes.data, y, out.nbytes, kind, self._stream),
                  "device-to-host copy")  # fmt: skip
        return out

    def _execute(self) -> None:
        """Queue the engine on this stream (the context's shape and addresses are set)."""
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")

    def _sync(self) -> None:
        cuda_call(self._rt, self._rt.cudaStreamSynchronize(self._stream), "stream sync")

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` into this backend's device input buffer (see DeviceResident)."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before stage()")
        self.check(batch)
        n = batch.shape[0]
        self._check_batch_size(n)
        self._on_device()
        self._prepare(n)
        self._copy_in(batch)
        self._sync()
        self._staged = n

    def run_device_resident(self) -> None:
        """Run on the staged batch: GPU compute and the closing synchronization only."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: call stage(batch) before run_device_resident()")
        self._on_device()
        self._prepare(self._staged)
        self._execute()
        self._sync()

    def fetch(self) -> np.ndarray:
        """The logits of the last staged run, copied to the host (float32 [N, K])."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: nothing has run yet")
        self._on_device()
        n = self._staged
        out = self._copy_out(n, self._prepare(n))
        self._sync()
        return np.array(out, dtype=np.float32)  # a copy: the staging buffer is reused

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """End to end with one synchronization: pinned host -> device, the engine, device ->
        pinned host, queued in order on this instance's stream."""
        n = batch.shape[0]
        self._check_batch_size(n)
        self._on_device()
        out_shape = self._prepare(n)
        self._copy_in(batch)
        self._execute()
        out = self._copy_out(n, out_shape)
        self._sync()
        self._staged = n
        return np.array(out, dtype=np.float32)  # a copy: the staging buffer is reused

    def run_device(self, batch):
        """Zero-copy: ``batch`` is a torch CUDA tensor [N, C, H, W] of the engine's input
        dtype on this backend's device, contiguous and 256-byte aligned (each checked);
        returns the logits as a new CUDA tensor, synchronized. Needs torch only here."""
        import torch

        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before run_device()")
        check_device_tensor(batch, self.device_id, self._dtypes[self._input_name])
        n = int(batch.shape[0])
        self._check_batch_size(n)
        self._on_device()
        out_shape = self._shapes_for(n)[self._output_name]
        out_dtype = getattr(torch, self._dtypes[self._output_name].name)
        out = torch.empty(out_shape, dtype=out_dtype, device=batch.device)
        # the caller's input and a new output tensor; any other output goes to scratch
        self._prepare(n, {self._input_name: batch.data_ptr(), self._output_name: out.data_ptr()})
        torch.cuda.current_stream(batch.device).synchronize()  # the input is written
        self._execute()
        self._sync()
        return out

    def _close(self) -> None:
        rt = self._rt
        previous = None  # the calling thread's device, put back at the end
        if rt is not None and not getattr(self._thread, "device_set", False):
            # closed from a thread that never ran this instance: free on its device
            err, *current = rt.cudaGetDevice()
            if err == rt.cudaError_t.cudaSuccess and current[0] != self.device_id:
                previous = current[0]
                rt.cudaSetDevice(self.device_id)  # unchecked: close is best effort
        counted = self._context is not None  # new_context() counted it
        self._context = None  # before its engine, and before the memory it points at
        if counted and self._shared is not None:
            self._shared.release()
        self._shared = None
        for buffer in (*self._device.values(), self._host_in, self._host_out):
            if buffer is not None:
                buffer.free()
        if rt is not None and self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
        self._device, self._host_in, self._host_out = {}, None, None
        self._shapes, self._bound = {}, {}
        self._shape_n = self._staged = None
        self._stream = None
        if previous is not None:
            rt.cudaSetDevice(previous)

    def describe(self) -> dict:
        d = super().describe()
        lo, opt, hi = self.profile
        d.update(
            tensorrt_version=self.trt_version,
            gpu=self.gpu_name,
            device_id=self.device_id,
            tf32=self.options.tf32,
            profile={"min_batch": lo, "opt_batch": opt, "max_batch": hi},
            engine_cache_hit=self.cache_hit,
            build_seconds=None if self.build_seconds is None else round(self.build_seconds, 3),
            engine=str(self.engine_path) if self.engine_path else None,
        )
        return d


__all__ = ["TensorRT", "bind", "set_shape", "tensorrt_import_error"]
