"""cuda-python's runtime API, as the native TensorRT backend uses it (no torch).

TensorRT takes device memory as integer addresses and a CUDA stream; cuda-python
(``cuda.bindings.runtime``, the ``tensorrt`` extra) provides both. Its calls
return ``(error, value...)`` tuples instead of raising: :func:`cuda_call` turns
an error into a RuntimeError naming it. :class:`Allocation` is one block of device
memory (``cudaMalloc``) or page-locked host memory (``cudaMallocHost``), grown on
demand. :func:`check_device_tensor` checks a caller's torch CUDA tensor before its
address is handed to TensorRT.
"""

from __future__ import annotations

import ctypes

import numpy as np

from convforge.errors import UserError

ALIGNMENT = 256  # bytes: the minimum alignment TensorRT requires of a tensor address


def cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime``; ``cuda.cudart`` before
    12.6.1, when the bindings moved; 13.x has only the new path)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(rt, result, what: str):
    """The value of a cuda-python call's ``(error, value...)`` tuple; RuntimeError on error."""
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise RuntimeError(f"CUDA {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class Allocation:
    """One block of device memory (``cudaMalloc``, aligned to 256 bytes or more) or, with
    ``pinned``, of page-locked host memory (``cudaMallocHost``), which copies to and from the
    device read by DMA, without the driver's own staging copy of pageable memory, and which
    ``cudaMemcpyAsync`` copies asynchronously. ``ptr`` is None until the first
    :meth:`reserve`; :meth:`free` gives it back (the owner's close)."""

    def __init__(self, rt, pinned: bool = False) -> None:
        self.rt, self.pinned = rt, pinned
        self.ptr: int | None = None
        self.nbytes = 0

    def reserve(self, nbytes: int) -> int:
        """The address of a block of at least ``nbytes``: this one, or a new one when it is
        too small (the old one is freed first, so no copy or kernel may still use it)."""
        if self.ptr is None or nbytes > self.nbytes:
            self.free()
            rt = self.rt
            what = "cudaMallocHost" if self.pinned else "cudaMalloc"
            alloc = rt.cudaMallocHost if self.pinned else rt.cudaMalloc
            self.ptr = int(cuda_call(rt, alloc(max(int(nbytes), 1)), what))
            self.nbytes = int(nbytes)
        return self.ptr

    def array(self, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy view of a pinned block's first bytes as ``dtype`` of ``shape`` (reserved
        to fit first). It aliases the block: copy what must outlive the next use."""
        if not self.pinned:
            raise RuntimeError("only page-locked host memory can be viewed from the host")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        self.reserve(count * dtype.itemsize)
        raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        """Give the block back (best effort: this runs on close and on error paths)."""
        if self.ptr is not None:
            (self.rt.cudaFreeHost if self.pinned else self.rt.cudaFree)(self.ptr)
        self.ptr, self.nbytes = None, 0


def check_device_tensor(tensor, device_id: int, dtype: np.dtype) -> None:
    """UserError unless ``tensor`` (torch) is contiguous, of ``dtype``, on CUDA device
    ``device_id`` and starts at a 256-byte aligned address."""
    if not getattr(tensor, "is_cuda", False):
        raise UserError("run_device takes a torch CUDA tensor; use run() for host arrays")
    if tensor.device.index not in (None, device_id):
        raise UserError(f"the tensor is on cuda:{tensor.device.index}, the engine on {device_id}")
    if str(tensor.dtype) != f"torch.{dtype.name}":
        raise UserError(f"the engine takes {dtype.name} input, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise UserError("the input tensor must be contiguous (call .contiguous())")
    if tensor.data_ptr() % ALIGNMENT:
        raise UserError(
            f"the input tensor's address is not {ALIGNMENT}-byte aligned, as TensorRT requires "
            "(a slice of a larger tensor?); pass .clone()"
        )
