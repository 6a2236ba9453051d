"""`convforge serve` with a model whose batch dimension is fixed (torch's default export):
the batcher runs batches of exactly that size, so any number of rows works."""

from __future__ import annotations

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient

from convforge.runtime import load
from convforge.runtime.serve.batcher import BatchingConfig
from convforge.runtime.serve.server import ServeConfig
from tests.runtime.serve.conftest import FIXTURES, MODEL, Server


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """The digits fixture with its batch dimension fixed at 1 (input and output)."""
    model = onnx.load(MODEL)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    onnx.save(model, path)
    return path


def test_rows_are_served_in_batches_of_the_fixed_size(fixed):
    rows = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    with load(MODEL, backend="ort-cpu") as reference:
        want = reference.logits(rows)
    config = ServeConfig(
        models={"fixed": str(fixed)}, backend="ort-cpu", port=0, grpc_port=0,
        batching=BatchingConfig(max_batch_size=8, max_queue_delay_ms=2),
        max_body_mb=1.0, drain_delay_s=0.0,
    )  # fmt: skip
    with Server(config) as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        inp = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        got = client.infer("fixed", [inp]).as_numpy("logits")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        image = sorted(FIXTURES.glob("digit-*.png"))[0]
        reply = httpx.post(f"{server.url}/v1/models/fixed/classify", content=image.read_bytes())
        assert reply.status_code == 200
        assert reply.json()["predictions"][0]["label"] == image.stem.split("-")[-1]


@pytest.mark.usefixtures("quiet_defaults")
def test_classify_on_a_model_that_is_not_a_classifier_is_a_400(tmp_path):
    """A detection-like model ([1, 1, 16, 16] -> [1, 10, 4]) serves v2 inference, but its
    classify endpoint says in one line that it needs an image classifier."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["b40"]),
        helper.make_node("Reshape", ["b40", "shape"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 4])],
        [numpy_helper.from_array(np.ones((1, 40), np.float32), "w"),
         numpy_helper.from_array(np.array([1, 10, 4], np.int64), "shape")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "detector.onnx")
    config = ServeConfig(
        models={"det": str(tmp_path / "detector.onnx")}, backend="ort-cpu", port=0, grpc_port=0,
        batching=BatchingConfig(max_batch_size=4, max_queue_delay_ms=2),
        max_body_mb=1.0, drain_delay_s=0.0,
    )  # fmt: skip
    image = sorted(FIXTURES.glob("digit-*.png"))[0]
    with Server(config) as server:
        reply = httpx.post(f"{server.url}/v1/models/det/classify", content=image.read_bytes())
    assert reply.status_code == 400
    assert "not [N, classes]" in reply.json()["error"]
