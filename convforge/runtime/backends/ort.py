"""ONNX Runtime on the CPU (``ort-cpu``), and what every ONNX Runtime backend shares:
reading the file, creating the session, the core count.

It runs an ``.onnx`` image classifier (input and output names from the graph;
float32, float16 or uint8 input; any precision), or, through ``load_graph``,
any ONNX graph. The input spec and the precision come from the file itself
(:func:`convforge.contract.read_info`). The GPU execution providers are in
:mod:`.ort_gpu`.

onnxruntime is imported inside functions only, so ``convforge.runtime`` imports
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import graph_precision, load_onnx, read_info
from convforge.errors import UserError
from convforge.extras import install_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable, InputSpec
from convforge.settings import setting

GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")


def _ort_importable() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, f"onnxruntime is not installed: {install_hint('onnxruntime')}"
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


def _read_info(backend: Backend):
    info = read_info(backend.path)
    backend.precision = info.precision
    backend.info = info  # input and output names come from the graph
    return info


def _first_line(e: Exception) -> str:
    """The first line of an ONNX Runtime error (its messages run to many lines)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _session(backend: Backend, sess_options, providers, required: str | None):
    """Create the InferenceSession; BackendUnavailable if ``required`` did not make it in."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(backend.path, sess_options=sess_options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
        first = _first_line(e)
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
    if backend.info is None:  # load_graph: any graph
        return session
    if backend.info.input_name not in names:  # read_info and ORT disagree: say so, in one line
        raise UserError(
            f"{backend.path}: expected an input named {backend.info.input_name!r}, got {names}"
        )
    return session


class OrtCpu(Backend):
    """ONNX Runtime on the CPU execution provider; execution is sequential (one inter-op
    thread), intra-op threads default to the physical cores this process may use."""

    name = "ort-cpu"

    @dataclass(frozen=True)
    class Options:
        threads: int | None = setting(
            None, "intra-op threads; default: the physical cores this process may use", minimum=1
        )
        graph_optimization: str = setting(
            "all", "ONNX Runtime graph optimizations", choices=GRAPH_OPTIMIZATIONS
        )
        # ONNX Runtime's default. Spinning threads keep their cores busy for a while after a
        # run: in turns with other engines they slowed the next engine's first call ~2x
        # (benchmarks/ort_int8_batch1.py); off, they block and cost nothing measured there.
        spinning: bool = setting(True, "intra-op threads spin-wait for work instead of blocking")

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        if self.options.threads is not None:
            self.threads, self.threads_source = self.options.threads, "option"
        else:
            self.threads, self.threads_source = physical_cores()
        self.graph_optimization = self.options.graph_optimization
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
        if not self.options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def _load(self) -> InputSpec:
        info = _read_info(self)
        self.session = _session(self, self.session_options(), ["CPUExecutionProvider"], None)
        self._output = info.output_name
        return info.spec

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self._output], {self.info.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def _load_graph(self) -> None:
        self.precision = graph_precision(load_onnx(self.path, weights=False))
        self.info = None  # not a classifier: no input spec
        self.session = _session(self, self.session_options(), ["CPUExecutionProvider"], None)

    def run_feeds(self, feeds: dict) -> list:
        try:
            return self.session.run(None, feeds)
        except Exception as e:  # ORT's own errors (a shape the graph refuses): one line
            raise UserError(f"onnxruntime could not run {self.path}: {_first_line(e)}") from None

    def _close(self) -> None:
        self.session = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            provider="CPUExecutionProvider",
            threads=self.threads,
            threads_source=self.threads_source,
            graph_optimization=self.graph_optimization,
            spinning=self.options.spinning,
            execution_mode="sequential",
        )
        if self.session is not None:
            d["providers"] = self.session.get_providers()
        return d
