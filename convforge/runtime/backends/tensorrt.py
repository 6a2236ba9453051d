"""TensorRT backend: ONNX -> serialized engine (cached on disk) -> execute_async_v3, no torch.

    with TensorRT("model.fp16.onnx", max_batch=32) as b:
        logits = b.run(batch)             # end to end: host -> GPU -> host
        b.stage(batch); b.run_device_resident(); b.fetch()   # compute-only timing
        out = b.run_device(cuda_tensor)   # a torch CUDA tensor in, zero-copy (torch optional)

Build (TensorRT 10.x and 11.x Python API): ``trt.Builder`` -> ``create_network`` ->
``trt.OnnxParser.parse_from_file`` -> one optimization profile over the batch range of
input ``input`` (the shared :class:`~.options.BatchProfile`; C, H, W from the file) ->
``create_builder_config`` with a timing cache kept in the cache dir ->
``build_serialized_network`` -> ``trt.Runtime(logger).deserialize_cuda_engine``.

Precision comes from the ONNX itself (fp16 tensors, or Q/DQ int8 from ``convforge
export --int8-target tensorrt``), never from builder flags: TensorRT 11 removed
``BuilderFlag.FP16``/``INT8`` and always builds strongly typed networks, and TensorRT's
explicit-quantization guide says precision flags "should not be specified" with strong
typing. On 10.x the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
(present since 9.x); on 11.x the flag is deprecated and ignored, so none is passed.
An int8 file whose Q/DQ is not symmetric int8 (the ``cpu`` export target: uint8
activations with zero points) is refused before the build: TensorRT's parser rejects
non-zero zero points.

Checked at every step, since TensorRT reports failure by return value, not exception:
``set_input_shape``, ``set_tensor_address``, ``set_timing_cache`` and ``execute_async_v3``
return False on failure and are checked. An unreadable timing cache is discarded with a
warning and rebuilt. Tensor addresses must be device memory with at least 256-byte
alignment (``IExecutionContext::setTensorAddress``): this backend's own buffers come from
``cudaMalloc``; a caller's torch tensor is checked before binding. One ``trt.Logger``
serves the whole process (TensorRT keeps one logger pointer; a second one makes it log
that the loggers differ).

Device memory and the stream come from cuda-python (``cuda.bindings.runtime``, or
``cuda.cudart`` before cuda-python 12.6.1), which the ``tensorrt`` extra installs:
torch is not needed. Engines are cached under ``~/.cache/convforge/tensorrt/`` (option
``cache_dir``), keyed by :func:`engine_cache_key` (sha256 of the ONNX bytes, GPU name,
TensorRT version, profile) and written atomically. TensorRT and cuda-python are imported
only inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import ModelInfo, read_info
from convforge.errors import UserError
from convforge.runtime.backends.base import Backend, BackendUnavailable, DeviceResident, InputSpec
from convforge.runtime.backends.cuda_runtime import (
    ALIGNMENT,
    check_device_tensor,
    cuda_call,
    cudart,
)
from convforge.runtime.backends.options import BatchProfile
from convforge.settings import setting

INSTALL_HINT = (
    "tensorrt is not installed: pip install 'convforge[tensorrt]' on a machine with an NVIDIA GPU"
)
DEFAULT_CACHE_DIR = "~/.cache/convforge/tensorrt"


def refuse_asymmetric_int8(backend: str, info: ModelInfo) -> None:
    """BackendUnavailable when ``info`` is an int8 file TensorRT's parser would reject.

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


def engine_cache_key(
    onnx_bytes: bytes, gpu_name: str, trt_version: str, profile: tuple[int, int, int]
) -> str:
    """The engine's cache file stem: changes with the model, the GPU, TensorRT and profile."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(onnx_bytes).digest())
    for part in (gpu_name, trt_version, "x".join(str(int(b)) for b in profile)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def network_flags(trt) -> int:
    """create_network flags for this TensorRT: strongly typed on 10.x, none on 11.x."""
    flags_enum = trt.NetworkDefinitionCreationFlag
    major = _major(trt.__version__)
    if major >= 11:
        return 0  # 11.x: always strongly typed and explicit batch; the flags are ignored
    if hasattr(flags_enum, "STRONGLY_TYPED"):
        return 1 << int(flags_enum.STRONGLY_TYPED)
    if major < 10 and hasattr(flags_enum, "EXPLICIT_BATCH"):
        return 1 << int(flags_enum.EXPLICIT_BATCH)
    return 0


@functools.cache
def logger():
    """The process's one ``trt.Logger`` (WARNING): every Builder and Runtime gets this one."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


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


def timing_cache(config, path: Path):
    """A timing cache for ``config`` from ``path``, set on it; an unreadable one is
    discarded with a warning and a fresh one used (the build then re-times its layers)."""
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # noqa: BLE001 (TensorRT raises various types for a corrupt blob)
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        warnings.warn(
            f"discarding the unreadable TensorRT timing cache {path}; it is rebuilt",
            RuntimeWarning,
            stacklevel=2,
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused a new, empty timing cache (see its log)")
    return cache


class TensorRT(Backend, DeviceResident):
    name = "tensorrt"

    @dataclass(frozen=True)
    class Options(BatchProfile):
        cache_dir: str = setting(DEFAULT_CACHE_DIR, "engine and timing caches")
        device_id: int = setting(0, "CUDA device", minimum=0)
        tf32: bool = setting(False, "let fp32 layers use TF32 (TensorRT's default; off: fp32)")

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.profile = self.options.profile(self.name)
        self.cache_dir = Path(self.options.cache_dir).expanduser()
        self.device_id = self.options.device_id
        self.engine_path: Path | None = None
        self.cache_hit: bool | None = None
        self.build_seconds: float | None = None
        self.trt_version: str | None = None
        self.gpu_name: str | None = None
        self._rt = None  # cuda-python runtime module
        self._runtime = None
        self._engine = None
        self._context = None
        self._stream = None
        self._output_name: str | None = None
        self._dtypes: tuple[np.dtype, np.dtype] | None = None  # input, output
        self._buffers: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # n -> in, out, shape
        self._bound: int | None = None  # batch size the context's shape and addresses are for
        self._staged: int | None = None

    # -- availability ----------------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except Exception:  # ImportError, or a broken install failing to load its libraries
            return False, INSTALL_HINT
        try:
            rt = cudart()
        except ImportError:
            return False, "cuda-python is not installed: pip install 'convforge[tensorrt]'"
        try:
            count = cuda_call(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except RuntimeError as e:
            return False, f"no CUDA device: {e}"
        if not count:
            return False, "no CUDA device: cudaGetDeviceCount() is 0"
        return True, ""

    # -- build / load ----------------------------------------------------------------------

    def _load(self) -> InputSpec:
        import tensorrt as trt

        from convforge.files import atomic_write, ensure_dir

        info = read_info(self.path)
        self._input_name = info.input_name  # from the graph (torch's default is input.1)
        refuse_asymmetric_int8(self.name, info)
        tf32 = self.options.tf32 and info.precision == "fp32"
        self.precision = "tf32" if tf32 else info.precision
        rt = self._rt = cudart()
        cuda_call(rt, rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        props = cuda_call(rt, rt.cudaGetDeviceProperties(self.device_id), "device properties")
        name = props.name
        self.gpu_name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\0")
        self.trt_version = trt.__version__

        key = engine_cache_key(
            Path(self.path).read_bytes(),
            self.gpu_name,
            f"{self.trt_version}{'+tf32' if self.options.tf32 else ''}",
            self.profile,
        )
        ensure_dir(self.cache_dir)
        self.engine_path = self.cache_dir / f"{key}.engine"
        if self.engine_path.is_file():
            plan = self.engine_path.read_bytes()
            self.cache_hit = True
        else:
            start = time.perf_counter()
            plan = self._build(trt, info.spec)
            self.build_seconds = time.perf_counter() - start
            with atomic_write(self.engine_path) as f:
                f.write(plan)
            self.cache_hit = False

        # The runtime must outlive its engine (TensorRT's rule); both are kept until close.
        self._runtime = trt.Runtime(logger())
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(
                f"TensorRT could not deserialize the cached engine {self.engine_path}; "
                "delete it to rebuild"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._input_name not in names or len(outputs) != 1:
            raise UserError(
                f"{self.path}: expected input {self._input_name!r} and one output, got {names}"
            )
        self._engine = engine
        self._output_name = outputs[0]
        self._dtypes = tuple(
            np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in (self._input_name, outputs[0])
        )
        self._context = engine.create_execution_context()
        if self._context is None:
            raise RuntimeError("TensorRT could not create an execution context (see its log)")
        self._stream = cuda_call(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        return info.spec

    def _build(self, trt, spec: InputSpec) -> bytes:
        """Parse the ONNX and build a serialized engine (bytes) for self.profile."""
        from convforge.files import atomic_write

        builder = trt.Builder(logger())
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger())
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise UserError(f"TensorRT cannot parse {self.path}: {errors or 'unknown error'}")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if self._input_name not in names:
            raise UserError(f"{self.path}: no input named {self._input_name!r} (inputs: {names})")

        config = builder.create_builder_config()
        if not self.options.tf32:
            # TF32 is on by default and rounds fp32 products to 10-bit mantissas: fp32 here
            # means fp32 (the torch backend's tf32 option works the same way).
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        lo, opt, hi = self.profile  # per-image shape in the file's layout (NHWC for uint8)
        profile.set_shape(self._input_name, spec.shape(lo), spec.shape(opt), spec.shape(hi))
        config.add_optimization_profile(profile)

        # timing caches are per device and TensorRT version (ignore_mismatch=False checks it)
        tag = hashlib.sha256(f"{self.gpu_name}\0{trt.__version__}".encode()).hexdigest()[:16]
        cache_file = self.cache_dir / f"timing-{tag}.cache"
        cache = timing_cache(config, cache_file)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"TensorRT failed to build an engine for {self.path} (see its log)")
        with atomic_write(cache_file) as f:
            f.write(memoryview(cache.serialize()))
        return bytes(memoryview(serialized))

    # -- run -------------------------------------------------------------------------------

    def _check_batch_size(self, n: int) -> None:
        lo, _, hi = self.profile
        if not lo <= n <= hi:
            raise UserError(
                f"batch of {n} is outside the TensorRT profile [{lo}, {hi}] (min_batch..max_batch);"
                f" rebuild with max_batch={n} or send smaller batches"
            )

    def _bind_buffers(self, n: int) -> tuple[int, int, tuple[int, ...]]:
        """Set the input shape for batch ``n`` and bind this backend's device buffers for it
        (allocated on first use with cudaMalloc, which aligns to 256 bytes or more)."""
        rt, ctx = self._rt, self._context
        if n not in self._buffers:
            set_shape(ctx, self._input_name, self.spec.shape(n))
            out_shape = tuple(int(d) for d in ctx.get_tensor_shape(self._output_name))
            in_dtype, out_dtype = self._dtypes
            in_bytes = int(np.prod(self.spec.shape(n))) * in_dtype.itemsize
            out_bytes = int(np.prod(out_shape)) * out_dtype.itemsize
            x = cuda_call(rt, rt.cudaMalloc(in_bytes), "cudaMalloc")
            try:
                y = cuda_call(rt, rt.cudaMalloc(out_bytes), "cudaMalloc")
            except RuntimeError:
                rt.cudaFree(x)
                raise
            self._buffers[n] = (x, y, out_shape)
            self._bound = None
        x, y, out_shape = self._buffers[n]
        if self._bound != n:
            set_shape(ctx, self._input_name, self.spec.shape(n))
            bind(ctx, self._input_name, x)
            bind(ctx, self._output_name, y)
            self._bound = n
        return x, y, out_shape

    def _enqueue(self) -> None:
        """Run the bound engine on the stream and wait for it."""
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        cuda_call(self._rt, self._rt.cudaStreamSynchronize(self._stream), "stream sync")

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` into this backend's device input buffer (see DeviceResident)."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before stage()")
        self.check(batch)
        n = batch.shape[0]
        self._check_batch_size(n)
        host = np.ascontiguousarray(batch, dtype=self._dtypes[0])
        x, _, _ = self._bind_buffers(n)
        rt = self._rt
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(rt, rt.cudaMemcpyAsync(x, host.ctypes.data, host.nbytes, kind, self._stream),
                  "host-to-device copy")  # fmt: skip
        cuda_call(rt, rt.cudaStreamSynchronize(self._stream), "stream sync")  # host may go now
        self._staged = n

    def run_device_resident(self) -> None:
        """Run on the staged batch: GPU compute and the closing synchronization only."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: call stage(batch) before run_device_resident()")
        self._bind_buffers(self._staged)
        self._enqueue()

    def fetch(self) -> np.ndarray:
        """The logits of the last staged run, copied to the host (float32 [N, K])."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: nothing has run yet")
        _, y, out_shape = self._buffers[self._staged]
        out = np.empty(out_shape, dtype=self._dtypes[1])
        rt = self._rt
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(rt, rt.cudaMemcpyAsync(out.ctypes.data, y, out.nbytes, kind, self._stream),
                  "device-to-host copy")  # fmt: skip
        cuda_call(rt, rt.cudaStreamSynchronize(self._stream), "stream sync")
        return out.astype(np.float32, copy=False)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.stage(batch)
        self.run_device_resident()
        return self.fetch()

    def run_device(self, batch):
        """Zero-copy: ``batch`` is a torch CUDA tensor [N, C, H, W] of the engine's input
        dtype on this backend's device, contiguous and 256-byte aligned (each checked);
        returns the logits as a new CUDA tensor, synchronized. Needs torch only here."""
        import torch

        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before run_device()")
        check_device_tensor(batch, self.device_id, self._dtypes[0])
        n = int(batch.shape[0])
        self._check_batch_size(n)
        ctx = self._context
        set_shape(ctx, self._input_name, tuple(batch.shape))
        out_shape = tuple(int(d) for d in ctx.get_tensor_shape(self._output_name))
        out_dtype = getattr(torch, self._dtypes[1].name)
        out = torch.empty(out_shape, dtype=out_dtype, device=batch.device)
        bind(ctx, self._input_name, batch.data_ptr())
        bind(ctx, self._output_name, out.data_ptr())
        self._bound = None  # the context now points at the caller's memory
        torch.cuda.current_stream(batch.device).synchronize()  # the input is written
        self._enqueue()
        return out

    def _close(self) -> None:
        rt = self._rt
        if rt is not None:
            for x, y, _ in self._buffers.values():
                rt.cudaFree(x)
                rt.cudaFree(y)
            if self._stream is not None:
                rt.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._bound = self._staged = None
        self._stream = None
        self._context = None  # destroy in dependency order: context, engine, runtime
        self._engine = None
        self._runtime = None

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


__all__ = [
    "TensorRT",
    "engine_cache_key",
    "network_flags",
    "refuse_asymmetric_int8",
    "timing_cache",
]
