"""Accuracy-aware int8: layers stay in float until the top-1 drop fits the budget.

The model is the trained digits CNN of test_precision with one deliberate trap:
the classifier's weights get a column of 1000s on a feature that is always 0
(its BatchNorm channel outputs -1, which ReLU zeroes). In float the column
changes nothing; quantized per output row, it sets each row's scale to
1000/63, so every real weight rounds to 0 and plain int8 falls to chance. The
only cure is to keep that one layer in float, and the search must find it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from convforge.errors import UserError
from convforge.export.int8 import Int8Quantizer, to_int8
from convforge.export.int8_accuracy import int8_within_budget
from convforge.export.validate import ValidationInputs
from tests.export.test_precision import digits, export, metadata, run, tiny_cnn, train


def trap(model: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        bn2, linear = model[5], model[9]
        bn2.weight[0], bn2.bias[0] = 0.0, -1.0  # channel 0 is -1 before ReLU: always 0 after
        linear.weight[:, 0] = 1000.0
    return model


@pytest.fixture(scope="module")
def trapped(tmp_path_factory):
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()
    model = trap(train(tiny_cnn(), x_train, y_train))
    proto = export(model, x_train[:2], tmp_path_factory.mktemp("onnx") / "trap.onnx")
    x_test, y_test = x_test.numpy(), y_test.numpy()
    reference = run(proto, x_test)
    assert (reference.argmax(1) == y_test).mean() > 0.9, "the test model did not train"
    return proto, x_train[:128].numpy(), x_test, y_test, reference


def checks(x: np.ndarray, y: np.ndarray, reference: np.ndarray, max_drop=0.5):
    """The validation inputs of the search: images, labels, fp32 logits, the budget."""
    return ValidationInputs(x, reference, y, int8_max_drop=max_drop)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_plain_int8_breaks_on_the_trap(trapped):
    proto, calibration, x_test, y_test, reference = trapped
    plain = accuracy(run(to_int8(proto, calibration), x_test), y_test)
    assert plain < accuracy(reference, y_test) - 0.3, f"the trap did not bite ({plain:.1%})"


def test_the_search_keeps_the_classifier_in_float(trapped):
    proto, calibration, x_test, y_test, reference = trapped
    model, search = int8_within_budget(proto, calibration, checks(x_test, y_test, reference, 0.5))
    gemm = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    assert search.float_layers == gemm, search.ranking
    assert search.ranking[0]["layer"] == gemm[0]
    # Ranked by the logit error with each layer alone in int8: the trapped classifier alone
    # wrecks the logits, a convolution alone barely moves them. (Ranked the other way, by
    # the error with each layer alone in float, the classifier's entry would be the small one.)
    errors = [entry["logit_mse"] for entry in search.ranking]
    assert errors == sorted(errors, reverse=True) and errors[0] > 100 * errors[1], errors
    assert search.reference_accuracy - search.accuracy <= 0.005
    assert search.plain_accuracy < search.reference_accuracy - 0.3
    assert accuracy(run(model, x_test), y_test) == pytest.approx(search.accuracy)
    # The classifier's weight reaches it in float; the convolutions' weights are int8.
    consumers = {i: n for n in model.graph.node for i in n.input}
    weight = next(n for n in model.graph.node if n.op_type == "Gemm").input[1]
    assert weight in {i.name for i in model.graph.initializer}
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert consumers[weight].op_type == "Gemm"
    calib = json.loads(metadata(model)["convforge.calibration"])
    assert calib == {"method": "minmax", "samples": 128, "float_layers": gemm}
    assert set(search.latency_ms) == {"fp32", "int8", "mixed"}
    assert "kept in float: " + gemm[0] in search.format()
    onnx.checker.check_model(model)


def test_a_model_that_fits_is_not_searched(trapped):
    proto, calibration, x_test, y_test, reference = trapped
    model, search = int8_within_budget(proto, calibration, checks(x_test, y_test, reference, 100))
    assert search.float_layers == [] and search.evaluations == 1 and search.ranking == []
    assert "float_layers" not in json.loads(metadata(model)["convforge.calibration"])


def test_no_mix_that_fits_is_refused(tmp_path):
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits(size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    model = train(model, x_train, y_train, epochs=3)
    with torch.no_grad():
        model[1].weight[:, 0] *= 0  # the first pixel's weights become a trap on a live input
        model[1].weight[:, 0] += 1000.0
    proto = export(model, x_train[:2], tmp_path / "linear.onnx")
    x_test, y_test = x_test.numpy(), y_test.numpy()
    message = "int8 cannot keep top-1 within 0.5 points: with every layer int8 it loses"
    with pytest.raises(UserError, match=re.escape(message) + ".*only quantizable layer"):
        int8_within_budget(proto, x_train[:64].numpy(), checks(x_test, y_test, run(proto, x_test)))


def test_a_mix_without_any_quantized_tensor_is_not_int8(tmp_path):
    """Pooling then the trapped classifier: keeping the classifier in float fits, but the
    pooling alone gets no Q/DQ, so that "mix" is the fp32 model and must be refused."""
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits(size=8)
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    model = train(model, x_train, y_train, epochs=3)
    with torch.no_grad():
        model[2].weight[:, 0] *= 0
        model[2].weight[:, 0] += 1000.0
    proto = export(model, x_train[:2], tmp_path / "pool_linear.onnx")
    x_test, y_test = x_test.numpy(), y_test.numpy()
    with pytest.raises(UserError, match="the mixes that fit leave no layer int8"):
        int8_within_budget(proto, x_train[:64].numpy(), checks(x_test, y_test, run(proto, x_test)))


def test_negative_budget_is_a_user_error(trapped):
    proto, calibration, x_test, y_test, reference = trapped
    with pytest.raises(UserError, match="must be >= 0 points"):
        int8_within_budget(proto, calibration, checks(x_test, y_test, reference, -1))


def test_calibration_runs_in_memory_bounded_chunks_and_once(trapped, monkeypatch):
    from onnxruntime.quantization import calibrate

    proto, calibration, *_ = trapped
    monkeypatch.setattr("convforge.export.int8.CALIBRATION_MEMORY", 1)  # one image per chunk
    runs = []
    original = calibrate.MinMaxCalibrater.collect_data

    def counting(self, reader):
        runs.append(1)
        return original(self, reader)

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "collect_data", counting)
    with Int8Quantizer(proto, calibration[:5]) as quantizer:
        assert quantizer.chunk == 1
        first = quantizer.quantize()
        assert len(runs) == 5  # one session run per chunk, merged
        quantizer.quantize(quantizer.layers[:1])
        assert len(runs) == 5  # the second variant reuses the cached calibration
    monkeypatch.undo()
    whole = to_int8(proto, calibration[:5])
    # Chunked min/max merge to the same ranges as one pass over every image.
    assert first.SerializeToString() == whole.SerializeToString()


def test_unknown_float_layer_is_a_bug_not_a_user_error(trapped):
    proto, calibration, *_ = trapped
    with Int8Quantizer(proto, calibration[:8]) as quantizer:
        with pytest.raises(ValueError, match="not quantizable layers"):
            quantizer.quantize(["no-such-node"])


def test_report_says_gain_when_the_mix_beats_fp32():
    from convforge.export.int8_accuracy import Int8Search

    latency = {"fp32": 80.0, "int8": 39.0, "mixed": 49.0}
    search = Int8Search(0.5, 0.89, 0.88, 0.8919, 71, ["a", "b"], [], 76, latency, 561.0)
    first = search.format().splitlines()[0]
    assert "loses 1.00 points" in first and "2 of 71 layers kept in float gain 0.19" in first
    search.accuracy = 0.8881
    assert "2 of 71 layers kept in float lose 0.19" in search.format()
