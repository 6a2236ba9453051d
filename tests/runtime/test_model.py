"""The Model API and `convforge predict` over an exported digits model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convforge.builder.data.sources import load_dataset
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.trainer import train
from convforge.cli import main
from convforge.errors import UserError
from convforge.export import ExportOptions, export_checkpoint
from convforge.runtime import BackendUnavailable, load
from convforge.runtime.backends import AUTO_ORDER, backend_class

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A small ResNet trained 3 epochs on 16 px digits, exported (fp32 ONNX + .pt2)."""
    out = tmp_path_factory.mktemp("m")
    cfg = TrainConfig(input_size=16, epochs=3, out=str(out / "run"))
    train(recipe_model("resnet18", 16, options={"base_width": 8}), cfg, progress=False)
    export_checkpoint(out / "run" / "best.pt", out / "digits.onnx", ExportOptions(val_samples=32))
    return out / "digits.onnx"


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    """Raw validation digits as PNG files (8x8 gray, as scikit-learn ships them) and labels."""
    bundle = load_dataset("digits")
    folder = tmp_path_factory.mktemp("png")
    paths, labels = [], []
    for i in range(40):
        image = bundle.val.load(i).numpy()[0]
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
        labels.append(bundle.val.targets[i])
    return paths, labels


def test_predict_files_with_ort_cpu(digits_model, digit_images):
    paths, labels = digit_images
    with load(digits_model, backend="ort-cpu") as model:
        results = model.predict(paths, topk=3)
    assert len(results) == len(paths) and all(len(top) == 3 for top in results)
    for top in results:
        assert top[0].probability >= top[1].probability >= top[2].probability
        assert 0.0 <= top[2].probability and top[0].probability <= 1.0
    accuracy = np.mean([top[0].label == str(y) for top, y in zip(results, labels, strict=True)])
    assert accuracy >= 0.85  # the model scores about the same in training


def test_arrays_and_pil_images_give_the_same_answer(digits_model, digit_images):
    paths, _ = digit_images
    arrays = [np.asarray(Image.open(p)) for p in paths[:4]]
    pils = [Image.open(p) for p in paths[:4]]
    with load(digits_model, backend="ort-cpu", batch_size=3) as model:
        a = model.predict(arrays, topk=1)
        b = model.predict(pils, topk=1)
        c = model.predict(paths[:4], topk=1)
    assert [t[0].index for t in a] == [t[0].index for t in b] == [t[0].index for t in c]


def test_wrong_input_is_caught_before_the_backend(digits_model):
    with load(digits_model, backend="ort-cpu") as model:
        with pytest.raises(UserError, match="model takes 1-channel images"):
            model.logits(np.zeros((2, 3, 16, 16), np.float32))
        with pytest.raises(UserError, match="must be float32"):
            model.logits(np.zeros((2, 1, 16, 16), np.float64))
        with pytest.raises(UserError, match="topk must be a positive integer"):
            model.predict([np.zeros((8, 8), np.uint8)], topk=0)


def test_unknown_and_unavailable_backends_are_clear_errors(digits_model):
    with pytest.raises(UserError, match="unknown backend 'onnx'; choose one of: tensorrt, ort-trt"):
        load(digits_model, backend="onnx")
    for name in ("ort-cuda", "ort-trt", "tensorrt"):
        ok, why = backend_class(name).available()
        if not ok:
            with pytest.raises(BackendUnavailable, match=f"backend '{name}' is not available"):
                load(digits_model, backend=name)
    with load(digits_model, backend="auto") as model:
        assert model.backend.name in AUTO_ORDER


@pytest.mark.parametrize("backend", ["auto", "openvino"])
def test_logits_agree_with_ort_cpu_unless_told_otherwise(backend):
    """A file runs in its own precision: ``auto`` (OpenVINO first on x86 CPUs) and OpenVINO
    by name agree with ort-cpu on an fp32 file to 1e-4 relative (bf16, which OpenVINO
    picks by itself on CPUs with AMX or AVX512-BF16, was 0.6% off)."""
    for name in ("ort-cpu", "openvino" if backend == "openvino" else "ort-cpu"):
        ok, why = backend_class(name).available()
        if not ok:
            pytest.skip(why)
    path = FIXTURES / "digits.onnx"
    with load(path, backend="ort-cpu") as reference, load(path, backend=backend) as model:
        images = model.preprocess(sorted(FIXTURES.glob("digit-*.png")))
        noise = np.random.default_rng(0).normal(size=(26, *images.shape[1:]))
        batch = np.concatenate([images, noise.astype(np.float32)])
        want, got = reference.logits(batch), model.logits(batch)
        assert model.backend.precision == "fp32"
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_cli_predict(digits_model, digit_images, capsys):
    paths, _ = digit_images
    assert main(["predict", str(digits_model), *paths[:2], "--backend", "ort-cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backend"] == "ort-cpu" and record["precision"] == "fp32"
    assert len(record["predictions"]) == 2 and len(record["predictions"][0]["top"]) == 5
    assert main(["predict", str(digits_model), paths[0], "--topk", "2"]) == 0
    assert "%" in capsys.readouterr().out
    assert main(["predict", str(digits_model), "/no/such.png", "--backend", "ort-cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runtime_runs_without_torch(digits_model, digit_images):
    """DESIGN: convforge.runtime works where torch is absent (here: import blocked)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from convforge.runtime import load\n"
        f"m = load({str(digits_model)!r}, backend='ort-cpu')\n"
        f"print(m.predict([{digit_images[0][0]!r}], topk=1)[0][0].label)\n"
        "assert 'convforge.builder' not in sys.modules and 'convforge.export' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.strip() in [str(i) for i in range(10)]
