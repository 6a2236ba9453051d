"""ONNX Runtime backends: ``ort-cpu``, ``ort-cuda`` and ``ort-trt``.

Each one runs an exported ``.onnx`` (input ``input``: float32 [N, C, H, W], N
dynamic; output: float32 [N, K] logits). The input spec and the precision come
from the file itself (:func:`convforge.contract.read_info`): an fp16 or
int8 export keeps float32 I/O, so every backend takes and returns float32.

GPU backends never fall back to the CPU: when the requested execution provider
is not in the session after creation (onnxruntime-gpu lists CUDA/TensorRT even
when their libraries fail to load, and then silently drops them), ``load()``
raises :class:`BackendUnavailable` naming what is missing.

onnxruntime is imported inside methods only, so ``convforge.runtime`` imports
without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convforge.contract import INPUT_NAME
from convforge.errors import UserError, check_choice, check_int
from convforge.extras import install_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable, InputSpec

GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
NO_CUDA = "onnxruntime has no CUDA execution provider (install onnxruntime-gpu and a CUDA GPU)"
NO_TRT = (
    "onnxruntime has no TensorRT execution provider "
    "(install onnxruntime-gpu with TensorRT libraries and a CUDA GPU)"
)
DEFAULT_TRT_CACHE = "~/.cache/convforge/ort-trt"


def _ort_importable() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, f"onnxruntime is not installed: {install_hint('onnxruntime')}"
    return True, ""


def _has_provider(provider: str, missing: str) -> tuple[bool, str]:
    ok, why = _ort_importable()
    if not ok:
        return ok, why
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, missing
    return True, ""


def physical_cores() -> tuple[int, str]:
    """(physical cores this process may use, how that was found).

    Counts distinct (package, core) pairs of the CPUs in our affinity mask from
    Linux sysfs, so SMT siblings count once. Where that is not readable (not
    Linux, restricted sysfs) it falls back to the logical count, which
    over-subscribes SMT machines; the second element says which way was used.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    if cpus:
        cores = set()
        try:
            for cpu in cpus:
                topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
                package = (topo / "physical_package_id").read_text().strip()
                core = (topo / "core_id").read_text().strip()
                cores.add((package, core))
        except OSError:
            return len(cpus), "logical cpus in affinity mask (sysfs topology unreadable)"
        return max(1, len(cores)), "physical cores in affinity mask (sysfs topology)"
    # Fallback: logical CPUs (may count SMT siblings twice).
    return max(1, os.cpu_count() or 1), "os.cpu_count() (logical; topology unknown)"


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(allowed)}"
        )


def _read_spec(backend: Backend) -> InputSpec:
    from convforge.contract import read_info

    if Path(backend.path).suffix != ".onnx":
        raise UserError(f"{backend.name} runs .onnx files, got {backend.path}")
    info = read_info(backend.path)
    backend.precision = info.precision
    return info.spec


def _session(backend: Backend, sess_options, providers, required: str | None):
    """Create the InferenceSession; BackendUnavailable if ``required`` did not make it in."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(backend.path, sess_options=sess_options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if required is not None:
            raise BackendUnavailable(f"{backend.name}: could not create a session: {first}") from e
        raise UserError(f"{backend.name}: onnxruntime cannot load {backend.path}: {first}") from e
    if required is not None and required not in session.get_providers():
        raise BackendUnavailable(
            f"backend {backend.name!r} is not available: {required} did not load "
            f"(session providers: {', '.join(session.get_providers())}); "
            "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs"
        )
    names = [i.name for i in session.get_inputs()]
    if INPUT_NAME not in names:
        raise UserError(f"{backend.path}: expected an input named {INPUT_NAME!r}, got {names}")
    return session


class OrtCpu(Backend):
    """ONNX Runtime on the CPU execution provider.

    Options: ``threads`` (intra-op threads; default the physical cores we may
    use), ``graph_optimization`` ("all" default, "extended", "basic",
    "disabled"). Execution is sequential (one inter-op thread).
    """

    name = "ort-cpu"
    OPTIONS = ("threads", "graph_optimization")

    def __init__(self, path: str, **options) -> None:
        _check_options(self.name, options, self.OPTIONS)
        super().__init__(path, **options)
        if "threads" in options:
            self.threads = check_int(f"{self.name} option threads", options["threads"])
            self.threads_source = "option"
        else:
            self.threads, self.threads_source = physical_cores()
        self.graph_optimization = check_choice(
            "graph optimization level", options.get("graph_optimization", "all"),
            GRAPH_OPTIMIZATIONS,
        )  # fmt: skip
        self.session = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return _ort_importable()

    def session_options(self):
        import onnxruntime as ort

        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        return so

    def _load(self) -> InputSpec:
        spec = _read_spec(self)
        self.session = _session(self, self.session_options(), ["CPUExecutionProvider"], None)
        self._output = self.session.get_outputs()[0].name
        return spec

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self._output], {INPUT_NAME: batch})
        return np.asarray(out, dtype=np.float32)

    def _close(self) -> None:
        self.session = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            provider="CPUExecutionProvider",
            threads=self.threads,
            threads_source=self.threads_source,
            graph_optimization=self.graph_optimization,
            execution_mode="sequential",
        )
        if self.session is not None:
            d["providers"] = self.session.get_providers()
        return d


class _OrtGpu(Backend):
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
    reuse the same addresses (required for CUDA graphs).
    """

    provider = ""
    missing = ""
    device_id = 0

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.session = None
        self._buffers: dict[int, tuple] = {}  # batch size -> (input, output OrtValue)
        self._binding = None
        self._staged: int | None = None

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
        spec = _read_spec(self)
        self.session = _session(self, self._session_options(), self._providers(), self.provider)
        out = self.session.get_outputs()[0]
        self._output = out.name
        k = out.shape[1] if len(out.shape) == 2 else None
        self._classes = k if isinstance(k, int) and k > 0 else None
        self._binding = self.session.io_binding()
        self._buffers = {}
        self._staged = None
        return spec

    def _check_batch_size(self, n: int) -> None:
        """Hook: subclasses reject batch sizes they cannot run (UserError)."""

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` to the GPU and bind input and output buffers for it."""
        import onnxruntime as ort

        from convforge.runtime.backends.base import check_batch

        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before stage()")
        check_batch(batch, self.spec)
        batch = np.ascontiguousarray(batch)
        n = batch.shape[0]
        self._check_batch_size(n)
        if n not in self._buffers:
            x = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", self.device_id)
            y = None
            if self._classes is not None:
                y = ort.OrtValue.ortvalue_from_shape_and_type(
                    [n, self._classes], np.float32, "cuda", self.device_id
                )
            self._buffers[n] = (x, y)
        else:
            x, y = self._buffers[n]
            x.update_inplace(batch)  # host->device into the same device address
        if self._staged != n:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()
            self._binding.bind_ortvalue_input(INPUT_NAME, x)
            if y is not None:
                self._binding.bind_ortvalue_output(self._output, y)
            else:  # K unknown statically: ORT allocates on the GPU
                self._binding.bind_output(self._output, "cuda", self.device_id)
            self._staged = n

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
        """The logits of the last run, copied to the host (float32 [N, K])."""
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

    Options: ``cuda_graph`` (False; True captures the whole run in a CUDA graph
    on the first call and replays it after: the batch size is then FIXED to the
    first one run, another size is a UserError; every run must reuse the same
    device buffers, which :meth:`stage` does), ``cudnn_conv_algo_search``
    ("EXHAUSTIVE" default, "HEURISTIC", "DEFAULT"), ``device_id`` (0).
    """

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"
    missing = NO_CUDA
    OPTIONS = ("cuda_graph", "cudnn_conv_algo_search", "device_id")

    def __init__(self, path: str, **options) -> None:
        _check_options(self.name, options, self.OPTIONS)
        super().__init__(path, **options)
        self.cuda_graph = bool(options.get("cuda_graph", False))
        self.conv_algo = check_choice(
            "cudnn_conv_algo_search", options.get("cudnn_conv_algo_search", "EXHAUSTIVE"),
            CONV_ALGO_SEARCHES,
        )  # fmt: skip
        self.device_id = int(options.get("device_id", 0))

    def provider_options(self) -> dict:
        return {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.conv_algo,
            "enable_cuda_graph": "1" if self.cuda_graph else "0",
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
        d.update(cuda_graph=self.cuda_graph, cudnn_conv_algo_search=self.conv_algo)
        return d


class OrtTensorRT(_OrtGpu):
    """ONNX Runtime on the TensorRT execution provider (CUDA EP second, for leftovers).

    Options: ``min_batch`` (1), ``opt_batch`` (max_batch), ``max_batch`` (32)
    give the TensorRT optimisation profile for ``input``; a batch outside
    [min_batch, max_batch] is a UserError. ``cache_dir``
    (``~/.cache/convforge/ort-trt``) holds the engine and timing caches.
    ``device_id`` (0). FP16 (or INT8, for a QDQ export) is enabled only when
    the ONNX file's own precision metadata says so: the precision comes from
    the file, never from an option.
    """

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    missing = NO_TRT
    OPTIONS = ("min_batch", "opt_batch", "max_batch", "cache_dir", "device_id")

    def __init__(self, path: str, **options) -> None:
        _check_options(self.name, options, self.OPTIONS)
        super().__init__(path, **options)
        self.min_batch = check_int(f"{self.name} option min_batch", options.get("min_batch", 1))
        self.max_batch = check_int(f"{self.name} option max_batch", options.get("max_batch", 32))
        self.opt_batch = check_int(
            f"{self.name} option opt_batch", options.get("opt_batch", self.max_batch)
        )
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(
                f"{self.name}: need min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        self.cache_dir = str(Path(options.get("cache_dir", DEFAULT_TRT_CACHE)).expanduser())
        self.device_id = int(options.get("device_id", 0))

    def provider_options(self) -> dict:
        if self.spec is None:
            raise RuntimeError(f"{self.name}: provider options need the input spec (load first)")
        c, h, w = self.spec.channels, self.spec.height, self.spec.width

        def shape(n: int) -> str:
            return f"{INPUT_NAME}:{n}x{c}x{h}x{w}"

        return {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": self.cache_dir,
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

    def _load(self) -> InputSpec:
        # provider_options() needs the spec before the session exists.
        self.spec = _read_spec(self)
        os.makedirs(self.cache_dir, exist_ok=True)
        return super()._load()

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
            fp16=self.precision == "fp16",
            int8=self.precision == "int8",
        )
        return d
