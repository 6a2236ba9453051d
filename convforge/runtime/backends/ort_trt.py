"""ONNX Runtime on the TensorRT execution provider (``ort-trt``), CUDA's second for what
TensorRT does not take; what it shares with ``ort-cuda`` is :class:`~.ort_gpu.OrtGpu`.

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

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from convforge.contract import ModelInfo, sha256_of
from convforge.errors import UserError
from convforge.runtime.backends.base import InputSpec, tune_profile
from convforge.runtime.backends.options import BatchProfile
from convforge.runtime.backends.ort_gpu import OrtGpu
from convforge.settings import setting

DEFAULT_TRT_CACHE = "~/.cache/convforge/ort-trt"
# Where TensorRT's own version can be asked when the tensorrt module is not importable:
# getInferLibVersion() is extern "C" in every libnvinfer (NvInferRuntimeBase.h).
NVINFER_LIBRARIES = (
    "libnvinfer.so.10",
    "libnvinfer.so.11",
    "libnvinfer.so",
    "nvinfer_10.dll",
    "nvinfer_11.dll",
)


class OrtTensorRT(OrtGpu):
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
    extra = "gpu,tensorrt"
    numeric_options = ()  # always TF32 on an fp32 file (no switch): one check per file
    symmetric_int8_only = True  # TensorRT's parser rejects non-zero zero points
    provider = "TensorrtExecutionProvider"
    provider_label = "TensorRT"
    needs = "a CUDA GPU, the onnxruntime-gpu build and TensorRT"
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

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """A TensorRT profile tuned for each batch size. fp16 and int8 engines come from the
        fp16/int8 files given: precision is the file's, never an option."""
        return [tune_profile(batch_size, batch_sizes)]

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

    def _check_file(self, info: ModelInfo) -> InputSpec:
        # The int8 symmetry was checked by load() (symmetric_int8_only).
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


def tensorrt_version() -> str:
    """The TensorRT version the TensorRT provider runs with, for the engine cache key:
    ``tensorrt.__version__`` once :func:`~.ort_gpu.preload_libraries` imported it, else
    libnvinfer's ``getInferLibVersion()`` ((major * 100 + minor) * 100 + patch from
    TensorRT 10), else ``unknown``. onnxruntime's build information does not name TensorRT
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
