"""`convforge serve` with a uint8-input model beside a float one: UINT8 tensors in, the
float model's logits out; every wrong datatype or shape is a 400 naming what is accepted."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient

from convforge.export.input_format import normalized, to_uint8_input
from convforge.runtime import load
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.server import ServeConfig
from tests.runtime.serve.conftest import FIXTURES, MODEL, Server

IMAGES = sorted(FIXTURES.glob("digit-*.png"))


@pytest.fixture(scope="module")
def pixels_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("u8") / "pixels.onnx"
    onnx.save(to_uint8_input(onnx.load(MODEL)), path)
    return path


@pytest.fixture(scope="module")
def server(pixels_model):
    config = ServeConfig(
        models={"digits": str(MODEL), "pixels": str(pixels_model)}, backend="ort-cpu",
        port=0, grpc_port=0, batching=BatchingConfig(max_batch_size=8, max_queue_delay_ms=2),
        max_body_mb=1.0, drain_delay_s=0.0,
    )  # fmt: skip
    with Server(config) as s:
        yield s


@pytest.fixture(scope="module")
def rows():
    """Three 16x16 grey images as uint8 NHWC, and the float model's logits for them."""
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    with load(MODEL, backend="ort-cpu") as model:
        return pixels, model.logits(normalized(pixels, model.info.mean, model.info.std))


def _v2(rows, datatype="UINT8", shape=None):
    shape = shape if shape is not None else list(np.shape(rows))
    return {"inputs": [{"name": "input", "datatype": datatype, "shape": shape,
                        "data": np.asarray(rows).ravel().tolist()}]}  # fmt: skip


def test_uint8_tensors_get_the_float_models_logits(server, rows):
    pixels, reference = rows
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    meta = client.get_model_metadata("pixels")
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 16, 16, 1]}]
    for binary in (False, True):
        inp = httpclient.InferInput("input", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels, binary_data=binary)
        got = client.infer("pixels", [inp]).as_numpy("logits")
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_classify_works_for_float_and_uint8_models(server):
    for image in IMAGES:
        tops = [
            httpx.post(f"{server.url}/v1/models/{name}/classify?topk=3",
                       content=image.read_bytes()).json()["predictions"]
            for name in ("digits", "pixels")
        ]  # fmt: skip
        assert tops[0][0]["label"] == tops[1][0]["label"] == image.stem.split("-")[-1]
        assert abs(tops[0][0]["probability"] - tops[1][0]["probability"]) < 1e-5


PIXELS = np.zeros((2, 16, 16, 1), np.uint8)
MISTAKES = [
    ("pixels", _v2(PIXELS.astype(np.float32), datatype="FP32"), "must be UINT8, got FP32"),
    ("pixels", _v2(PIXELS, datatype="INT8"), "must be UINT8, got INT8"),
    ("pixels", _v2(PIXELS, shape=[2, 1, 16, 16]), "must have shape [-1, 16, 16, 1] (NHWC"),
    ("pixels", _v2(np.full((1, 16, 16, 1), 300)), "UINT8 data must be integers 0-255"),
    ("pixels", _v2(np.full((1, 16, 16, 1), -1)), "UINT8 data must be integers 0-255"),
    ("pixels", _v2(np.full((1, 16, 16, 1), 1.5)), "UINT8 data must be integers 0-255"),
    ("digits", _v2(PIXELS.transpose(0, 3, 1, 2)), "must be FP32, got UINT8"),
]


@pytest.mark.parametrize("model, body, words", MISTAKES)
def test_wrong_datatypes_and_shapes_are_400s_naming_what_is_accepted(server, model, body, words):
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]


def test_binary_uint8_of_the_wrong_size_is_a_400(server):
    tensor = {"name": "input", "datatype": "UINT8", "shape": [1, 16, 16, 1],
              "parameters": {"binary_data_size": 255}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    response = httpx.post(
        f"{server.url}/v2/models/pixels/infer",
        content=header + bytes(255),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400 and "needs 256" in response.json()["error"]
