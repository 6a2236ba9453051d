"""The file contract: names, keys, encoding, and reading a file back (no torch needed)."""

import dataclasses
import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convforge import contract
from convforge.errors import UserError
from convforge.overrides import ModelOverrides


def _model(weight_type=TensorProto.FLOAT, qdq=False, props=None):
    """A 1x1 conv classifier: input [batch, 3, 4, 4] -> logits, optionally Q/DQ'd."""
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), dtype=np.float32), "w")
    if weight_type == TensorProto.FLOAT16:
        w = numpy_helper.from_array(np.ones((2, 3, 1, 1), dtype=np.float16), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["logits"])]
    inits = [w]
    src = "input"
    if qdq:
        inits += [numpy_helper.from_array(np.float32(0.1), "s"),
                  numpy_helper.from_array(np.uint8(128), "z")]  # fmt: skip
        nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]), *nodes]  # fmt: skip
    else:
        nodes[0].input[0] = src
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 4, 4])],
        inits,
    )
    model = helper.make_model(graph)
    contract.write_props(model, props or {})
    return model


def _props(**over):
    base = dict(
        arch="resnet18", classes=["cat", "dog, big"], mean=[0.5, 0.4, 0.3], std=[0.2] * 3,
        input_size=4, resize_size=8, channels=3, source_sha256="ab" * 32, folded_bn=20,
    )  # fmt: skip
    return contract.metadata(**{**base, **over})


def test_metadata_round_trips_through_an_onnx_file(tmp_path):
    onnx.save(_model(props=_props()), tmp_path / "m.onnx")
    info = contract.read_info(tmp_path / "m.onnx")
    assert info.classes == ["cat", "dog, big"] and info.mean == [0.5, 0.4, 0.3]
    assert info.spec == contract.InputSpec(3, 4, 4) and info.resize_size == 8
    assert info.arch == "resnet18" and info.precision == "fp32" and info.int8_target is None
    assert info.metadata["folded_bn"] == 20 and info.metadata["version"]


def test_metadata_round_trips_through_a_pt2_extra_file(tmp_path):
    # A .pt2 is a zip archive; the contract reads its extra file without torch.
    with zipfile.ZipFile(tmp_path / "m.pt2", "w") as z:
        z.writestr("m/extra/" + contract.PT2_METADATA, json.dumps(_props()))
    info = contract.read_info(tmp_path / "m.pt2")
    assert info.spec == contract.InputSpec(3, 4, 4) and info.classes == ["cat", "dog, big"]


COMPRESS_RECORD = {  # a checkpoint's compress record, as `convforge compress` writes it
    "source": "runs/r18/best.pt", "source_sha256": "cd" * 32, "target": {"speedup": 2.0},
    "original": {"macs": 1_800_000, "params": 11_000, "top1": 0.9, "latency_ms": 1.5},
    "rounds": [{"round": 1}], "kept": 1, "macs": 880_000, "params": 5_000, "speedup": 2.045,
    "top1": 0.897,
}  # fmt: skip


def test_a_compressed_model_carries_a_summary_of_its_record(tmp_path):
    onnx.save(_model(props=_props(compressed=COMPRESS_RECORD)), tmp_path / "small.onnx")
    info = contract.read_info(tmp_path / "small.onnx")
    # No rounds, options, path or machine-bound latency: those stay in the checkpoint.
    assert info.compressed == {
        "source_sha256": "cd" * 32, "speedup": 2.045, "macs": 880_000, "params": 5_000,
        "top1": 0.897, "original": {"macs": 1_800_000, "params": 11_000, "top1": 0.9},
    }  # fmt: skip
    assert info.metadata["compressed"] == info.compressed
    onnx.save(_model(props=_props()), tmp_path / "m.onnx")
    assert contract.read_info(tmp_path / "m.onnx").compressed is None
    assert "compressed" in contract.KEYS  # encode takes it


def test_encode_refuses_keys_outside_the_contract():
    with pytest.raises(ValueError, match="not keys of the convforge file contract"):
        contract.encode({"precison": "fp32"})
    assert contract.encode({"precision": "int8", "folded_bn": 3}) == {
        "convforge.precision": '"int8"',
        "convforge.folded_bn": "3",
    }


def test_a_numeric_looking_string_round_trips_as_a_string():
    values = {"output": "191", "arch": "1.0", "classes": ["191", "7"], "folded_bn": 191}
    encoded = contract.encode(values)
    assert encoded["convforge.output"] == '"191"'  # JSON, strings too
    assert contract.decode(encoded) == values


def test_a_file_written_before_every_value_was_json_reads_as_before(tmp_path):
    """Old files stored strings as-is: plain text stays text, numbers and lists are JSON,
    and the text of a text-valued key stays text even when it reads as a number."""
    old = {
        "convforge.precision": "fp32", "convforge.arch": "resnet18", "convforge.version": "1.0",
        "convforge.output": "191", "convforge.layout": "NCHW", "convforge.channels": "3",
        "convforge.input_size": "8", "convforge.classes": '["a", "b"]', "other.key": "7",
    }  # fmt: skip
    assert contract.decode(old) == {
        "precision": "fp32", "arch": "resnet18", "version": "1.0", "output": "191",
        "layout": "NCHW", "channels": 3, "input_size": 8, "classes": ["a", "b"],
    }  # fmt: skip
    # The reader takes the old numeric output name as the name it is, no str() needed.
    path = _foreign([("input.1", TensorProto.FLOAT, ["n", 3, 8, 8])],
                    [("aux", ["n", 2]), ("191", ["n", 2])], tmp_path=tmp_path)  # fmt: skip
    model = onnx.load(path)
    contract.write_props(model, old)
    onnx.save(model, path)
    info = contract.read_info(path)
    assert info.output_name == "191" and info.metadata["output"] == "191"
    assert info.arch == "resnet18" and info.classes == ["a", "b"] and info.spec.channels == 3


def test_write_props_replaces_in_place_and_keeps_other_keys():
    model = _model()
    model.metadata_props.add(key="other.key", value="x")
    contract.write_props(model, contract.encode({"precision": "fp32", "arch": "a"}))
    contract.write_props(model, contract.encode({"precision": "int8"}))
    assert contract.read_props(model) == {
        "other.key": "x",
        "convforge.precision": '"int8"',
        "convforge.arch": '"a"',
    }
    contract.write_props(model, {"convforge.arch": "b"}, replace_all=True)
    assert contract.read_props(model) == {"convforge.arch": "b"}


@pytest.mark.parametrize(
    "model, precision",
    [
        (_model(), "fp32"),
        (_model(weight_type=TensorProto.FLOAT16), "fp16"),
        (_model(qdq=True), "int8"),
    ],
)
def test_precision_of_a_file_without_metadata_comes_from_its_graph(model, precision, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    info = contract.read_info(tmp_path / "m.onnx")
    assert info.precision == precision and info.classes == []


def test_declared_precision_wins_over_the_graph(tmp_path):
    onnx.save(_model(qdq=True, props=_props(precision="fp16")), tmp_path / "m.onnx")
    assert contract.read_info(tmp_path / "m.onnx").precision == "fp16"


def test_unreadable_files_are_user_errors(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="does not exist"):
        contract.read_info(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        contract.read_info(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match=r"is not a torch.export program \(.pt2\)"):
        contract.read_info(tmp_path / "junk.pt2")


def test_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert contract.sha256_of(tmp_path / "f").startswith("ba7816bf")


def _pixels_model(props, elem_type=TensorProto.UINT8):
    """``_model`` with its input replaced by [batch, 4, 4, 3] of ``elem_type`` (NHWC pixels)."""
    model = _model(props=props)
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("input", elem_type, ["batch", 4, 4, 3])
    )
    return model


def test_the_input_format_round_trips(tmp_path):
    props = {**_props(), **contract.encode({"input_format": "uint8"})}
    onnx.save(_pixels_model(props), tmp_path / "m.onnx")
    info = contract.read_info(tmp_path / "m.onnx")
    assert info.input_format == "uint8" and info.metadata["input_format"] == "uint8"
    assert info.spec == contract.InputSpec(3, 4, 4, "uint8", "NHWC")
    assert info.spec.shape(2) == (2, 4, 4, 3) and info.spec.sample_shape == (4, 4, 3)
    onnx.save(_model(props=_props()), tmp_path / "f.onnx")  # no key: float32, as before
    info = contract.read_info(tmp_path / "f.onnx")
    assert info.input_format == "float32" and info.spec.shape(2) == (2, 3, 4, 4)


@pytest.mark.parametrize(
    "fmt, elem_type, message",
    [
        ("bgr", TensorProto.UINT8, "unknown input_format 'bgr'; accepted: float32, uint8"),
        ("uint8", TensorProto.FLOAT, "says input_format uint8, but the graph input is not uint8"),
    ],
)
def test_an_input_format_that_does_not_fit_the_graph_is_refused(fmt, elem_type, message, tmp_path):
    props = {**_props(), **(contract.encode({"input_format": fmt}) if fmt else {})}
    onnx.save(_pixels_model(props, elem_type), tmp_path / "m.onnx")
    with pytest.raises(UserError, match=message):
        contract.read_info(tmp_path / "m.onnx")


def _foreign(inputs, outputs, name="m.onnx", tmp_path=None):
    """A graph of Identity/Add nodes with the given (name, type, shape) inputs and outputs,
    no convforge metadata: a file made elsewhere."""
    ins = [helper.make_tensor_value_info(n, t, shape) for n, t, shape in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in outputs]
    first = inputs[0][0]
    nodes = [helper.make_node("Cast", [first], [o.name], to=TensorProto.FLOAT) for o in outs]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs))
    onnx.save(model, tmp_path / name)
    return tmp_path / name


def test_names_and_batch_come_from_the_graph(tmp_path):
    path = _foreign([("input.1", TensorProto.FLOAT, [1, 3, 8, 8])],
                    [("191", [1, 3, 8, 8]), ("aux", [1, 3, 8, 8])], tmp_path=tmp_path)  # fmt: skip
    with pytest.warns(contract.DefaultsWarning, match="has no convforge metadata; using Ima"):
        info = contract.read_info(path)
    assert (info.input_name, info.output_name) == ("input.1", "191")  # the first output
    assert info.spec == contract.InputSpec(3, 8, 8, "float32", "NCHW", batch=1)
    assert info.spec.takes(1) and not info.spec.takes(4)
    assert info.mean == contract.IMAGENET_MEAN and info.resize_size == 9  # 8 / 0.875
    assert "resize 9 + centre crop 8" in info.defaults_note


def test_layout_and_type_of_a_foreign_input_come_from_its_shape(tmp_path):
    nhwc = _foreign([("img", TensorProto.UINT8, ["n", 8, 8, 3])], [("out", ["n", 8, 8, 3])],
                    tmp_path=tmp_path)  # fmt: skip
    info = contract.read_info(nhwc)
    assert info.spec == contract.InputSpec(3, 8, 8, "uint8", "NHWC")
    assert "ImageNet mean/std" not in info.defaults  # a uint8 graph normalizes inside
    half = _foreign([("x", TensorProto.FLOAT16, ["n", 1, 8, 8])], [("y", ["n", 1, 8, 8])],
                    name="h.onnx", tmp_path=tmp_path)  # fmt: skip
    info = contract.read_info(half)
    assert info.spec == contract.InputSpec(1, 8, 8, "float16", "NCHW")
    assert info.mean == [0.5] and info.input_format == "float32"


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([("a", TensorProto.FLOAT, [1, 3, 8, 8]), ("b", TensorProto.FLOAT, [1, 3, 8, 8])],
         "has 2 inputs (a, b); an image classifier has one"),
        ([("ids", TensorProto.INT64, [1, 3, 8, 8])],
         "its input 'ids' has element type 7 (onnx.TensorProto); accepted: float32, float16"),
    ],
)  # fmt: skip
def test_inputs_a_classifier_cannot_have_are_one_line_errors(inputs, message, tmp_path):
    path = _foreign(inputs, [("y", [1, 3, 8, 8])], tmp_path=tmp_path)
    with pytest.raises(UserError) as e:
        contract.read_info(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_convforge_export_has_no_defaults(tmp_path):
    onnx.save(_model(props=_props()), tmp_path / "m.onnx")
    info = contract.read_info(tmp_path / "m.onnx")
    assert info.defaults == () and info.defaults_note is None
    assert (info.input_name, info.output_name) == ("input", "logits")


def test_overrides_win_over_the_file_and_the_defaults(tmp_path):
    outputs = [("a", ["n", 2]), ("b", ["n", 3])]
    path = _foreign([("img", TensorProto.FLOAT, ["n", 8, 8, 3])], outputs, tmp_path=tmp_path)
    with pytest.warns(contract.DefaultsWarning):
        assert contract.read_info(path).spec.layout == "NHWC"
    given = ModelOverrides(layout="NCHW", output="b", mean=(0.1,) * 8, classes=("x", "y", "z"))
    info = contract.read_info(path, given)
    assert info.spec.layout == "NCHW" and info.spec.channels == 8 and info.output_name == "b"
    assert info.mean == [0.1] * 8 and info.classes == ["x", "y", "z"]
    assert "mean" not in info.defaults_note and "std [0.5," in info.defaults_note
    with pytest.raises(UserError, match="--resize 4 is below the input size 8"):
        contract.read_info(path, dataclasses.replace(given, resize_size=4))
    with pytest.raises(UserError, match="--mean takes 8 value"):
        contract.read_info(path, dataclasses.replace(given, mean=(0.1,)))
    with pytest.raises(UserError, match="has no output 'c' .*its outputs: a, b"):
        contract.read_info(path, dataclasses.replace(given, output="c", resize_size=9))
    # Overrides travel with the call, not the process: the file alone reads as before.
    alone = contract.read_info(path)
    assert (alone.spec.layout, alone.output_name, alone.classes) == ("NHWC", "a", [])
