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

Each runner (a loaded backend instance) runs in a thread of its own, always the
same one, and several runners (``--instances``) take batches from the same
queue. A backend whose state is tied to a thread (torch.compile's CUDA-graph
trees, the CUDA device current in that thread) is loaded in the thread that
will run it: :func:`runner_thread` makes one, the caller loads and warms the
instance there, and hands the thread to the batcher with its runner
(``threads``); the caller keeps it, to close the instance there after
:meth:`Batcher.stop`, and shuts it down.

Admission is all-or-nothing, by rows: a request is queued whole when fewer
than ``max_queue`` requests wait and its rows fit in what is left of
``max_queue_rows``; otherwise :meth:`Batcher.infer` raises :class:`QueueFull`
at once (the server answers 503 with Retry-After), so one large request can
neither half-run nor crowd out the others. A request that waits longer than
``timeout_s`` raises :class:`RequestTimeout`; a caller that is cancelled (a
gRPC client that cancels or whose deadline passes) takes its rows out of the
queue too. A runner that wants one batch size only (``pad_to``) gets every
batch padded to it (copies of its last row, :mod:`convforge.runtime.evaluate`).
A worker survives any error of a batch (its callers get the error);
:attr:`Batcher.alive` says whether every worker still runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from convforge.errors import UserError
from convforge.runtime.evaluate import pad_rows
from convforge.settings import check_ranges, setting

log = logging.getLogger("convforge.serve")


class QueueFull(Exception):
    """The queue has no room for the request's rows; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, rows: int, asked: int, retry_after: float) -> None:
        super().__init__(
            f"the queue is full ({waiting} requests, {rows} rows waiting; {asked} more rows "
            "do not fit); retry later"
        )
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """A request waited longer than the per-request timeout."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = setting(
        32, "rows per backend call, at most (1 = no batching)", minimum=1, maximum=4096
    )
    max_queue_delay_ms: float = setting(
        2.0, "longest wait for more rows before a batch runs", minimum=0, maximum=10_000
    )
    max_queue: int = setting(
        256, "requests waiting at most; beyond: 503 with Retry-After", minimum=1, maximum=100_000
    )
    max_queue_rows: int = setting(
        1024, "rows waiting at most, all requests together; a request whose rows do not all "
        "fit: 503 with Retry-After", minimum=1, maximum=1_000_000,
    )  # fmt: skip
    max_request_rows: int = setting(
        256, "rows one request may carry; beyond: 400", minimum=1, maximum=1_000_000
    )
    instances: int = setting(1, "backend instances per model, sharing the queue", minimum=1,
                             maximum=64)  # fmt: skip
    timeout_s: float = setting(
        30.0, "a request waiting longer is answered 504", minimum=0.001, maximum=86_400
    )

    def check(self) -> BatchingConfig:
        check_ranges(self)
        if self.max_request_rows > self.max_queue_rows:
            raise UserError(
                f"--max-request-rows ({self.max_request_rows}) must be at most --max-queue-rows "
                f"({self.max_queue_rows}): a larger request could never be admitted"
            )
        return self


@dataclass
class _Ticket:
    """One admitted request: counted against the queue's budgets while parts of it wait."""

    parts: int
    rows: int


@dataclass
class _Part:
    """A slice of a request (at most ``max_batch_size`` rows) waiting for a worker."""

    rows: np.ndarray
    future: asyncio.Future
    enqueued: float  # loop time
    ticket: _Ticket
    queued: bool = field(default=True)


class Batcher:
    """One queue, ``len(runners)`` workers; see the module docstring.

    ``runners`` are callables ``float32 [n, C, H, W] -> float32 [n, K]``, one per
    backend instance. ``threads`` (optional): one :func:`runner_thread` per
    runner, the one it was loaded in, where its calls then run; they stay the
    caller's (:meth:`stop` leaves them running). Without them each runner
    gets a new thread of its own, which :meth:`stop` shuts down.
    ``observe`` (optional) receives ``(event, value)`` pairs for metrics:
    ``queue_s`` per request, ``compute_s`` and ``batch_rows`` per batch.
    """

    def __init__(
        self,
        runners: list[Callable[[np.ndarray], np.ndarray]],
        config: BatchingConfig,
        pad_to: int | None = None,
        observe: Callable[[str, float], None] | None = None,
        threads: list[concurrent.futures.ThreadPoolExecutor] | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        if threads is not None and len(threads) != len(runners):
            raise ValueError(f"{len(runners)} runners need as many threads, got {len(threads)}")
        self.config = config.check()
        self.runners = runners
        self.pad_to = pad_to
        self.observe = observe or (lambda event, value: None)
        self._queue: asyncio.Queue[_Part] | None = None
        self._workers: list[asyncio.Task] = []
        self._owns_threads = threads is None
        self._executors = threads or [runner_thread(i) for i in range(len(runners))]
        self._waiting = 0  # admitted requests with a part still queued
        self._waiting_rows = 0  # their rows still queued
        self._in_flight = 0  # admitted requests not yet answered
        self._concurrent = False  # did the last batch hold more than one request?
        self._stopping = False
        self._mean_batch_s = 0.01  # running estimate, for Retry-After

    @property
    def started(self) -> bool:
        return self._queue is not None

    @property
    def alive(self) -> bool:
        """Every worker is running (false before start and once one has died)."""
        return bool(self._workers) and not any(task.done() for task in self._workers)

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return self._waiting

    @property
    def depth_rows(self) -> int:
        """Rows waiting in the queue."""
        return self._waiting_rows

    async def start(self) -> None:
        # Unbounded as a container: admission (infer) bounds what enters it.
        self._queue = asyncio.Queue()
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
        n, cfg = len(rows), self.config
        if self._waiting >= cfg.max_queue or self._waiting_rows + n > cfg.max_queue_rows:
            raise QueueFull(self._waiting, self._waiting_rows, n, self._retry_after())
        loop = asyncio.get_running_loop()
        size, now = cfg.max_batch_size, loop.time()
        ticket = _Ticket(parts=-(-n // size), rows=n)
        parts = [_Part(rows[i : i + size], loop.create_future(), now, ticket)
                 for i in range(0, n, size)]  # fmt: skip
        self._waiting += 1
        self._waiting_rows += n
        self._in_flight += 1
        for part in parts:
            self._queue.put_nowait(part)
        together = asyncio.gather(*(part.future for part in parts))
        together.add_done_callback(_retrieve)  # withdrawn parts end it cancelled, unawaited
        try:
            outs = await asyncio.wait_for(asyncio.shield(together), cfg.timeout_s)
        except asyncio.TimeoutError:
            self._withdraw(parts)
            raise RequestTimeout(
                f"no answer within {cfg.timeout_s:g} s (the server is overloaded)"
            ) from None
        except asyncio.CancelledError:  # the caller gave up (a gRPC cancel or deadline)
            self._withdraw(parts)
            raise
        except Exception:
            self._withdraw(parts)  # one part failed: the others need not run
            raise
        finally:
            self._in_flight -= 1
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def stop(self, drain_s: float = 30.0) -> None:
        """Take no new requests, let queued and running ones finish (up to ``drain_s``),
        then stop the workers, and the threads the batcher made (not those it was given)."""
        self._stopping = True
        deadline = time.monotonic() + drain_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._owns_threads:
            for executor in self._executors:
                executor.shutdown(wait=True)

    # -- the queue's budgets ---------------------------------------------------------------

    def _dequeued(self, part: _Part) -> None:
        """``part`` left the queue (taken by a worker or withdrawn): release its budget."""
        if not part.queued:
            return
        part.queued = False
        self._waiting_rows -= len(part.rows)
        part.ticket.parts -= 1
        if part.ticket.parts == 0:
            self._waiting -= 1

    def _withdraw(self, parts: list[_Part]) -> None:
        """The caller no longer waits: its queued parts are skipped and release their budget."""
        for part in parts:
            part.future.cancel()
            self._dequeued(part)

    # -- the worker ----------------------------------------------------------------------------

    async def _work(self, runner, executor) -> None:
        loop = asyncio.get_running_loop()
        leftover: _Part | None = None
        while True:
            first = leftover or await self._next()
            leftover = None
            if first.future.done():
                continue  # timed out or cancelled while queued
            batch, rows = [first], len(first.rows)
            delay = self.config.max_queue_delay_ms / 1000 if self._concurrent else 0.0
            deadline = first.enqueued + delay
            while rows < self.config.max_batch_size:
                try:
                    nxt = self._next_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._next(), remaining)
                    except asyncio.TimeoutError:
                        break
                if nxt.future.done():
                    continue
                if rows + len(nxt.rows) > self.config.max_batch_size:
                    leftover = nxt
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            try:
                await self._run(batch, rows, runner, executor, loop)
            except Exception as e:  # noqa: BLE001 (a worker must outlive any one batch)
                log.error("a batch of %d rows failed outside the backend", rows, exc_info=e)
                _fail(batch, e)

    async def _next(self) -> _Part:
        part = await self._queue.get()
        self._dequeued(part)
        return part

    def _next_nowait(self) -> _Part:
        part = self._queue.get_nowait()
        self._dequeued(part)
        return part

    async def _run(self, batch: list[_Part], rows: int, runner, executor, loop) -> None:
        start = loop.time()
        for part in batch:
            self.observe("queue_s", start - part.enqueued)
        x = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        try:
            out = await loop.run_in_executor(executor, runner, self._padded(x))
        except Exception as e:  # noqa: BLE001 (every caller of the batch gets the error)
            _fail(batch, e)
            return
        seconds = loop.time() - start
        self._concurrent = len(batch) > 1
        self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * seconds
        self.observe("compute_s", seconds)
        self.observe("batch_rows", rows)
        offset = 0
        for part in batch:
            n = len(part.rows)
            if not part.future.done():
                part.future.set_result(out[offset : offset + n])
            offset += n

    def _padded(self, x: np.ndarray) -> np.ndarray:
        return x if self.pad_to is None else pad_rows(x, self.pad_to)

    def _retry_after(self) -> float:
        """Seconds until the queue has room again, roughly (for the Retry-After header)."""
        batches = self._waiting_rows / max(1, self.config.max_batch_size) / len(self.runners)
        return max(1.0, round(batches * self._mean_batch_s + 0.5))


def runner_thread(i: int) -> concurrent.futures.ThreadPoolExecutor:
    """The thread of runner ``i``: an executor of exactly one thread, so that whatever is
    submitted to it (load, warm-up, every batch, close) runs in that same thread."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"convforge-runner-{i}")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _fail(batch: list[_Part], error: Exception) -> None:
    for part in batch:
        if not part.future.done():
            part.future.set_exception(error)
