"""PyTorch: the ``.pt2`` torch.export program the export writes beside the ONNX.

    backend = TorchProgram("model.onnx", device="cpu", dtype="fp32")  # runs model.pt2

Given an ``.onnx`` path it runs the sibling ``.pt2``; given a ``.pt2`` it runs that.
Given a uint8-input twin (``model.uint8.onnx``, ``convforge export --input-format
uint8``) it runs the float program it was made from (``model.pt2``, checked to come
from the same checkpoint) and takes uint8 [N, H, W, C] pixels: they go to the device
as uint8 (4x fewer bytes) and are normalized there with the graph's own scale and
bias (:func:`convforge.contract.pixel_normalization`).
The program is ``torch.export.load(path).module()``: no builder or export code is
imported, so any file ``convforge export`` wrote is enough. Runs under
``torch.inference_mode``.

Options (:class:`TorchProgram.Options`):

* ``device``: ``"cpu"`` (default) or ``"cuda"``.
* ``dtype``: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: the module's weights and the
  inputs are cast to it; logits always come back as float32 numpy. Lowered only when
  asked: fp32 runs in fp32. fp16 is meant for CUDA (many CPU kernels lack it). bf16 is
  for CPUs with native bf16 (:func:`native_bf16`): with ``channels_last``, ResNet-18 at
  batch 8 took 33 ms against fp32's 119 ms (also channels_last) on a 2-core AMX Xeon
  (torch 2.14); elsewhere oneDNN emulates it, slower than fp32.
* ``channels_last``: module and inputs in NHWC memory format (faster convs on
  CUDA tensor cores and oneDNN).
* ``compile``: wrap the module in ``torch.compile``. Needs a working compiler
  toolchain (Inductor emits C++ on CPU, Triton kernels on CUDA: a C++ compiler, and
  the ``triton`` package for CUDA); the first run of each batch shape is slow.
* ``tf32``: CUDA fp32 only (default False). cuDNN runs fp32 convs on TF32 tensor
  cores by default on Ampere and newer GPUs (10-bit mantissa: about 1e-3 relative error
  here); off, fp32 means fp32 (convolutions and matmuls). On, both may use TF32 and the
  backend reports precision ``tf32``. torch's TF32 switches are process-wide: they are
  set at load, and every fp32 CUDA instance loaded in a process at the same time must
  ask the same (another is refused, in one line); the last one closed restores them.
* ``cuda_graphs``: CUDA only. Replays a captured CUDA graph, which removes the
  per-kernel launch overhead for small batches. A graph has a fixed batch size, so
  batches go in size buckets: a batch of ``n`` rows runs in the graph of the next power
  of two (1, 2, 4, 8, 16, 32, ...; ``n`` itself for a fixed-batch file), padded, and
  its ``n`` rows of logits come back. Each bucket is captured on its first batch (a
  few warm-up runs, then the capture) and kept: at most 7 graphs up to batch 64, and
  padding at most doubles a batch (``convforge serve`` warms every bucket up to its
  ``--max-batch-size`` before serving). An instance's graphs share one memory pool and
  one capture stream; captures are one at a time in the process and in thread-local
  mode, so work in other threads cannot invalidate them. With ``compile`` it uses
  ``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA graphs, recorded per
  thread) on the same buckets instead of a manual ``torch.cuda.CUDAGraph``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convforge.contract import ModelInfo, read_info
from convforge.errors import UserError, first_line
from convforge.extras import extra_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable, DeviceResident, InputSpec
from convforge.settings import setting

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
_WARMUP = 3  # runs on a side stream before a CUDA graph capture
_LARGEST_BUCKET = 4096  # the batch range `convforge export` gives the program (MAX_BATCH)
# PyTorch's CUDA graph constraints: "within a process, only one capture may be underway
# at a time" (CUDA semantics notes, torch 2.6-2.14).
_CAPTURE = threading.Lock()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, which every AMX CPU has too)
    as torch sees it. False without torch, or where torch cannot tell."""
    try:
        import torch
    except ImportError:
        return False
    # A private helper of torch.cpu (2.2+): there is no public one.
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


class _ProcessTf32:
    """torch's TF32 switches for CUDA fp32 convolutions and matmuls, held by the fp32 CUDA
    instances loaded in this process.

    ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32`` are
    process-wide: every thread reads them at each call (and a capture or compile bakes in
    what it read), so setting them around each run would let one thread's exit switch
    TF32 back under another's running batch. They are set once, by the first instance to
    load; the others must ask the same (two models in one process asking differently
    conflict: refused in one line rather than one of them silently running the other's
    precision); the last one to close puts back what was there before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.on: bool | None = None  # what the loaded instances set; None: none loaded
        self._users = 0
        self._before: tuple[bool, bool] | None = None

    def claim(self, on: bool) -> None:
        import torch

        with self._lock:
            if self._users and self.on != on:
                raise UserError(
                    f"torch: fp32 CUDA models loaded in this process run with tf32={self.on}, "
                    f"and TF32 is a process-wide torch setting: one asking tf32={on} cannot run "
                    "beside them (run it in another process, or ask the same tf32)"
                )
            if not self._users:
                try:
                    self._before = (
                        torch.backends.cudnn.allow_tf32,
                        torch.backends.cuda.matmul.allow_tf32,
                    )
                except RuntimeError:  # torch 2.9+: legacy and fp32_precision settings mixed
                    self._before = None
                torch.backends.cudnn.allow_tf32 = on
                torch.backends.cuda.matmul.allow_tf32 = on
                self.on = on
            self._users += 1

    def release(self) -> None:
        import torch

        with self._lock:
            self._users -= 1
            if self._users == 0:
                if self._before is not None:
                    cudnn, matmul = self._before
                    torch.backends.cudnn.allow_tf32 = cudnn
                    torch.backends.cuda.matmul.allow_tf32 = matmul
                self.on = None


TF32 = _ProcessTf32()


def program_path(path: str | Path) -> Path:
    """The ``.pt2`` program for ``path`` (an ``.onnx`` export, its uint8-input twin
    ``<name>.uint8.onnx`` (the float ``<name>.pt2``), or the ``.pt2`` itself)."""
    path = Path(path)
    if path.suffix == ".pt2":
        return path
    stem = path.stem.removesuffix(".uint8")
    return path.with_name(stem + ".pt2")


class TorchProgram(Backend, DeviceResident):
    name = "torch"
    library = "torch"
    extra = "train"
    gpu = False  # CPU by default; device="cuda" is an option, checked when it loads
    numeric_options = ("device", "dtype", "tf32")
    suffixes = (".onnx", ".pt2")  # an .onnx export means the .pt2 program beside it
    fp32_only = True  # export writes the .pt2 for the fp32 model only

    @dataclass(frozen=True)
    class Options:
        device: str = setting("cpu", "where the program runs", choices=DEVICES)
        dtype: str = setting("fp32", "weights and inputs cast to this", choices=DTYPES)
        channels_last: bool = setting(False, "NHWC memory format")
        compile: bool = setting(False, "torch.compile the program (needs a C++ compiler)")
        cuda_graphs: bool = setting(False, "replay a CUDA graph per batch-size bucket (CUDA only)")
        tf32: bool = setting(False, "TF32 convolutions and matmuls for fp32 on CUDA")

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        o = self.options
        self.device, self.dtype, self.channels_last = o.device, o.dtype, o.channels_last
        self.compile, self.cuda_graphs, self.tf32 = o.compile, o.cuda_graphs, o.tf32
        if self.cuda_graphs and self.device != "cuda":
            raise UserError("cuda_graphs needs device='cuda'")
        self.program = program_path(path)
        self._staged = None  # (device input, last output), set by stage()
        self._module = None
        self._torch_dtype = None
        self._pixels = None  # (scale, bias) tensors for a uint8-input file, set by load()
        self._graphs: dict = {}  # bucket (batch size) -> (graph, static input, static output)
        self._pool = None  # this instance's graph memory pool (graph_pool_handle)
        self._stream = None  # and its capture stream: the same one for every capture
        self._tf32_claimed = False  # holds TF32 (see _ProcessTf32)

    @classmethod
    def reads(cls, path: str) -> list[str]:
        """The file given and the ``.pt2`` program it runs (code: torch's loader can
        unpickle), so that a plan hashes the program too."""
        program = str(program_path(path))
        return [str(path)] + ([program] if program != str(path) else [])

    @property
    def device_resident(self) -> bool:
        """On CUDA, a staged batch stays on the GPU (compute-only timing); on the CPU there
        is no device copy to leave out."""
        return self.device == "cuda"

    @classmethod
    def available(cls, device: str = "cpu") -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, f"torch is not installed: {extra_hint(cls.extra)}"
        if device == "cuda" and not torch.cuda.is_available():
            return False, "device 'cuda' requested but torch.cuda.is_available() is False"
        return True, ""

    @classmethod
    def tune_variants(cls, batch_size: int, batch_sizes, fp32: bool) -> list[dict]:
        """The CPU program, contiguous and channels_last, and bf16 (channels_last) on a CPU
        with native bf16; on CUDA fp32 and fp16, with and without CUDA graphs (fp32 files
        only: export writes the .pt2 program for the fp32 model alone)."""
        ok_cuda, _ = cls.available("cuda")
        out = [{}, {"channels_last": True}]  # the CPU: slow for CNNs, kept so the plan says so
        if native_bf16():  # emulated bf16 is slower than fp32: not worth timing
            out.append({"dtype": "bf16", "channels_last": True})
        if ok_cuda and fp32:  # the .pt2 is fp32 only; dtype casts it on the GPU
            out += [
                {"device": "cuda", "dtype": d, "channels_last": True, "cuda_graphs": g}
                for d in ("fp32", "fp16")
                for g in (False, True)
            ]
        return out

    def _read_info(self) -> ModelInfo:
        """The info of the ``.onnx`` beside the program (it declares the input shape even
        without convforge metadata) or of a bare ``.pt2`` (which needs the metadata, channels
        and input_size, in its convforge.json). First the device must be here, and there must
        be a program: an fp16/int8 ``.onnx`` has none (UserError)."""
        ok, why = self.available(self.device)
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available: {why}")
        source = Path(self.path)
        if not self.program.is_file() and source.suffix == ".onnx" and source.is_file():
            precision = read_info(source, self.overrides).precision
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
        path = source if source.suffix == ".onnx" and source.is_file() else self.program
        return read_info(path, self.overrides)

    def _load(self, info: ModelInfo) -> InputSpec:
        import torch

        if self.device == "cuda" and self.dtype == "fp32":
            TF32.claim(self.tf32)  # before anything compiles or runs: they read it
            self._tf32_claimed = True
        try:
            module = torch.export.load(str(self.program)).module()
        except Exception as e:  # torch.export.load raises many types for a foreign file
            raise UserError(
                f"{self.program} is not a loadable torch.export program: {first_line(e)}"
            ) from None
        self._torch_dtype = {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
        }[self.dtype]
        module = module.to(device=self.device, dtype=self._torch_dtype)
        self._pixels = self._pixel_normalization(info) if info.spec.dtype == "uint8" else None
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            module = torch.compile(module, mode=mode)
        self._module = module
        tf32 = self.tf32 and self.device == "cuda" and self.dtype == "fp32"
        self.precision = "tf32" if tf32 else self.dtype
        return info.spec

    def _pixel_normalization(self, info):
        """(scale, bias) on the device for a uint8-input file whose program is its float twin's."""
        import torch

        from convforge.contract import pixel_normalization

        made_from = read_info(self.program).metadata.get("source_sha256")
        if made_from != info.metadata.get("source_sha256"):
            raise UserError(
                f"{self.program.name} and {Path(self.path).name} come from different checkpoints "
                "(source_sha256); export them together"
            )
        c = info.spec.channels
        return tuple(
            torch.from_numpy(v.reshape(1, c, 1, 1)).to(self.device)
            for v in pixel_normalization(info.mean, info.std)
        )

    @property
    def input_dtypes(self) -> tuple[type, ...]:
        """fp16 programs also take float16 batches: half the host-to-device bytes; a
        uint8-input file takes uint8 pixels only."""
        if self.spec is not None and self.spec.dtype == "uint8":
            return (np.uint8,)
        return (np.float32, np.float16) if self.dtype == "fp16" else (np.float32,)

    def _to_input(self, batch: np.ndarray):
        import torch

        if self._pixels is not None:  # uint8 NHWC to the device, then the graph's Mul and Add
            scale, bias = self._pixels
            x = torch.from_numpy(batch).to(device=self.device).permute(0, 3, 1, 2)
            x = (x.float() * scale + bias).to(self._torch_dtype)
            memory = torch.channels_last if self.channels_last else torch.contiguous_format
            return x.contiguous(memory_format=memory)
        x = torch.from_numpy(batch).to(device=self.device, dtype=self._torch_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._forward(self._to_input(batch)).float().cpu().numpy()

    def bucket(self, n: int) -> int:
        """The batch size that runs ``n`` rows with ``cuda_graphs``: the next power of two,
        within the program's batch range; ``n`` itself for a fixed-batch file."""
        if self.spec is not None and self.spec.batch is not None:
            return n
        return max(n, min(1 << (n - 1).bit_length(), _LARGEST_BUCKET))

    def _padded(self, x):
        """``x`` padded up to its bucket (compiled CUDA graphs: one per bucket) with copies
        of its last row, the policy of :mod:`convforge.runtime.evaluate`."""
        import torch

        pad = self.bucket(len(x)) - len(x)
        if not pad:
            return x
        copies = x[-1:].expand(pad, *x.shape[1:])
        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.cat([x, copies]).contiguous(memory_format=memory)

    def _capture(self, x, size: int) -> tuple:
        """(graph, static input, static output) for batches of ``size`` rows, captured with
        the first batch ``x`` in its input (``size >= len(x)``, the rest zeros)."""
        import torch

        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        static_in = torch.empty(
            (size, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=memory
        ).zero_()
        static_in[: len(x)].copy_(x)
        if self._pool is None:
            # One pool for all of this instance's graphs (they replay one at a time, each
            # output copied out before the next replay), with the same capture stream each
            # time, as torch.cuda.graph asks of captures that share a pool.
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream()
        with _CAPTURE:
            # Warm-up on a side stream (cuDNN and cuBLAS set themselves up), as documented.
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for _ in range(_WARMUP):
                    self._module(static_in)
            torch.cuda.current_stream().wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (other instances) neither invalidate
            # this capture nor fail; only this thread's are checked.
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                static_out = self._module(static_in)
        return graph, static_in, static_out

    def _replay(self, x):
        """Run ``x`` through the CUDA graph of its bucket (capturing it on first use)."""
        n, size = len(x), self.bucket(len(x))
        if size not in self._graphs:
            self._graphs[size] = self._capture(x, size)
        graph, static_in, static_out = self._graphs[size]
        # Rows n.. keep an earlier batch's values: each row's logits depend on that row
        # only (inference, no batch statistics), and they are sliced off.
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n].clone()  # the next replay overwrites static_out

    def _forward(self, x):
        if not self.cuda_graphs:
            return self._module(x)
        if not self.compile:
            return self._replay(x)
        return self._module(self._padded(x))[: len(x)]

    def stage(self, batch: np.ndarray) -> None:
        """Copy ``batch`` to the device once, for :meth:`run_device_resident`."""
        if not self._loaded:
            raise RuntimeError(f"{self.name}: call load() before stage()")
        self.check(batch)
        self._staged = (self._to_input(np.ascontiguousarray(batch)), None)

    def run_device_resident(self) -> None:
        """Run on the staged batch: device compute and the closing synchronization only."""
        import torch

        if self._staged is None:
            raise RuntimeError(f"{self.name}: call stage(batch) before run_device_resident()")
        with torch.inference_mode():
            y = self._forward(self._staged[0])
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._staged = (self._staged[0], y)

    def fetch(self) -> np.ndarray:
        """The logits of the last :meth:`run_device_resident`, on the host (float32)."""
        if self._staged is None or self._staged[1] is None:
            raise RuntimeError(f"{self.name}: nothing has run yet")
        return self._staged[1].float().cpu().numpy()

    def _close(self) -> None:
        self._graphs.clear()
        self._pool = self._stream = None
        self._staged = None
        self._module = None
        if self._tf32_claimed:
            self._tf32_claimed = False
            TF32.release()

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": self.device,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "cuda_graph_batches": sorted(self._graphs),  # the buckets captured so far
            "tf32": self.precision == "tf32",  # what ran (set at load), not what was asked
            "program": str(self.program),
        }
