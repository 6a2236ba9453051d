"""`convforge serve` against hostile clients: each attack over a real socket, then a good
request that must still be answered correctly (issue 20's items, numbered as there)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from convforge.cli import main
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.http_app import new_dataplane
from convforge.runtime.serve.served_model import ServedModel
from tests.runtime.serve.conftest import MODEL, start

ROWS = np.zeros((2, 1, 16, 16), np.float32)
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server():
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=2, max_request_rows=16,
                              max_queue_rows=64)  # fmt: skip
    with start(batching=batching, request_timeout_s=0.5, max_image_mp=0.01) as s:
        yield s


def _v2(rows: np.ndarray, **extra) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape),
              "data": rows.ravel().tolist()}  # fmt: skip
    return {"inputs": [tensor], **extra}


def _still_serves(server) -> None:
    ok = httpx.post(f"{server.url}{INFER}", json=_v2(ROWS))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [2, 10]


def _raw(server, data: bytes, wait: float = 0.0) -> bytes:
    """Send ``data`` on a fresh connection, wait, then read until the server closes."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        time.sleep(wait)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# -- 1. request reception ----------------------------------------------------------------------


def test_a_huge_head_is_refused_at_16_kib(server):
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    start_s = time.perf_counter()
    try:
        answer = _raw(server, head)
    except ConnectionResetError:  # closed while we still sent: refused all the same
        answer = b"HTTP/1.1 400"
    assert answer.startswith(b"HTTP/1.1 400") or answer == b""
    assert time.perf_counter() - start_s < 5
    _still_serves(server)


def test_a_head_that_does_not_arrive_in_time_is_dropped(server):
    start_s = time.perf_counter()
    answer = _raw(server, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")  # no end
    assert answer == b""  # closed, unanswered, after --request-timeout-s (0.5 s)
    assert 0.3 < time.perf_counter() - start_s < 5
    _still_serves(server)


def test_a_body_that_does_not_arrive_in_time_is_a_408(server):
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    answer = _raw(server, head + b"{" * 10)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    _still_serves(server)


def test_a_client_that_leaves_mid_body_is_not_answered_with_half_a_body(server):
    body = json.dumps(_v2(ROWS)).encode()
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        sock.shutdown(socket.SHUT_WR)  # the disconnect
        assert sock.recv(65536) == b""
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="499"' in metrics  # counted as the client's leaving, not a 400 or 500
    _still_serves(server)


# -- 2. response amplification -----------------------------------------------------------------


@pytest.mark.parametrize("outputs", [[{"name": "logits"}] * 5000, [{"name": "other"}]])
def test_only_the_models_output_may_be_asked_for_once(server, outputs):
    response = httpx.post(f"{server.url}{INFER}", json=_v2(ROWS, outputs=outputs))
    assert response.status_code == 400 and "one output, 'logits'" in response.json()["error"]
    assert len(response.content) < 1000
    ok = httpx.post(f"{server.url}{INFER}", json=_v2(ROWS, outputs=[{"name": "logits"}]))
    assert ok.status_code == 200 and len(ok.json()["outputs"]) == 1


# -- 3. images to classify ---------------------------------------------------------------------


def _encoded(size, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, fmt)
    return buf.getvalue()


def _broken_png() -> bytes:
    """A PNG whose compressed pixels are garbage (zlib fails mid-decode)."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    at = png.index(b"IDAT") + 40
    png[at : at + 200] = bytes(200)
    return bytes(png)


CLASSIFY_ATTACKS = [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "accepts JPEG, PNG, WEBP"),
    (_encoded((16, 16), "GIF"), "accepts JPEG, PNG, WEBP"),
    (_encoded((200, 200), "PNG"), "at most 0.01 MP"),  # the fixture server's --max-image-mp
    (_broken_png(), "cannot read"),
    (_encoded((16, 16), "JPEG")[:40], "cannot read"),
]


@pytest.mark.parametrize("body, words", CLASSIFY_ATTACKS)
def test_classify_refuses_what_it_should_not_decode(server, body, words):
    response = httpx.post(f"{server.url}/v1/models/digits/classify", content=body)
    assert response.status_code == 400 and words in response.json()["error"], response.text
    good = httpx.post(f"{server.url}/v1/models/digits/classify",
                      content=_encoded((16, 16), "PNG"))  # fmt: skip
    assert good.status_code == 200


def test_a_multipart_form_holds_one_file(server):
    image = _encoded((16, 16), "PNG")
    files = [("a", ("a.png", image, "image/png")), ("b", ("b.png", image, "image/png"))]
    response = httpx.post(f"{server.url}/v1/models/digits/classify", files=files)
    assert response.status_code == 400
    _still_serves(server)


# -- 4. nothing loads a model on request -------------------------------------------------------


def test_a_model_that_is_not_loaded_is_unavailable_not_loaded_on_request():
    from convforge.runtime.serve.kserve_sdk import errors

    dataplane, _ = new_dataplane()
    model = ServedModel("digits", MODEL, backend="ort-cpu")
    dataplane.model_registry.update(model)
    with pytest.raises(errors.ModelNotReady):
        asyncio.run(dataplane.get_model("digits"))
    assert model.backends == []  # kserve's get_model would have run load() right there


# -- 5. metrics cardinality --------------------------------------------------------------------


def test_made_up_model_names_do_not_grow_the_metrics(server):
    for i in range(20):
        assert (
            httpx.post(f"{server.url}/v2/models/made-up-{i}/infer", json=_v2(ROWS)).status_code
            == 404
        )
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "made-up" not in metrics and 'model="unknown"' in metrics


# -- 6. admission by rows ----------------------------------------------------------------------


def test_a_request_of_too_many_rows_is_refused_before_its_data_is_read(server):
    big = np.zeros((17, 1, 16, 16), np.float32)  # --max-request-rows 16
    response = httpx.post(f"{server.url}{INFER}", json=_v2(big))
    assert response.status_code == 400 and "at most 16 a request" in response.json()["error"]
    _still_serves(server)


def test_a_body_larger_than_any_valid_request_is_refused_unread(server):
    # 16 rows of 1x16x16 FP32 are 16 KiB of values: a 10 MB body cannot be a valid request,
    # so the server answers from the head alone and never reads the body it announced.
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        "Inference-Header-Content-Length: 100\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    answer = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-rows" in answer
    _still_serves(server)


def test_json_requests_of_any_content_type_are_parsed_by_the_same_checks(server):
    body = json.dumps(_v2(ROWS)).encode()
    for ctype in ("application/json", "text/plain", None):
        headers = {"Content-Type": ctype} if ctype else {}
        response = httpx.post(f"{server.url}{INFER}", content=body, headers=headers)
        assert response.status_code == 200, (ctype, response.text)
    broken = httpx.post(
        f"{server.url}{INFER}", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    wrong = httpx.post(f"{server.url}{INFER}", json={"inputs": "x"})
    assert wrong.status_code == 400 and "inputs" in wrong.json()["error"]


@pytest.mark.parametrize("body", [b"[1]", b'"x"', b"null"])
def test_a_json_body_that_is_not_an_object_is_a_400_in_one_line(server, body):
    # Valid JSON, but no object to look 'inputs' up in: the user's mistake, said in one line,
    # not an AttributeError from the schema check turned into a 500.
    response = httpx.post(
        f"{server.url}{INFER}", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "the request must be a JSON object with 'inputs'"}
    _still_serves(server)


def test_a_json_body_has_its_own_smaller_limit():
    with start(max_body_mb=1.0, max_json_mb=0.01) as small:
        response = httpx.post(f"{small.url}{INFER}", json=_v2(np.zeros((32, 1, 16, 16))))
        assert response.status_code == 413 and "--max-json-mb" in response.json()["error"]
        _still_serves(small)


# -- 7. ports ----------------------------------------------------------------------------------


def test_a_grpc_port_another_server_holds_is_an_error_not_shared(server):
    taken = server.running.grpc_address.rsplit(":", 1)[1]
    base = ["serve", str(MODEL), "--backend", "ort-cpu", "--port", "0"]
    assert main([*base, "--grpc-port", taken]) == 2


@pytest.mark.parametrize("option, value, words", [
    ("--port", "70000", "--port must be an integer from 0 to 65535, got 70000"),
    ("--grpc-port", "-2", "--grpc-port must be an integer from -1 to 65535"),
    ("--max-body-mb", "0", "--max-body-mb must be a number from 0.001 to 4096"),
    ("--request-timeout-s", "nan", "--request-timeout-s must be a number"),
    ("--max-queue-rows", "0", "--max-queue-rows must be an integer from 1"),
    ("--drain-s", "-1", "--drain-s must be a number from 0 to 3600"),
])  # fmt: skip
def test_every_number_is_range_checked_before_anything_starts(capsys, option, value, words):
    assert main(["serve", str(MODEL), "--backend", "ort-cpu", option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


# -- 9. the binary extension's header ----------------------------------------------------------


@pytest.mark.parametrize("tensor, extra, words", [
    ({"datatype": 5}, {}, "inputs.0.datatype"),
    ({"shape": [1e200, 1e200]}, {}, "inputs.0.shape"),
    ({"shape": [2**40, 2**40, 1, 1]}, {}, "out of range"),
    ({}, {"parameters": []}, "parameters"),
    ({}, {"id": 5}, "id"),
    ({"datatype": "BYTES"}, {}, "numeric datatype"),
])  # fmt: skip
def test_a_malformed_binary_header_is_a_400(server, tensor, extra, words):
    spec = {"name": "input", "datatype": "FP32", "shape": [2, 1, 16, 16],
            "parameters": {"binary_data_size": ROWS.nbytes}, **tensor}  # fmt: skip
    header = json.dumps({"inputs": [spec], **extra}).encode()
    length = {"Inference-Header-Content-Length": str(len(header))}
    response = httpx.post(f"{server.url}{INFER}", content=header + ROWS.tobytes(), headers=length)
    assert response.status_code == 400 and words in response.json()["error"], response.text
    _still_serves(server)


# -- 11. shutdown ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_flips_readiness_first_and_a_second_signal_exits_at_once():
    port = _free_port()
    argv = [sys.executable, "-m", "convforge", "serve", str(MODEL), "--backend", "ort-cpu",
            "--port", str(port), "--grpc-port", "-1", "--drain-delay-s", "30"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503  # load balancers see it
        assert httpx.get(f"{url}/v2/health/live").status_code == 200  # still serving
        assert httpx.post(f"{url}{INFER}", json=_v2(ROWS)).status_code == 200
        proc.send_signal(signal.SIGINT)  # the second signal: no 30 s drain
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    out = proc.stdout.read()
    assert "fork_posix" not in out and "Traceback" not in out


def test_connections_past_max_connections_are_503():
    with start(max_connections=3) as capped:
        host, port = capped.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.1)
            assert httpx.get(f"{capped.url}/v2/health/live").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.1)
        _still_serves(capped)


def test_bodies_held_at_once_are_bounded():
    """One client trickling a body holds most of --max-buffered-mb: the next body that
    would pass it is a 503, and once the first leaves, bodies are taken again."""
    with start(max_body_mb=1.0, max_buffered_mb=1.0, request_timeout_s=5.0) as capped:
        host, port = capped.url.removeprefix("http://").split(":")
        head = (b"POST /v1/models/digits/classify HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 1000000\r\n\r\n")  # fmt: skip
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(head + b"\0" * 900_000)
            time.sleep(0.3)
            response = httpx.post(f"{capped.url}/v1/models/digits/classify",
                                  content=_encoded((64, 64), "PNG") + b"\0" * 200_000)  # fmt: skip
            assert response.status_code == 503 and "request bodies" in response.json()["error"]
        time.sleep(0.2)
        _still_serves(capped)


@pytest.mark.parametrize("error", [RuntimeError("/secret/path/model.onnx failed")])
def test_an_unexpected_grpc_error_reveals_nothing(error):
    import grpc

    from convforge.runtime.serve.grpc_server import _Errors

    class Context:
        async def abort(self, code, message):
            self.aborted = (code, message)
            raise grpc.aio.AbortError()

    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(_Errors().handle_exception(error, None, context, "/ModelInfer"))
    code, message = context.aborted
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
