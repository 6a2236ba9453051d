"""How `serve` loads its backend instances: each is loaded, warmed, run and closed in its own
runner thread (torch.compile's CUDA-graph trees and the current CUDA device are per thread),
the extra ones as the first's ``sibling()``, and a failed one fails ``load()`` cleanly."""

import asyncio
import importlib.util
import shutil
import threading
import time

import numpy as np
import pytest

from convforge.runtime.backends import Backend, BackendUnavailable
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.served_model import ServedModel
from tests.runtime.serve.conftest import MODEL


@pytest.fixture
def calls(monkeypatch):
    """Every load, run, sibling and close of any backend: (event, instance, thread id, rows
    of a run). Runs take 10 ms more, so that two instances serve at the same time."""
    seen: list[tuple[str, Backend, int, int | None]] = []

    def record(event, real):
        def wrapper(self, *args):
            rows = len(args[0]) if event == "run" else None
            seen.append((event, self, threading.get_ident(), rows))
            if event == "run":
                time.sleep(0.01)
            return real(self, *args)

        return wrapper

    for event in ("load", "run", "sibling", "close"):
        if hasattr(Backend, event):
            monkeypatch.setattr(Backend, event, record(event, getattr(Backend, event)))
    return seen


def _runner_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("convforge-runner")}


def _serve_a_little(model: ServedModel) -> list[np.ndarray]:
    async def main():
        await model.start()
        rows = np.zeros((2, *model.sample_shape), np.float32)
        outs = await asyncio.gather(*(model.infer(rows) for _ in range(8)))
        await model.stop(drain_s=5)
        return outs

    return asyncio.run(main())


@pytest.mark.parametrize(
    "backend, options", [("ort-cpu", {"threads": 1}), ("auto", {})], ids=["named", "auto"]
)
def test_each_instance_lives_in_its_own_runner_thread(calls, backend, options):
    """Load, warm-up, every batch and close of an instance happen in one thread, its own;
    the second instance is the first's sibling(), made in that second thread, with the
    first's options (none after auto, which repeats its choice)."""
    before = _runner_threads()
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_ms=0, instances=2)
    model = ServedModel("digits", str(MODEL), backend, options, batching)
    model.load()  # here, in the test's thread, as KServe's ModelServer does
    first, second = model.backends
    assert type(second) is type(first) and second is not first

    outs = _serve_a_little(model)
    assert all(o.shape == (2, 10) for o in outs)

    main = threading.get_ident()
    threads = {}
    for instance in (first, second):
        events = [(e, t, n) for e, b, t, n in calls if b is instance and e != "sibling"]
        names = [e for e, _, _ in events]
        assert names[0] == "load" and names[-1] == "close", names
        assert len({t for _, t, _ in events}) == 1, events  # one thread for all of it
        threads[instance] = events[0][1]
        runs = [n for e, _, n in events if e == "run"]
        # warmed at every power-of-two bucket up to the largest batch, then it served
        assert runs[:3] == [1, 2, 4] and len(runs) > 3
    assert main not in threads.values() and threads[first] != threads[second]
    siblings = [(b, t) for e, b, t, _ in calls if e == "sibling"]
    assert siblings == [(first, threads[second])]  # made where it then ran
    assert second._given == options and first._given == options
    assert _runner_threads() == before  # stop() shut its runner threads down


def test_a_failed_instance_fails_load_in_one_line_and_closes_the_loaded_ones(calls, monkeypatch):
    """The second instance cannot load: load() raises its error as it is (a one-line
    BackendUnavailable), after closing the first in its own thread; no runner thread is
    left behind and the model is not ready."""
    from convforge.runtime.backends.ort import OrtCpu

    real = OrtCpu._load
    loads = []

    def second_fails(self, info):
        loads.append(self)
        if len(loads) == 2:
            raise BackendUnavailable("backend 'ort-cpu' is not available: out of device memory")
        return real(self, info)

    monkeypatch.setattr(OrtCpu, "_load", second_fails)
    before = _runner_threads()
    batching = BatchingConfig(max_batch_size=4, instances=3)
    model = ServedModel("digits", str(MODEL), "ort-cpu", None, batching)
    with pytest.raises(BackendUnavailable) as e:
        model.load()
    assert str(e.value) == "backend 'ort-cpu' is not available: out of device memory"
    first = loads[0]
    events = [(e, t) for e, b, t, _ in calls if b is first and e != "sibling"]
    assert events[-1][0] == "close" and not first._loaded
    assert len({t for _, t in events}) == 1  # closed where it was loaded and warmed
    assert len(loads) == 2  # the third instance was never tried
    assert model.backends == [] and not model.ready
    assert _runner_threads() == before


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["cuda-graphs", "compile-cuda-graphs"])
def test_torch_cuda_graph_instances_serve_from_their_own_threads(tmp_path, compile):
    """serve --instances 2 with the torch backend's CUDA graphs (manual, or torch.compile's
    CUDA-graph trees, which work only in the thread that recorded them): every bucket is
    captured at load, and concurrent requests of every size 1..32 get the right logits."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False here)")
    if compile and (shutil.which("c++") is None or importlib.util.find_spec("triton") is None):
        pytest.skip("torch.compile on CUDA needs a C++ compiler and triton")
    from tests.helpers import export_small_model, random_batch, torch_logits

    path, model = export_small_model(tmp_path)
    batching = BatchingConfig(max_batch_size=32, max_queue_delay_ms=1, instances=2)
    options = {"device": "cuda", "cuda_graphs": True, "compile": compile}
    served = ServedModel("small", str(path), "torch", options, batching)
    served.load()
    if not compile:
        for backend in served.backends:
            assert backend.describe()["cuda_graph_batches"] == [1, 2, 4, 8, 16, 32]
    xs = [random_batch(n, seed=n) for n in range(1, 33)]

    async def main():
        await served.start()
        outs = await asyncio.gather(*(served.infer(x) for x in xs))
        captured = [b.describe()["cuda_graph_batches"] for b in served.backends]
        await served.stop(drain_s=30)
        return outs, captured

    outs, captured = asyncio.run(main())
    for x, got in zip(xs, outs, strict=True):
        want = torch_logits(model, x)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), len(x)
    if not compile:
        assert captured == [[1, 2, 4, 8, 16, 32]] * 2  # nothing captured while serving
