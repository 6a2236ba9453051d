"""TensorRT backend: ONNX -> serialized engine (cached on disk) -> execute_async_v3.

    with TensorRT("model.fp16.onnx", max_batch=32) as b:
        logits = b.run(batch)            # end to end: host -> GPU -> host
        out = b.run_device(gpu_batch)    # benchmark path: torch CUDA tensor in, CUDA tensor out

Build (TensorRT 10.x and 11.x Python API): ``trt.Builder`` -> ``create_network`` ->
``trt.OnnxParser.parse_from_file`` -> one optimization profile over the batch range of
input ``input`` (``min_batch`` 1, ``opt_batch`` 8, ``max_batch`` 32; C, H, W from the
file's metadata) -> ``create_builder_config`` with a timing cache kept in the cache dir ->
``build_serialized_network`` -> ``trt.Runtime(logger).deserialize_cuda_engine``.

Precision comes from the ONNX itself (fp16 tensors, or Q/DQ int8 from ``convforge
export``), never from builder flags: TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``
and always builds strongly typed networks. On 10.x the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (present since 9.x), so TensorRT keeps
the ONNX types exactly as exported and 10.x and 11.x build the same thing; on 11.x the
flag is deprecated and ignored, so none is passed. ``EXPLICIT_BATCH`` is ignored since
10.0 (networks are always explicit batch) and is only passed to older versions that
expose it without strong typing, which this backend does not otherwise support.

Engines are cached under ``~/.cache/convforge/tensorrt/`` (option ``cache_dir``), keyed by
:func:`engine_cache_key` (sha256 of the ONNX bytes, GPU name, TensorRT version, profile)
and written atomically. Buffers and the stream are torch CUDA objects; TensorRT and torch
are imported only inside methods.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from convforge.contract import INPUT_NAME
from convforge.errors import UserError
from convforge.runtime.backends.base import Backend, InputSpec

INSTALL_HINT = (
    "tensorrt is not installed: pip install 'convforge[tensorrt]' on a machine with an NVIDIA GPU"
)
DEFAULT_CACHE_DIR = Path("~/.cache/convforge/tensorrt")
DEFAULTS = {"min_batch": 1, "opt_batch": 8, "max_batch": 32}


def engine_cache_key(
    onnx_bytes: bytes, gpu_name: str, trt_version: str, profile: tuple[int, int, int]
) -> str:
    """The engine's cache file stem: changes with the model, the GPU, TensorRT and profile."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(onnx_bytes).digest())
    for part in (gpu_name, trt_version, "x".join(str(int(b)) for b in profile)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()


def profile_from_options(options: dict) -> tuple[int, int, int]:
    """(min, opt, max) batch from the options; UserError unless 1 <= min <= opt <= max."""
    lo, opt, hi = (
        int(options.get(k, DEFAULTS[k])) for k in ("min_batch", "opt_batch", "max_batch")
    )
    if not 1 <= lo <= opt <= hi:
        raise UserError(
            f"tensorrt profile needs 1 <= min_batch <= opt_batch <= max_batch, "
            f"got min_batch={lo}, opt_batch={opt}, max_batch={hi}"
        )
    return lo, opt, hi


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


class TensorRT(Backend):
    name = "tensorrt"

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.profile = profile_from_options(options)
        self.cache_dir = Path(options.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()
        self.engine_path: Path | None = None
        self.cache_hit: bool | None = None
        self.build_seconds: float | None = None
        self.trt_version: str | None = None
        self.gpu_name: str | None = None
        self._runtime = None
        self._engine = None
        self._context = None
        self._stream = None
        self._output_name: str | None = None
        self._torch = None
        self._staged = None  # a CUDA tensor, set by stage()

    # -- availability ----------------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt  # noqa: F401
        except Exception:  # ImportError, or a broken install failing to load its libraries
            return False, INSTALL_HINT
        try:
            import torch
        except ImportError:
            return False, "no CUDA device: torch is not installed (buffers are torch CUDA tensors)"
        if not torch.cuda.is_available():
            why = "torch has no CUDA support" if torch.version.cuda is None else "none visible"
            return False, f"no CUDA device: torch.cuda.is_available() is False ({why})"
        return True, ""

    # -- build / load ----------------------------------------------------------------------

    def _load(self) -> InputSpec:
        import tensorrt as trt
        import torch

        from convforge.contract import read_info
        from convforge.files import atomic_write, ensure_dir

        info = read_info(self.path)
        self.precision = info.precision
        spec = info.spec
        self._torch = torch
        self.trt_version = trt.__version__
        self.gpu_name = torch.cuda.get_device_name()
        logger = trt.Logger(trt.Logger.WARNING)

        onnx_bytes = Path(self.path).read_bytes()
        key = engine_cache_key(onnx_bytes, self.gpu_name, self.trt_version, self.profile)
        ensure_dir(self.cache_dir)
        self.engine_path = self.cache_dir / f"{key}.engine"
        if self.engine_path.is_file():
            plan = self.engine_path.read_bytes()
            self.cache_hit = True
        else:
            start = time.perf_counter()
            plan = self._build(trt, logger, spec)
            self.build_seconds = time.perf_counter() - start
            with atomic_write(self.engine_path) as f:
                f.write(plan)
            self.cache_hit = False

        # keep the runtime alive as long as its engine (TensorRT requires it to outlive it)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(
                f"TensorRT could not deserialize the cached engine {self.engine_path}; "
                "delete it to rebuild"
            )
        outputs = [
            engine.get_tensor_name(i)
            for i in range(engine.num_io_tensors)
            if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        ]
        if len(outputs) != 1:
            raise UserError(f"{self.path}: expected one output (logits), got {outputs}")
        self._engine = engine
        self._output_name = outputs[0]
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        return spec

    def _build(self, trt, logger, spec: InputSpec) -> bytes:
        """Parse the ONNX and build a serialized engine (bytes) for self.profile."""
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise UserError(f"TensorRT cannot parse {self.path}: {errors or 'unknown error'}")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if INPUT_NAME not in names:
            raise UserError(f"{self.path}: no input named {INPUT_NAME!r} (inputs: {names})")

        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        chw = (spec.channels, spec.height, spec.width)
        lo, opt, hi = self.profile
        profile.set_shape(INPUT_NAME, (lo, *chw), (opt, *chw), (hi, *chw))
        config.add_optimization_profile(profile)

        # timing caches are per device and TensorRT version (ignore_mismatch=False checks it)
        tag = hashlib.sha256(f"{self.gpu_name}\0{trt.__version__}".encode()).hexdigest()[:16]
        cache_file = self.cache_dir / f"timing-{tag}.cache"
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        timing_cache = config.create_timing_cache(blob)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"TensorRT failed to build an engine for {self.path} (see its log)")

        from convforge.files import atomic_write

        with atomic_write(cache_file) as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(serialized))

    # -- run -------------------------------------------------------------------------------

    def _check_batch_size(self, n: int) -> None:
        lo, _, hi = self.profile
        if not lo <= n <= hi:
            raise UserError(
                f"batch of {n} is outside the TensorRT profile [{lo}, {hi}] (min_batch..max_batch);"
                f" rebuild with max_batch={n} or send smaller batches"
            )

    def run_device(self, batch):
        """Compute only: ``batch`` is a float32 torch CUDA tensor [N, C, H, W]; returns the
        logits as a CUDA tensor, synchronized. No host copies (for the benchmark)."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before run_device()")
        torch = self._torch
        n = int(batch.shape[0])
        self._check_batch_size(n)
        batch = batch.contiguous()
        ctx = self._context
        if not ctx.set_input_shape(INPUT_NAME, tuple(batch.shape)):
            raise UserError(f"TensorRT rejected input shape {list(batch.shape)}")
        out_shape = tuple(ctx.get_tensor_shape(self._output_name))
        out_dtype = _torch_dtype(torch, self._engine.get_tensor_dtype(self._output_name))
        out = torch.empty(out_shape, dtype=out_dtype, device=batch.device)
        ctx.set_tensor_address(INPUT_NAME, batch.data_ptr())
        ctx.set_tensor_address(self._output_name, out.data_ptr())
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())  # the input is ready before we read it
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        stream.synchronize()
        return out

    def _to_device(self, batch: np.ndarray):
        torch = self._torch
        self._check_batch_size(batch.shape[0])
        in_dtype = _torch_dtype(torch, self._engine.get_tensor_dtype(INPUT_NAME))
        return torch.from_numpy(batch).to("cuda", non_blocking=False).to(in_dtype)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.run_device(self._to_device(batch))
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` to the GPU once, for :meth:`run_device_resident` (the bench's
        compute-only timing; same protocol as the ONNX Runtime GPU backends)."""
        from convforge.runtime.backends.base import check_batch

        check_batch(batch, self.spec)
        self._staged = self._to_device(np.ascontiguousarray(batch))

    def run_device_resident(self) -> None:
        """Run on the staged batch: GPU compute and the closing synchronization only."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: call stage(batch) before run_device_resident()")
        self.run_device(self._staged)

    def _close(self) -> None:
        self._staged = None
        self._context = None  # destroy in dependency order: context, engine, runtime
        self._engine = None
        self._runtime = None
        self._stream = None

    def describe(self) -> dict:
        d = super().describe()
        lo, opt, hi = self.profile
        d.update(
            tensorrt_version=self.trt_version,
            gpu=self.gpu_name,
            profile={"min_batch": lo, "opt_batch": opt, "max_batch": hi},
            engine_cache_hit=self.cache_hit,
            build_seconds=None if self.build_seconds is None else round(self.build_seconds, 3),
            engine=str(self.engine_path) if self.engine_path else None,
        )
        return d


def _torch_dtype(torch, trt_dtype):
    """The torch dtype of a TensorRT tensor dtype (float32, float16, int8, int32, ...)."""
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if trt_dtype not in table:
        raise UserError(f"unsupported TensorRT I/O dtype {trt_dtype}")
    return table[trt_dtype]


__all__ = ["TensorRT", "engine_cache_key", "network_flags", "profile_from_options"]
