"""export_onnx and `convforge export` / `inspect` end to end on a tiny trained checkpoint."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from convforge import contract
from convforge.builder import create_model
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.trainer import train
from convforge.cli import main
from convforge.contract import PT2_METADATA
from convforge.errors import UserError
from convforge.export import export_onnx
from convforge.export.exporter import ExportOptions, export_checkpoint
from tests.helpers import with_bn_statistics


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ResNet-18 (base width 8) trained 2 epochs on 16 px digits: real BN statistics."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(input_size=16, epochs=2, out=str(out))
    train(recipe_model("resnet18", 16, options={"base_width": 8}), cfg, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    model = create_model("plain", depth=1, width=4, num_classes=2, stem="small").eval()
    export_onnx(model, path, input_size=(3, 8, 8))
    return path


def test_export_onnx_folds_every_bn_and_matches_at_another_batch_size(tmp_path):
    model = with_bn_statistics(create_model("vgg11_bn", num_classes=5, stem="small"))
    report = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert report.batchnorm_nodes == 0 and report.fold.kept == 0 and report.fold.folded == 8
    assert report.validation.passed
    assert {r.batch_size for r in report.validation.runs} == {1, 8}
    assert {r.graph_optimization for r in report.validation.runs} == {"disabled", "all"}
    # Validate independently, at a batch size neither export nor validation used.
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert graph.input[0].name == "input" and graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_pt2_program_runs_without_builder_code(tmp_path):
    model = with_bn_statistics(create_model("resnet18", num_classes=3, stem="small", base_width=8))
    export_onnx(
        model, tmp_path / "m.onnx", input_size=(3, 16, 16), metadata={"convforge.arch": "x"}
    )
    extra = {PT2_METADATA: ""}
    program = torch.export.load(tmp_path / "m.pt2", extra_files=extra)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)
    assert json.loads(extra[PT2_METADATA])["convforge.arch"] == "x"


def test_export_checkpoint_writes_metadata_and_report(checkpoint, tmp_path):
    out = tmp_path / "digits.onnx"
    report = export_checkpoint(checkpoint, out, ExportOptions(val_samples=64))
    assert report.validation.source == "dataset" and report.validation.samples == 64
    assert report.validation.reference_accuracy == report.validation.onnx_accuracy
    info = contract.read_info(out).metadata
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["channels"] == 1 and info["input_size"] == 16 and info["precision"] == "fp32"
    assert info["folded_bn"] == report.fold.folded > 0
    assert info["source_sha256"] == contract.sha256_of(checkpoint)
    assert info["dataset"] == {"spec": "digits", "val_fraction": 0.1, "seed": 0}
    saved = json.loads(out.with_suffix(".export.json").read_text())
    assert saved["validation"]["passed"] and saved["batchnorm_nodes"] == 0


def test_failed_validation_writes_nothing(tmp_path, monkeypatch):
    import convforge.export.validate as validate

    monkeypatch.setattr(validate, "FP32_REL_TOL", -1.0)  # nothing can pass
    model = create_model("plain", depth=2, width=8, num_classes=3, stem="small").eval()
    with pytest.raises(UserError, match="fp32 export failed validation, m.onnx not written"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_the_validated_logits_come_from_the_runtime_backend(tmp_path, monkeypatch):
    from convforge.runtime.backends.ort import OrtCpu

    real_run = OrtCpu._run
    monkeypatch.setattr(OrtCpu, "_run", lambda self, batch: real_run(self, batch) + 1.0)
    model = create_model("plain", depth=2, width=8, num_classes=3, stem="small").eval()
    with pytest.raises(UserError, match="fp32 export failed validation, m.onnx not written"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_the_written_metadata_is_read_back(tmp_path, monkeypatch):
    import convforge.export.exporter as exporter

    def lossy(model):  # a writer bug: the metadata never reaches the file
        del model.metadata_props[:]
        return model.SerializeToString()

    monkeypatch.setattr(exporter, "serialize", lossy)
    model = create_model("plain", depth=2, width=8, num_classes=3, stem="small").eval()
    metadata = contract.metadata(
        arch="plain", classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.2] * 3,
        input_size=8, resize_size=8, channels=3, source_sha256="0" * 64,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="metadata read back differs from what was written"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 8, 8), metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_inspect(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "-o", str(out), "--val-samples", "32"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "folded into" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["batchnorm_nodes"] == 0 and info["opsets"]["ai.onnx"] == 18
    assert info["inputs"][0]["shape"] == ["batch", 1, 16, 16]
    assert info["metadata"]["arch"] == "resnet18" and info["parameters"] > 0
    assert main(["inspect", str(out)]) == 0
    assert "BatchNormalization: 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "{missing}", "-o", "{tmp}/m.onnx"], "does not exist"),
        (["export", "{ckpt}", "-o", "{tmp}/no/dir/m.onnx"], "does not exist"),
        (["export", "{ckpt}", "-o", "{tmp}/m.txt"], "must end in .onnx"),
        (["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--opset", "11"], "opset must be between"),
        (
            ["export", "{ckpt}", "-o", "{tmp}/m.onnx", "--input-format", "bgr"],
            "unknown --input-format 'bgr'; choose one of: float32, uint8",
        ),
        (["export", "{junk}", "-o", "{tmp}/m.onnx"], "is not a readable PyTorch file"),
        (["inspect", "{junk}"], "is not a readable ONNX model"),
        (["inspect", "{truncated}"], "is not a readable ONNX model"),
        (["inspect", "{missing}"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_file(
    argv, message, checkpoint, small_onnx, tmp_path, capsys
):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(small_onnx.read_bytes()[:100])
    names = {
        "missing": tmp_path / "nope",
        "tmp": tmp_path,
        "ckpt": checkpoint,
        "junk": junk,
        "truncated": truncated,
    }
    before = set(tmp_path.iterdir())
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and message in err and err.count("\n") == 1
    assert set(tmp_path.iterdir()) == before  # no partial files


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_precision_variants_and_triton_repo(checkpoint, tmp_path, target):
    out = tmp_path / "m.onnx"
    opts = ExportOptions(
        fp16=True,
        int8=True,
        int8_target=target,
        calib_samples=128,
        triton_repo=str(tmp_path / "repo"),
    )
    report = export_checkpoint(checkpoint, out, opts)
    assert set(report.variants) == {"fp16", "int8"}
    fp16, int8 = (report.variants[p]["report"] for p in ("fp16", "int8"))
    assert fp16.passed and min(r.top1_agreement for r in fp16.runs) >= 0.99
    assert int8.passed and int8.reference_accuracy - int8.onnx_accuracy <= 0.01
    assert int8.accuracy_run == ("disabled" if target == "tensorrt" else "all")
    info = contract.read_info(out.with_suffix(".int8.onnx")).metadata
    assert info["precision"] == "int8" and info["int8_target"] == target
    assert info["classes"] == [str(i) for i in range(10)]
    assert contract.read_info(out.with_suffix(".fp16.onnx")).precision == "fp16"
    model_dir = tmp_path / "repo" / "m"
    assert (model_dir / "config.pbtxt").exists() and (model_dir / "1" / "model.onnx").exists()
    assert (model_dir / "labels.txt").read_text().split() == [str(i) for i in range(10)]


def test_checkpoint_of_an_unknown_architecture(checkpoint, tmp_path):
    from convforge.builder.checkpoint import save_checkpoint

    payload = torch.load(checkpoint, weights_only=True)  # the file's dict, to edit
    payload["model_config"]["arch"] = "resnet19"
    save_checkpoint(tmp_path / "odd.pt", payload)
    with pytest.raises(UserError, match="unknown model 'resnet19'; choose one of"):
        export_checkpoint(tmp_path / "odd.pt", tmp_path / "m.onnx", ExportOptions())
    assert not (tmp_path / "m.onnx").exists()


def test_uint8_input_variants_match_their_float_twins(checkpoint, tmp_path):
    from convforge.export.input_format import normalized
    from convforge.runtime import load

    out = tmp_path / "m.onnx"
    opts = ExportOptions(int8=True, calib_samples=64, val_samples=64, input_format="uint8")
    report = export_checkpoint(checkpoint, out, opts)
    assert set(report.variants) == {"int8", "fp32.uint8", "int8.uint8"}
    paths = {k: v["path"] for k, v in report.variants.items()}
    assert paths["fp32.uint8"] == str(tmp_path / "m.uint8.onnx")
    assert paths["int8.uint8"] == str(tmp_path / "m.int8.uint8.onnx")
    fp32 = report.variants["fp32.uint8"]["report"]
    assert fp32.passed and fp32.source == "dataset" and fp32.samples == 64
    assert max(r.max_rel_diff for r in fp32.runs) <= 1e-5  # exact pixels: float rounding only
    assert report.variants["int8.uint8"]["report"].passed
    for name in ("m.uint8.onnx", "m.int8.uint8.onnx"):
        info = contract.read_info(tmp_path / name)
        assert info.input_format == "uint8" and info.spec.shape(1) == (1, 16, 16, 1)
    assert json.loads(out.with_suffix(".export.json").read_text())["variants"]["int8.uint8"]
    pixels = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    with load(out, "ort-cpu") as f, load(tmp_path / "m.uint8.onnx", "ort-cpu") as u:
        want = f.logits(normalized(pixels, f.info.mean, f.info.std))
        assert np.abs(u.logits(pixels) - want).max() <= 1e-5 * np.abs(want).max()


def _tree(folder) -> dict:
    """Every path under ``folder`` (hidden ones included) -> its bytes (None: a folder)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


# Each step of an export, made to fail: (what to patch, the options that reach it).
FAILING_STEPS = {
    "pt2 program": ("convforge.export.exporter.save_program", {}),
    "fp16": ("convforge.export.precision.to_fp16", {"fp16": True}),
    "fp16 validation": ("convforge.export.validate.FP16_MIN_AGREEMENT", {"fp16": True}),
    "int8": ("convforge.export.int8_accuracy.int8_within_budget", {"int8": True}),
    "uint8": ("convforge.export.input_format.to_uint8_input", {"input_format": "uint8"}),
    "triton": ("convforge.export.triton._config_text", {"fp16": True, "triton_repo": "repo"}),
    "report": (
        "convforge.export.exporter.ExportReport.as_dict",
        {"fp16": True, "input_format": "uint8", "triton_repo": "repo"},
    ),
}


@pytest.mark.parametrize("step", list(FAILING_STEPS))
def test_a_failing_step_leaves_no_new_file_and_every_old_one(step, checkpoint, tmp_path,
                                                             monkeypatch):  # fmt: skip
    """All or nothing: whichever step fails, the export's files, new or replacing older
    ones, appear together or not at all (an older export of the same name stays whole)."""
    target, options = FAILING_STEPS[step]
    out = tmp_path / "m.onnx"
    for name in ("m.onnx", "m.pt2", "m.fp16.onnx", "m.export.json", "repo/m/config.pbtxt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"an older {name}")
    before = _tree(tmp_path)
    if options.get("triton_repo"):
        options = {**options, "triton_repo": str(tmp_path / "repo")}
    opts = ExportOptions(val_samples=32, calib_samples=32, **options)
    monkeypatch.setattr(target, 2.0 if target.endswith("AGREEMENT") else _boom)
    with pytest.raises((OSError, UserError)):
        export_checkpoint(checkpoint, out, opts)
    assert _tree(tmp_path) == before


@pytest.fixture(scope="module")
def moved_dataset(tmp_path_factory):
    """(checkpoint, folder): a tiny model trained on ``imagefolder:<folder>/data``, whose
    images have since moved to ``<folder>/moved``."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("moved")
    rng = np.random.default_rng(0)
    for c in range(3):
        (folder / "data" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "data" / f"c{c}" / f"{i}.png")
    cfg = TrainConfig(dataset=f"imagefolder:{folder / 'data'}", input_size=16, epochs=1,
                      batch_size=8, out=str(folder / "run"))  # fmt: skip
    model = recipe_model("plain", 16, options={"depth": 1, "width": 4})
    train(model, cfg, progress=False)
    (folder / "data").rename(folder / "moved")
    return folder / "run" / "best.pt", folder


@pytest.mark.parametrize("flag", ["--fp16", "--int8"])
def test_a_moved_dataset_is_one_line_naming_it_and_dataset(flag, moved_dataset, tmp_path, capsys):
    checkpoint, folder = moved_dataset
    (tmp_path / "m.onnx").write_text("an older export")
    before = _tree(tmp_path)
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convforge: error: {flag} needs the checkpoint's dataset")
    assert f"folder {folder / 'data'} does not exist" in err
    assert "pass --dataset imagefolder:PATH" in err and err.count("\n") == 1
    assert _tree(tmp_path) == before


def test_dataset_points_export_at_the_moved_images(moved_dataset, tmp_path):
    checkpoint, folder = moved_dataset
    out = tmp_path / "m.onnx"
    report = out.with_suffix(".export.json")
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0  # plain fp32: random inputs
    assert json.loads(report.read_text())["validation"]["source"] == "random"
    spec = f"imagefolder:{folder / 'moved'}"
    assert main(["export", str(checkpoint), "-o", str(out), "--dataset", spec]) == 0
    assert json.loads(report.read_text())["validation"]["source"] == "dataset"
    assert contract.read_info(out).metadata["dataset"]["spec"] == spec


def test_dataset_with_other_classes_is_refused(moved_dataset, tmp_path, capsys):
    checkpoint, folder = moved_dataset
    other = tmp_path / "other"
    for name in ("c0", "c1", "x"):
        (other / name).mkdir(parents=True)
        for f in (folder / "moved" / "c0").iterdir():
            (other / name / f.name).write_bytes(f.read_bytes())
    argv = ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--fp16",
            "--dataset", f"imagefolder:{other}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has classes [c0, c1, x], but the checkpoint was trained on [c0, c1, c2]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
