"""Building and caching TensorRT engines for the ``tensorrt`` backend (:mod:`.tensorrt`).

Build (TensorRT 10.x and 11.x Python API): ``trt.Builder`` -> ``create_network`` ->
``trt.OnnxParser.parse_from_file`` -> one optimization profile over the batch range of
the file's input (the shared :class:`~.options.BatchProfile`; C, H, W from the file; a
file whose batch dimension is fixed at b gets (b, b, b), as TensorRT requires of a static
dimension) -> ``create_builder_config`` with a timing cache kept in the cache dir ->
``build_serialized_network`` -> ``trt.Runtime(logger).deserialize_cuda_engine``. A file
TensorRT cannot parse, a profile it rejects, a failed build or an engine that does not
deserialize is :class:`BackendUnavailable`: ``auto`` records why and moves on, a backend
asked for by name fails with that line.

Precision comes from the ONNX itself (fp16 tensors, or Q/DQ int8 from ``convforge
export --int8-target tensorrt``), never from builder flags: TensorRT 11 removed
``BuilderFlag.FP16``/``INT8`` and always builds strongly typed networks, and TensorRT's
explicit-quantization guide says precision flags "should not be specified" with strong
typing. On 10.x the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
(present since 9.x); on 11.x the flag is deprecated and ignored, so none is passed.

TensorRT reports failure by return value, not exception: ``set_timing_cache`` returns
False on failure, ``add_optimization_profile`` -1, ``build_serialized_network`` and
``deserialize_cuda_engine`` None; each is checked. An unreadable timing cache is
discarded with a warning and rebuilt, and so is a cached engine that does not
deserialize. One ``trt.Logger`` serves the whole process (TensorRT keeps one logger
pointer; a second one makes it log that the loggers differ).

Engines are cached in the cache dir, keyed by :func:`engine_cache_key` (sha256 of the
ONNX bytes, GPU name, TensorRT version, profile) and written atomically once they
deserialize (:func:`load_engine`). TensorRT is imported only inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from convforge.errors import UserError
from convforge.runtime.backends.base import BackendUnavailable, InputSpec

__all__ = [
    "CachedEngine",
    "EngineSpec",
    "SharedEngine",
    "build_engine",
    "engine_cache_key",
    "load_engine",
    "logger",
    "network_flags",
    "timing_cache",
]


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


class SharedEngine:
    """A deserialized engine and the runtime it came from, shared by a loaded instance and
    every :meth:`TensorRT.sibling` made from it.

    TensorRT's runtime and engine may be used by several threads at once provided each uses
    its own execution context ("How TensorRT Works", TensorRT 11.1: thread safety), so each
    instance gets one from :meth:`new_context`, counted. :meth:`release`, called once per
    context on close, drops the engine and then the runtime (TensorRT's order: a runtime
    outlives its engines, an engine its contexts) when the last one is gone.
    """

    def __init__(self, runtime, engine) -> None:
        self.runtime, self.engine = runtime, engine
        self.users = 0
        self._lock = threading.Lock()

    def new_context(self):
        """A new IExecutionContext of the engine, counted as one user of it."""
        with self._lock:  # TensorRT documents concurrent contexts, not concurrent creation
            if self.engine is None:
                raise RuntimeError("the shared TensorRT engine is already released")
            context = self.engine.create_execution_context()
            if context is None:
                raise RuntimeError("TensorRT could not create an execution context (see its log)")
            self.users += 1
            return context

    def release(self) -> None:
        """One context fewer; the last one out drops the engine, then the runtime."""
        with self._lock:
            self.users -= 1
            if self.users <= 0:
                self.engine = None
                self.runtime = None


@dataclass(frozen=True)
class EngineSpec:
    """What decides an engine: the ONNX file and its input, the batch profile, TF32 and
    the GPU it is built on."""

    path: str  # the ONNX file
    input_name: str  # its input, as read_info found it in the graph
    input: InputSpec  # the input's shape per batch size, in the file's layout
    profile: tuple[int, int, int]  # (min, opt, max) batch
    tf32: bool  # fp32 layers may use TF32 (TensorRT's default; off: fp32 means fp32)
    gpu_name: str  # the device's name: engines and timing caches are per GPU


@dataclass(frozen=True)
class CachedEngine:
    """A deserialized engine and where it came from (for describe())."""

    shared: SharedEngine  # the engine and its runtime, not yet used by any context
    path: Path  # the cache file
    hit: bool  # deserialized from the cache, not built
    build_seconds: float | None  # the build's time, None on a cache hit


def load_engine(trt, want: EngineSpec, cache_dir: Path) -> CachedEngine:
    """The engine for ``want``: the cached one in ``cache_dir`` when it deserializes,
    else built (:func:`build_engine`), deserialized and only then cached, atomically. A
    cached engine that does not deserialize (written by this key's TensorRT and GPU, so
    damaged) is rebuilt with a warning. BackendUnavailable when TensorRT cannot parse,
    build or deserialize it."""
    from convforge.files import atomic_write, ensure_dir

    key = engine_cache_key(
        Path(want.path).read_bytes(),
        want.gpu_name,
        f"{trt.__version__}{'+tf32' if want.tf32 else ''}",
        want.profile,
    )
    ensure_dir(cache_dir)
    path = cache_dir / f"{key}.engine"
    # The runtime must outlive its engine (TensorRT's rule): SharedEngine keeps both.
    runtime = trt.Runtime(logger())
    engine = None
    if path.is_file():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is not None:
            return CachedEngine(SharedEngine(runtime, engine), path, True, None)
        warnings.warn(
            f"TensorRT could not deserialize the cached engine {path}; rebuilding it",
            RuntimeWarning,
            stacklevel=3,
        )
    start = time.perf_counter()
    plan = build_engine(trt, want, cache_dir)
    build_seconds = time.perf_counter() - start
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendUnavailable(
            f"TensorRT could not deserialize the engine it built for {want.path} (see its log)"
        )
    with atomic_write(path) as f:  # only an engine that loads is cached
        f.write(plan)
    return CachedEngine(SharedEngine(runtime, engine), path, False, build_seconds)


def build_engine(trt, want: EngineSpec, cache_dir: Path) -> bytes:
    """Parse the ONNX and build a serialized engine (bytes) for ``want.profile``, with the
    timing cache in ``cache_dir``. BackendUnavailable (``auto`` moves on) when TensorRT
    cannot parse or build it."""
    from convforge.files import atomic_write

    builder = trt.Builder(logger())
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger())
    if not parser.parse_from_file(str(want.path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        errors = " ".join((errors or "unknown error").split())  # one line
        raise BackendUnavailable(f"TensorRT cannot parse {want.path}: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if want.input_name not in names:
        raise UserError(f"{want.path}: no input named {want.input_name!r} (inputs: {names})")

    config = builder.create_builder_config()
    if not want.tf32:
        # TF32 is on by default and rounds fp32 products to 10-bit mantissas: fp32 here
        # means fp32 (the torch backend's tf32 option works the same way).
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    lo, opt, hi = want.profile  # per-image shape in the file's layout (NHWC for uint8)
    shapes = [want.input.shape(b) for b in (lo, opt, hi)]
    what = f"the optimization profile {list(shapes[0])}..{list(shapes[2])} (opt {opt})"
    try:  # the Python binding raises when a shape contradicts another
        profile.set_shape(want.input_name, *shapes)
    except RuntimeError as e:
        raise BackendUnavailable(f"TensorRT rejected {what} for {want.path}: {e}") from None
    if config.add_optimization_profile(profile) < 0:  # -1: invalid
        raise BackendUnavailable(f"TensorRT rejected {what} for {want.path} (see its log)")

    # timing caches are per device and TensorRT version (ignore_mismatch=False checks it)
    tag = hashlib.sha256(f"{want.gpu_name}\0{trt.__version__}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"timing-{tag}.cache"
    cache = timing_cache(config, cache_file)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(
            f"TensorRT failed to build an engine for {want.path} (see its log)"
        )
    with atomic_write(cache_file) as f:
        f.write(memoryview(cache.serialize()))
    return bytes(memoryview(serialized))
