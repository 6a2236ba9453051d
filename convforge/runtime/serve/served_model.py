"""One served model: a ``kserve.Model`` whose ``predict`` goes through the dynamic batcher.

The same class runs under KServe on Kubernetes (its ``ModelServer`` takes
loaded models and calls ``predict()``); ``convforge serve`` drives it through
:mod:`.server`. ``load()`` loads ``instances`` backends (``auto`` picks the
backend with the first, the rest are its :meth:`~.Backend.sibling`) and warms
each one at the batch sizes it will run before the model says it is ready;
the batcher starts with the first request, or with ``start()``. Each instance
is loaded, warmed, run and closed in one thread of its own, its runner thread:
torch.compile's CUDA-graph trees work only in the thread that recorded them,
and the CUDA device a backend selects at load is current in that thread only.

A request's input is checked against the model before it is queued: one
tensor, named as the model's input, FP32 (or FP16 where the backend takes
half-precision batches), shape ``[n, C, H, W]`` with ``n >= 1``, and as many
values as the shape says; for a file whose input format is uint8, UINT8
pixels of shape ``[n, H, W, C]`` (JSON values: integers 0-255). Each mistake
is ``kserve.errors.InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT) naming
what was wrong; so is a request of more rows than ``max_request_rows``
(checked from its shape, before its data is converted) and one that asks for
anything but the model's one output, once (a response is never larger than
its rows' logits).

``ready`` is true once loaded and while every batcher worker runs: a dead
worker takes the model, and so the server, out of readiness.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from convforge.contract import INPUT_NAME, OUTPUT_NAME, read_info
from convforge.errors import first_line
from convforge.overrides import ModelOverrides
from convforge.runtime import backends
from convforge.runtime.serve.batcher import Batcher, BatchingConfig, runner_thread
from convforge.runtime.serve.kserve_sdk import (
    InferOutput,
    InferRequest,
    InferResponse,
    errors,
    kserve,
)
from convforge.runtime.serve.metrics import ServerMetrics

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}  # v2 datatype -> numpy
REQUEST_HEAD_BYTES = 64 * 2**10  # a request's JSON besides its values: names, shape, parameters
JSON_VALUE_BYTES = 32  # one value in JSON, separator included ("-1.1754943508222875e-38, ")


class ServedModel(kserve.Model):
    def __init__(
        self,
        name: str,
        path: str,
        backend: str = "auto",
        options: dict | None = None,
        batching: BatchingConfig | None = None,
        metrics: ServerMetrics | None = None,
        max_image_pixels: int | None = None,
        overrides: ModelOverrides | None = None,
    ) -> None:
        super().__init__(name)
        self.max_image_pixels = max_image_pixels  # classify's limit (None: Pillow's own)
        self.path = str(path)
        self.overrides = overrides  # what the user says about the file (--mean, --labels, ...)
        self.info = read_info(path, overrides)
        self.backend_name = backend
        self.options = dict(options or {})
        self.batching = (batching or BatchingConfig()).check()
        self.metrics = metrics or ServerMetrics()
        self.backends: list[backends.Backend] = []
        self._threads: list = []  # backends[i] lives in _threads[i] (see load)
        self.skipped: list[dict] = []  # auto's candidates that could not run the file
        self.num_classes: int | None = None
        self.batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        batcher = getattr(self, "batcher", None)
        alive = batcher is None or not batcher.started or batcher.alive
        return getattr(self, "_loaded", False) and alive

    @ready.setter
    def ready(self, value: bool) -> None:  # kserve.Model sets it
        self._loaded = value

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> bool:
        """Load and warm up the backend instances (slow: engines build here); then ready.

        Instance ``i`` is loaded and warmed in runner thread ``i``, which then runs its
        batches: the first by name (or ``auto``'s choice), the others as its
        :meth:`~.Backend.sibling`. One after another: a warm-up may capture CUDA graphs,
        and PyTorch allows no other CUDA work in the process during a capture. Returns once
        every instance is warm; an instance that fails raises its own error here, after the
        instances already loaded are closed.
        """
        threads = [runner_thread(i) for i in range(self.batching.instances)]
        loaded: list[backends.Backend] = []
        try:
            chosen = threads[0].submit(
                backends.load_backend, self.backend_name, self.path, self.overrides,
                **self.options,
            )  # fmt: skip
            first, self.skipped = chosen.result()
            loaded.append(first)
            fixed = self.info.spec.batch  # a graph with a fixed batch size runs exactly that many
            if fixed is not None and self.batching.max_batch_size != fixed:
                self.batching = dataclasses.replace(self.batching, max_batch_size=fixed)
            single = first.single_batch_size or fixed is not None
            pad_to = self.batching.max_batch_size if single else None
            sizes = [pad_to] if pad_to else _warm_sizes(self.batching.max_batch_size)
            logits = threads[0].submit(self._warm, first, sizes).result()
            for thread in threads[1:]:
                loaded.append(thread.submit(first.sibling).result())
                thread.submit(self._warm, loaded[-1], sizes).result()
        except BaseException:
            for backend, thread in zip(loaded, threads, strict=False):
                thread.submit(backend.close).exception()  # waits; the load's error is raised
            for thread in threads:
                thread.shutdown(wait=True)
            raise
        self.backends, self._threads = loaded, threads
        self.num_classes = int(logits.shape[1])
        self.batcher = Batcher(
            [b.run for b in self.backends], self.batching, pad_to,
            self.metrics.observer(self.name), threads,
        )  # fmt: skip
        self.metrics.track_depth(self.name, lambda: self.batcher.depth)
        self.ready = True
        return True

    def _warm(self, backend: backends.Backend, sizes: list[int]) -> np.ndarray:
        """Run ``backend`` on zeros of each of ``sizes`` rows; the last logits."""
        for n in sizes:
            logits = backend.run(np.zeros(self.info.spec.shape(n), self.info.spec.dtype))
        return logits

    async def start(self) -> None:
        """Start the batcher's workers (in the serving event loop)."""
        if not self.batcher.started:
            await self.batcher.start()

    async def stop(self, drain_s: float = 30.0) -> None:
        """Not ready; finish what is queued (up to ``drain_s``); release the backends."""
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop(drain_s)
        loop = asyncio.get_running_loop()
        for backend, thread in zip(self.backends, self._threads, strict=True):
            await loop.run_in_executor(thread, backend.close)  # where it was loaded and ran
        for thread in self._threads:
            thread.shutdown(wait=True)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One row: (C, H, W), or (H, W, C) for a uint8-input file."""
        return self.info.spec.sample_shape

    @property
    def datatypes(self) -> list[str]:
        """The v2 datatypes the input takes (what the loaded backend accepts)."""
        if not self.backends:  # before load: what the file's input is
            return [d for d, t in DATATYPES.items() if np.dtype(t) == self.info.spec.dtype][:1]
        return [d for d, t in DATATYPES.items() if t in self.backends[0].input_dtypes]

    def largest_body(self, binary: bool) -> int:
        """The most bytes a valid infer request to this model can hold: ``max_request_rows``
        rows in the widest datatype it takes, plus room for the JSON around them."""
        values = self.batching.max_request_rows * int(np.prod(self.sample_shape))
        each = max(np.dtype(DATATYPES[d]).itemsize for d in self.datatypes)
        return REQUEST_HEAD_BYTES + values * (each if binary else JSON_VALUE_BYTES)

    def describe(self) -> dict:
        """Backend, precision and settings of the first instance (for the startup log)."""
        return self.backends[0].describe() if self.backends else {}

    # -- the v2 protocol -------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        shape = [-1, *self.sample_shape]
        return [{"name": INPUT_NAME, "datatype": self.datatypes[0], "shape": shape}]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, self.num_classes or -1]}]

    async def predict(self, request: InferRequest, headers=None) -> InferResponse:
        self.check_outputs(request)
        logits = await self.infer(self.input_rows(request))
        out = InferOutput(OUTPUT_NAME, list(logits.shape), "FP32")
        out.set_data_from_numpy(np.ascontiguousarray(logits, np.float32), binary_data=False)
        return InferResponse(
            response_id=request.id or "",
            model_name=self.name,
            infer_outputs=[out],
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Logits for preprocessed ``rows``, through the batcher."""
        if not self.ready or self.batcher is None:
            raise errors.ModelNotReady(self.name)
        await self.start()
        return await self.batcher.infer(rows)

    def check_outputs(self, request: InferRequest) -> None:
        """InvalidInput unless the request asks for nothing or for the model's one output once."""
        asked = [o.name for o in request.request_outputs or []]
        if asked and asked != [OUTPUT_NAME]:
            shown = asked if len(asked) <= 3 else [*asked[:3], f"... ({len(asked)} in all)"]
            raise errors.InvalidInput(
                f"{self.name} has one output, {OUTPUT_NAME!r}: ask for it once or not at all "
                f"(got {shown})"
            )

    def input_rows(self, request: InferRequest) -> np.ndarray:
        """The request's one input as ``[n, C, H, W]``; InvalidInput naming any mistake."""
        if len(request.inputs) != 1:
            names = [i.name for i in request.inputs]
            raise errors.InvalidInput(f"{self.name} takes one input ({INPUT_NAME!r}), got {names}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise errors.InvalidInput(
                f"{self.name} has no input {tensor.name!r}; its input is {INPUT_NAME!r}"
            )
        accepted = self.datatypes
        if tensor.datatype not in accepted:
            raise errors.InvalidInput(
                f"input {INPUT_NAME!r} must be {' or '.join(accepted)}, got {tensor.datatype}"
            )
        shape = [int(d) for d in tensor.shape]
        want = [-1, *self.sample_shape]
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != want[1:]:
            raise errors.InvalidInput(
                f"input {INPUT_NAME!r} must have shape {want} ({self.info.spec.layout}, -1: any "
                f"batch >= 1), got {shape}"
            )
        if shape[0] > self.batching.max_request_rows:
            raise errors.InvalidInput(
                f"input {INPUT_NAME!r} has {shape[0]} rows; this server takes at most "
                f"{self.batching.max_request_rows} a request (--max-request-rows)"
            )
        if tensor.datatype == "UINT8" and isinstance(tensor.data, list):
            _check_pixels(tensor.data)  # numpy would wrap 256 to 0 or truncate 1.5 silently
        try:
            rows = tensor.as_numpy()
        except (ValueError, TypeError, OverflowError) as e:
            raise errors.InvalidInput(
                f"input {INPUT_NAME!r}: its data does not fill shape {shape} of "
                f"{tensor.datatype} ({first_line(e)})"
            ) from None
        return np.ascontiguousarray(rows)


def _warm_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes an instance is warmed at: 1, 2, 4, ... below ``max_batch_size``, and
    ``max_batch_size``: every size bucket of a backend that prepares per bucket (the torch
    backend's CUDA graphs pad to powers of two), so none is first met while serving."""
    sizes = [1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size]
    return [*sizes, max_batch_size]


def _check_pixels(data: list) -> None:
    """InvalidInput unless JSON ``data`` for a UINT8 tensor holds integers 0-255 only."""
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        values = np.asarray([], dtype=object)
    if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
        raise errors.InvalidInput(f"input {INPUT_NAME!r}: UINT8 data must be integers 0-255")


async def load_all(models: list[ServedModel]) -> None:
    """Load every model off the event loop (one at a time: engines may build), then start."""
    loop = asyncio.get_running_loop()
    for model in models:
        await loop.run_in_executor(None, model.load)
    for model in models:
        await model.start()
