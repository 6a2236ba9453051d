"""What ``ort-cuda`` (:mod:`.ort_cuda`) and ``ort-trt`` (:mod:`.ort_trt`) share: ONNX
Runtime's GPU providers behind IO binding (:class:`OrtGpu`), and loading their libraries.

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
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading

import numpy as np

from convforge.contract import ModelInfo
from convforge.extras import extra_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable, DeviceResident, InputSpec
from convforge.runtime.backends.ort_session import create_session, ort_importable

__all__ = ["OrtGpu", "preload_libraries"]

# A session output's ONNX type -> the numpy type of the device buffer bound to it. A type
# numpy cannot name (bfloat16) gets a buffer onnxruntime allocates.
OUTPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_preloaded: set[str] = set()  # what preload_libraries has done in this process
# Held while stdout is redirected (preload_dlls, session creation). The redirect is
# process-wide and serve loads instances from several threads: two at once would restore
# each other's stream. So one GPU session is created at a time; a second ort-trt instance
# then finds the engine the first one cached instead of building it into the same file.
_stdout_lock = threading.Lock()


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


def _ep_error(printed: str) -> str:
    """onnxruntime's reason for a provider failure, from what InferenceSession printed
    ("EP Error <reason> when using [...]"; its banner lines start with '*'), or ''."""
    for line in printed.splitlines():
        if line.startswith("EP Error "):
            return line[len("EP Error ") :].split(" when using [")[0].strip()
    return ""


class OrtGpu(Backend, DeviceResident):
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

    library = "onnxruntime"
    gpu = True
    provider = ""  # the execution provider it runs on, e.g. "CUDAExecutionProvider"
    provider_label = ""  # and what a person calls it, e.g. "CUDA"
    needs = ""  # what that provider needs, said when onnxruntime does not have it
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
        ok, why = ort_importable()
        if not ok:
            return ok, why
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            return False, (
                f"onnxruntime has no {cls.provider_label} execution provider "
                f"(it needs {cls.needs}: {extra_hint(cls.extra)})"
            )
        return True, ""

    def _providers(self) -> list:
        raise NotImplementedError

    def _session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return so

    def _load(self, info: ModelInfo) -> InputSpec:
        spec = self._check_file(info)
        preload_libraries(tensorrt=self.loads_tensorrt)
        self.session = self._create_session(self._providers())
        out = next(o for o in self.session.get_outputs() if o.name == info.output_name)
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
                session = create_session(self, self._session_options(), providers, self.provider)
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

    def _check_file(self, info: ModelInfo) -> InputSpec:
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
