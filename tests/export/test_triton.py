"""Triton model repository layout; configs are parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper
from torch import nn

from convforge.errors import UserError
from convforge.export.triton import write_triton_repo


def _model_config_pb2():
    """Triton's own ModelConfig protobuf, loaded from its file alone: importing the
    tritonclient.grpc package defines the v2 protocol's `inference.*` messages, which kserve
    (the server tests) defines too, and protobuf refuses a second definition in one process."""
    import importlib.util

    tritonclient = pytest.importorskip("tritonclient", reason="tritonclient is a dev dependency")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()

CLASSES = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A real dynamo export: 3x32x32 -> 10, batch dimension named ``batch``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 32, 32),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        opset_version=18,
        external_data=False,
        verbose=False,
    )
    return path


def graph_model(path, inputs, outputs, nodes=None) -> str:
    """Save a hand-made ONNX graph (Identity by default) and return its path."""
    nodes = nodes or [helper.make_node("Identity", [inputs[0].name], [outputs[0].name])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return str(path)


def parse(folder) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse((folder / "config.pbtxt").read_text(), config)
    return config


def test_layout_and_config_match_the_onnx(tiny_onnx, tmp_path):
    folder = write_triton_repo(
        tiny_onnx, tmp_path / "repo", "tiny", CLASSES, preferred_batch_sizes=[16, 4, 4, 8]
    )
    assert folder == tmp_path / "repo" / "tiny"
    assert sorted(os.listdir(folder)) == ["1", "config.pbtxt", "labels.txt"]
    assert os.listdir(folder / "1") == ["model.onnx"]
    assert (folder / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    assert (folder / "labels.txt").read_text().splitlines() == CLASSES

    config = parse(folder)
    DT = model_config_pb2.DataType
    assert config.name == "tiny"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", DT.Value("TYPE_FP32"), [3, 32, 32])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", DT.Value("TYPE_FP32"), [10])
    ]
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    [group] = config.instance_group
    assert group.count == 1 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_options_reach_the_config(tiny_onnx, tmp_path):
    folder = write_triton_repo(
        tiny_onnx,
        tmp_path,
        "m-2.gpu",
        CLASSES,
        max_batch_size=8,
        instance_count=3,
        kind="KIND_GPU",
        max_queue_delay_us=0,
    )
    config = parse(folder)
    assert config.max_batch_size == 8
    assert config.instance_group[0].count == 3
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert not config.dynamic_batching.preferred_batch_size  # left to Triton
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.HasField("dynamic_batching")


def test_types_and_dims_come_from_the_graph(tmp_path):
    # Several I/O, fp16, int64, a symbolic non-batch dim (-1) and an unnamed batch dim.
    source = graph_model(
        tmp_path / "multi.onnx",
        [
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, ["n", 1, "h", 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT16, ["n", 1, "h", 8]),
            helper.make_tensor_value_info("logits", TensorProto.INT64, [None, 4]),
        ],
        [
            helper.make_node("Identity", ["pixels"], ["scores"]),
            helper.make_node("Identity", ["ids"], ["logits"]),
        ],
    )
    config = parse(write_triton_repo(source, tmp_path / "repo", "multi", ["a", "b", "c", "d"]))
    DT = model_config_pb2.DataType
    assert [(i.name, DT.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("pixels", "TYPE_FP16", [1, -1, 8]),
        ("ids", "TYPE_INT64", [4]),
    ]
    assert [(o.name, o.label_filename) for o in config.output] == [
        ("scores", ""),
        ("logits", "labels.txt"),
    ]


def test_existing_model_folder_is_replaced_cleanly(tiny_onnx, tmp_path):
    old = tmp_path / "tiny"
    (old / "2").mkdir(parents=True)
    (old / "2" / "model.onnx").write_bytes(b"stale")
    (old / "notes.txt").write_text("stale")
    (tmp_path / "other").mkdir()  # another model in the repository stays
    write_triton_repo(tiny_onnx, tmp_path, "tiny", CLASSES[:3] + CLASSES[3:])
    assert sorted(os.listdir(tmp_path)) == ["other", "tiny"]  # no staging or trash left
    assert sorted(os.listdir(old)) == ["1", "config.pbtxt", "labels.txt"]


def test_failure_leaves_the_old_folder_and_no_debris(tiny_onnx, tmp_path, monkeypatch):
    write_triton_repo(tiny_onnx, tmp_path, "tiny", CLASSES, max_batch_size=4)
    before = (tmp_path / "tiny" / "config.pbtxt").read_text()

    real = os.replace

    def broken(src, dst):  # the new folder cannot be moved in
        if Path(dst) == tmp_path / "tiny":
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr("convforge.files.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_triton_repo(tiny_onnx, tmp_path, "tiny", CLASSES, max_batch_size=8)
    assert os.listdir(tmp_path) == ["tiny"]
    assert (tmp_path / "tiny" / "config.pbtxt").read_text() == before


def test_static_batch_is_refused(tmp_path):
    source = graph_model(
        tmp_path / "static.onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    with pytest.raises(UserError, match="input 'input' has a fixed batch dimension of 1"):
        write_triton_repo(source, tmp_path / "repo", "static", CLASSES)
    assert not (tmp_path / "repo" / "static").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../escape"}, "invalid Triton model name '../escape'"),
        ({"name": ".hidden"}, "invalid Triton model name"),
        ({"name": ""}, "invalid Triton model name"),
        ({"name": "a b"}, "invalid Triton model name"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer >= 1"),
        ({"instance_count": 0}, "instance_count must be an integer >= 1"),
        ({"kind": "KIND_TPU"}, "unknown Triton instance kind 'KIND_TPU'; choose one of: KIND_CPU"),
        ({"preferred_batch_sizes": [4, 64]}, "preferred batch size must be an integer in 1..32"),
        ({"preferred_batch_sizes": [0]}, "preferred batch size must be an integer in 1..32"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us must be an integer >= 0"),
        ({"classes": []}, "non-empty list of class names"),
        ({"classes": "abc"}, "non-empty list of class names"),
        ({"classes": ["a\nb"] + CLASSES[1:]}, "invalid class name"),
        ({"classes": [""] + CLASSES[1:]}, "invalid class name"),
        ({"classes": CLASSES[:9]}, "'logits' has 10 class scores but 9 class names were given"),
    ],
)
def test_bad_arguments_are_user_errors(tiny_onnx, tmp_path, kwargs, message):
    args = {"name": "tiny", "classes": CLASSES, **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        write_triton_repo(tiny_onnx, tmp_path / "repo", **args)
    assert not (tmp_path / "repo").exists() or os.listdir(tmp_path / "repo") == []


def test_bad_onnx_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_triton_repo(tmp_path / "missing.onnx", tmp_path, "m", CLASSES)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff not a protobuf \x00")
    with pytest.raises(UserError, match="cannot read .* as an ONNX model"):
        write_triton_repo(junk, tmp_path, "m", CLASSES)


def test_unclear_or_mismatched_class_output_is_a_user_error(tmp_path):
    two = graph_model(
        tmp_path / "two.onnx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Identity", ["x"], ["b"])],
    )
    with pytest.raises(UserError, match="cannot tell which output holds the class scores"):
        write_triton_repo(two, tmp_path / "r", "two", list("abcd"))
    image = graph_model(
        tmp_path / "image.onnx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4])],
    )
    with pytest.raises(UserError, match=r"class scores must be \[batch, num_classes\]"):
        write_triton_repo(image, tmp_path / "r", "image", list("abcd"))


def test_file_in_the_way_is_a_user_error(tiny_onnx, tmp_path):
    (tmp_path / "tiny").write_text("not a folder")
    with pytest.raises(UserError, match="a file is in the way"):
        write_triton_repo(tiny_onnx, tmp_path, "tiny", CLASSES)
