"""ONNX Runtime on the CPU (``ort-cpu``).

It runs an ``.onnx`` image classifier (input and output names from the graph;
float32, float16 or uint8 input; any precision), or, through ``load_graph``,
any ONNX graph. The input spec and the precision come from the file itself
(:func:`convforge.contract.read_info`). What every ONNX Runtime backend shares
is in :mod:`.ort_session`; the GPU execution providers are :mod:`.ort_cuda` and
:mod:`.ort_trt`.

onnxruntime is imported inside functions only, so ``convforge.runtime`` imports
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import ModelInfo, graph_precision, load_onnx
from convforge.errors import UserError, first_line
from convforge.runtime.backends.base import Backend, InputSpec
from convforge.runtime.backends.ort_session import create_session, ort_importable
from convforge.settings import setting

GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")


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


class OrtCpu(Backend):
    """ONNX Runtime on the CPU execution provider; execution is sequential (one inter-op
    thread), intra-op threads default to the physical cores this process may use."""

    name = "ort-cpu"
    library = "onnxruntime"
    extra = "cpu"
    gpu = False
    numeric_options = ("graph_optimization",)

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
        return ort_importable()

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """Threads (all physical cores, the default, and 1) x graph optimization level
        (all, basic)."""
        threads = [{}, {"threads": 1}] if physical_cores()[0] > 1 else [{}]
        return [{**t, "graph_optimization": g} for g in ("all", "basic") for t in threads]

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

    def _load(self, info: ModelInfo) -> InputSpec:
        self.session = create_session(self, self.session_options(), ["CPUExecutionProvider"], None)
        self._output = info.output_name
        return info.spec

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self._output], {self.info.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def _load_graph(self) -> None:
        self.precision = graph_precision(load_onnx(self.path, weights=False))
        self.session = create_session(self, self.session_options(), ["CPUExecutionProvider"], None)

    def run_feeds(self, feeds: dict) -> list:
        try:
            return self.session.run(None, feeds)
        except Exception as e:  # ORT's own errors (a shape the graph refuses): one line
            raise UserError(f"onnxruntime could not run {self.path}: {first_line(e)}") from None

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
