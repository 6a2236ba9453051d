"""ONNX Runtime on the CUDA execution provider (``ort-cuda``), with IO binding: what it
shares with ``ort-trt`` (the device buffers, no silent CPU fallback, the libraries loaded
before the first session) is :class:`~.ort_gpu.OrtGpu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convforge.contract import ModelInfo
from convforge.errors import UserError
from convforge.runtime.backends.base import InputSpec
from convforge.runtime.backends.ort_gpu import OrtGpu
from convforge.settings import setting

CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


class OrtCuda(OrtGpu):
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
    extra = "gpu"
    numeric_options = ("tf32",)
    provider = "CUDAExecutionProvider"
    provider_label = "CUDA"
    needs = "a CUDA GPU and the onnxruntime-gpu build"

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

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """With and without a CUDA graph."""
        return [{"cuda_graph": False}, {"cuda_graph": True}]

    @property
    def single_batch_size(self) -> bool:
        return self.cuda_graph

    def _load(self, info: ModelInfo) -> InputSpec:
        spec = super()._load(info)
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

    def _check_file(self, info: ModelInfo) -> InputSpec:
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
        return {
            **super().describe(),
            "cuda_graph": self.cuda_graph,
            "cudnn_conv_algo_search": self.conv_algo,
            "tf32": self.options.tf32,
        }
