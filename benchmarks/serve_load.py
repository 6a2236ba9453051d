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

Hostile phase (``--hostile``, on by default; ``--no-grid`` runs it alone):

    .venv/bin/python benchmarks/serve_load.py --no-grid --phase-s 20 [--per-attack] [--tag before]

16 good clients (the HTTP load above) for ``--phase-s`` each: without attackers (baseline),
with one client per attack at once (hostile), optionally each attack alone (``--per-attack``),
and without again (recovery). Attacks: slowloris (slow headers, slow bodies), a huge header
line, response amplification (``outputs`` naming "logits" 5,000 times), image bombs to
``/v1/models/NAME/classify``, /metrics cardinality (random model names), a body of
``--max-body-mb`` of rows, broken binary-extension headers, gRPC deadlines and cancels.
Reported: the good clients' p50/p99 and errors, the server's VmRSS at each phase's end
(ratios to the baseline; goals: p99 and RSS within 1.5x, 0 errors), what each attacker got
back, what the server logged. Writes benchmarks/results/serve_hostile[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import functools
import itertools
import json
import os
import random
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
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
    """A server subprocess, ready once ``ready_words`` is printed; its output read on by a
    thread from then on (a full pipe would block the server), the last lines kept."""

    def __init__(self, argv: list[str], ready_words: str, env: dict | None = None) -> None:
        # Run from outside the checkout: `python -m` puts the working directory first on
        # sys.path, ahead of PYTHONPATH, which can point at another convforge to measure.
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        self.argv = argv
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.count = 0  # lines printed after ready
        deadline = time.monotonic() + 300
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(lines[-30:]))
            lines.append(line)
            if ready_words in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise RuntimeError("server not ready in 300 s")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.count += 1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_convforge(
    name: str, path: Path, batch: int, queue: int, extra: tuple[str, ...] = ()
) -> tuple[Process, int, int]:
    http, grpc = free_port(), free_port()
    argv = [sys.executable, "-m", "convforge", "serve", f"{name}={path}", "--backend", "ort-cpu",
            "--port", str(http), "--grpc-port", str(grpc), "--max-batch-size", str(batch),
            "--max-queue-delay-ms", "2", "--max-queue", str(queue), *extra]  # fmt: skip
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


# -- hostile phase ---------------------------------------------------------------------------
#
# 16 good clients (the HTTP load above: binary v2 infer, one row each) run for --phase-s with
# no attacker (baseline), with every attacker at once (hostile), optionally with each attacker
# alone (--per-attack), then with none again (recovery: does the server get back?). The
# attackers run in a process of their own, so that their work (building bombs, reading
# amplified answers) does not slow the good clients' event loop; each is one client, bounded
# in time, and what it gets back (statuses, resets, timeouts) is tallied, not counted as a
# good client's error. After each phase: the server's VmRSS, the size of /metrics, whether it
# is alive and ready, and what it logged.

ATTACKS = ("slowloris", "huge_header", "amplification", "image_bombs", "cardinality",
           "big_rows", "binary_garbage", "grpc")  # fmt: skip
GOOD_CLIENTS = 16
GOOD_TIMEOUT_S = 10.0  # a good call slower than this is an error ("timeout")


class Tally:
    """What one attacker got back: a count per outcome, and notes."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.notes: dict = {}

    def add(self, what) -> None:
        self.outcomes[str(what)] += 1

    def record(self) -> dict:
        return {"outcomes": dict(self.outcomes.most_common()), "notes": self.notes}


def _attack_kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    return type(e).__name__


def _png(width: int, height: int, depth: int = 8, tail: bytes = b"", rows: int | None = None):
    """A grayscale PNG of zeros, built row by row (the pixels never exist here); ``rows``
    of them only (a truncated image) and ``tail`` chunks after the IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z = zlib.compressobj(9)
    row = bytes(1 + (width * depth + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + tail
            + chunk(b"IEND", b""))  # fmt: skip


def image_bombs() -> dict[str, bytes]:
    bad_crc = struct.pack(">I", 4) + b"IDAT" + b"\x00\x01\x02\x03" + b"\xde\xad\xbe\xef"
    huge_len = struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"x" * 64
    return {
        "png 20000x20000 1-bit": _png(20000, 20000, depth=1),
        "png 13000x13000 (under PIL's error limit)": _png(13000, 13000),
        "png 1x60000": _png(1, 60000),
        "png 60000x1": _png(60000, 1),
        "png bad CRC after IDAT": _png(64, 64, rows=32, tail=bad_crc),
        "png chunk of 2 GB after IDAT": _png(64, 64, tail=huge_len),
        # small, so that PIL gets past its size check to the plugin that runs Ghostscript
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
        b"/Helvetica findfont 12 scalefont setfont 0 0 moveto (x) show showpage\n%%EOF\n",
    }


def garbage_requests(name: str, shape: tuple[int, ...]) -> dict[str, tuple[bytes, str]]:
    """Binary-extension requests with a broken JSON header: name -> (body, header length)."""
    size = 4 * int(np.prod(shape))
    good = {"name": name, "shape": list(shape), "datatype": "FP32",
            "parameters": {"binary_data_size": size}}  # fmt: skip
    tensor = bytes(size)
    variants = {
        "datatype 5": {"inputs": [{**good, "datatype": 5}]},
        "datatype BYTES": {"inputs": [{**good, "datatype": "BYTES"}]},
        "shape [1e200, 1e200]": {"inputs": [{**good, "shape": [1e200, 1e200]}]},
        "shape [2**62, 2**62]": {"inputs": [{**good, "shape": [2**62, 2**62]}]},
        "shape [-1, ...]": {"inputs": [{**good, "shape": [-1, *shape[1:]]}]},
        "shape of strings": {"inputs": [{**good, "shape": [str(d) for d in shape]}]},
        "shape null": {"inputs": [{**good, "shape": None}]},
        "input parameters []": {"inputs": [{**good, "parameters": []}]},
        "binary_data_size 1e300": {"inputs": [{**good, "parameters": {"binary_data_size": 1e300}}]},
        "binary_data_size true": {"inputs": [{**good, "parameters": {"binary_data_size": True}}]},
        "parameters []": {"inputs": [good], "parameters": []},
        "id 12345": {"inputs": [good], "id": 12345},
        "id {}": {"inputs": [good], "id": {"a": [1]}},
        "outputs 'logits'": {"inputs": [good], "outputs": "logits"},
        "outputs [1]": {"inputs": [good], "outputs": [1]},
        "outputs [{}]": {"inputs": [good], "outputs": [{}]},
        "inputs [1]": {"inputs": [1]},
        "inputs [{}]": {"inputs": [{}]},
        "header is a list": [good],
        "name 1": {"inputs": [{**good, "name": 1}]},
    }
    out = {}
    for key, header in variants.items():
        head = json.dumps(header).encode()
        out[key] = (head + tensor, str(len(head)))
    # np.prod wraps to 0 in int64: a shape of 2**124 elements that "needs" 0 bytes
    head = json.dumps({"inputs": [{**good, "shape": [2**62, 2**62, 1, 1],
                                   "parameters": {"binary_data_size": 0}}]}).encode()  # fmt: skip
    out["shape [2**62, 2**62, 1, 1], 0 bytes"] = (head, str(len(head)))
    head = json.dumps({"inputs": [good]}).encode()
    for key, length in (("length -1", "-1"), ("length 0", "0"), ("length 1e9", "1000000000"),
                        ("length 'abc'", "abc"), ("length 1 (cut JSON)", "1")):  # fmt: skip
        out[key] = (head + tensor, length)
    return out


class Attackers:
    """The attackers of one phase, in the attacker process; ``until`` bounds them all."""

    def __init__(self, target: dict, until: float, options: dict) -> None:
        import httpx

        self.t, self.until, self.options = target, until, options
        self.stopped = asyncio.Event()
        self.base = f"http://127.0.0.1:{target['http']}"
        self.client = httpx.AsyncClient(
            base_url=self.base, timeout=httpx.Timeout(10.0, connect=5.0),
            limits=httpx.Limits(max_connections=4),
        )  # fmt: skip
        c, h, w = target["shape"]
        self.model, self.row = target["model"], (1, c, h, w)
        self.infer = f"/v2/models/{self.model}/infer"

    def running(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.until

    async def paced(self):
        """Yields at ``attack_rate`` a second at most while the phase runs: a request
        attacker tests what one request costs the server, not how many it can send."""
        interval, next_at = 1.0 / self.options["attack_rate"], time.monotonic()
        while self.running():
            yield
            next_at = max(next_at + interval, time.monotonic())
            await self.pause(next_at - time.monotonic())

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), seconds)

    async def send(self, tally: Tally, method: str, url: str, key: str = "", **kw) -> dict | None:
        """One request; the response read to its end but not parsed. Tallies the status
        (``key`` first) or the exception; returns size and seconds of an answer."""
        import httpx

        start = time.perf_counter()
        prefix = f"{key}: " if key else ""
        try:

            async def go():
                async with self.client.stream(method, url, **kw) as r:
                    size, first = 0, b""
                    async for chunk in r.aiter_raw():
                        size += len(chunk)
                        first = first or chunk[:200]
                    return r.status_code, size, first

            status, size, first = await asyncio.wait_for(go(), 30)
        except (httpx.HTTPError, OSError, TimeoutError, asyncio.TimeoutError) as e:
            tally.add(prefix + _attack_kind(e))
            await self.pause(0.05)  # a refused connection must not spin
            return None
        tally.add(prefix + str(status))
        if status >= 400:  # the first answer of each kind, for the reader
            answers = tally.notes.setdefault("answers", {})
            answers.setdefault(prefix + str(status), first.decode(errors="replace"))
        return {"status": status, "bytes": size, "seconds": time.perf_counter() - start}

    # 1. slowloris: connections trickling their headers, or a body of a few MB, 1 s apart
    async def slowloris(self, tally: Tally) -> None:
        n = self.options["slowloris_conns"]
        held: list[float] = []  # seconds a connection lasted before the server ended it
        opened = [0]
        head = (f"POST {self.infer} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-0: ").encode()
        # A body the server must wait for: 1 MB is under the largest valid JSON request to
        # the demo model (256 rows of 1x16x16 values), so it is not refused from the head.
        body_head = (f"POST {self.infer} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
                     '{"inputs": [').encode()  # fmt: skip

        async def trickle(first: bytes, unit: bytes, kind: str) -> None:
            while self.running():
                start = time.monotonic()
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.t["http"]), 5
                    )
                except (OSError, TimeoutError, asyncio.TimeoutError) as e:
                    tally.add(f"{kind} connect: {_attack_kind(e)}")
                    await self.pause(1.0)
                    continue
                opened[0] += 1
                outcome, pending = None, first
                try:
                    while self.running():
                        writer.write(pending[:1] if kind == "headers" else pending)
                        pending = pending[1:] if kind == "headers" else unit
                        pending = pending or unit
                        await asyncio.wait_for(writer.drain(), 5)
                        try:
                            got = await asyncio.wait_for(reader.read(256), 1.0)
                        except (TimeoutError, asyncio.TimeoutError):
                            continue  # still open: the next byte
                        line = got.split(b"\r\n", 1)[0].decode(errors="replace")
                        outcome = f"{kind}: answered {line[9:12]}" if got else f"{kind}: closed"
                        break
                except (OSError, TimeoutError, asyncio.TimeoutError) as e:
                    outcome = f"{kind}: {_attack_kind(e)}"
                finally:
                    writer.close()
                if outcome is None:
                    tally.add(f"{kind}: held to the end")
                else:
                    tally.add(outcome)
                    held.append(time.monotonic() - start)

        header_unit = b"a"  # the header value grows one byte a second, never ending
        tasks = [trickle(head, header_unit, "headers") for _ in range(n - n // 2)]
        tasks += [trickle(body_head, b" " * 16, "body") for _ in range(n // 2)]
        await asyncio.gather(*tasks)
        tally.notes.update(connections=n, opened=opened[0], ended_by_server=len(held))
        if held:
            tally.notes["median_s_before_server_ended_one"] = round(statistics.median(held), 2)

    # 2. a header line of tens of MB, as fast as the server reads it
    async def huge_header(self, tally: Tally) -> None:
        total = int(self.options["huge_header_mb"] * 2**20)
        chunk = b"a" * 2**16
        accepted: list[int] = []
        while self.running():
            sent, outcome = 0, None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.t["http"]), 5
                )
            except (OSError, TimeoutError, asyncio.TimeoutError) as e:
                tally.add(f"connect: {_attack_kind(e)}")
                await self.pause(1.0)
                continue
            try:
                writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: ")
                while sent < total and self.running():
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 10)
                    sent += len(chunk)
                writer.write(b"\r\n\r\n")
                await asyncio.wait_for(writer.drain(), 10)
                got = await asyncio.wait_for(reader.read(256), 10)
                line = got.split(b"\r\n", 1)[0].decode(errors="replace")
                outcome = f"answered {line[9:12]}" if got else "closed"
            except (OSError, TimeoutError, asyncio.TimeoutError) as e:
                outcome = _attack_kind(e)
                with contextlib.suppress(Exception):  # an answer sent before the reset
                    got = await asyncio.wait_for(reader.read(256), 0.5)
                    if got.startswith(b"HTTP/"):
                        outcome = f"answered {got[9:12].decode()} then {outcome}"
            finally:
                writer.close()
            if not self.running() and outcome == "timeout":
                break
            tally.add(outcome)
            accepted.append(sent)
        if accepted:
            tally.notes["header_mb_sent_before_the_answer"] = {
                "min": round(min(accepted) / 2**20, 2), "max": round(max(accepted) / 2**20, 2)
            }  # fmt: skip

    # 3. one small request asking for "logits" 5,000 times
    async def amplification(self, tally: Tally) -> None:
        rows = self.options["amplification_rows"]
        shape = [rows, *self.row[1:]]
        data = np.zeros(shape, np.float32).ravel().tolist()
        body = json.dumps({
            "inputs": [{"name": self.t["input"], "shape": shape, "datatype": "FP32", "data": data}],
            "outputs": [{"name": "logits"}] * 5000,
        }).encode()  # fmt: skip
        biggest = {"bytes": 0, "seconds": 0.0}
        async for _ in self.paced():
            r = await self.send(tally, "POST", self.infer, content=body,
                                headers={"Content-Type": "application/json"})  # fmt: skip
            if r and r["bytes"] > biggest["bytes"]:
                biggest = r
        tally.notes.update(request_bytes=len(body), rows=rows,
                           largest_answer_bytes=biggest["bytes"],
                           largest_answer_s=round(biggest["seconds"], 3))  # fmt: skip

    # 4. image bombs to the classify endpoint
    async def image_bombs(self, tally: Tally) -> None:
        bombs = self.options["bombs"]
        slowest: dict[str, float] = {}
        url = f"/v1/models/{self.model}/classify"
        octets = {"Content-Type": "application/octet-stream"}
        cycle = itertools.cycle(bombs.items())
        async for _ in self.paced():
            key, body = next(cycle)
            r = await self.send(tally, "POST", url, key, content=body, headers=octets)
            if r:
                slowest[key] = max(slowest.get(key, 0.0), round(r["seconds"], 3))
        tally.notes["slowest_answer_s"] = slowest
        tally.notes["body_bytes"] = {k: len(v) for k, v in bombs.items()}

    # 5. infer requests to random model names, then the size of /metrics
    async def cardinality(self, tally: Tally) -> None:
        async def metrics_size() -> int | None:
            r = await self.send(Tally(), "GET", "/metrics")
            return r["bytes"] if r else None

        before = await metrics_size()
        body = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                       "data": [0.0]}]}).encode()  # fmt: skip
        names = 0
        async for _ in self.paced():
            name = "".join(random.choices(string.ascii_lowercase + string.digits, k=24))
            await self.send(tally, "POST", f"/v2/models/{name}/infer", content=body,
                            headers={"Content-Type": "application/json"})  # fmt: skip
            names += 1
        tally.notes.update(random_names=names, metrics_bytes_before=before,
                           metrics_bytes_after=await metrics_size())  # fmt: skip

    # 6. one request of --max-body-mb of FP32 rows, again and again
    async def big_rows(self, tally: Tally) -> None:
        row_bytes = 4 * int(np.prod(self.row))
        rows = int(0.98 * self.t["max_body"] - 512) // row_bytes
        shape = [rows, *self.row[1:]]
        head = json.dumps({
            "inputs": [{"name": self.t["input"], "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": rows * row_bytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }).encode()  # fmt: skip
        body = head + np.random.default_rng(0).standard_normal(shape).astype(np.float32).tobytes()
        headers = {"Inference-Header-Content-Length": str(len(head)),
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        seconds = []
        async for _ in self.paced():
            r = await self.send(tally, "POST", self.infer, content=body, headers=headers)
            if r:
                seconds.append(r["seconds"])
        tally.notes.update(rows=rows, body_mb=round(len(body) / 2**20, 1))
        if seconds:
            tally.notes["median_s"] = round(statistics.median(seconds), 3)

    # 7. the binary tensor extension with a broken JSON header
    async def binary_garbage(self, tally: Tally) -> None:
        requests = garbage_requests(self.t["input"], self.row)
        by_variant: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        cycle = itertools.cycle(requests.items())
        async for _ in self.paced():
            key, (body, length) = next(cycle)
            one = Tally()
            await self.send(one, "POST", self.infer, content=body, headers={
                "Inference-Header-Content-Length": length,
                "Content-Type": "application/octet-stream",
            })  # fmt: skip
            for outcome, count in one.outcomes.items():
                tally.outcomes[outcome] += count
                by_variant[key][outcome] += count
            for status, text in one.notes.get("answers", {}).items():
                tally.notes.setdefault("answers", {}).setdefault(f"{key}: {status}", text)
        tally.notes["by_variant"] = {k: dict(v) for k, v in by_variant.items()}

    # 8. gRPC calls (32 rows) with deadlines of half a millisecond, and calls cancelled
    async def grpc(self, tally: Tally) -> None:
        import tritonclient.grpc.aio as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.t['grpc']}")
        x = np.zeros((32, *self.row[1:]), np.float32)
        inp = grpcclient.InferInput(self.t["input"], list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        async def call(kind: str, timeout: float | None) -> None:
            try:
                await asyncio.wait_for(client.infer(self.model, [inp], client_timeout=timeout), 15)
                tally.add(f"{kind}: ok")
            except asyncio.CancelledError:
                tally.add(f"{kind}: cancelled")
            except Exception as e:  # noqa: BLE001 (every answer is tallied)
                status = getattr(e, "status", None)
                tally.add(f"{kind}: {status() if callable(status) else _attack_kind(e)}")

        try:
            async for _ in self.paced():  # 2 calls past their deadline, 2 cancelled
                await asyncio.gather(*(call("deadline 0.5 ms", 0.0005) for _ in range(2)))
                tasks = [asyncio.create_task(call("cancelled", None)) for _ in range(2)]
                await asyncio.sleep(random.uniform(0.0, 0.005))
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)

    async def run(self, attacks: list[str], stop) -> dict:
        tallies = {name: Tally() for name in attacks}

        async def watch() -> None:  # the parent's stop event, polled
            while not stop.is_set() and time.monotonic() < self.until:
                await asyncio.sleep(0.1)
            self.stopped.set()

        async def one(name: str) -> None:
            try:
                await getattr(self, name)(tallies[name])
            except Exception as e:  # noqa: BLE001 (an attacker's own crash is a result too)
                tallies[name].notes["attacker_crashed"] = f"{type(e).__name__}: {e}"[:300]

        watcher = asyncio.create_task(watch())
        tasks = [asyncio.create_task(one(name), name=name) for name in attacks]
        await self.stopped.wait()
        _, late = await asyncio.wait(tasks, timeout=15)
        for task in late:  # stuck past the end: cancelled, and said so
            tallies[task.get_name()].notes["cancelled_late"] = True
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
        watcher.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.aclose(), 5)
        return {name: t.record() for name, t in tallies.items()}


def attacker_main(target: dict, attacks: list[str], options: dict, seconds: float,
                  ready, go, stop, results) -> None:  # fmt: skip
    """The attacker process: build the payloads, say ready, wait for go, attack until stop
    (or ``seconds`` + 20 at most), put what each attacker got back on ``results``."""
    if "image_bombs" in attacks:
        options = {**options, "bombs": image_bombs()}
    ready.set()
    if not go.wait(300):
        results.put({})
        return

    async def main() -> dict:
        attackers = Attackers(target, time.monotonic() + seconds + 20, options)
        return await attackers.run(attacks, stop)

    results.put(asyncio.run(main()))


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def http_get(port: int, path: str) -> tuple[int | None, int | None]:
    """Status and body size of a GET on the server, None where it did not answer in 10 s."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, len(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return None, None


async def good_clients(port: int, model: str, x: np.ndarray, seconds: float, pid: int) -> dict:
    """The 16 good clients of a phase (``drive``), each call bounded by GOOD_TIMEOUT_S; the
    server's RSS sampled meanwhile."""
    client, call = await triton_http(port, model, x)
    peak = [rss_mb(pid) or 0.0]

    async def bounded():
        try:
            await asyncio.wait_for(call(), GOOD_TIMEOUT_S)
        except Exception:
            await asyncio.sleep(0.01)  # a refused connection must not spin
            raise

    async def sample():
        while True:
            peak[0] = max(peak[0], rss_mb(pid) or 0.0)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    try:
        r = await asyncio.wait_for(
            drive(bounded, GOOD_CLIENTS, seconds), seconds + GOOD_TIMEOUT_S + 15
        )
    except (TimeoutError, asyncio.TimeoutError):
        r = {"concurrency": GOOD_CLIENTS, "requests": 0, "throughput_rps": 0.0,
             "p50_ms": None, "p99_ms": None, "errors": {"phase hung": 1}}  # fmt: skip
    finally:
        sampler.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)
    r["rss_peak_mb"] = peak[0]
    return r


def run_phase(name: str, server: Process, target: dict, x: np.ndarray, attacks: list[str],
              options: dict, seconds: float) -> dict:  # fmt: skip
    """One phase: the attackers (if any) started, 16 good clients for ``seconds``, stop."""
    import multiprocessing as mp
    import queue

    pid, proc, attacked = server.proc.pid, None, {}
    logged, rss_start = server.count, rss_mb(server.proc.pid)
    if attacks:
        ctx = mp.get_context("spawn")
        ready, go, stop, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(
            target=attacker_main, daemon=True,
            args=(target, attacks, options, seconds, ready, go, stop, results),
        )  # fmt: skip
        proc.start()
        if not ready.wait(300):
            raise RuntimeError("the attacker process did not start in 300 s")
        go.set()
        time.sleep(1.0)  # the slow connections open, the first bombs go out
    good = asyncio.run(good_clients(target["http"], target["model"], x, seconds, pid))
    if proc is not None:
        stop.set()
        try:
            attacked = results.get(timeout=60)
        except queue.Empty:
            attacked = {"attackers": {"notes": {"error": "no report in 60 s"}}}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    alive = server.proc.poll() is None
    good["rss_peak_mb"] = max(good["rss_peak_mb"], rss_mb(pid) or 0.0)
    ready_status, _ = http_get(target["http"], "/v2/health/ready") if alive else (None, None)
    _, metrics_bytes = http_get(target["http"], "/metrics") if alive else (None, None)
    new_lines = list(server.lines)[-(server.count - logged) :] if server.count > logged else []
    row = {
        "phase": name, "attacks": attacks, **good,
        "rss_start_mb": rss_start, "rss_end_mb": rss_mb(pid), "rss_hwm_mb": rss_mb(pid, "VmHWM"),
        "metrics_bytes": metrics_bytes, "server_alive": alive, "ready_status": ready_status,
        "exit_code": server.proc.poll(), "log_lines": server.count - logged,
        "log_tail": _log_summary(new_lines), "attackers": attacked,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in row.items() if k != "attackers"}), flush=True)
    return row


def _log_summary(lines: list[str]) -> dict:
    """Tracebacks and the distinct error lines a phase's server output holds."""
    errors = collections.Counter(
        line.strip()[:200] for line in lines
        if line and not line[0].isspace() and ("Error" in line or "Exception" in line
                                               or "WARNING" in line or "ERROR" in line)
    )  # fmt: skip
    return {"tracebacks": sum("Traceback" in line for line in lines),
            "errors": dict(errors.most_common(8))}  # fmt: skip


def measure_hostile(path: Path, x: np.ndarray, args) -> dict:
    """Baseline, hostile and recovery phases on one `convforge serve` process; with
    ``--per-attack``, each attack alone on a fresh one (so that no RSS or state carries
    over from another attack)."""
    options = {"slowloris_conns": args.slowloris_conns, "huge_header_mb": args.huge_header_mb,
               "amplification_rows": 8, "attack_rate": args.attack_rate}  # fmt: skip
    plan = [("baseline", []), ("hostile", list(args.attacks)), ("recovery", [])]
    record = serve_phases(path, x, args, options, plan)
    if args.per_attack:
        for attack in args.attacks:
            more = serve_phases(path, x, args, options, [(f"only {attack}", [attack])])
            record["phases"] += [{**p, "fresh_server": True} for p in more["phases"]]
    return record


def serve_phases(path: Path, x: np.ndarray, args, options: dict, plan: list) -> dict:
    """One `convforge serve` process through the phases of ``plan``."""
    name = "demo"
    extra = ("--max-body-mb", f"{args.max_body_mb:g}", "--drain-s", "5")
    server, http, grpc = start_convforge(name, path, 32, 256, extra)
    target = {"http": http, "grpc": grpc, "model": name, "input": "input",
              "shape": list(x.shape[1:]), "max_body": int(args.max_body_mb * 2**20)}  # fmt: skip
    phases = []
    try:
        for phase, attacks in plan:
            phases.append(run_phase(phase, server, target, x, attacks, options, args.phase_s))
            if server.proc.poll() is not None:
                print(f"the server exited ({server.proc.returncode}) in phase {phase}", flush=True)
                break
    finally:
        server.stop()
    return {
        "server_argv": [Path(a).name if a == sys.executable else a for a in server.argv],
        "phases": phases,
        "server_log_tail": list(server.lines)[-40:],
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
    parser.add_argument(
        "--grid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the concurrency x batching x protocol grid, peer and overload",
    )
    parser.add_argument(
        "--hostile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the hostile phase: good clients with and without attackers",
    )
    parser.add_argument(
        "--phase-s",
        type=float,
        default=20.0,
        help="measured seconds of each hostile-run phase (20)",
    )
    parser.add_argument(
        "--attacks",
        type=lambda s: s.split(","),
        default=list(ATTACKS),
        help="comma-separated, of: " + ",".join(ATTACKS) + " (all)",
    )
    parser.add_argument(
        "--per-attack",
        action="store_true",
        help="also one phase per attack, alone against the good clients",
    )
    parser.add_argument(
        "--slowloris-conns", type=int, default=100, help="slow connections held open (100)"
    )
    parser.add_argument(
        "--huge-header-mb", type=float, default=32.0, help="size of the huge header line (32)"
    )
    parser.add_argument(
        "--attack-rate",
        type=float,
        default=20.0,
        help="requests a second, at most, of each request-sending attacker (20)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=64.0,
        help="the server's --max-body-mb in the hostile run (64, its default)",
    )
    parser.add_argument(
        "--tag", default="", help="results/serve_hostile-TAG.json and .md (e.g. before, after)"
    )
    args = parser.parse_args()  # fmt: skip
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    if args.grid:
        run_grid(args)
    if args.hostile:
        run_hostile(args)


def run_hostile(args) -> None:
    demo = prepare_models(Path(tempfile.gettempdir()), quick=True)["demo"]
    x = np.random.default_rng(0).standard_normal((1, *input_shape(demo))).astype(np.float32)
    hostile = measure_hostile(demo, x, args)
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tag": args.tag,
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "convforge_from": _convforge_source(),
        "model": str(demo.relative_to(ROOT)) if demo.is_relative_to(ROOT) else demo.name,
        "input_shape": list(x.shape),
        "phase_s": args.phase_s,
        "good_clients": GOOD_CLIENTS,
        "attack_rate": args.attack_rate,
        "hostile": hostile,
        "goals": hostile_goals(hostile["phases"]),
    }
    stem = "serve_hostile" + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    table = hostile_table(record)
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {RESULTS / stem}.json and .md", flush=True)


def run_grid(args) -> None:
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


def hostile_goals(phases: list[dict]) -> dict:
    """The issue's goals, for every phase with attackers against the baseline."""
    base = next((p for p in phases if p["phase"] == "baseline"), None)
    out: dict = {}
    for p in phases:
        if not p["attacks"] and p["phase"] != "recovery" or base is None:
            continue
        p99 = _ratio(p["p99_ms"], base["p99_ms"])
        rss = _ratio(p["rss_end_mb"], base["rss_end_mb"])
        out[p["phase"]] = {
            "p99_vs_baseline": p99, "rss_vs_baseline": rss,
            "good_errors": sum(p["errors"].values()),
            "p99_within_1.5x": p99 is not None and p99 <= 1.5,
            "zero_good_errors": not p["errors"],
            "rss_within_1.5x": rss is not None and rss <= 1.5,
            "server_alive_and_ready": p["server_alive"] and p["ready_status"] == 200,
        }  # fmt: skip
    return out


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def hostile_table(record: dict) -> str:
    """The markdown of a hostile run: the machine, the phases, what each attacker got back."""
    m, h, tag = record["machine"], record["hostile"], record["tag"]
    base = next((p for p in h["phases"] if p["phase"] == "baseline"), {})
    lines = [
        f"# serve_load hostile phase, {record['date']}" + (f", {tag}" if tag else ""),
        "",
        f"- machine: {m['cpu']}, {m['logical_cores']} "
        f"cores, flags: {' '.join(m['cpu_flags']) or 'none of avx2/avx512f/avx512_vnni/amx_tile'}",
        f"- command: `{record['command']}`",
        f"- server: `{' '.join(h['server_argv'])}` (convforge from {record['convforge_from']})",
        f"- load: {GOOD_CLIENTS} good clients, HTTP v2 infer (binary, 1 row of "
        f"{record['input_shape']}), {record['phase_s']:g} s per phase; a good call over "
        f"{GOOD_TIMEOUT_S:g} s is an error; RSS is the server's VmRSS at the end of the phase",
        f"- attackers: one client per attack, in a process of their own; request-sending ones "
        f"at {record['attack_rate']:g} requests/s at most; baseline, hostile and recovery on one "
        f"server process, each 'only' phase on a fresh one",
        "",
        "| phase | good req | req/s | p50 ms | p99 ms | p99 vs base | good errors | RSS MB "
        "| RSS vs base | peak RSS MB | /metrics KB | alive, ready | log lines (tracebacks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in h["phases"]:
        errors = ", ".join(f"{k} x {v}" for k, v in p["errors"].items()) or "0"
        kb = "-" if p["metrics_bytes"] is None else f"{p['metrics_bytes'] / 1024:.0f}"
        lines.append(
            f"| {p['phase']} | {p['requests']} | {p['throughput_rps']:.0f} | {p['p50_ms']} "
            f"| {p['p99_ms']} | {_ratio(p['p99_ms'], base.get('p99_ms')) or '-'} | {errors} "
            f"| {p['rss_end_mb']} | {_ratio(p['rss_end_mb'], base.get('rss_end_mb')) or '-'} "
            f"| {p['rss_peak_mb']} | {kb} | {'yes' if p['server_alive'] else 'NO'}, "
            f"{p['ready_status']} | {p['log_lines']} ({p['log_tail']['tracebacks']}) |"
        )
    lines += ["", "Goals (issue 20): p99 within 1.5x of baseline, 0 errors, RSS within 1.5x", ""]
    for phase, g in record["goals"].items():
        verdict = [f"p99 {g['p99_vs_baseline']}x {'ok' if g['p99_within_1.5x'] else 'FAIL'}",
                   f"errors {g['good_errors']} {'ok' if g['zero_good_errors'] else 'FAIL'}",
                   f"RSS {g['rss_vs_baseline']}x {'ok' if g['rss_within_1.5x'] else 'FAIL'}",
                   f"alive+ready {'ok' if g['server_alive_and_ready'] else 'FAIL'}"]  # fmt: skip
        lines.append(f"- {phase}: " + "; ".join(verdict))
    for p in h["phases"]:
        if not p["attackers"]:
            continue
        lines += ["", f"What each attacker got back ({p['phase']} phase):", "",
                  "| attack | outcomes | notes |", "|---|---|---|"]  # fmt: skip
        for attack, r in p["attackers"].items():
            outcomes = ", ".join(f"{k} x {v}" for k, v in r.get("outcomes", {}).items()) or "-"
            notes = dict(r.get("notes", {}))
            by_variant = notes.pop("by_variant", None)
            notes.pop("body_bytes", None)
            notes.pop("answers", None)  # in the JSON
            if by_variant:  # binary garbage: the variants not answered 400 alone
                odd = {k: v for k, v in by_variant.items() if set(v) != {"400"}}
                notes["variants not answered 400"] = odd or "none"
            text = json.dumps(notes).replace("|", "/")
            lines.append(f"| {attack} | {outcomes.replace('|', '/')} | {text} |")
    return "\n".join(lines) + "\n"


def _convforge_source() -> str:
    """Where the server's convforge comes from (PYTHONPATH can point it elsewhere): asked of
    a Python started as the server is."""
    code = "import convforge, os; print(os.path.dirname(convforge.__file__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=60)  # fmt: skip
    return out.stdout.strip() or out.stderr.strip()[-200:]


def _machine() -> dict:
    """bench's environment record (CPU model, cores, library versions) and the CPU's SIMD flags."""
    from convforge.runtime.environment import environment

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
