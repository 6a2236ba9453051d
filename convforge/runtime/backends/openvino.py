"""OpenVINO on the CPU: the exported ONNX compiled by ``ov.Core().compile_model``.

    backend = OpenVino("model.onnx", hint="LATENCY", precision=None, threads=None)

Options (:class:`OpenVino.Options`): ``hint`` is OpenVINO's PERFORMANCE_HINT (LATENCY:
one stream using every core; THROUGHPUT: several streams for batched/parallel work).
``threads`` is INFERENCE_NUM_THREADS.

``precision`` is INFERENCE_PRECISION_HINT, the precision of every op that is not
quantized, and it is always sent: ``f32`` unless asked otherwise. Left to itself
OpenVINO computes fp32 files in bf16 on CPUs with native bf16 (AVX512-BF16 / AMX),
about 3 significant digits, which a file's own precision never asked for. f32 is
the file's own precision for fp32 files and for the float parts of int8 ones; for
fp16 files it is what the CPU plugin offers at or above fp16 on every CPU (fp16
compute exists on few CPUs, so f16 would make results depend on the CPU). ``bf16``
is the faster choice where the CPU has it (:func:`native_bf16`; ``convforge tune``
tries it, accuracy-checked). A request the CPU cannot honour (bf16 without hardware
support) is downgraded by OpenVINO, so the precision that runs is read back from the
compiled model (``describe()["inference_precision"]``), never assumed.

:attr:`precision` is the file's (fp32, fp16, int8), or names bf16 when bf16 ran:
``bf16`` for a float file, ``int8+bf16`` for an int8 one. openvino is imported inside
the functions only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from convforge.contract import ModelInfo
from convforge.errors import UserError
from convforge.extras import extra_hint
from convforge.runtime.backends.base import Backend, InputSpec
from convforge.settings import setting

HINTS = ("LATENCY", "THROUGHPUT")
PRECISIONS = ("f32", "bf16")


class OpenVino(Backend):
    name = "openvino"
    library = "openvino"
    extra = "openvino"
    gpu = False
    numeric_options = ("precision",)

    @dataclass(frozen=True)
    class Options:
        hint: str = setting("LATENCY", "OpenVINO's performance hint", choices=HINTS)
        precision: str = setting(
            "f32", "precision of every op that is not int8: f32 (each file's own or better) "
            "or bf16 (faster on CPUs with AVX512-BF16/AMX, about 3 significant digits)",
            choices=PRECISIONS,
        )  # fmt: skip
        threads: int | None = setting(None, "inference threads; default: OpenVINO's", minimum=1)

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self.hint = self.options.hint
        self.requested_precision = self.options.precision
        self.threads = self.options.threads
        self._compiled = None
        self._request = None
        self._settings: dict = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False, f"openvino is not installed: {extra_hint(cls.extra)}"
        return True, ""

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """The LATENCY and THROUGHPUT performance hints, each in f32 and, for an fp32 file
        on a CPU with native bf16, in bf16. Streams and a static-shape compile are left out:
        the backend runs one synchronous infer request, which one stream serves, and a
        static-shape compile per batch size measured no gain here (commit 6ea1095 reverted
        it). bf16 is not tried on fp16 files (the same bf16 compute from coarser weights)
        nor on int8 ones (little left in float)."""
        precisions = ("f32", "bf16") if fp32 and native_bf16() else ("f32",)
        return [{"hint": h, "precision": p} for p in precisions for h in ("LATENCY", "THROUGHPUT")]

    def _load(self, info: ModelInfo) -> InputSpec:
        compiled = self._compile(info.precision)
        self._input = compiled.input(info.input_name)
        self._output = compiled.output(info.output_name)
        return info.spec

    def _compile(self, file_precision: str):
        """Compile the file for the CPU with this instance's options; set the precision that
        runs (read back from OpenVINO) and the settings describe() reports."""
        import openvino as ov

        config = {
            "PERFORMANCE_HINT": self.hint,
            # Always sent: unset, OpenVINO picks bf16 on CPUs that have it (module docstring).
            "INFERENCE_PRECISION_HINT": self.requested_precision,
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        core = ov.Core()
        try:
            compiled = core.compile_model(self.path, "CPU", config)
        except RuntimeError as e:
            raise UserError(f"OpenVINO could not compile {self.path}: {_first_line(e)}") from None
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        ran = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = _precision(file_precision, ran)
        self._settings = {
            "device": "CPU",
            "hint": self.hint,
            "requested_precision": self.requested_precision,
            "inference_precision": ran,
            "threads": _int_property(compiled, "INFERENCE_NUM_THREADS"),
            "streams": _int_property(compiled, "NUM_STREAMS"),
            "openvino": ov.__version__.split("-")[0],
        }
        return compiled

    def _load_graph(self) -> None:
        from convforge.contract import graph_precision, load_onnx

        self._compile(graph_precision(load_onnx(self.path, weights=False)))

    def run_feeds(self, feeds: dict) -> list:
        try:
            self._request.infer(feeds)
        except RuntimeError as e:
            raise UserError(f"OpenVINO could not run {self.path}: {_first_line(e)}") from None
        count = len(self._compiled.outputs)
        return [np.array(self._request.get_output_tensor(i).data) for i in range(count)]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            self._request.infer({self._input: batch})
        except RuntimeError as e:  # the engine's own check: one line, never a traceback
            raise UserError(f"OpenVINO could not run {self.path}: {_first_line(e)}") from None
        out = self._request.get_tensor(self._output).data
        return np.array(out, dtype=np.float32, copy=True)

    def _close(self) -> None:
        self._request = None
        self._compiled = None

    def describe(self) -> dict:
        return {**super().describe(), **self._settings}


@functools.cache
def native_bf16() -> bool:
    """Whether OpenVINO's CPU device computes bf16 natively here (AVX512-BF16 or AMX): it
    lists BF16 among its OPTIMIZATION_CAPABILITIES. False without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _precision(file_precision: str, ran: str) -> str:
    """What a file of ``file_precision`` runs in when its float ops run in ``ran`` (an
    OpenVINO type name): the file's own precision, with bf16 named where it ran."""
    if ran != "bf16":
        return file_precision
    return "int8+bf16" if file_precision == "int8" else "bf16"


def _type_name(value) -> str:
    """'f32' / 'bf16' / ... from an ov.Type, or from a string in either spelling."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    text = str(value).lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


def _int_property(compiled, key: str) -> int | None:
    try:
        return int(compiled.get_property(key))
    except (RuntimeError, TypeError, ValueError):
        return None


def _first_line(e: Exception) -> str:
    """The engine message's first line that says something (OpenVINO starts with where)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(e).__name__])[0]
