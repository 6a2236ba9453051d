"""ONNX files convforge did not export: torch's default names, a fixed batch, NHWC uint8 and
float16 inputs, engine failures. Every case runs through every backend available here."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from convforge.cli import main
from convforge.contract import read_info
from convforge.runtime import backends, bench, load
from convforge.runtime.backends import BACKENDS
from convforge.runtime.candidates import candidates
from convforge.runtime.preprocess import preprocess
from tests.helpers import skip_unless_available

pytestmark = pytest.mark.usefixtures("quiet_defaults")

# The CPU backends that run .onnx files (torch needs its .pt2 program, and says so).
ENGINES = [n for n in ("ort-cpu", "openvino") if n in BACKENDS]
CFG = bench.BenchConfig(batch_sizes=(1, 4), warmup_iters=1, warmup_seconds=0, iters=2, seconds=0)


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """A torchvision ResNet-18 (10 classes, 32 px) exported with torch.onnx's defaults
    (TorchScript exporter: input 'input.1', a numbered output, batch fixed at 1), and the
    same graph with its batch dimension made dynamic."""
    import torchvision

    folder = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    static = folder / "tv_static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(static), dynamo=False)
    graph = onnx.load(static)
    for value in (graph.graph.input[0], graph.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "n"
    dynamic = folder / "tv_dynamic.onnx"
    onnx.save(graph, dynamic)
    images = []
    for i in range(3):
        path = folder / f"img{i}.png"
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        images.append(path)
    return model, static, dynamic, images


def test_torch_default_names_and_fixed_batch_are_read(torchvision_files):
    _, static, dynamic, _ = torchvision_files
    info = read_info(static)
    assert info.input_name == "input.1" and info.output_name != "logits"
    assert info.spec.batch == 1 and read_info(dynamic).spec.batch is None
    assert info.mean == [0.485, 0.456, 0.406] and info.resize_size == 37  # 32 / 0.875
    assert info.classes == [] and info.precision == "fp32"


@pytest.mark.parametrize("name", ENGINES)
def test_predict_matches_torch_on_either_batch_dimension(name, torchvision_files):
    model, static, dynamic, images = torchvision_files
    skip_unless_available(name)
    x = preprocess(images, read_info(dynamic))  # ImageNet mean/std, resize 37, crop 32
    want = model(torch.from_numpy(x)).detach().numpy()
    tolerance = 1e-3 if name == "ort-cpu" else 5e-2  # OpenVINO may run bf16 on this CPU
    for path in (static, dynamic):
        with load(path, backend=name) as m:
            got = m.logits(m.preprocess(images))  # the fixed-batch file runs one at a time
            top = m.predict(images, topk=1)
        assert got.shape == (3, 10)
        assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
        assert [t[0].label for t in top] == [str(i) for i in want.argmax(1)]


@pytest.mark.parametrize("name", ENGINES)
def test_bench_skips_batch_sizes_a_fixed_batch_cannot_take(name, torchvision_files):
    _, static, dynamic, _ = torchvision_files
    skip_unless_available(name)
    records, skipped = bench.bench_matrix([str(static), str(dynamic)], [name], CFG)
    sizes = {(r["model"].rsplit("/", 1)[-1], r["batch_size"]) for r in records}
    assert sizes == {("tv_static.onnx", 1), ("tv_dynamic.onnx", 1), ("tv_dynamic.onnx", 4)}
    assert skipped == ["batch 4 on tv_static.onnx (its batch dimension is fixed at 1)"]


def test_tune_considers_only_the_sizes_a_file_takes(torchvision_files):
    _, static, _, _ = torchvision_files
    pool, skipped = candidates([str(static)], (1, 4), ["ort-cpu"])
    assert {c.batch_size for c in pool} == {1}
    assert "batch 4 on tv_static.onnx (its batch is fixed at 1)" in skipped


def test_tensorrt_candidates_on_a_fixed_batch_file_leave_the_profile_to_the_file(
    torchvision_files, monkeypatch
):
    # TensorRT builds a fixed-batch file for that batch alone; a tuned min/max batch would
    # be a conflicting option (a UserError), so tune does not offer one.
    _, static, _, _ = torchvision_files
    cls = backends.backend_class("tensorrt")
    monkeypatch.setattr(cls, "available", classmethod(lambda c: (True, "")))
    pool, _ = candidates([str(static)], (1,), ["tensorrt"])
    assert pool and all(
        not {"min_batch", "opt_batch", "max_batch"} & dict(c.options).keys() for c in pool
    )


def test_cli_bench_and_predict_on_a_torch_export(torchvision_files, capsys):
    _, static, _, images = torchvision_files
    assert main(["bench", str(static), "--backends", "ort-cpu", "--batch-sizes", "1,4"]) == 0
    out = capsys.readouterr()
    assert "skipped: batch 4 on tv_static.onnx (its batch dimension is fixed at 1)" in out.out
    assert main(["predict", str(static), *map(str, images), "--backend", "ort-cpu"]) == 0
    assert out.err.count("has no convforge metadata; using ImageNet mean/std") <= 1


def _pixel_mean_model(folder, dtype: int, name: str, layout: str = "NHWC"):
    """[N, 8, 8, 3] (or [N, 3, 8, 8]) of ``dtype`` -> [N, 3]: the mean of each channel, as a
    foreign file with its own names and no metadata (built with onnx.helper)."""
    shape = ["n", 8, 8, 3] if layout == "NHWC" else ["n", 3, 8, 8]
    nodes = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT)]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]))
    else:
        nodes.append(helper.make_node("Identity", ["f"], ["nchw"]))
    nodes += [
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pixel_mean",
        [helper.make_tensor_value_info("pixels", dtype, shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / name
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("name", ENGINES)
def test_nhwc_uint8_and_float16_inputs(name, tmp_path):
    skip_unless_available(name)
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    pixels[0, ..., 2] = 200  # image 0 is blue, image 1 red
    pixels[1, ..., 0] = 250
    images = list(pixels)
    nhwc = _pixel_mean_model(tmp_path, TensorProto.UINT8, "nhwc_uint8.onnx")
    half = _pixel_mean_model(tmp_path, TensorProto.FLOAT16, "nchw_fp16.onnx", layout="NCHW")
    assert read_info(nhwc).spec.layout == "NHWC" and read_info(half).spec.dtype == "float16"
    with load(nhwc, backend=name) as m:  # raw pixels in, mean pixel value out
        np.testing.assert_allclose(m.logits(m.preprocess(images)), [[0, 0, 200], [250, 0, 0]])
        assert [t[0].index for t in m.predict(images, topk=1)] == [2, 0]
    with load(half, backend=name) as m:  # normalized with ImageNet mean/std, cast to fp16
        batch = m.preprocess(images)
        assert batch.dtype == np.float16 and batch.shape == (2, 3, 8, 8)
        assert [t[0].index for t in m.predict(images, topk=1)] == [2, 0]
    records, skipped = bench.bench_matrix([str(nhwc), str(half)], [name], CFG)
    assert len(records) == 4 and skipped == []


@pytest.mark.parametrize("name", ENGINES)
def test_an_engine_failure_is_one_line(name, tmp_path, capsys):
    skip_unless_available(name)
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.com")],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("example.com", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, tmp_path / "broken.onnx")
    assert main(["bench", str(tmp_path / "broken.onnx"), "--backends", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and err.count("\n") == 1
    assert "broken.onnx" in err
