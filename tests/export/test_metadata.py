import onnx
from onnx import helper

from convforge.export import metadata as meta


def _model():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 2])],
    )
    return helper.make_model(graph)


def test_metadata_round_trip_through_a_file(tmp_path):
    info = meta.build(
        arch="resnet18",
        classes=["cat", "dog, big"],
        mean=[0.5, 0.4, 0.3],
        std=[0.2] * 3,
        input_size=224,
        resize_size=256,
        channels=3,
        folded_bn=20,
        source_sha256="ab" * 32,
    )
    model = _model()
    meta.write(model, info)
    onnx.save(model, tmp_path / "m.onnx")
    back = meta.decoded(onnx.load(tmp_path / "m.onnx"))
    assert back["classes"] == ["cat", "dog, big"] and back["mean"] == [0.5, 0.4, 0.3]
    assert back["input_size"] == 224 and back["resize_size"] == 256 and back["channels"] == 3
    assert back["arch"] == "resnet18" and back["precision"] == "fp32" and back["folded_bn"] == 20
    assert set(meta.REQUIRED) <= set(back)


def test_write_replaces_keys_and_keeps_others():
    model = _model()
    model.metadata_props.add(key="other.key", value="x")
    meta.write(model, {"convforge.precision": "fp32"})
    meta.write(model, {"convforge.precision": "int8"})
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"other.key": "x", "convforge.precision": "int8"}


def test_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert meta.sha256_of(tmp_path / "f").startswith("ba7816bf")
