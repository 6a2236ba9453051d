"""Dynamic batching: requests wait in a bounded queue and run together as one backend call.

    batcher = Batcher([backend.run], BatchingConfig(max_batch_size=32, max_queue_delay_ms=2))
    await batcher.start()
    logits = await batcher.infer(rows)      # rows: [n, C, H, W]; several callers at once
    await batcher.stop()                    # drains what is queued, then stops

A request holds one or more rows. A batch starts with the oldest request and
takes the next ones while they fit in ``max_batch_size`` rows, until the first
request has waited ``max_queue_delay_ms``; then it runs as one call of a
runner, in that runner's own thread (off the event loop), and each caller gets
its own rows of the result back. The wait is skipped while traffic is not
concurrent (the previous batch held a single request and nothing else is
queued): a lone client would only pay the delay, for no company. A request
of more rows than ``max_batch_size`` is split into full batches.
``max_batch_size=1`` turns batching off.

Each runner (a loaded backend instance) is used by one thread at a time, and
several runners (``--instances``) take batches from the same queue. When
``max_queue`` requests are already waiting, :meth:`Batcher.infer` raises
:class:`QueueFull` at once (the server answers 503 with Retry-After) instead
of letting memory grow; a request that waits longer than ``timeout_s`` raises
:class:`RequestTimeout` and is dropped from the queue. A runner that wants one
batch size only (``pad_to``) gets every batch padded to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convforge.errors import UserError, check_int
from convforge.settings import setting


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: float) -> None:
        super().__init__(f"the queue is full ({waiting} requests waiting); retry later")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """A request waited longer than the per-request timeout."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = setting(32, "rows per backend call, at most (1 = no batching)")
    max_queue_delay_ms: float = setting(2.0, "longest wait for more rows before a batch runs")
    max_queue: int = setting(256, "requests waiting at most; beyond: 503 with Retry-After")
    instances: int = setting(1, "backend instances per model, sharing the queue")
    timeout_s: float = setting(30.0, "a request waiting longer is answered 504")

    def check(self) -> BatchingConfig:
        for name in ("max_batch_size", "max_queue", "instances"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.max_queue_delay_ms < 0 or self.timeout_s <= 0:
            raise UserError(
                "--max-queue-delay-ms must be >= 0 and --timeout-s positive, got "
                f"{self.max_queue_delay_ms} and {self.timeout_s}"
            )
        return self


@dataclass
class _Request:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float  # loop time


class Batcher:
    """One queue, ``len(runners)`` workers; see the module docstring.

    ``runners`` are callables ``float32 [n, C, H, W] -> float32 [n, K]``, one per
    backend instance. ``observe`` (optional) receives ``(event, value)`` pairs
    for metrics: ``queue_s`` per request, ``compute_s`` and ``batch_rows`` per
    batch.
    """

    def __init__(
        self,
        runners: list[Callable[[np.ndarray], np.ndarray]],
        config: BatchingConfig,
        pad_to: int | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.config = config.check()
        self.runners = runners
        self.pad_to = pad_to
        self.observe = observe or (lambda event, value: None)
        self._queue: asyncio.Queue[_Request] | None = None
        self._workers: list[asyncio.Task] = []
        self._executors = [
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"convforge-runner-{i}")
            for i in range(len(runners))
        ]
        self._in_flight = 0
        self._concurrent = False  # did the last batch hold more than one request?
        self._stopping = False
        self._mean_batch_s = 0.01  # running estimate, for Retry-After

    @property
    def started(self) -> bool:
        return self._queue is not None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._workers = [
            asyncio.create_task(self._work(runner, executor), name=f"batcher-{i}")
            for i, (runner, executor) in enumerate(zip(self.runners, self._executors, strict=True))
        ]

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """The runner's output for ``rows``, computed in a batch with other callers' rows."""
        if self._queue is None:
            raise RuntimeError("call start() before infer()")
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        size = self.config.max_batch_size
        if len(rows) > size:
            parts = [rows[i : i + size] for i in range(0, len(rows), size)]
            return np.concatenate(await asyncio.gather(*(self.infer(p) for p in parts)))
        loop = asyncio.get_running_loop()
        request = _Request(rows, loop.create_future(), loop.time())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull(self.depth, self._retry_after()) from None
        self._in_flight += 1
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.config.timeout_s)
        except asyncio.TimeoutError:
            request.future.cancel()  # the worker skips it if it is still queued
            raise RequestTimeout(
                f"no answer within {self.config.timeout_s:g} s (the server is overloaded)"
            ) from None
        finally:
            self._in_flight -= 1

    async def stop(self, drain_s: float = 30.0) -> None:
        """Take no new requests, let queued and running ones finish (up to ``drain_s``),
        then stop the workers and their threads."""
        self._stopping = True
        deadline = time.monotonic() + drain_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)

    # -- the worker ----------------------------------------------------------------------------

    async def _work(self, runner, executor) -> None:
        loop = asyncio.get_running_loop()
        leftover: _Request | None = None
        while True:
            first = leftover or await self._queue.get()
            leftover = None
            if first.future.done():
                continue  # timed out or cancelled while queued
            batch, rows = [first], len(first.rows)
            delay = self.config.max_queue_delay_ms / 1000 if self._concurrent else 0.0
            deadline = first.enqueued + delay
            while rows < self.config.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if nxt.future.done():
                    continue
                if rows + len(nxt.rows) > self.config.max_batch_size:
                    leftover = nxt
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            await self._run(batch, rows, runner, executor, loop)

    async def _run(self, batch: list[_Request], rows: int, runner, executor, loop) -> None:
        start = loop.time()
        for request in batch:
            self.observe("queue_s", start - request.enqueued)
        x = batch[0].rows if len(batch) == 1 else np.concatenate([r.rows for r in batch])
        try:
            out = await loop.run_in_executor(executor, runner, self._padded(x))
        except Exception as e:  # noqa: BLE001 (every caller of the batch gets the error)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        seconds = loop.time() - start
        self._concurrent = len(batch) > 1
        self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * seconds
        self.observe("compute_s", seconds)
        self.observe("batch_rows", rows)
        offset = 0
        for request in batch:
            n = len(request.rows)
            if not request.future.done():
                request.future.set_result(out[offset : offset + n])
            offset += n

    def _padded(self, x: np.ndarray) -> np.ndarray:
        if self.pad_to is None or len(x) == self.pad_to:
            return x
        pad = np.zeros((self.pad_to - len(x), *x.shape[1:]), x.dtype)
        return np.concatenate([x, pad])

    def _retry_after(self) -> float:
        """Seconds until the queue has room again, roughly (for the Retry-After header)."""
        batches = self.depth / max(1, self.config.max_batch_size) / len(self.runners)
        return max(1.0, round(batches * self._mean_batch_s + 0.5))
