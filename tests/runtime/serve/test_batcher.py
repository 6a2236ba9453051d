"""The dynamic batcher: batching, splitting, padding, a bounded queue, timeouts, draining."""

import asyncio
import threading
import time

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.serve.batcher import (
    Batcher,
    BatchingConfig,
    QueueFull,
    RequestTimeout,
    ShuttingDown,
)


class Recorder:
    """A runner that returns each row's sum (so rows can be traced back) and records batches."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.batches, self.threads = delay, [], set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)


def _rows(n: int, start: float) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + start).reshape(n, 1, 1, 1)


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_rows_back():
    async def main():
        runner = Recorder(delay=0.05)
        batcher = Batcher([runner], BatchingConfig(max_batch_size=8, max_queue_delay_ms=20))
        await batcher.start()
        # one request, then 6 more of 1-2 rows while it waits for company: 9 rows in all
        first = asyncio.create_task(batcher.infer(_rows(1, 100)))
        await asyncio.sleep(0.01)
        sizes = [1, 2, 1, 2, 1, 1]
        outs = await asyncio.gather(*(batcher.infer(_rows(n, 10 * i)) for i, n in enumerate(sizes)))
        assert (await first)[0, 0] == 100
        await batcher.stop()
        return runner, sizes, outs

    runner, sizes, outs = _run(main())
    for i, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        np.testing.assert_array_equal(out[:, 0], np.arange(n) + 10 * i)
    assert sorted(runner.batches) == [1, 8]  # 7 requests, 2 calls of at most 8 rows


def test_a_lone_client_never_waits_and_concurrent_traffic_waits_at_most_the_delay():
    async def timed(batcher, rows):
        start = time.perf_counter()
        await batcher.infer(rows)
        return time.perf_counter() - start

    async def main():
        runner = Recorder()
        batcher = Batcher([runner], BatchingConfig(max_batch_size=32, max_queue_delay_ms=30))
        await batcher.start()
        alone = [await timed(batcher, _rows(1, i)) for i in range(3)]
        await asyncio.gather(batcher.infer(_rows(1, 0)), batcher.infer(_rows(1, 1)))
        after_company = await timed(batcher, _rows(1, 0))  # traffic was concurrent: it waits
        await batcher.stop()
        return runner, alone, after_company

    runner, alone, after_company = _run(main())
    assert max(alone) < 0.02  # no 30 ms wait for a client that is alone
    assert 0.025 <= after_company < 0.5
    assert runner.batches == [1, 1, 1, 2, 1]


def test_batching_off_and_requests_larger_than_a_batch():
    async def main():
        runner = Recorder()
        off = Batcher([runner], BatchingConfig(max_batch_size=1, max_queue_delay_ms=50))
        await off.start()
        outs = await asyncio.gather(off.infer(_rows(1, 0)), off.infer(_rows(1, 5)))
        big = await off.infer(_rows(3, 20))  # split into three calls of one row
        await off.stop()
        return runner, outs, big

    runner, outs, big = _run(main())
    assert runner.batches == [1, 1, 1, 1, 1]
    assert [o[0, 0] for o in outs] == [0, 5] and big[:, 0].tolist() == [20, 21, 22]


def test_padding_to_a_fixed_batch_size_is_invisible_to_callers():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], BatchingConfig(max_batch_size=4), pad_to=4)
        await batcher.start()
        out = await batcher.infer(_rows(3, 1))
        await batcher.stop()
        return runner, out

    runner, out = _run(main())
    assert runner.batches == [4] and out[:, 0].tolist() == [1, 2, 3]


def test_instances_share_the_queue_in_their_own_threads():
    active, peak = [0], [0]
    lock = threading.Lock()

    class Overlap(Recorder):
        def __call__(self, x):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                return super().__call__(x)
            finally:
                with lock:
                    active[0] -= 1

    async def main():
        runners = [Overlap(delay=0.05), Overlap(delay=0.05)]
        batcher = Batcher(runners, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
        await batcher.start()
        await asyncio.gather(*(batcher.infer(_rows(1, i)) for i in range(4)))
        await batcher.stop()
        return runners

    runners = _run(main())
    assert sorted(len(r.batches) for r in runners) == [2, 2]
    assert runners[0].threads.isdisjoint(runners[1].threads)
    assert peak[0] == 2  # the two instances ran at the same time


def test_a_full_queue_refuses_at_once_with_a_retry_hint():
    async def main():
        runner = Recorder(delay=0.1)
        batcher = Batcher([runner], BatchingConfig(max_batch_size=1, max_queue=2))
        await batcher.start()
        running = asyncio.create_task(batcher.infer(_rows(1, 0)))
        await asyncio.sleep(0.02)  # the worker has taken it: the queue is empty again
        queued = [asyncio.create_task(batcher.infer(_rows(1, i))) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as e:
            await batcher.infer(_rows(1, 3))
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return e.value

    refused = _run(main())
    assert refused.retry_after >= 1 and "queue is full" in str(refused)


def test_a_request_that_waits_too_long_times_out_and_is_skipped():
    async def main():
        runner = Recorder(delay=0.2)
        batcher = Batcher([runner], BatchingConfig(max_batch_size=1, timeout_s=0.05))
        await batcher.start()
        slow = asyncio.create_task(batcher.infer(_rows(1, 0)))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestTimeout, match="no answer within 0.05 s"):
            await batcher.infer(_rows(1, 1))
        with pytest.raises(RequestTimeout):
            await slow  # it runs 0.2 s, past its own deadline
        await asyncio.sleep(0.3)
        await batcher.stop()
        return runner

    runner = _run(main())
    assert runner.batches == [1]  # the timed-out queued request never ran


def test_a_runner_error_reaches_every_caller_of_its_batch():
    def broken(x):
        raise RuntimeError("engine failed")

    async def main():
        batcher = Batcher([broken], BatchingConfig(max_batch_size=4, max_queue_delay_ms=10))
        await batcher.start()
        results = await asyncio.gather(
            batcher.infer(_rows(1, 0)), batcher.infer(_rows(1, 1)), return_exceptions=True
        )
        await batcher.stop()
        return results

    assert [str(r) for r in _run(main())] == ["engine failed", "engine failed"]


def test_stop_drains_what_is_queued_and_refuses_new_requests():
    async def main():
        runner = Recorder(delay=0.05)
        batcher = Batcher([runner], BatchingConfig(max_batch_size=1))
        await batcher.start()
        pending = [asyncio.create_task(batcher.infer(_rows(1, i))) for i in range(3)]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await batcher.infer(_rows(1, 9))
        outs = await asyncio.gather(*pending)
        await stopping
        return outs

    assert [o[0, 0] for o in _run(main())] == [0, 1, 2]


def test_metrics_hooks_and_config_checks():
    seen = []

    async def main():
        batcher = Batcher([Recorder()], BatchingConfig(max_batch_size=4),
                          observe=lambda event, value: seen.append(event))  # fmt: skip
        await batcher.start()
        await batcher.infer(_rows(2, 0))
        await batcher.stop()

    _run(main())
    assert seen == ["queue_s", "compute_s", "batch_rows"]
    with pytest.raises(UserError, match="--max-batch-size must be an integer from 1 to 4096"):
        BatchingConfig(max_batch_size=0).check()
    with pytest.raises(UserError, match="--max-queue-delay-ms must be a number from 0 to"):
        BatchingConfig(max_queue_delay_ms=-1).check()
    with pytest.raises(UserError, match="--timeout-s must be a number from 0.001 to 86400"):
        BatchingConfig(timeout_s=float("nan")).check()
    with pytest.raises(UserError, match="--max-request-rows .* at most --max-queue-rows"):
        BatchingConfig(max_request_rows=64, max_queue_rows=32).check()


def test_admission_is_all_or_nothing_by_rows():
    """A request whose rows do not all fit in the row budget is refused whole (nothing of it
    queued or run), while a small one still gets in."""

    async def main():
        runner = Recorder(delay=0.1)
        config = BatchingConfig(max_batch_size=4, max_queue_rows=8, max_request_rows=8,
                                max_queue_delay_ms=0)  # fmt: skip
        batcher = Batcher([runner], config)
        await batcher.start()
        running = asyncio.create_task(batcher.infer(_rows(4, 0)))
        await asyncio.sleep(0.02)  # taken by the worker: the budget is free again
        queued = asyncio.create_task(batcher.infer(_rows(6, 1)))
        await asyncio.sleep(0)
        assert batcher.depth_rows == 6
        with pytest.raises(QueueFull):
            await batcher.infer(_rows(3, 2))  # 6 + 3 > 8
        assert batcher.depth_rows == 6  # nothing of the refused request entered
        small = await batcher.infer(_rows(2, 3))  # 6 + 2 fits
        await asyncio.gather(running, queued)
        await batcher.stop()
        return runner, small

    runner, small = _run(main())
    assert small[:, 0].tolist() == [3, 4]
    assert sum(runner.batches) == 4 + 6 + 2  # the refused rows never ran


def test_a_cancelled_caller_takes_its_rows_out_of_the_queue():
    async def main():
        runner = Recorder(delay=0.1)
        batcher = Batcher([runner], BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
        await batcher.start()
        busy = asyncio.create_task(batcher.infer(_rows(2, 0)))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.infer(_rows(8, 1)))  # a gRPC client that cancels
        await asyncio.sleep(0)
        assert (batcher.depth, batcher.depth_rows) == (1, 8)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (batcher.depth, batcher.depth_rows) == (0, 0)
        await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        return runner

    assert _run(main()).batches == [2]  # the cancelled request's 4 batches never ran


def test_a_worker_survives_an_error_outside_the_backend():
    """An exception in the batch's own handling (here the metrics hook) fails that batch's
    callers, and the worker goes on serving."""
    calls = []

    def observe(event, value):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("metrics broke")

    async def main():
        batcher = Batcher([Recorder()], BatchingConfig(max_batch_size=4), observe=observe)
        await batcher.start()
        with pytest.raises(RuntimeError, match="metrics broke"):
            await batcher.infer(_rows(1, 0))
        alive = batcher.alive
        out = await batcher.infer(_rows(1, 7))
        await batcher.stop()
        return alive, out, batcher.alive

    alive, out, after = _run(main())
    assert alive and out[0, 0] == 7 and not after


def test_a_runner_runs_in_the_thread_it_was_loaded_in_which_stays_its_owners():
    """Given the runner thread its instance was loaded in, every batch runs there; stop()
    leaves that thread to its owner (who closes the instance there, then shuts it down)."""
    from convforge.runtime.serve.batcher import runner_thread

    thread = runner_thread(0)
    runner = thread.submit(Recorder).result()  # "loaded" in its thread
    loaded_in = thread.submit(threading.get_ident).result()

    async def main():
        batcher = Batcher([runner], BatchingConfig(max_batch_size=2), threads=[thread])
        await batcher.start()
        await asyncio.gather(*(batcher.infer(_rows(1, i)) for i in range(5)))
        await batcher.stop()

    _run(main())
    assert runner.threads == {loaded_in}
    assert thread.submit(threading.get_ident).result() == loaded_in  # still running
    thread.shutdown(wait=True)
    with pytest.raises(ValueError, match="2 runners need as many threads"):
        Batcher([runner, runner], BatchingConfig(), threads=[thread])
