"""ONNX Runtime on NVIDIA GPUs: ``ort-cuda`` (CUDA execution provider) and ``ort-trt``
(TensorRT execution provider, CUDA for what TensorRT does not take).

They run what ``ort-cpu`` runs (:mod:`.ort`) and keep batches on the device for
compute-only timing (:class:`~.base.DeviceResident`). They never fall back to
the CPU: onnxruntime-gpu lists CUDA/TensorRT even when their libraries fail to
load, and when a provider fails in ``InferenceSession`` (its libraries, or a
TensorRT engine that does not build) onnxruntime prints "EP Error" and silently
retries on the next providers. So after creation every requested provider must
be in the session, else ``load()`` raises :class:`BackendUnavailable` with
onnxruntime's reason in one line: ``auto`` moves on and records it, a backend
asked for by name fails with it. What onnxruntime prints goes to stderr, never
into a command's stdout.

Before the first GPU session of the process, :func:`preload_libraries` loads the
CUDA and cuDNN libraries that pip installed (``onnxruntime.preload_dlls``) and,
for ``ort-trt``, imports ``tensorrt`` (which loads ``libnvinfer``), so that the
providers find them without torch having loaded them first.

``ort-trt`` keeps one engine-cache folder per ONNX file content (its sha256):
ONNX Runtime names a cached engine from the graph's node and tensor names and
version numbers, never from the weights, so two exports of one architecture
would otherwise share an engine and a retrained model would silently run the
old weights. Inside it the engine files are prefixed with the optimisation
profile and the ONNX Runtime and TensorRT versions (:func:`engine_cache_prefix`).
It refuses an int8 file whose Q/DQ is not symmetric int8 (the ``cpu`` export
target): TensorRT's parser rejects non-zero zero points. On an fp32 file it runs
TF32 and says so (``precision == "tf32"``): ONNX Runtime's TensorRT provider
leaves TensorRT's TF32 builder flag on and has no option to clear it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import sha256_of
from convforge.errors import UserError
from convforge.runtime.backends.base import Backend, BackendUnavailable, DeviceResident, InputSpec
from convforge.runtime.backends.options import BatchProfile
from convforge.runtime.backends.ort import _ort_importable, _read_info, _session
from convforge.runtime.backends.tensorrt import refuse_asymmetric_int8
from convforge.settings import setting

CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
NO_CUDA = (
    "onnxruntime has no CUDA execution provider (it needs a CUDA GPU and the "
    "onnxruntime-gpu build: pip install 'convforge[gpu]')"
)
NO_TRT = (
    "onnxruntime has no TensorRT execution provider (it needs a CUDA GPU, the "
    "onnxruntime-gpu build and TensorRT: pip install 'convforge[gpu,tensorrt]')"
)
DEFAULT_TRT_CACHE = "~/.cache/convforge/ort-trt"
# A session output's ONNX type -> the numpy type of the device buffer bound to it. A type
# numpy cannot name (bfloat16) gets a buffer onnxruntime allocates.
OUTPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
# Where TensorRT's own version can be asked when the tensorrt module is not importable:
# getInferLibVersion() is extern "C" in every libnvinfer (NvInferRuntimeBase.h).
NVINFER_LIBRARIES = (
    "libnvinfer.so.10",
    "libnvinfer.so.11",
    "libnvinfer.so",
    "nvinfer_10.dll",
    "nvinfer_11.dll",
)

_preloaded: set[str] = set()  # what preload_libraries has done in this process
# Held while stdout is redirected (preload_dlls, session creation). The redirect is
# process-wide and serve loads instances from several threads: two at once would restore
# each other's stream. So one GPU session is created at a time; a second ort-trt instance
# then finds the engine the first one cached instead of building it into the same file.
_stdout_lock = threading.Lock()


def _has_provider(provider: str, missing: str) -> tuple[bool, str]:
    ok, why = _ort_importable()
    if not ok:
        return ok, why
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, missing
    return True, ""


def preload_libraries(tensorrt: bool) -> None:
    """Load the GPU libraries onnxruntime's providers need before their first session, once
    per process (``tensorrt``: also TensorRT's). Best effort: whatever is still missing, the
    session reports in its own words, which become the BackendUnavailable reason.

    * ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21; absent before, then skipped)
      loads CUDA and cuDNN from the nvidia-* pip packages (cuda=True, cudnn=True; missing
      cuDNN is ignored; msvc only matters on Windows; directory=None searches torch's lib
      folder on Windows, then the nvidia site-packages, then the default paths), so no
      ``import torch`` is needed first. It reports what failed with print(): sent to stderr.
    * ``import tensorrt`` loads libnvinfer from the tensorrt-*-libs packages into the
      process, where the TensorRT provider's own dlopen finds it by name. After
      preload_dlls, because libnvinfer may need the CUDA runtime it loads.
    """
    import onnxruntime as ort

    with _stdout_lock:
        if "cuda" not in _preloaded:
            _preloaded.add("cuda")
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Exception):
                    preload(cuda=True, cudnn=True, msvc=True, directory=None)
        if tensorrt and "tensorrt" not in _preloaded:
            _preloaded.add("tensorrt")
            # ImportError when not installed; OSError/RuntimeError when its libraries do not
            # load. Either way the TensorRT provider fails next, naming the library.
            with contextlib.suppress(Exception):
                import tensorrt  # noqa: F401


def tensorrt_version() -> str:
    """The TensorRT version the TensorRT provider runs with, for the engine cache key:
    ``tensorrt.__version__`` once :func:`preload_libraries` imported it, else libnvinfer's
    ``getInferLibVersion()`` ((major * 100 + minor) * 100 + patch from TensorRT 10), else
    ``unknown``. onnxruntime's build information does not name TensorRT
    (``get_build_info()`` and ``capi/build_and_package_info.py`` hold its own version and
    CUDA's only)."""
    version = getattr(sys.modules.get("tensorrt"), "__version__", None)
    if version:
        return str(version)
    for name in NVINFER_LIBRARIES:
        try:
            return str(int(ctypes.CDLL(name).getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    return "unknown"


def _ep_error(printed: str) -> str:
    """onnxruntime's reason for a provider failure, from what InferenceSession printed
    ("EP Error <reason> when using [...]"; its banner lines start with '*'), or ''."""
    for line in printed.splitlines():
        if line.startswith("EP Error "):
            return line[len("EP Error ") :].split(" when using [")[0].strip()
    return ""


class _OrtGpu(Backend, DeviceResident):
    """IO-binding runner shared by the CUDA and TensorRT backends.

    Inputs and outputs live on the GPU as OrtValues bound to the session:

    * :meth:`run` (end to end) = host->device copy of the batch, compute,
      device->host copy of the logits.
    * :meth:`stage` copies a batch to the GPU and binds it; then
      :meth:`run_device_resident` runs on it with no host transfers at all
      (launch + GPU compute + stream synchronisation) and returns nothing;
      :meth:`fetch` copies the last logits to the host. A benchmark times
      ``run_device_resident`` for compute-only numbers.

    Device buffers are cached per batch size, so repeated runs at one size
    reuse the same addresses (required for CUDA graphs). The output buffer has
    the element type of the session's output (a file may output float16);
    :meth:`fetch` and :meth:`run` return float32 whatever it is, as
    :meth:`Backend.run` promises.
    """

    provider = ""
    missing = ""
    loads_tensorrt = False  # preload TensorRT's library before the session

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.device_id = self.options.device_id
        self.session = None
        self._buffers: dict[int, tuple] = {}  # batch size -> (input, output OrtValue)
        self._binding = None
        self._staged: int | None = None
        self._output_type = None  # numpy type of the output buffer; None: ORT allocates it

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _has_provider(cls.provider, cls.missing)

    def _providers(self) -> list:
        raise NotImplementedError

    def _session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return so

    def _load(self) -> InputSpec:
        spec = self._check_file(_read_info(self))
        preload_libraries(tensorrt=self.loads_tensorrt)
        self.session = self._create_session(self._providers())
        out = next(o for o in self.session.get_outputs() if o.name == self.info.output_name)
        self._output = out.name
        self._output_type = OUTPUT_TYPES.get(out.type)
        k = out.shape[1] if len(out.shape) == 2 else None
        self._classes = k if isinstance(k, int) and k > 0 else None
        self._binding = self.session.io_binding()
        self._buffers = {}
        self._staged = None
        return spec

    def _create_session(self, providers: list):
        """The session, with every provider in ``providers``; BackendUnavailable naming the
        one that is missing and onnxruntime's reason for it otherwise."""
        printed = io.StringIO()
        try:
            # InferenceSession prints its "EP Error" banner: read it for the reason, keep it
            # off stdout (a command's JSON goes there), show it on stderr.
            with _stdout_lock, contextlib.redirect_stdout(printed):
                session = _session(self, self._session_options(), providers, self.provider)
        except BackendUnavailable as e:
            reason = _ep_error(printed.getvalue())
            raise BackendUnavailable(f"{e}; onnxruntime: {reason}" if reason else str(e)) from e
        finally:
            sys.stderr.write(printed.getvalue())
        loaded = session.get_providers()
        missing = [name for name, _ in providers if name not in loaded]
        if missing:  # e.g. ort-trt's CUDA provider: leftovers would run on the CPU
            raise BackendUnavailable(
                f"backend {self.name!r} is not available: {', '.join(missing)} did not load "
                f"(session providers: {', '.join(loaded)}); "
                "check the CUDA/cuDNN libraries onnxruntime-gpu needs"
            )
        return session

    def _check_file(self, info) -> InputSpec:
        """Hook: refuse a file this provider cannot run (BackendUnavailable); the input spec."""
        return info.spec

    def _check_batch_size(self, n: int) -> None:
        """Hook: subclasses reject batch sizes they cannot run (UserError)."""

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` to the GPU and bind input and output buffers for it.

        The copy is complete before the next run starts. onnxruntime's host-to-device copy
        (``ortvalue_from_numpy`` and ``update_inplace``) is a ``cudaMemcpy`` from pageable
        memory on the legacy default stream, whose DMA may still be in flight when it
        returns, while the providers compute on their own non-blocking stream. onnxruntime
        (since 1.10, PR #9841) ends that copy with ``cudaStreamSynchronize(0)``; on top,
        ``IOBinding.synchronize_inputs()`` makes the order explicit (the CUDA provider's
        Sync() is a ``cudaDeviceSynchronize``; the TensorRT provider's is a no-op, there the
        copy's own synchronisation is what holds). Outside the timed
        :meth:`run_device_resident`.
        """
        import onnxruntime as ort

        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before stage()")
        self.check(batch)
        batch = np.ascontiguousarray(batch)
        n = batch.shape[0]
        self._check_batch_size(n)
        if n not in self._buffers:
            x = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", self.device_id)
            y = None
            if self._classes is not None and self._output_type is not None:
                y = ort.OrtValue.ortvalue_from_shape_and_type(
                    [n, self._classes], self._output_type, "cuda", self.device_id
                )
            self._buffers[n] = (x, y)
        else:
            x, y = self._buffers[n]
            x.update_inplace(batch)  # host->device into the same device address
        if self._staged != n:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()
            self._binding.bind_ortvalue_input(self.info.input_name, x)
            if y is not None:
                self._binding.bind_ortvalue_output(self._output, y)
            else:  # shape or type unknown to numpy: ORT allocates on the GPU
                self._binding.bind_output(self._output, "cuda", self.device_id)
            self._staged = n
        self._binding.synchronize_inputs()

    def run_device_resident(self) -> None:
        """Run on the staged batch: GPU compute only, no host<->device copies.

        Measures kernel launches + GPU execution + the stream synchronisation
        that ends the run; the input was copied by :meth:`stage` beforehand and
        the logits stay on the GPU (read them with :meth:`fetch`).
        """
        if self._staged is None:
            raise RuntimeError(f"{self.name}: call stage(batch) before run_device_resident()")
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()

    def fetch(self) -> np.ndarray:
        """The logits of the last run, copied to the host: float32 [N, K] whatever the
        output's own type (a float16 output is widened, as :meth:`Backend.run` promises)."""
        if self._staged is None:
            raise RuntimeError(f"{self.name}: nothing has run yet")
        (out,) = self._binding.copy_outputs_to_cpu()
        return np.asarray(out, dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.stage(batch)
        self.run_device_resident()
        return self.fetch()

    def _close(self) -> None:
        self._binding = None
        self._buffers = {}
        self._staged = None
        self.session = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(provider=self.provider, io_binding=True, device_id=self.device_id)
        if self.session is not None:
            d["providers"] = self.session.get_providers()
        return d


class OrtCuda(_OrtGpu):
    """ONNX Runtime on the CUDA execution provider only, with IO binding.

    With ``cuda_graph`` the whole run is captured in a CUDA graph on the first
    call and replayed after: an instance then runs ONE batch size (the first it
    ran; another is a UserError) and every run reuses the same device buffers,
    which :meth:`stage` does. :attr:`single_batch_size` says so, and the bench
    loads one instance per batch size. The replay writes to the output buffer
    it captured, so a file whose output buffer cannot be allocated up front
    (shape [N, K] with K unknown, or a type numpy cannot name) is refused.
    """

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    missing = NO_CUDA

    @dataclass(frozen=True)
    class Options:
        cuda_graph: bool = setting(False, "capture and replay a CUDA graph (one batch size)")
        cudnn_conv_algo_search: str = setting(
            "EXHAUSTIVE", "cuDNN convolution algorithm search", choices=CONV_ALGO_SEARCHES
        )
        device_id: int = setting(0, "CUDA device", minimum=0)
        tf32: bool = setting(False, "let fp32 convolutions use TF32 (ONNX Runtime's default)")

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.cuda_graph = self.options.cuda_graph
        self.conv_algo = self.options.cudnn_conv_algo_search

    @property
    def single_batch_size(self) -> bool:
        return self.cuda_graph

    def _load(self) -> InputSpec:
        spec = super()._load()
        if self.cuda_graph and (self._classes is None or self._output_type is None):
            # ONNX Runtime's CUDA graphs replay into the output addresses bound at capture
            # (CUDA-ExecutionProvider docs, "Using CUDA Graphs"): a buffer ORT allocates per
            # run could move.
            out = next(o for o in self.session.get_outputs() if o.name == self._output)
            raise UserError(
                f"{self.name} with cuda_graph=True needs an output it can allocate up front "
                f"([N, K], float32/float16/float64); {Path(self.path).name}'s output "
                f"{out.name!r} is {out.type} {list(out.shape)}: load it without cuda_graph"
            )
        return spec

    def _check_file(self, info) -> InputSpec:
        if self.options.tf32 and info.precision == "fp32":
            self.precision = "tf32"
        return info.spec

    def provider_options(self) -> dict:
        return {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.conv_algo,
            "enable_cuda_graph": "1" if self.cuda_graph else "0",
            # ONNX Runtime's use_tf32 defaults to 1; off, fp32 means fp32.
            "use_tf32": "1" if self.options.tf32 else "0",
        }

    def _providers(self) -> list:
        return [(self.provider, self.provider_options())]

    def _check_batch_size(self, n: int) -> None:
        if self.cuda_graph and self._buffers and n not in self._buffers:
            (first,) = self._buffers
            raise UserError(
                f"{self.name} with cuda_graph=True runs one fixed batch size ({first}); "
                f"got {n}: load another backend for another size"
            )

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            cuda_graph=self.cuda_graph,
            cudnn_conv_algo_search=self.conv_algo,
            tf32=self.options.tf32,
        )
        return d


class OrtTensorRT(_OrtGpu):
    """ONNX Runtime on the TensorRT execution provider (CUDA EP second, for leftovers).

    The TensorRT optimisation profile for ``input`` is the shared
    :class:`~.options.BatchProfile`; a batch outside [min_batch, max_batch] is
    a UserError. A file whose batch dimension is fixed at b gets the profile
    (b, b, b), and a min_batch/opt_batch/max_batch set to anything else is a
    UserError (:meth:`~.options.BatchProfile.for_file`, shared with ``tensorrt``).
    Engines are cached under ``cache_dir/<sha256 of the file>/``, their names
    prefixed with the profile and the ONNX Runtime and TensorRT versions (see
    the module docstring); the timing cache, which is per GPU and TensorRT
    version rather than per model, is shared in ``cache_dir``.
    FP16 (or INT8, for a symmetric QDQ export) is enabled only when the file's
    own precision says so: the precision comes from the file, never from an
    option. An fp32 file runs, and is labelled, ``tf32``.
    """

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    missing = NO_TRT
    loads_tensorrt = True

    @dataclass(frozen=True)
    class Options(BatchProfile):
        cache_dir: str = setting(DEFAULT_TRT_CACHE, "engine and timing caches")
        device_id: int = setting(0, "CUDA device", minimum=0)

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.min_batch, self.opt_batch, self.max_batch = self.options.profile(self.name)
        self.cache_dir = str(Path(self.options.cache_dir).expanduser())
        self.engine_cache: str | None = None  # cache_dir/<sha256 of the ONNX file>, set by load
        self.engine_prefix: str | None = None  # engine file prefix, set with provider options

    def provider_options(self) -> dict:
        """The TensorRT provider's options (load's first steps set what they need)."""
        import onnxruntime as ort

        if self.spec is None:
            raise RuntimeError(f"{self.name}: provider options need the input spec (load first)")

        def shape(n: int) -> str:  # in the file's layout (NHWC for a uint8-input file)
            return f"{self.info.input_name}:" + "x".join(map(str, self.spec.shape(n)))

        profile = (self.min_batch, self.opt_batch, self.max_batch)
        self.engine_prefix = engine_cache_prefix(profile, ort.__version__, tensorrt_version())
        return {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": self.engine_cache,
            # ORT reuses a cached engine only under the same prefix (onnxruntime >= 1.17).
            "trt_engine_cache_prefix": self.engine_prefix,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": self.cache_dir,
            "trt_fp16_enable": "True" if self.precision == "fp16" else "False",
            "trt_int8_enable": "True" if self.precision == "int8" else "False",
            "trt_profile_min_shapes": shape(self.min_batch),
            "trt_profile_opt_shapes": shape(self.opt_batch),
            "trt_profile_max_shapes": shape(self.max_batch),
        }

    def _providers(self) -> list:
        return [
            (self.provider, self.provider_options()),
            ("CUDAExecutionProvider", {"device_id": str(self.device_id)}),
        ]

    def _check_file(self, info) -> InputSpec:
        refuse_asymmetric_int8(self.name, info)
        # (b, b, b) for a batch fixed at b, as the tensorrt backend builds: the only profile
        # its engine can have (ONNX Runtime gives TensorRT a static dimension's own value
        # whatever the profile shapes say), so the shapes, describe(), the cache key and
        # the batch check say what runs. A batch option set to another value: UserError.
        self.min_batch, self.opt_batch, self.max_batch = self.options.for_file(
            self.name, info, self._given
        )
        if info.precision == "fp32":
            # Why a label and not NVIDIA_TF32_OVERRIDE=0: ONNX Runtime's TensorRT provider
            # sets no TF32 flag of its own, so TensorRT's default (kTF32 on) holds, and it
            # has no option to clear it (onnxruntime issues #26029, #28177; PR #26035 is
            # not merged). The variable would act process-wide on every NVIDIA library
            # (cuDNN/cuBLAS under ort-cuda and torch too), only if set before they read it
            # (a session created earlier in the process keeps the old value), and NVIDIA
            # documents it as a debugging tool. The label says what may run (TF32 where the
            # GPU has it, as tensorrt's tf32 option does) and tune's records carry it.
            self.precision = "tf32"
        # provider_options() needs the spec and the cache folder before the session exists.
        self.spec = info.spec
        self.engine_cache = engine_cache_dir(self.cache_dir, self.path)
        os.makedirs(self.engine_cache, exist_ok=True)
        return info.spec

    def _check_batch_size(self, n: int) -> None:
        if not self.min_batch <= n <= self.max_batch:
            raise UserError(
                f"{self.name}: batch size {n} is outside the TensorRT profile "
                f"[{self.min_batch}, {self.max_batch}]; load with min_batch/max_batch covering it"
            )

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            min_batch=self.min_batch,
            opt_batch=self.opt_batch,
            max_batch=self.max_batch,
            cache_dir=self.cache_dir,
            engine_cache=self.engine_cache,
            engine_prefix=self.engine_prefix,
            fp16=self.precision == "fp16",
            int8=self.precision == "int8",
            tf32=self.precision == "tf32",
        )
        return d


def engine_cache_dir(cache_dir: str, path: str) -> str:
    """``cache_dir/<sha256 of the file at path>``: one engine folder per model content."""
    return str(Path(cache_dir) / sha256_of(path))


def engine_cache_prefix(profile: tuple[int, int, int], ort_version: str, trt_version: str) -> str:
    """The engine file prefix inside a file's cache folder: its (min, opt, max) profile and
    the ONNX Runtime and TensorRT versions, as ``b1-8-32_ort1.22.0_trt10.9.0.34``.

    ONNX Runtime's TensorRT provider documents that cached engines must be cleaned when
    either version changes (it does not check), and rebuilds and overwrites an engine
    whose explicit profile differs: keyed, a max_batch=256 engine and the default one
    each keep their own file and no upgrade loads a stale one. Characters outside
    ``[A-Za-z0-9._-]`` become ``-``.
    """
    raw = f"b{'-'.join(str(int(b)) for b in profile)}_ort{ort_version}_trt{trt_version}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)
