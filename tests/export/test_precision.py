"""fp16 and int8 variants of a small CNN trained on scikit-learn's digits.

The CNN (conv-bn-relu-pool-conv-bn-relu-gap-linear, 3x16x16 -> 10) trains in
about two seconds to ~97% held-out accuracy, so int8 accuracy is a real
measurement rather than agreement on noise. It is built once per module.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from convforge.errors import UserError
from convforge.export.int8 import CALIBRATION_METHODS, INT8_TARGETS, to_int8
from convforge.export.precision import to_fp16

SIZE = 16
METADATA = {"convforge.arch": "tinycnn", "convforge.classes": json.dumps(list("0123456789"))}


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def digits(size: int = SIZE):
    """sklearn digits as normalized 3-channel images; (train, test) splits of (x, y)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.3) / 0.4
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return (x[train], y[train]), (x[test], y[test])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> nn.Module:
    # One thread: on a 2-core runner, two threads fighting over tiny convs are ~5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = 32
        steps = epochs * -(-len(x) // batch)
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path) -> onnx.ModelProto:
    """Dynamo ONNX export with a dynamic batch and a couple of metadata entries."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        opset_version=18,
        external_data=False,
        verbose=False,
    )
    proto = onnx.load(str(path))
    for key, value in {**METADATA, "convforge.precision": "fp32"}.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def run(model: onnx.ModelProto, x: np.ndarray, basic: bool = False) -> np.ndarray:
    """Logits from ONNX Runtime on CPU; ``basic`` runs Q/DQ as written (float arithmetic)."""
    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()
    model = train(tiny_cnn(), x_train, y_train)
    proto = export(model, x_train[:2], tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    calibration = x_train[:256].numpy()
    x_test, y_test = x_test.numpy(), y_test.numpy()
    reference = run(proto, x_test)
    accuracy = (reference.argmax(1) == y_test).mean()
    assert accuracy > 0.9, f"the test model did not train ({accuracy:.1%})"
    return proto, calibration, x_test, y_test, reference


@pytest.fixture(scope="module")
def int8_models(trained):
    proto, calibration, *_ = trained
    return {t: to_int8(proto, calibration, t) for t in INT8_TARGETS}


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------- fp16


def test_fp16_has_half_weights_and_float_io(trained):
    proto, *_ = trained
    half = to_fp16(proto)
    onnx.checker.check_model(half, full_check=True)
    float_weights = [
        t.name
        for t in half.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1
    ]
    assert not float_weights
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer) >= 6
    for value in (*half.graph.input, *half.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [i.name for i in half.graph.input] == ["input"]
    assert [o.name for o in half.graph.output] == ["logits"]


def test_fp16_matches_fp32(trained):
    proto, _, x_test, y_test, reference = trained
    half = to_fp16(proto)
    for batch in (1, 8):
        got = run(half, x_test[:batch])
        assert got.shape == (batch, 10) and got.dtype == np.float32
    logits = run(half, x_test)
    agreement = (logits.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.99
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() <= 0.01 * scale


def test_fp16_keeps_metadata_and_input_untouched(trained):
    proto, *_ = trained
    before = proto.SerializeToString()
    meta = metadata(to_fp16(proto))
    assert meta == {**METADATA, "convforge.precision": '"fp16"'}  # every value JSON
    assert list(meta)[:2] == list(METADATA)  # original order kept
    assert proto.SerializeToString() == before


def test_fp16_refuses_a_converted_model(trained, int8_models):
    proto, *_ = trained
    with pytest.raises(UserError, match="already fp16"):
        to_fp16(to_fp16(proto))
    with pytest.raises(UserError, match="already int8"):
        to_fp16(int8_models["cpu"])


# ---------------------------------------------------------------- int8


def qdq_nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def activation_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    """Zero points of every QuantizeLinear (those quantize activations, never weights)."""
    values = initializers(model)
    return [values[n.input[2]] for n in qdq_nodes(model, "QuantizeLinear")]


def weight_dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv/Gemm weight input -> the DequantizeLinear producing it."""
    producers = {n.output[0]: n for n in qdq_nodes(model, "DequantizeLinear")}
    return {
        n.name: producers[n.input[1]]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm") and n.input[1] in producers
    }


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_int8_structure(trained, int8_models, target):
    proto, *_ = trained
    model = int8_models[target]
    onnx.checker.check_model(model, full_check=True)
    assert qdq_nodes(model, "QuantizeLinear") and qdq_nodes(model, "DequantizeLinear")
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # Every conv and the classifier take per-channel int8 weights (a scale per output channel).
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    dequant = weight_dequantizers(model)
    assert len(layers) == 3 and len(dequant) == 3
    values = initializers(model)
    for node in dequant.values():
        weight, scale, zero = (values[name] for name in node.input)
        assert weight.dtype == np.int8
        assert scale.ndim == 1 and scale.shape[0] == weight.shape[0] > 1
        assert {a.name: a.i for a in node.attribute}.get("axis", 1) == 0
        assert not zero.any()
    zero_points = activation_zero_points(model)
    assert zero_points
    if target == "cpu":
        assert all(z.dtype == np.uint8 for z in zero_points)
    else:
        assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
        # TensorRT wants float biases (no DequantizeLinear of int32).
        assert not any(v.dtype == np.int32 for v in values.values())
    used = {o.domain for o in model.opset_import}
    assert used <= {"", "ai.onnx"}, f"unused opset imports left: {used}"


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_int8_metadata(trained, int8_models, target):
    meta = metadata(int8_models[target])
    assert {k: meta[k] for k in METADATA} == METADATA
    assert json.loads(meta["convforge.precision"]) == "int8"
    assert json.loads(meta["convforge.int8_target"]) == target
    assert json.loads(meta["convforge.calibration"]) == {"method": "minmax", "samples": 256}


def test_int8_cpu_accuracy_close_to_fp32(trained, int8_models):
    # Default ORT optimizations: the fused integer kernels actually run, batch 1 and many.
    _, _, x_test, y_test, reference = trained
    model = int8_models["cpu"]
    assert run(model, x_test[:1]).shape == (1, 10)
    logits = run(model, x_test)
    fp32 = (reference.argmax(1) == y_test).mean()
    int8 = (logits.argmax(1) == y_test).mean()
    assert int8 >= fp32 - 0.03, f"int8 {int8:.1%} vs fp32 {fp32:.1%}"


def test_int8_tensorrt_accuracy_close_to_fp32(trained, int8_models):
    # Checked with Q/DQ run as written: the arithmetic TensorRT reproduces. ORT's fused
    # S8S8 kernels saturate on CPUs without VNNI, which says nothing about TensorRT.
    _, _, x_test, y_test, reference = trained
    logits = run(int8_models["tensorrt"], x_test, basic=True)
    fp32 = (reference.argmax(1) == y_test).mean()
    int8 = (logits.argmax(1) == y_test).mean()
    assert int8 >= fp32 - 0.03, f"int8 {int8:.1%} vs fp32 {fp32:.1%}"
    assert run(int8_models["tensorrt"], x_test[:8]).shape == (8, 10)  # runs fused too


@pytest.mark.parametrize("method", [m for m in CALIBRATION_METHODS if m != "minmax"])
def test_every_calibration_method_runs(trained, method):
    proto, calibration, x_test, y_test, reference = trained
    model = to_int8(proto, calibration[:64], "cpu", method)
    calib = json.loads(metadata(model)["convforge.calibration"])
    assert calib == {"method": method, "samples": 64}
    logits = run(model, x_test)
    agreement = (logits.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.9


def test_int8_uses_a_short_last_batch_and_leaves_no_temp_files(trained, tmp_path, monkeypatch):
    proto, calibration, *_ = trained
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    model = to_int8(proto, calibration[:37], "cpu")
    assert json.loads(metadata(model)["convforge.calibration"])["samples"] == 37
    assert os.listdir(tmp_path) == []


def test_int8_leaves_its_input_untouched(trained):
    proto, calibration, *_ = trained
    before = proto.SerializeToString()
    to_int8(proto, calibration[:16], "tensorrt")
    assert proto.SerializeToString() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "gpu"}, "unknown int8 target 'gpu'; choose one of: cpu, tensorrt"),
        ({"method": "mse"}, "unknown calibration method 'mse'; choose one of: minmax"),
        ({"calibration": np.zeros((0, 3, SIZE, SIZE), np.float32)}, "empty"),
        ({"calibration": np.zeros((4, 3, SIZE, SIZE), np.float64)}, "must be float32"),
        ({"calibration": np.zeros((3, SIZE, SIZE), np.float32)}, "must be 4-D"),
        ({"calibration": np.zeros((4, 1, SIZE, SIZE), np.float32)}, "but the model takes 3x16x16"),
        ({"calibration": np.zeros((4, 3, 8, 8), np.float32)}, "are 3x8x8"),
        ({"calibration": np.full((4, 3, SIZE, SIZE), np.nan, np.float32)}, "NaN"),
        ({"calibration": [[0.0]]}, "numpy array"),
    ],
)
def test_int8_bad_arguments_are_user_errors(trained, kwargs, message):
    proto, calibration, *_ = trained
    args = {"calibration": calibration[:8], **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        to_int8(proto, **args)


def test_int8_refuses_a_converted_model(trained):
    proto, calibration, *_ = trained
    with pytest.raises(UserError, match="already fp16"):
        to_int8(to_fp16(proto), calibration[:8])
