"""Load test of `convforge serve` on loopback, beside a hand-written FastAPI + ONNX Runtime server.

    .venv/bin/python benchmarks/serve_load.py [--seconds 4] [--quick]

Models: the demo model (``runs/demo/model.onnx`` when `make demo` has run, else the
test fixture of the same recipe at 16 px) and a ResNet-18 at 224 px (random weights
with real BN statistics), fp32 and int8 (convforge's QDQ export, cpu target). Every
server runs the ``ort-cpu`` backend in its own process; the load comes from this
process through the real Triton clients (``tritonclient.grpc.aio``,
``tritonclient.http.aio`` with binary tensors), one single-row request after another
per client, ``--seconds`` per cell after a short warm-up, so every run stops by itself.

Grid: concurrency 1, 4, 16, 64 x batching on (``--max-batch-size 32``) and off
(``--max-batch-size 1``) x gRPC and HTTP. Beside it, in the same run:

* the peer: the server a user writes by hand, FastAPI + one ONNX Runtime session,
  one request per call (raw float32 bytes in, raw logits out), driven by httpx;
* in-process references: ``Model.logits`` on one row (for the server's added
  latency) and ``bench``'s best throughput over batch sizes 1-32;
* overload: concurrency 64 against ``--max-queue 8``: the answers must be 503s
  (UNAVAILABLE/RESOURCE_EXHAUSTED on gRPC), never timeouts or 500s.

Writes benchmarks/results/serve_load.json and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONCURRENCY = (1, 4, 16, 64)
PEER_NAME = "fastapi+onnxruntime (peer)"


# -- models ----------------------------------------------------------------------------------


def prepare_models(folder: Path, quick: bool) -> dict[str, Path]:
    demo = ROOT / "runs" / "demo" / "model.onnx"
    models = {"demo": demo if demo.is_file() else ROOT / "tests" / "fixtures" / "digits.onnx"}
    if quick:
        return models
    import onnx
    import torch

    from convforge import contract
    from convforge.builder import create_model
    from convforge.export import export_onnx
    from convforge.export.int8 import to_int8
    from convforge.export.onnx_export import serialize

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    meta = contract.metadata(
        arch="resnet18", classes=[str(i) for i in range(10)], mean=[0.5] * 3, std=[0.25] * 3,
        input_size=224, resize_size=256, channels=3, source_sha256="",
    )  # fmt: skip
    fp32 = folder / "resnet18_224.onnx"
    export_onnx(model, fp32, input_size=(3, 224, 224), metadata=meta)
    calib = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    int8 = folder / "resnet18_224.int8.onnx"
    int8.write_bytes(serialize(to_int8(onnx.load(fp32), calib, "cpu")))
    models["resnet18_224"] = fp32
    models["resnet18_224_int8"] = int8
    return models


def input_shape(path: Path) -> tuple[int, int, int]:
    from convforge.contract import read_info

    spec = read_info(path).spec
    return spec.channels, spec.height, spec.width


# -- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, argv: list[str], ready_words: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 300
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(lines[-30:]))
            lines.append(line)
            if ready_words in line:
                return
        raise RuntimeError("server not ready in 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_convforge(name: str, path: Path, batch: int, queue: int) -> tuple[Process, int, int]:
    http, grpc = free_port(), free_port()
    argv = [sys.executable, "-m", "convforge", "serve", f"{name}={path}", "--backend", "ort-cpu",
            "--port", str(http), "--grpc-port", str(grpc), "--max-batch-size", str(batch),
            "--max-queue-delay-ms", "2", "--max-queue", str(queue)]  # fmt: skip
    return Process(argv, "ready on"), http, grpc


PEER = textwrap.dedent(
    """
    # The server a user writes by hand: FastAPI, one ONNX Runtime session, one request per
    # call. A plain `def` endpoint: FastAPI runs it in its thread pool, so calls overlap.
    import sys

    import numpy as np
    import onnxruntime as ort
    from fastapi import Body, FastAPI, Response

    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = [int(d) for d in session.get_inputs()[0].shape[1:]]
    app = FastAPI()


    @app.post("/predict")
    def predict(body: bytes = Body(..., media_type="application/octet-stream")):
        x = np.frombuffer(body, np.float32).reshape(-1, *shape)
        (y,) = session.run(None, {name: x})
        return Response(y.astype(np.float32).tobytes(), media_type="application/octet-stream")
    """
)


def start_peer(path: Path, folder: Path) -> tuple[Process, int]:
    app = folder / "peer_app.py"
    app.write_text(PEER)
    port = free_port()
    code = (
        f"import sys; sys.argv = ['peer', {str(path)!r}]; sys.path.insert(0, {str(folder)!r}); "
        f"import uvicorn, peer_app; uvicorn.run(peer_app.app, host='127.0.0.1', port={port}, "
        "log_level='info', access_log=False)"
    )
    return Process([sys.executable, "-c", code], "Uvicorn running"), port


# -- load ------------------------------------------------------------------------------------


async def drive(call, concurrency: int, seconds: float, warmup: float = 0.5) -> dict:
    """``concurrency`` clients calling ``call()`` back to back; latencies after the warm-up."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client() -> None:
        while (now := time.perf_counter()) < stop_at:
            try:
                await call()
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)
            except Exception as e:  # noqa: BLE001 (every failure is counted by kind)
                if now >= measure_from:
                    kind = _kind(e)
                    errors[kind] = errors.get(kind, 0) + 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": done,
        "throughput_rps": round(done / seconds, 2),
        "p50_ms": round(1e3 * statistics.median(latencies), 3) if latencies else None,
        "p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 3) if latencies else None,
        "errors": errors,
    }


def _kind(e: Exception) -> str:
    status = getattr(e, "status", None)
    status = status() if callable(status) else status
    if status:
        return str(status)
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    return type(e).__name__


async def triton_grpc(port: int, model: str, x: np.ndarray):
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)

    async def call():
        result = await client.infer(model, [inp], client_timeout=30)
        assert result.as_numpy("logits").shape[0] == len(x)

    return client, call


async def triton_http(port: int, model: str, x: np.ndarray):
    import tritonclient.http.aio as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=128)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("logits", binary_data=True)

    async def call():
        result = await client.infer(model, [inp], outputs=[out], timeout=30)
        assert result.as_numpy("logits").shape[0] == len(x)

    return client, call


async def peer_http(port: int, x: np.ndarray):
    import httpx

    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30,
        limits=httpx.Limits(max_connections=128),
    )  # fmt: skip
    body = x.tobytes()

    async def call():
        response = await client.post("/predict", content=body)
        response.raise_for_status()

    return client, call


async def _load(factory, concurrency: int, seconds: float) -> dict:
    client, call = await factory()
    try:
        return await drive(call, concurrency, seconds)
    finally:
        close = getattr(client, "close", None) or client.aclose
        await close()


# -- in-process references -------------------------------------------------------------------


def in_process(path: Path, x: np.ndarray) -> dict:
    from convforge.runtime import bench, load

    with load(path, backend="ort-cpu") as model:
        for _ in range(10):
            model.logits(x)
        samples = []
        for _ in range(200):
            t = time.perf_counter()
            model.logits(x)
            samples.append(time.perf_counter() - t)
    cfg = bench.BenchConfig(batch_sizes=(1, 8, 16, 32), warmup_seconds=0.5, seconds=2.0, iters=5)
    records = bench.bench_backend("ort-cpu", str(path), cfg)
    best = max(records, key=lambda r: r["throughput_ips"])
    return {
        "logits_p50_ms": round(1e3 * statistics.median(samples), 3),
        "bench_images_per_s": {r["batch_size"]: round(r["throughput_ips"], 1) for r in records},
        "bench_best_images_per_s": round(best["throughput_ips"], 1),
        "bench_best_batch": best["batch_size"],
    }


# -- the run ---------------------------------------------------------------------------------


def measure_convforge(name: str, path: Path, x: np.ndarray, batch: int, queue: int,
                      concurrency: tuple[int, ...], seconds: float) -> list[dict]:  # fmt: skip
    """One `convforge serve` process, every concurrency over gRPC then HTTP."""
    server, http, grpc = start_convforge(name, path, batch, queue)
    rows = []
    try:
        for protocol, factory in (
            ("grpc", functools.partial(triton_grpc, grpc, name, x)),
            ("http", functools.partial(triton_http, http, name, x)),
        ):
            for c in concurrency:
                r = asyncio.run(_load(factory, c, seconds))
                rows.append({"model": name, "protocol": protocol, **r})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def measure_peer(name: str, path: Path, x: np.ndarray, folder: Path, seconds: float) -> list[dict]:
    peer, port = start_peer(path, folder)
    rows = []
    try:
        for c in CONCURRENCY:
            r = asyncio.run(_load(functools.partial(peer_http, port, x), c, seconds))
            rows.append({"model": name, "server": PEER_NAME, "batching": "n/a",
                         "protocol": "http", **r})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        peer.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--quick", action="store_true", help="the demo model only")
    args = parser.parse_args()
    rows, refs, overload = [], {}, []
    with tempfile.TemporaryDirectory(prefix="convforge-serve-load-") as tmp:
        folder = Path(tmp)
        models = prepare_models(folder, args.quick)
        for name, path in models.items():
            x = np.random.default_rng(0).standard_normal((1, *input_shape(path)))
            x = x.astype(np.float32)
            refs[name] = in_process(path, x)
            print(f"{name}: in-process {refs[name]}", flush=True)
            for batching, batch in (("on", 32), ("off", 1)):
                for r in measure_convforge(name, path, x, batch, 256, CONCURRENCY, args.seconds):
                    rows.append({"server": "convforge", "batching": batching, **r})
            rows += measure_peer(name, path, x, folder, args.seconds)
            for r in measure_convforge(name, path, x, 32, 8, (64,), args.seconds):
                overload.append({"max_queue": 8, **r})
    record = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "seconds_per_cell": args.seconds,
        "models": {
            k: str(v.relative_to(ROOT)) if v.is_relative_to(ROOT) else v.name
            for k, v in models.items()
        },  # fmt: skip
        "in_process": refs,
        "rows": rows,
        "overload": overload,
        "goals": goals(rows, refs, overload),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["goals"], indent=2))


def goals(rows: list[dict], refs: dict, overload: list[dict]) -> dict:
    def row(model, server="convforge", batching="on", protocol="grpc", c=1):
        return next((r for r in rows if r["model"] == model and r["server"] == server
                     and r["batching"] == batching and r["protocol"] == protocol
                     and r["concurrency"] == c), None)  # fmt: skip

    out = {"zero_errors": all(not r["errors"] for r in rows)}
    added = {}
    for model, ref in refs.items():
        r = row(model)
        if r and r["p50_ms"] is not None:
            added[model] = round(r["p50_ms"] - ref["logits_p50_ms"], 3)
    out["added_p50_ms_at_concurrency_1_grpc"] = added
    for model in ("resnet18_224", "resnet18_224_int8"):
        if model not in refs:
            continue
        best = max((r for r in rows if r["model"] == model and r["server"] == "convforge"
                    and r["concurrency"] == 16), key=lambda r: r["throughput_rps"])  # fmt: skip
        peer = row(model, PEER_NAME, "n/a", "http", 16)
        out[model] = {
            "best_c16": {k: best[k] for k in ("batching", "protocol", "throughput_rps")},
            "vs_in_process_bench": round(
                best["throughput_rps"] / refs[model]["bench_best_images_per_s"], 3
            ),
            # 16 clients of one row each can fill batches of 16 rows at most
            "vs_in_process_bench_batch16": round(
                best["throughput_rps"] / refs[model]["bench_images_per_s"][16], 3
            ),
            "vs_peer": round(best["throughput_rps"] / peer["throughput_rps"], 3) if peer else None,
        }
    out["overload_only_503s"] = all(
        set(o["errors"]) <= {"503", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
        for o in overload
    )
    return out


def _machine() -> dict:
    """bench's environment record (CPU model, cores, library versions) and the CPU's SIMD flags."""
    from convforge.runtime.bench import environment

    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
        flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in line.split()]
    except (OSError, StopIteration):
        pass
    return {**environment(), "cpu_flags": flags}


if __name__ == "__main__":
    main()
