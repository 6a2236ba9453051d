"""`convforge inspect` (runtime/onnx_info.py) on a compressed model's file: the comparison with
the original in one line (onnx only, no torch)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convforge import contract
from convforge.cli import main
from convforge.runtime.onnx_info import describe, format_description

RECORD = {  # a checkpoint's compress record (builder/compress/job.py), the parts export keeps
    "source": "runs/r18/best.pt", "source_sha256": "cd" * 32, "rounds": [], "kept": 2,
    "original": {"macs": 1_820_000_000, "params": 11_690_000, "top1": 0.9512},
    "macs": 880_000_000, "params": 5_120_000, "speedup": 2.068, "top1": 0.9487,
}  # fmt: skip


def _file(path, compressed=None):
    """A 1x1 conv classifier with convforge metadata (``compressed``: a compress record)."""
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 4, 4])], [w],
    )  # fmt: skip
    model = helper.make_model(graph)
    contract.write_props(model, contract.metadata(
        arch="resnet18", classes=["a", "b"], mean=[0.5] * 3, std=[0.2] * 3, input_size=4,
        resize_size=4, channels=3, source_sha256="ef" * 32, compressed=compressed,
    ))  # fmt: skip
    onnx.save(model, path)
    return path


def test_inspect_shows_a_compressed_model_against_its_original(tmp_path, capsys):
    info = describe(_file(tmp_path / "small.onnx", RECORD))
    assert info["compressed"] == {
        "source_sha256": "cd" * 32, "speedup": 2.068, "macs": 880_000_000,
        "params": 5_120_000, "top1": 0.9487,
        "original": {"macs": 1_820_000_000, "params": 11_690_000, "top1": 0.9512},
    }  # fmt: skip
    text = format_description(info)
    line = (
        "compressed: 2.07x fewer MACs than the original (1.82 G -> 880.00 M), params "
        "11.69 M -> 5.12 M, top-1 95.12% -> 94.87% (-0.25 points; original checkpoint "
        "sha256 cdcdcdcdcdcd)"
    )
    assert line in text.splitlines()
    assert text.count("compressed") == 1  # not again among the metadata lines
    assert main(["inspect", str(tmp_path / "small.onnx")]) == 0
    assert line in capsys.readouterr().out.splitlines()


def test_inspect_of_an_ordinary_file_has_no_compressed_line(tmp_path):
    info = describe(_file(tmp_path / "m.onnx"))
    assert info["compressed"] is None
    assert "compressed" not in format_description(info)


def test_a_compressed_value_convforge_did_not_write_is_shown_as_is(tmp_path):
    path = _file(tmp_path / "odd.onnx")
    model = onnx.load(path)
    contract.write_props(model, contract.encode({"compressed": {"speedup": "fast"}}))
    onnx.save(model, path)
    text = format_description(describe(path))
    assert "compressed: {'speedup': 'fast'}" in text.splitlines()
