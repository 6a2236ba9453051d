"""The PyTorch backend: the exported .pt2 program against the model it came from."""

import contextlib
import shutil
import threading

import numpy as np
import pytest
import torch

from convforge.builder import create_model
from convforge.errors import UserError
from convforge.export import export_onnx
from convforge.runtime.backends.base import BackendUnavailable
from convforge.runtime.backends.torch_program import TorchProgram
from tests.helpers import (
    SMALL_CLASSES,
    export_small_model,
    random_batch,
    torch_logits,
)

CLASSES = SMALL_CLASSES
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False here)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, model = export_small_model(tmp_path_factory.mktemp("torch"))
    return path, model


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_fp32_matches_pytorch(exported, n, suffix):
    path, model = exported
    x = random_batch(n)
    want = torch_logits(model, x)
    with TorchProgram(path.with_suffix(suffix)) as backend:
        assert backend.spec.channels == 3 and (backend.spec.height, backend.spec.width) == (16, 16)
        got = backend.run(x)
        info = backend.describe()
    assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert info["backend"] == "torch" and info["precision"] == "fp32"
    assert info["device"] == "cpu" and info["program"] == str(path.with_suffix(".pt2"))


def test_channels_last_matches_pytorch(exported):
    path, model = exported
    x = random_batch(5, seed=2)
    want = torch_logits(model, x)
    with TorchProgram(path, channels_last=True) as backend:
        got = backend.run(x)
        assert backend.describe()["channels_last"] is True
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("n", [1, 5])
def test_bf16_agrees_on_top1_and_returns_float32(exported, n):
    path, model = exported
    x = random_batch(n, seed=3)
    want = torch_logits(model, x)
    with TorchProgram(path, dtype="bf16") as backend:
        got = backend.run(x)
        assert backend.precision == "bf16" and backend.describe()["dtype"] == "bf16"
    assert got.dtype == np.float32
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_matches_pytorch(exported):
    path, model = exported
    x = random_batch(2, seed=4)
    want = torch_logits(model, x)
    with TorchProgram(path, compile=True) as backend:
        got = backend.run(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_missing_program_is_a_user_error(exported, tmp_path):
    alone = tmp_path / "alone.onnx"
    shutil.copy(exported[0], alone)
    with pytest.raises(UserError, match=r"alone\.pt2 does not exist.*convforge export"):
        TorchProgram(alone).load()


def test_foreign_program_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a torch.export program"):
        TorchProgram(junk).load()


def test_cuda_graphs_need_the_cuda_device(exported):
    with pytest.raises(UserError, match="cuda_graphs needs device='cuda'"):
        TorchProgram(exported[0], cuda_graphs="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_unavailable(exported):
    ok, why = TorchProgram.available("cuda")
    assert not ok and "cuda" in why
    with pytest.raises(BackendUnavailable, match="cuda"):
        TorchProgram(exported[0], device="cuda").load()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_cuda_matches_pytorch(exported, dtype, tol):
    path, model = exported
    x = random_batch(5, seed=5)
    want = torch_logits(model, x)
    with TorchProgram(path, device="cuda", dtype=dtype, channels_last=True) as backend:
        got = backend.run(x)
        assert backend.describe()["device"] == "cuda" and backend.precision == dtype
    assert got.dtype == np.float32
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graphs_replay_per_batch_bucket(exported):
    path, model = exported
    with TorchProgram(path, device="cuda", cuda_graphs=True) as backend:
        for n, seed in [(1, 6), (5, 7), (1, 8), (8, 9)]:  # the last two replay earlier graphs
            x = random_batch(n, seed=seed)
            want = torch_logits(model, x)
            got = backend.run(x)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        assert backend.describe()["cuda_graph_batches"] == [1, 8]  # 5 rows ran padded to 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_graph_instances_in_concurrent_threads(exported, tf32):
    """Two instances as serve --instances 2 runs them: each loaded and warmed at every
    bucket in its own thread, one after the other, then both running every batch size
    1..32 at the same time: right answers; TF32 set once, as asked."""
    path, model = exported
    errors, done = [], []
    warming = threading.Lock()  # serve loads and warms instances one at a time

    def instance(seed: int) -> None:
        try:
            with warming:
                backend = TorchProgram(path, device="cuda", cuda_graphs=True, tf32=tf32).load()
                for n in (1, 2, 4, 8, 16, 32):
                    backend.run(random_batch(n))
            try:
                assert torch.backends.cudnn.allow_tf32 is tf32
                for n in range(1, 33):
                    x = random_batch(n, seed=seed + n)
                    want = torch_logits(model, x)
                    got = backend.run(x)
                    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), n
                done.append(backend.describe())
            finally:
                backend.close()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=instance, args=(s,)) for s in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for described in done:
        assert described["cuda_graph_batches"] == [1, 2, 4, 8, 16, 32]
        assert described["tf32"] is tf32 and described["precision"] == ("tf32" if tf32 else "fp32")


def test_spec_comes_from_the_onnx_when_the_program_has_no_metadata(tmp_path):
    """An export without convforge metadata still serves: the ONNX declares the input shape."""
    model = create_model("plain", depth=1, width=4, num_classes=2, stem="small").eval()
    export_onnx(model, tmp_path / "bare.onnx", input_size=(3, 8, 8))
    x = np.random.default_rng(9).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with TorchProgram(tmp_path / "bare.onnx") as backend:
        assert (backend.spec.channels, backend.spec.height) == (3, 8)
        got = backend.run(x)
    assert np.abs(got - torch_logits(model, x)).max() <= 1e-5 * np.abs(torch_logits(model, x)).max()
    with pytest.raises(UserError, match="no convforge metadata"):
        TorchProgram(tmp_path / "bare.pt2").load()


def test_an_fp16_program_also_takes_float16_host_batches(exported):
    assert TorchProgram(exported[0], dtype="fp16").input_dtypes == (np.float32, np.float16)
    with TorchProgram(exported[0]) as backend:  # fp32: float32 only
        with pytest.raises(UserError, match="input must be float32, got float16"):
            backend.run(random_batch(2).astype(np.float16))


def test_staged_runs_match_run_and_are_device_resident_on_cuda_only(exported):
    assert TorchProgram(exported[0], device="cuda").device_resident
    x = random_batch(3, seed=11)
    with TorchProgram(exported[0]) as backend:
        assert not backend.device_resident  # the bench times no compute-only row on the CPU
        backend.stage(x)
        backend.run_device_resident()
        np.testing.assert_array_equal(backend.fetch(), backend.run(x))


class FakeCudaGraphs:
    """torch.cuda's graph API, recorded, for the CPU: a capture records the module's work
    (through :meth:`recording`), a replay redoes it into the same output tensor, as a CUDA
    graph replays into the same addresses. Streams do nothing."""

    def __init__(self, monkeypatch) -> None:
        self.captures: list[dict] = []
        self.pools: list[object] = []
        self.streams: list[object] = []
        self.overlaps = 0  # captures that began while another was underway
        self._active: dict[int, object] = {}  # thread -> the graph it is capturing
        self._lock = threading.Lock()
        fake = self

        class CUDAGraph:
            def __init__(self) -> None:
                self.work, self.replays = [], 0

            def replay(self) -> None:
                self.replays += 1
                for step in self.work:
                    step()

        class Stream:
            def __init__(self, counted: bool = True) -> None:
                if counted:
                    fake.streams.append(self)

            def wait_stream(self, other) -> None:
                pass

        current = Stream(counted=False)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global", **_):
            with fake._lock:
                fake.overlaps += bool(fake._active)
                fake._active[threading.get_ident()] = cuda_graph
            fake.captures.append(
                {"graph": cuda_graph, "pool": pool, "stream": stream, "mode": capture_error_mode}
            )
            try:
                threading.Event().wait(0.02)  # a capture takes time: overlaps would show
                yield
            finally:
                with fake._lock:
                    del fake._active[threading.get_ident()]

        def graph_pool_handle():
            fake.pools.append(object())
            return fake.pools[-1]

        for name, value in {
            "CUDAGraph": CUDAGraph, "Stream": Stream, "graph": graph,
            "graph_pool_handle": graph_pool_handle, "stream": lambda s: contextlib.nullcontext(),
            "current_stream": lambda: current,
        }.items():  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, value)

    def recording(self, module):
        """``module``, whose calls during a capture are recorded into the captured graph
        (with the rows it was captured at)."""

        def call(x):
            out = module(x)
            graph = self._active.get(threading.get_ident())
            if graph is not None:
                graph.work.append(lambda: out.copy_(module(x)))
                self.captures[-1]["rows"] = len(x)
            return out

        return call


def _graph_backend(path, fake: FakeCudaGraphs) -> TorchProgram:
    """The CPU program, run with cuda_graphs through the fake graph API."""
    backend = TorchProgram(path).load()
    backend.cuda_graphs = True
    backend._module = fake.recording(backend._module)
    return backend


def test_cuda_graphs_pad_to_buckets_one_pool_per_instance_thread_local(exported, monkeypatch):
    """Batches run in the graph of the next power of two, padded, their own rows sliced
    back; an instance's graphs share one memory pool and capture stream; every capture is
    thread-local; two instances in two threads never capture at the same time."""
    path, model = exported
    fake = FakeCudaGraphs(monkeypatch)
    a, b = _graph_backend(path, fake), _graph_backend(path, fake)
    results, errors = {}, []

    def serve(backend, sizes, seed):
        try:
            for n in sizes:
                x = random_batch(n, seed=seed + n)
                results[(seed, n)] = (backend.run(x), torch_logits(model, x))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [
        threading.Thread(target=serve, args=(a, [1, 3, 5, 4, 3, 17], 100)),
        threading.Thread(target=serve, args=(b, [2, 7, 8, 32], 200)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in results.values():
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert a.describe()["cuda_graph_batches"] == [1, 4, 8, 32]
    assert b.describe()["cuda_graph_batches"] == [2, 8, 32]
    assert a._graphs[4][0].replays == 3  # 3, 4 and 3 rows: one graph, captured once
    assert {c["mode"] for c in fake.captures} == {"thread_local"}
    assert sorted(c["rows"] for c in fake.captures) == sorted([1, 4, 8, 32, 2, 8, 32])
    assert fake.overlaps == 0
    assert len(fake.pools) == len(fake.streams) == 2  # one pool and stream per instance
    for backend in (a, b):
        graphs = {id(g) for g, _, _ in backend._graphs.values()}
        mine = [c for c in fake.captures if id(c["graph"]) in graphs]
        assert len({id(c["pool"]) for c in mine}) == len({id(c["stream"]) for c in mine}) == 1
    a.close()
    b.close()


def test_tf32_is_a_process_wide_setting_held_by_the_loaded_instances():
    """The first fp32 CUDA instance sets torch's TF32 switches (cuDNN and cuBLAS), later ones
    asking the same share them, one asking otherwise is refused in one line (not silently
    flipped), and the last to close puts back what was there."""
    from convforge.runtime.backends.torch_program import TF32

    switches = torch.backends.cudnn, torch.backends.cuda.matmul
    before = tuple(s.allow_tf32 for s in switches)
    for on in (False, True):
        TF32.claim(on)
        TF32.claim(on)  # a second instance asking the same
        assert all(s.allow_tf32 is on for s in switches)
        with pytest.raises(UserError, match=f"tf32={on}.*process-wide.*tf32={not on}") as e:
            TF32.claim(not on)
        assert "\n" not in str(e.value)
        TF32.release()
        assert all(s.allow_tf32 is on for s in switches)  # one instance still holds it
        TF32.release()
        assert tuple(s.allow_tf32 for s in switches) == before


def test_tf32_is_set_at_load_never_around_each_run(exported, monkeypatch):
    """Loading a CUDA fp32 instance claims TF32 before anything else (a conflicting one is
    refused right there); runs never switch cuDNN flags; describe() says what ran."""

    def per_call_switch(**_):
        raise AssertionError("cudnn.flags() switches process-wide state around a run")

    monkeypatch.setattr(torch.backends.cudnn, "flags", per_call_switch)
    with TorchProgram(exported[0], tf32=True) as backend:  # the CPU: TF32 means nothing
        backend.run(random_batch(2))
        assert backend.describe()["tf32"] is False and backend.precision == "fp32"

    from convforge.runtime.backends.torch_program import TF32

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    TF32.claim(False)  # another model in this process runs fp32 CUDA without TF32
    try:
        with pytest.raises(UserError, match="process-wide"):
            TorchProgram(exported[0], device="cuda", tf32=True).load()
        with contextlib.suppress(Exception):  # without a GPU it fails past the claim
            TorchProgram(exported[0], device="cuda").load().close()
        assert TF32.on is False and TF32._users == 1  # each load gave its claim back
    finally:
        TF32.release()
