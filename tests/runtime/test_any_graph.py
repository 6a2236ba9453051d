"""bench on models that are not image classifiers: several inputs, detection-like outputs,
dynamic dims set with --shapes (trtexec's syntax); predict says it needs a classifier."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convforge.cli import main
from convforge.errors import UserError
from convforge.runtime import bench
from convforge.runtime.any_graph import graph_inputs, parse_shapes, random_feeds
from tests.helpers import skip_unless_available

pytestmark = pytest.mark.usefixtures("quiet_defaults")

ENGINES = ["ort-cpu", "openvino"]
CFG = bench.BenchConfig(batch_sizes=(1,), warmup_iters=1, warmup_seconds=0, iters=3, seconds=0)


def _save(tmp_path, name, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / f"{name}.onnx")
    return tmp_path / f"{name}.onnx"


@pytest.fixture
def two_inputs(tmp_path):
    """image [n, 3, h, w] (h, w dynamic) and ids [n, 4] int64 -> [n, 4]."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mixed"]),
        helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["mixed", "idf"], ["out"]),
    ]
    return _save(
        tmp_path, "two_inputs", nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
    )  # fmt: skip


@pytest.fixture
def detector(tmp_path):
    """image [1, 3, 32, 32] -> boxes [1, 10, 4] and scores [1, 10]: a detection-like head."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wb"], ["b40"]),
        helper.make_node("Reshape", ["b40", "shape"], ["boxes"]),
        helper.make_node("MatMul", ["flat", "ws"], ["scores"]),
    ]
    return _save(
        tmp_path, "detector", nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(np.ones((3, 40), np.float32), "wb"),
         numpy_helper.from_array(np.ones((3, 10), np.float32), "ws"),
         numpy_helper.from_array(np.array([1, 10, 4], np.int64), "shape")],
    )  # fmt: skip


def test_shapes_parse_as_trtexec_writes_them():
    assert parse_shapes("image:1x3x640x640, ids:1X4") == {"image": (1, 3, 640, 640), "ids": (1, 4)}
    assert parse_shapes(None) == {} and parse_shapes("") == {}
    for bad in ("image", "image:1x0", ":1x3", "image:1xq"):
        with pytest.raises(UserError, match="--shapes takes NAME:DxDx"):
            parse_shapes(bad)


def test_random_feeds_take_each_inputs_type_and_shape(two_inputs):
    inputs = graph_inputs(two_inputs)
    assert [(i.name, i.dtype, i.dims) for i in inputs] == [
        ("image", "float32", ("n", 3, "h", "w")), ("ids", "int64", ("n", 4))]  # fmt: skip
    feeds = random_feeds(inputs, parse_shapes("image:2x3x16x24,ids:2x4"), np.random.default_rng(0))
    assert feeds["image"].shape == (2, 3, 16, 24) and feeds["image"].dtype == np.float32
    assert feeds["ids"].dtype == np.int64 and set(np.unique(feeds["ids"])) <= {0, 1}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ("", "input 'image' has dynamic dims (nx3xhxw); set them with --shapes image:Nx3xNxN"),
        ("image:2x3x16x16,boxes:1", "--shapes names boxes, not inputs of"),
        ("image:2x3x16,ids:2x4", "--shapes image: 3 dims given, the input has 4"),
        ("image:2x1x16x16,ids:2x4", "--shapes image: 2x1x16x16 does not fit its fixed dims"),
    ],
)
def test_shape_mistakes_are_one_line(two_inputs, shapes, message):
    with pytest.raises(UserError) as e:
        bench.bench_matrix([str(two_inputs)], ["ort-cpu"], CFG, shapes=parse_shapes(shapes))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ENGINES)
def test_bench_times_a_model_with_two_inputs(name, two_inputs):
    skip_unless_available(name)
    shapes = parse_shapes("image:2x3x16x16,ids:2x4")
    labelled = ([np.zeros((8, 8, 3), np.uint8)], [0])
    records, skipped = bench.bench_matrix([str(two_inputs)], [name], CFG, labelled=labelled,
                                          shapes=shapes)  # fmt: skip
    (record,) = records
    assert record["backend"] == name and record["batch_size"] == 2
    assert record["inputs"] == {"image": [2, 3, 16, 16], "ids": [2, 4]}
    assert record["p50_ms"] > 0 and "top1_accuracy" not in record
    assert skipped == [f"accuracy on two_inputs.onnx (not an image classifier: {two_inputs} "
                       "has 2 inputs (image, ids); an image classifier has one)"]  # fmt: skip


@pytest.mark.parametrize("name", ENGINES)
def test_a_detection_like_model_benches_but_does_not_classify(name, detector, capsys):
    skip_unless_available(name)
    records, _ = bench.bench_matrix([str(detector)], [name], CFG)
    assert [r["batch_size"] for r in records] == [1]
    image = detector.parent / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), "white").save(image)
    assert main(["predict", str(detector), str(image), "--backend", name]) == 2
    err = capsys.readouterr().err
    assert "output has shape [1, 10, 4], not [N, classes]" in err and err.count("\n") == 1


def test_cli_bench_with_shapes_and_predict_refusal(two_inputs, capsys):
    argv = ["bench", str(two_inputs), "--backends", "ort-cpu", "--iters", "2", "--seconds", "0",
            "--warmup-iters", "1", "--warmup-seconds", "0"]  # fmt: skip
    assert main([*argv, "--shapes", "image:1x3x8x8,ids:1x4"]) == 0
    assert "ort-cpu" in capsys.readouterr().out
    assert main(argv) == 2
    assert "set them with --shapes image:Nx3xNxN" in capsys.readouterr().err
    assert main(["bench", str(two_inputs), "--backends", "torch", "--shapes",
                 "image:1x3x8x8,ids:1x4"]) == 2  # fmt: skip
    assert "torch runs image classifiers only" in capsys.readouterr().err
    assert main(["predict", str(two_inputs), str(two_inputs)]) == 2
    assert "has 2 inputs (image, ids); an image classifier has one" in capsys.readouterr().err


def test_tune_refuses_a_model_that_is_not_a_classifier(detector, capsys):
    image = detector.parent / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), "white").save(image)
    argv = ["tune", str(detector), "--images", str(image), "--backends", "ort-cpu",
            "-o", str(detector.parent / "plan.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not [N, classes]; tune checks top-1 accuracy" in err and err.count("\n") == 1
