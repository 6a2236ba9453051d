"""PyTorch: the ``.pt2`` torch.export program the export writes beside the ONNX.

    backend = TorchProgram("model.onnx", device="cpu", dtype="fp32")  # runs model.pt2

Given an ``.onnx`` path it runs the sibling ``.pt2``; given a ``.pt2`` it runs that.
The program is ``torch.export.load(path).module()``: no builder or export code is
imported, so any file ``convforge export`` wrote is enough. Runs under
``torch.inference_mode``.

Options:

* ``device``: ``"cpu"`` (default) or ``"cuda"``.
* ``dtype``: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: the module's weights and the
  inputs are cast to it; logits always come back as float32 numpy. fp16 is meant for
  CUDA (many CPU kernels lack it).
* ``channels_last``: bool, module and inputs in NHWC memory format (faster convs on
  CUDA tensor cores and oneDNN).
* ``compile``: bool, wrap the module in ``torch.compile``. Needs a working compiler
  toolchain (Inductor emits C++ on CPU, Triton kernels on CUDA: a C++ compiler, and
  the ``triton`` package for CUDA); the first run of each batch shape is slow.
* ``tf32``: bool, CUDA fp32 only (default False). cuDNN runs fp32 convs on TF32 tensor
  cores by default on Ampere and newer GPUs (10-bit mantissa: about 1e-3 relative error
  here); off, fp32 means fp32. On, the backend reports precision ``tf32``.
* ``cuda_graphs``: bool, CUDA only. Replays a captured CUDA graph, which removes the
  per-kernel launch overhead for small batches. The graph has a fixed batch shape:
  each new batch shape is captured once (a few warm-up runs, then capture) and kept,
  with its own static input/output buffers. With ``compile`` it uses
  ``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA graphs) instead of a
  manual ``torch.cuda.CUDAGraph``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convforge.errors import UserError, check_choice
from convforge.extras import install_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable, InputSpec

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
_OPTIONS = ("device", "dtype", "channels_last", "compile", "cuda_graphs", "tf32")
_WARMUP = 3  # runs on a side stream before a CUDA graph capture


def program_path(path: str | Path) -> Path:
    """The ``.pt2`` program for ``path`` (an ``.onnx`` export or the ``.pt2`` itself)."""
    path = Path(path)
    return path if path.suffix == ".pt2" else path.with_suffix(".pt2")


class TorchProgram(Backend):
    name = "torch"

    def __init__(self, path: str, **options) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise UserError(
                f"unknown option(s) for backend 'torch': {', '.join(unknown)}; "
                f"accepted: {', '.join(_OPTIONS)}"
            )
        super().__init__(path, **options)
        self.device = check_choice("torch device", str(options.get("device", "cpu")), DEVICES)
        self.dtype = check_choice("torch dtype", str(options.get("dtype", "fp32")), DTYPES)
        self.channels_last = bool(options.get("channels_last", False))
        self.compile = bool(options.get("compile", False))
        self.cuda_graphs = bool(options.get("cuda_graphs", False))
        self.tf32 = bool(options.get("tf32", False))
        if self.cuda_graphs and self.device != "cuda":
            raise UserError("cuda_graphs needs device='cuda'")
        self.program = program_path(path)
        self._module = None
        self._torch_dtype = None
        self._graphs: dict = {}  # batch shape -> (graph, static input, static output)

    @classmethod
    def available(cls, device: str = "cpu") -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, f"torch is not installed: {install_hint('torch')}"
        if device == "cuda" and not torch.cuda.is_available():
            return False, "device 'cuda' requested but torch.cuda.is_available() is False"
        return True, ""

    def _load(self) -> InputSpec:
        import torch

        from convforge.contract import read_info

        ok, why = self.available(self.device)
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        source = Path(self.path)
        if not self.program.is_file() and source.suffix == ".onnx" and source.is_file():
            precision = read_info(source).precision
            if precision != "fp32":
                raise UserError(
                    f"the torch backend runs the fp32 .pt2 program; {source.name} is an "
                    f"{precision} variant, which has none (give the fp32 .onnx)"
                )
        if not self.program.is_file():
            raise UserError(
                f"{self.program} does not exist: the torch backend runs the .pt2 program "
                "that `convforge export` writes beside the .onnx; re-export the checkpoint"
            )
        # The ONNX beside the program declares the input shape even without convforge
        # metadata; a bare .pt2 needs the metadata (channels, input_size) in convforge.json.
        info = read_info(source if source.suffix == ".onnx" and source.is_file() else self.program)
        try:
            module = torch.export.load(str(self.program)).module()
        except Exception as e:  # torch.export.load raises many types for a foreign file
            raise UserError(
                f"{self.program} is not a loadable torch.export program: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None
        self._torch_dtype = {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
        }[self.dtype]
        module = module.to(device=self.device, dtype=self._torch_dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            module = torch.compile(module, mode=mode)
        self._module = module
        tf32 = self.tf32 and self.device == "cuda" and self.dtype == "fp32"
        self.precision = "tf32" if tf32 else self.dtype
        return info.spec

    def _numerics(self):
        """cuDNN flags for this backend's runs: TF32 only when asked for (see ``tf32``)."""
        import torch

        cudnn = torch.backends.cudnn
        return cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=self.tf32,
        )

    def _to_input(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(batch).to(device=self.device, dtype=self._torch_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._numerics():
            x = self._to_input(batch)
            if self.cuda_graphs and not self.compile:
                y = self._replay(x)
            else:
                y = self._module(x)
            return y.float().cpu().numpy()

    def _replay(self, x):
        """Run ``x`` through the CUDA graph captured for its shape (capturing it first)."""
        import torch

        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP):
                    self._module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._module(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _close(self) -> None:
        self._graphs.clear()
        self._module = None

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": self.device,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "tf32": self.tf32,
            "program": str(self.program),
        }
