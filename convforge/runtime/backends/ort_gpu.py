"""ONNX Runtime on NVIDIA GPUs: ``ort-cuda`` (CUDA execution provider) and ``ort-trt``
(TensorRT execution provider, CUDA for what TensorRT does not take).

They run what ``ort-cpu`` runs (:mod:`.ort`) and keep batches on the device for
compute-only timing (:class:`~.base.DeviceResident`). They never fall back to
the CPU: when the requested execution provider is not in the session after
creation (onnxruntime-gpu lists CUDA/TensorRT even when their libraries fail to
load; ``InferenceSession`` then prints "EP Error" and silently retries on the
next providers), ``load()`` raises :class:`BackendUnavailable` naming what is
missing, so ``auto`` moves on.

``ort-trt`` keeps one engine-cache folder per ONNX file content (its sha256):
ONNX Runtime names a cached engine from the graph's node and tensor names and
version numbers, never from the weights, so two exports of one architecture
would otherwise share an engine and a retrained model would silently run the
old weights. It refuses an int8 file whose Q/DQ is not symmetric int8 (the
``cpu`` export target): TensorRT's parser rejects non-zero zero points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import sha256_of
from convforge.errors import UserError
from convforge.runtime.backends.base import Backend, DeviceResident, InputSpec
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


def _has_provider(provider: str, missing: str) -> tuple[bool, str]:
    ok, why = _ort_importable()
    if not ok:
        return ok, why
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, missing
    return True, ""


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
    reuse the same addresses (required for CUDA graphs).
    """

    provider = ""
    missing = ""

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.device_id = self.options.device_id
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
        spec = self._check_file(_read_info(self))
        self.session = _session(self, self._session_options(), self._providers(), self.provider)
        out = next(o for o in self.session.get_outputs() if o.name == self.info.output_name)
        self._output = out.name
        k = out.shape[1] if len(out.shape) == 2 else None
        self._classes = k if isinstance(k, int) and k > 0 else None
        self._binding = self.session.io_binding()
        self._buffers = {}
        self._staged = None
        return spec

    def _check_file(self, info) -> InputSpec:
        """Hook: refuse a file this provider cannot run (BackendUnavailable); the input spec."""
        return info.spec

    def _check_batch_size(self, n: int) -> None:
        """Hook: subclasses reject batch sizes they cannot run (UserError)."""

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` to the GPU and bind input and output buffers for it."""
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
            self._binding.bind_ortvalue_input(self.info.input_name, x)
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

    With ``cuda_graph`` the whole run is captured in a CUDA graph on the first
    call and replayed after: an instance then runs ONE batch size (the first it
    ran; another is a UserError) and every run reuses the same device buffers,
    which :meth:`stage` does. :attr:`single_batch_size` says so, and the bench
    loads one instance per batch size.
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
    a UserError. Engines are cached under ``cache_dir/<sha256 of the file>/``
    (see the module docstring); the timing cache, which is per GPU and
    TensorRT version rather than per model, is shared in ``cache_dir``. FP16
    (or INT8, for a symmetric QDQ export) is enabled only when the file's own
    precision says so: the precision comes from the file, never from an option.
    """

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    missing = NO_TRT

    @dataclass(frozen=True)
    class Options(BatchProfile):
        cache_dir: str = setting(DEFAULT_TRT_CACHE, "engine and timing caches")
        device_id: int = setting(0, "CUDA device", minimum=0)

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.min_batch, self.opt_batch, self.max_batch = self.options.profile(self.name)
        self.cache_dir = str(Path(self.options.cache_dir).expanduser())
        self.engine_cache: str | None = None  # cache_dir/<sha256 of the ONNX file>, set by load

    def provider_options(self) -> dict:
        if self.spec is None:
            raise RuntimeError(f"{self.name}: provider options need the input spec (load first)")

        def shape(n: int) -> str:  # in the file's layout (NHWC for a uint8-input file)
            return f"{self.info.input_name}:" + "x".join(map(str, self.spec.shape(n)))

        return {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": self.engine_cache,
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
            fp16=self.precision == "fp16",
            int8=self.precision == "int8",
        )
        return d


def engine_cache_dir(cache_dir: str, path: str) -> str:
    """``cache_dir/<sha256 of the file at path>``: one engine folder per model content."""
    return str(Path(cache_dir) / sha256_of(path))
