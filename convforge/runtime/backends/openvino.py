"""OpenVINO on the CPU: the exported ONNX compiled by ``ov.Core().compile_model``.

    backend = OpenVino("model.onnx", hint="LATENCY", precision=None, threads=None)

Options:

* ``hint``: ``"LATENCY"`` (default) or ``"THROUGHPUT"`` (OpenVINO's PERFORMANCE_HINT:
  one stream using every core, or several streams for batched/parallel work).
* ``precision``: ``"f32"``, ``"bf16"`` or ``None`` (INFERENCE_PRECISION_HINT). ``None``
  lets OpenVINO choose: bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), else f32.
  A request the CPU cannot honour (bf16 without hardware support) is downgraded by
  OpenVINO; the precision that actually runs is read back from the compiled model and
  is what :attr:`precision` and :meth:`describe` report, never the request.
* ``threads``: INFERENCE_NUM_THREADS (``None``: OpenVINO's default).
* ``shapes``: ``"static"`` (default) or ``"dynamic"``. The export's batch
  dimension is dynamic; OpenVINO's CPU plugin runs a model reshaped to a fixed
  batch faster (ResNet-18 int8 at batch 1: about 17% less latency on a 2-core
  AVX2 CPU, see ``benchmarks/cpu_backends.py``), so by default each batch size
  gets its own static compiled model: batch 1 at :meth:`load`, any other on
  its first call (that call includes the compile; ``convforge bench`` reports
  it as first inference). At most ``MAX_STATIC_SHAPES`` are kept, least
  recently used first out. ``"dynamic"`` compiles the model once as exported.

An int8 (QDQ) export runs its quantized ops in int8; it reports ``"int8"`` when the
ONNX metadata says so. openvino is imported inside the methods only.
"""

from __future__ import annotations

import numpy as np

from convforge.errors import UserError, check_choice
from convforge.runtime.backends.base import Backend, InputSpec

HINTS = ("LATENCY", "THROUGHPUT")
PRECISIONS = ("f32", "bf16")
SHAPES = ("static", "dynamic")
MAX_STATIC_SHAPES = 8  # compiled batch sizes kept at once (each holds its own buffers)
_OPTIONS = ("hint", "precision", "threads", "shapes")
# OpenVINO element type name -> convforge precision name
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


class OpenVino(Backend):
    name = "openvino"

    def __init__(self, path: str, **options) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise UserError(
                f"unknown option(s) for backend 'openvino': {', '.join(unknown)}; "
                f"accepted: {', '.join(_OPTIONS)}"
            )
        super().__init__(path, **options)
        self.hint = check_choice("openvino hint", str(options.get("hint", "LATENCY")), HINTS)
        precision = options.get("precision")
        if precision is not None:
            check_choice("openvino precision", precision, PRECISIONS)
        self.requested_precision = precision
        threads = options.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UserError(f"openvino threads must be a positive integer, got {threads!r}")
        self.threads = threads
        self.shapes = check_choice("openvino shapes", str(options.get("shapes", "static")), SHAPES)
        self._model = None  # the ov.Model as read (dynamic batch)
        self._config: dict = {}
        self._requests: dict[int | None, object] = {}  # batch size (None: dynamic) -> request
        self._settings: dict = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, "openvino is not installed: pip install 'convforge[openvino]'"
        return True, ""

    def _load(self) -> InputSpec:
        import openvino as ov

        from convforge.runtime.artifact import read_info

        info = read_info(self.path)
        config = {"PERFORMANCE_HINT": self.hint}
        if self.requested_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = self.requested_precision
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        self._config = config
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(self.path)
        except RuntimeError as e:
            raise UserError(f"OpenVINO could not read {self.path}: {_first_line(e)}") from None
        compiled = self._request_for(1 if self.shapes == "static" else None).get_compiled_model()
        ran = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = _PRECISION_NAMES.get(ran, ran)
        if info.precision == "int8":
            self.precision = "int8"
        self._settings = {
            "device": "CPU",
            "hint": self.hint,
            "requested_precision": self.requested_precision,
            "inference_precision": ran,
            "shapes": self.shapes,
            "threads": _int_property(compiled, "INFERENCE_NUM_THREADS"),
            "streams": _int_property(compiled, "NUM_STREAMS"),
            "openvino": ov.__version__.split("-")[0],
        }
        return info.spec

    def _request_for(self, batch: int | None):
        """The infer request of the model compiled for ``batch`` (None: as exported)."""
        request = self._requests.pop(batch, None)
        if request is None:
            model = self._model
            if batch is not None:
                model = model.clone()
                shape = model.inputs[0].get_partial_shape()
                shape[0] = batch
                model.reshape({0: shape})
            try:
                compiled = self._core.compile_model(model, "CPU", self._config)
            except RuntimeError as e:
                why = _first_line(e)
                raise UserError(f"OpenVINO could not compile {self.path}: {why}") from None
            request = compiled.create_infer_request()
            if len(self._requests) >= MAX_STATIC_SHAPES:
                self._requests.pop(next(iter(self._requests)))  # least recently used
        self._requests[batch] = request  # (re)inserted last: most recently used
        return request

    def _run(self, batch: np.ndarray) -> np.ndarray:
        request = self._request_for(len(batch) if self.shapes == "static" else None)
        request.infer({0: batch})
        out = request.get_output_tensor(0).data
        return np.array(out, dtype=np.float32, copy=True)

    def _close(self) -> None:
        self._requests.clear()
        self._model = None

    def describe(self) -> dict:
        return {**super().describe(), **self._settings}


def _type_name(value) -> str:
    """'f32' / 'bf16' / ... from an ov.Type, or from a string in either spelling."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    text = str(value).lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _int_property(compiled, key: str) -> int | None:
    try:
        return int(compiled.get_property(key))
    except (RuntimeError, TypeError, ValueError):
        return None
