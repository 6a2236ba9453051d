"""`convforge serve` end to end: the real Triton clients, every client mistake, metrics,
overload and a clean stop. The server runs on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from convforge.runtime import load
from convforge.runtime.serve.batcher import QueueFull
from tests.runtime.serve.conftest import FIXTURES, MODEL, start

IMAGES = sorted(FIXTURES.glob("digit-*.png"))


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(batch):
    with load(MODEL, backend="ort-cpu") as model:
        return model.logits(batch)


def _client(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def test_the_triton_http_client(server, batch, reference):
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    for binary in (False, True):
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        got = client.infer("digits", [inp], outputs=[out]).as_numpy("logits")
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_the_triton_grpc_client(server, batch, reference, tmp_path):
    np.save(tmp_path / "x.npy", batch)
    script = Path(__file__).with_name("grpc_client.py")
    argv = [sys.executable, str(script), server.running.grpc_address, "digits"]
    proc = subprocess.run(
        [*argv, str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["metadata"]["inputs"][0]["shape"] == ["-1", "1", "16", "16"]  # int64 as JSON
    np.testing.assert_allclose(np.array(seen["logits"]), reference, rtol=1e-5, atol=1e-5)
    assert seen["errors"]["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert seen["errors"]["wrong_shape"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "must have shape [-1, 1, 16, 16]" in seen["errors"]["wrong_shape"][1]


def test_classify_an_image(server):
    for image in IMAGES:
        raw = httpx.post(f"{server.url}/v1/models/digits/classify?topk=3",
                         content=image.read_bytes())  # fmt: skip
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        multipart = httpx.post(f"{server.url}/v1/models/digits/classify", files=files)
        assert raw.status_code == multipart.status_code == 200
        top = raw.json()["predictions"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"]
        assert top[0]["label"] == image.stem.split("-")[-1]  # the fixture's digit
        assert multipart.json()["predictions"][0] == top[0]


def _v2(rows, name="input", datatype="FP32", shape=None):
    shape = shape if shape is not None else list(np.shape(rows))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                        "data": np.asarray(rows).ravel().tolist()}]}  # fmt: skip


def _binary(x: np.ndarray, shape=None, cut: int = 0):
    tensor = {"name": "input", "datatype": "FP32", "shape": shape or list(x.shape),
              "parameters": {"binary_data_size": x.nbytes - cut}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    body = header + x.tobytes()[: x.nbytes - cut]
    return body, {"Inference-Header-Content-Length": str(len(header)),
                  "Content-Type": "application/octet-stream"}  # fmt: skip


ROWS = np.zeros((2, 1, 16, 16), np.float32)

# (method, path, keyword arguments for httpx, status, words the error must contain)
MISTAKES = [
    ("post", "/v2/models/digits/infer", {"content": b"{not json"}, 400, "not valid JSON"),
    ("post", "/v2/models/digits/infer", {"json": {"outputs": []}}, 400, "inputs"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS, datatype="INT32")}, 400,
     "must be FP32, got INT32"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS, datatype="FP64")}, 400, "FP64"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS, shape=[2, 1, 8, 8])}, 400,
     "must have shape [-1, 1, 16, 16]"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS, shape=[2, 1, 16, 15])}, 400, "shape"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS, name="image")}, 400,
     "has no input 'image'"),
    ("post", "/v2/models/digits/infer", {"json": {"inputs": [{"name": "input",
     "datatype": "FP32", "shape": [1, 1, 16, 16], "data": ["a"] * 256}]}}, 400, "data"),
    ("post", "/v2/models/digits/infer", {"json": _v2(ROWS[:1], shape=[2, 1, 16, 16])}, 400,
     "does not fill shape"),
    ("post", "/v2/models/nope/infer", {"json": _v2(ROWS)}, 404, "nope"),
    ("get", "/v2/models/nope", {}, 404, "nope"),
    ("get", "/v2/models/nope/ready", {}, 404, "nope"),
    ("post", "/v1/models/nope/classify", {"content": b"x"}, 404, "nope"),
    ("post", "/v1/models/digits/classify", {"content": b"not an image"}, 400,
     "not a readable image"),
    ("post", "/v1/models/digits/classify", {"content": b""}, 400, "empty"),
    ("post", "/v1/models/digits/classify?topk=0", {"content": b"x"}, 400, "topk"),
    ("post", "/v2/repository/models/digits/unload", {}, 404, "does not load or unload"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, kwargs, status, words", MISTAKES)
def test_client_mistakes_are_4xx_and_the_server_keeps_serving(server, method, path, kwargs,
                                                              status, words):  # fmt: skip
    response = getattr(httpx, method)(f"{server.url}{path}", **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    ok = httpx.post(f"{server.url}/v2/models/digits/infer", json=_v2(ROWS))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [2, 10]


@pytest.mark.parametrize("shape, cut", [(None, 4), (None, 1), ([3, 1, 16, 16], 0)])
def test_binary_data_that_disagrees_with_its_shape_is_a_400(server, shape, cut):
    body, headers = _binary(ROWS, shape, cut)
    response = httpx.post(f"{server.url}/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_an_oversized_body_is_a_413(server):
    big = b"0" * (2 * 2**20)  # the fixture server takes 1 MiB
    response = httpx.post(f"{server.url}/v2/models/digits/infer", content=big)
    assert response.status_code == 413 and "--max-json-mb" in response.json()["error"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(4):
            yield b"0" * 2**19

    response = httpx.post(f"{server.url}/v2/models/digits/infer", content=chunks())
    assert response.status_code == 413
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(server, monkeypatch):
    model = server.running.models[0]

    async def full(rows):
        raise QueueFull(waiting=256, rows=1024, asked=2, retry_after=2.0)

    monkeypatch.setattr(model.batcher, "infer", full)
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=_v2(ROWS))
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert "queue is full" in response.json()["error"]


def test_a_request_past_its_timeout_answers_504(server, monkeypatch):
    from convforge.runtime.serve.batcher import RequestTimeout

    async def late(rows):
        raise RequestTimeout("no answer within 30 s (the server is overloaded)")

    monkeypatch.setattr(server.running.models[0].batcher, "infer", late)
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=_v2(ROWS))
    assert response.status_code == 504 and "no answer within" in response.json()["error"]


def test_metrics(server):
    httpx.post(f"{server.url}/v2/models/digits/infer", json=_v2(ROWS))
    httpx.post(f"{server.url}/v2/models/digits/infer", json=_v2(ROWS, datatype="INT32"))
    text = httpx.get(f"{server.url}/metrics").text
    for line in [
        'convforge_requests_total{model="digits",protocol="http",status="200"}',
        'convforge_requests_total{model="digits",protocol="http",status="400"}',
        'convforge_request_seconds_bucket{le="0.001",model="digits",protocol="http"}',
        'convforge_queue_seconds_count{model="digits"}',
        'convforge_compute_seconds_count{model="digits"}',
        'convforge_batch_rows_bucket{le="2.0",model="digits"}',
        'convforge_queue_depth{model="digits"} 0.0',
    ]:
        assert line in text, line


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server, reference, batch):
    async def main():
        async with httpx.AsyncClient(base_url=server.url) as client:
            return await asyncio.gather(*(
                client.post("/v2/models/digits/infer", json=_v2(batch[i % 3 : i % 3 + 1]))
                for i in range(24)
            ))  # fmt: skip

    responses = asyncio.run(main())
    for i, r in enumerate(responses):
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, reference[i % 3 : i % 3 + 1], rtol=1e-5, atol=1e-5)
    text = httpx.get(f"{server.url}/metrics").text
    sizes = [line for line in text.splitlines() if line.startswith("convforge_batch_rows_sum")]
    assert sizes  # batches ran; their sizes are in the histogram


def test_ready_only_after_loading_and_not_while_draining(batch):
    with start() as s:
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        s.running.models[0].ready = False  # as while it loads or drains
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{s.url}/v2/health/live").status_code == 200
        s.running.models[0].ready = True


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "convforge", "serve", str(MODEL), "--backend", "ort-cpu",
         "--port", "0", "--grpc-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        while "ready on" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        url = line.split("ready on ")[1].split()[0].rstrip(",")
        assert httpx.post(f"{url}/v2/models/digits/infer", json=_v2(ROWS)).status_code == 200
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "convforge serve: stopped" in out and "Traceback" not in err


def test_binary_tensors_stay_bytes_and_match_json(server, batch, reference):
    """The binary extension's bytes reach the model without a detour through Python lists."""
    from convforge.runtime.serve.http_app import binary_request

    body, headers = _binary(batch)
    request = binary_request(body, {k.lower(): v for k, v in headers.items()}, "digits")
    assert request.inputs[0]._raw_data == batch.tobytes() and request.inputs[0].data is None
    response = httpx.post(f"{server.url}/v2/models/digits/infer", content=body, headers=headers)
    got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_a_taken_port_is_a_one_line_error(capsys):
    import socket

    from convforge.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        base = ["serve", str(MODEL), "--backend", "ort-cpu"]
        assert main([*base, "--port", port, "--grpc-port", "-1"]) == 2
        assert main([*base, "--port", "0", "--grpc-port", port]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"convforge: error: cannot serve HTTP on 127.0.0.1:{port}: Address already in use "
        "(--port 0 takes a free one)"
    )
    assert err[-1].startswith(f"convforge: error: cannot serve gRPC on 127.0.0.1:{port}")
