"""`convforge annotate`: metadata into a foreign file, nothing else changed, logits checked."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convforge.cli import main
from convforge.contract import read_info, read_props
from convforge.errors import UserError
from convforge.overrides import ModelOverrides
from convforge.runtime import backends, load
from convforge.runtime.annotate import annotate

pytestmark = pytest.mark.usefixtures("quiet_defaults")


@pytest.fixture
def two_outputs(tmp_path):
    """[N, 3, 8, 8] float -> 'aux' (pooled, first) and 'scores' [N, 3]: the mean of each
    channel. No convforge metadata, and the class scores are not the first output."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["aux"]),
        helper.make_node("Flatten", ["aux"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["n", 3, 1, 1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "foreign.onnx"
    onnx.save(model, path)
    return path


def test_annotate_round_trips(two_outputs, tmp_path):
    out = tmp_path / "annotated.onnx"
    given = ModelOverrides(classes=("red", "green", "blue", ""), output="scores", resize_size=10,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
    done = annotate(two_outputs, out, given)
    assert done["checked"]["identical"]
    info = read_info(out)
    assert info.defaults == () and info.output_name == "scores"
    assert info.classes == ["red", "green", "blue"]
    assert (info.mean, info.std, info.resize_size) == ([0.5] * 3, [0.25] * 3, 10)
    assert info.spec.layout == "NCHW"
    # Only metadata_props changed: graph, weights, names and opsets are the original's.
    before, after = onnx.load(two_outputs), onnx.load(out)
    assert after.graph == before.graph and after.opset_import == before.opset_import
    assert set(read_props(after)) > set(read_props(before))
    # It now serves with its labels: blue pixels score highest on 'blue'.
    pixels = np.zeros((12, 12, 3), np.uint8)
    pixels[..., 2] = 255
    name = "ort-cpu" if backends.backend_class("ort-cpu").available()[0] else "auto"
    with load(out, backend=name) as m:
        assert m.predict([pixels], topk=1)[0][0].label == "blue"


def test_without_options_the_defaults_are_written_out(two_outputs, tmp_path):
    annotate(two_outputs, tmp_path / "a.onnx")
    info = read_info(tmp_path / "a.onnx")
    assert info.defaults == () and info.mean == [0.485, 0.456, 0.406] and info.resize_size == 9
    assert info.output_name == "aux" and info.classes == []  # the first output, index labels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ("a", "b"), "output": "scores"}, "2 labels for output 'scores' of 3 scores"),
        ({"output": "boxes"}, "--output 'boxes' is not an output of"),
        ({"mean": (0.5,)}, "--mean takes 3 value(s), one per channel; got 1"),
        ({"std": (1, 0, 1)}, "--std must be positive"),
        ({"resize_size": 4}, "--resize 4 is below the input size 8"),
        ({"layout": "CHWN"}, "--layout 'CHWN'; accepted: NCHW, NHWC"),
        ({"classes": ("", " ")}, "no labels given"),
    ],
)
def test_values_that_do_not_fit_are_refused(two_outputs, tmp_path, kwargs, message):
    with pytest.raises(UserError) as e:
        annotate(two_outputs, tmp_path / "a.onnx", ModelOverrides(**kwargs))
    assert message in str(e.value)
    assert not (tmp_path / "a.onnx").exists() and len(list(tmp_path.iterdir())) == 1


def test_other_logits_refuse_the_file(two_outputs, tmp_path, monkeypatch):
    """The check is real: a written file that computed anything else is not saved."""
    real = backends.create

    class Shifted:
        def __init__(self, backend):
            self.backend = backend

        def load(self):
            self.backend.load()
            return self

        def run(self, batch):
            return self.backend.run(batch) + 1e-3

        def close(self):
            self.backend.close()

    monkeypatch.setattr(backends, "create", lambda name, path, **o: Shifted(real(name, path, **o)))
    with pytest.raises(UserError, match="gives other logits than .*nothing was written"):
        annotate(two_outputs, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_cli(two_outputs, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    out = tmp_path / "a.onnx"
    argv = ["annotate", str(two_outputs), "-o", str(out), "--labels", str(labels),
            "--output", "scores", "--mean", "0.4,0.4,0.4", "--std", "0.2,0.2,0.2"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: 3 labels, mean [0.4, 0.4, 0.4]" in said and "logits identical" in said
    assert main([*argv[:5], str(tmp_path / "missing.txt")]) == 2
    assert "cannot read labels file" in capsys.readouterr().err
    assert main([*argv[:-4], "--mean", "a,b"]) == 2
    assert "takes comma-separated numbers, got 'a,b'" in capsys.readouterr().err


def test_the_same_values_as_command_line_flags(two_outputs, tmp_path, capsys):
    """--labels/--mean/--std/--resize/--output on predict do for one run what annotate
    writes into the file; a mistake in them is one line."""
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    from PIL import Image

    image = tmp_path / "blue.png"
    Image.new("RGB", (12, 12), (0, 0, 255)).save(image)
    argv = ["predict", str(two_outputs), str(image), "--backend", "ort-cpu", "--topk", "1"]
    assert main(argv) == 2  # the first output, 'aux', is not [N, classes]
    assert "not [N, classes]" in capsys.readouterr().err
    flags = ["--output", "scores", "--labels", str(labels), "--mean", "0.5,0.5,0.5",
             "--std", "0.25,0.25,0.25", "--resize", "10"]  # fmt: skip
    assert main([*argv, *flags, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["predictions"][0]["top"][0]["label"] == "blue"
    for bad, message in ((["--labels", str(tmp_path / "none.txt")], "cannot read labels file"),
                         (["--std", "1,0,1"], "--std must be positive"),
                         (["--resize", "0"], "--resize must be a positive integer"),
                         (["--labels", str(empty)], "holds no labels (one per line)"),
                         (["--layout", "HWC"], "invalid choice: 'HWC'")):  # fmt: skip
        assert main([*argv, "--output", "scores", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_a_non_square_input_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "wide.onnx")
    with pytest.raises(UserError, match="input is 8x16; annotate takes square"):
        annotate(tmp_path / "wide.onnx", tmp_path / "a.onnx")


def test_a_full_disk_leaves_no_file_and_the_old_output(two_outputs, tmp_path, monkeypatch):
    """Writing stops halfway (disk full): one line, no scratch or partial file, and an
    earlier annotated file of the same name is left as it was."""
    from pathlib import Path

    (tmp_path / "a.onnx").write_bytes(b"an older annotated file")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())

    def half_then_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(UserError, match="No space left on device"):
        annotate(two_outputs, tmp_path / "a.onnx")
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("command", "output_flags"),
    [("predict m.onnx i.png", {"--output", "--output-name"}),
     ("bench m.onnx", {"--output", "--output-name"}),
     ("serve m.onnx", {"--output", "--output-name"}),
     ("tune m.onnx -o plan.json", {"--output-name"}), ("annotate m.onnx -o a.onnx", {"--output"})],
)  # fmt: skip
def test_every_command_takes_the_override_flags_of_one_class(command, output_flags, tmp_path):
    """The override options of each command come from ModelOverrides' fields (tune's own
    --output is its plan, annotate's output flag is --output), and give back that class."""
    from convforge.cli import arguments, runtime, tune

    command, *required = command.split()
    parser = arguments.Parser(prog=command)
    {**runtime.PARSERS, **tune.PARSERS}[command](parser)
    flags = {flag for action in parser._actions if action.dest.startswith(arguments.OVERRIDE)
             for flag in action.option_strings}  # fmt: skip
    assert flags == {"--mean", "--std", "--resize", "--labels", "--layout", *output_flags}
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\n")
    output = sorted(output_flags)[-1]
    given = ["--labels", str(labels), "--mean", "0.5,0.5,0.5", "--resize", "10", output, "s"]
    args = parser.parse_args([*required, *given])
    assert arguments.model_overrides(args) == ModelOverrides(
        mean=(0.5, 0.5, 0.5), resize_size=10, classes=("red", "green"), output="s"
    )


def test_a_sibling_reads_the_file_with_the_same_overrides(two_outputs):
    """Overrides travel with the backend: a serve instance made by sibling() sees them too."""
    if not backends.backend_class("ort-cpu").available()[0]:
        pytest.skip("needs onnxruntime (the cpu extra)")
    given = ModelOverrides(output="scores", classes=("red", "green", "blue"))
    first = backends.create("ort-cpu", str(two_outputs), overrides=given).load()
    try:
        second = first.sibling()
        second.close()
    finally:
        first.close()
    assert second.info.output_name == "scores" and second.info.classes == ["red", "green", "blue"]
