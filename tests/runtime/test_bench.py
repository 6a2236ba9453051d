import json

import numpy as np
import pytest

from convforge import contract
from convforge.builder import create_model
from convforge.cli import main
from convforge.errors import UserError
from convforge.export import export_onnx
from convforge.runtime import bench

KEYS = {
    "backend",
    "precision",
    "batch_size",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "throughput_ips",
}


def test_latency_stats_on_known_samples():
    s = bench.latency_stats([float(x) for x in range(1, 101)], batch_size=4)
    assert s["mean_ms"] == pytest.approx(50.5) and s["min_ms"] == 1 and s["max_ms"] == 100
    assert s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["std_ms"] == pytest.approx(np.std(range(1, 101), ddof=1))
    assert s["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)
    assert s["unstable"]  # cv 0.57
    steady = bench.latency_stats([10.0, 10.1, 9.9, 10.0], batch_size=1)
    assert not steady["unstable"] and steady["throughput_ips"] == pytest.approx(100.0)


def test_compare_flags_only_slowdowns_beyond_the_threshold():
    base = [
        {
            "backend": "ort-cpu",
            "precision": "fp32",
            "batch_size": 1,
            "timing": "end-to-end",
            "p50_ms": 10.0,
        }
    ]
    now = [dict(base[0], p50_ms=10.5), dict(base[0], batch_size=8, p50_ms=99.0)]
    assert bench.compare(now, base, 0.10) == []
    slow = bench.compare([dict(base[0], p50_ms=12.0)], base, 0.10)
    assert len(slow) == 1 and slow[0]["slowdown"] == pytest.approx(1.2)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "m.onnx"
    info = contract.metadata(
        arch="plain",
        classes=["a", "b", "c"],
        mean=[0.5] * 3,
        std=[0.25] * 3,
        input_size=16,
        resize_size=16,
        channels=3,
        source_sha256="0" * 64,
    )
    model = create_model("plain", depth=2, width=8, num_classes=3, stem="small").eval()
    export_onnx(model, path, input_size=(3, 16, 16), metadata=info)
    return path


def test_bench_cli_writes_json_csv_and_plot(onnx_file, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        str(onnx_file),
        "--backends",
        "ort-cpu",
        "--batch-sizes",
        "1,4",
        "--warmup-iters",
        "2",
        "--warmup-seconds",
        "0",
        "--iters",
        "5",
        "--seconds",
        "0",
        "--json-out",
        str(out),
        "--csv-out",
        str(tmp_path / "b.csv"),
        "--plot",
        str(tmp_path / "b.png"),
    ]
    assert main(argv) == 0
    assert "ort-cpu" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {"cpu", "logical_cores", "onnxruntime_version"} <= set(data["environment"])
    records = data["records"]
    assert [r["batch_size"] for r in records] == [1, 4]
    assert all(KEYS <= set(r) and r["timing"] == "end-to-end" for r in records)
    assert all(r["iterations"] >= 5 and r["load_s"] >= 0 for r in records)
    assert (tmp_path / "b.csv").read_text().splitlines()[0].count(",") >= len(KEYS) - 1
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    # The same run compared with itself made 10x faster is a regression: exit 1.
    fast = [dict(r, p50_ms=r["p50_ms"] / 10) for r in records]
    (tmp_path / "fast.json").write_text(json.dumps({"records": fast}))
    assert main([*argv[:-6], "--compare", str(tmp_path / "fast.json"), "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["regressions"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backends", "ort-gpu"], "unknown backend 'ort-gpu'"),
        (["--batch-sizes", "1,x"], "--batch-sizes: takes comma-separated positive integers"),
        (["--backends", "tensorrt"], "backend 'tensorrt' is not available"),
    ],
)
def test_bench_errors(onnx_file, extra, message, capsys):
    from convforge.runtime.backends import backend_class

    if "tensorrt" in extra and backend_class("tensorrt").available()[0]:
        pytest.skip("TensorRT is available here")
    assert main(["bench", str(onnx_file), *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_matrix_times_and_scores_with_the_same_backend_options(onnx_file, monkeypatch):
    from convforge.runtime import backends

    created = []
    real_create = backends.create

    def spy(name, path, overrides=None, **options):
        created.append((name, options))
        return real_create(name, path, overrides, **options)

    monkeypatch.setattr(backends, "create", spy)
    images = list(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    cfg = bench.BenchConfig(batch_sizes=(2,), warmup_iters=1, warmup_seconds=0, iters=2, seconds=0)
    options = {"ort-cpu": {"threads": 1, "graph_optimization": "basic"}}
    records, skipped = bench.bench_matrix(
        [str(onnx_file)], ["ort-cpu"], cfg, options, labelled=(images, [0, 1, 2, 0, 1, 2])
    )
    assert created == [("ort-cpu", options["ort-cpu"])] * 2  # timing, then accuracy
    assert skipped == [] and 0.0 <= records[0]["top1_accuracy"] <= 1.0
    assert records[0]["threads"] == 1 and records[0]["graph_optimization"] == "basic"


def test_the_matrix_skips_what_cannot_run_only_when_backends_are_not_named(tmp_path):
    cfg = bench.BenchConfig(batch_sizes=(1,), warmup_iters=1, warmup_seconds=0, iters=2, seconds=0)
    missing = str(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="does not exist"):
        bench.bench_matrix([missing], ["ort-cpu"], cfg)
    with pytest.raises(UserError, match=r"no backend could run: .*ort-cpu on .*nope.onnx"):
        bench.bench_matrix([missing], None, cfg)
    # skip_failures: a named backend that cannot run a file is listed, not fatal.
    with pytest.raises(UserError, match=r"no backend could run: ort-cpu on .*nope.onnx"):
        bench.bench_matrix([missing], ["ort-cpu"], cfg, skip_failures=True)


def test_a_single_batch_size_backend_gets_one_instance_per_size(onnx_file, monkeypatch):
    """CUDA-graph instances run one batch size: bench must not reuse one across sizes."""
    from convforge.runtime.backends.ort import OrtCpu

    sizes_seen: dict[int, set] = {}
    real_run = OrtCpu._run

    def run(self, batch):
        sizes_seen.setdefault(id(self), set()).add(len(batch))
        return real_run(self, batch)

    monkeypatch.setattr(OrtCpu, "single_batch_size", property(lambda self: True))
    monkeypatch.setattr(OrtCpu, "_run", run)
    cfg = bench.BenchConfig(batch_sizes=(1, 2, 4), warmup_iters=1, warmup_seconds=0, iters=2,
                            seconds=0)  # fmt: skip
    records = bench.bench_backend("ort-cpu", str(onnx_file), cfg)
    assert [r["batch_size"] for r in records] == [1, 2, 4]
    assert sorted(map(sorted, sizes_seen.values())) == [[1], [2], [4]]
