"""Dataset sources on small files written here: shapes, labels, pixels, and every error path."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convforge.builder.data.images import FileImageSet, TensorImageSet, stratified_split
from convforge.builder.data.sources import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    load_dataset,
    parse_spec,
    read_idx,
    to_channels,
)
from convforge.errors import UserError

# ---- specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("digits", ("digits", None)),
        ("synthetic", ("synthetic", None)),
        ("synthetic:classes=3,size=16", ("synthetic", "classes=3,size=16")),
        ("cifar10:/data/c", ("cifar10", "/data/c")),
        ("imagefolder:C:/data/x", ("imagefolder", "C:/data/x")),  # only the first colon splits
        (" mnist : /m ", ("mnist", "/m")),
        ("fashion-mnist:rel/path", ("fashion-mnist", "rel/path")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_parse_spec_unknown_kind_lists_datasets():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; choose one of: digits, "):
        parse_spec("imagenet:/data")
    assert DATASETS == (
        "digits", "synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist"
    )  # fmt: skip


@pytest.mark.parametrize("spec", ["imagefolder", "cifar10:", "mnist:  ", "cifar100"])
def test_parse_spec_missing_path(spec):
    with pytest.raises(UserError, match="needs a folder: use .*:PATH"):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["digits:/data", "digits:"])
def test_parse_spec_extra_path(spec):
    with pytest.raises(UserError, match="takes no path"):
        parse_spec(spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "val fraction must be between 0 and 1"),
        ({"val_fraction": 1.0}, "val fraction must be between 0 and 1"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
    ],
)
def test_load_dataset_checks_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_dataset("digits", **kwargs)


@pytest.mark.parametrize("kind", ["imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist"])
def test_missing_path_names_it_and_the_files_expected(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        load_dataset(f"{kind}:{missing}")
    message = str(err.value)
    assert f"folder {missing} does not exist; expected" in message
    expected = {
        "imagefolder": "PATH/<class>/<images>",
        "cifar10": "data_batch_1",
        "cifar100": "train, test, meta in PATH or PATH/cifar-100-python",
        "mnist": "train-images-idx3-ubyte",
        "fashion-mnist": "t10k-labels-idx1-ubyte",
    }[kind]
    assert expected in message
    assert "\n" not in message


def test_archive_instead_of_folder_says_extract(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match="is a file, not a folder \\(extract the archive first\\)"):
        load_dataset(f"cifar10:{archive}")


def test_to_channels_matches_pil():
    rgb = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    gray = to_channels(rgb, 1)
    assert gray.shape == (2, 1, 5, 7) and gray.dtype == torch.uint8
    for i in range(2):
        pil = Image.fromarray(rgb[i].permute(1, 2, 0).numpy()).convert("L")
        assert np.array_equal(gray[i, 0].numpy(), np.asarray(pil))
    back = to_channels(gray, 3)
    assert back.shape == (2, 3, 5, 7) and torch.equal(back[:, 2], gray[:, 0])
    assert to_channels(rgb, None) is rgb and to_channels(rgb, 3) is rgb


# ---- digits --------------------------------------------------------------------------------


def test_digits_shapes_split_and_pixels():
    from sklearn.datasets import load_digits

    bundle = load_dataset("digits")
    assert bundle.name == "digits" and bundle.classes == [str(d) for d in range(10)]
    assert (bundle.channels, bundle.native_size, bundle.flip_safe) == (1, 8, False)
    assert bundle.skipped == []
    assert len(bundle.train) + len(bundle.val) == 1797
    assert bundle.description == (
        "digits (scikit-learn): 1618 train / 179 val images, 10 classes, 1x8x8"
    )
    assert isinstance(bundle.train, TensorImageSet) and bundle.train.images.dtype == torch.uint8
    # Stratified: every class keeps ~10% in val.
    train_counts = np.bincount(bundle.train.targets, minlength=10)
    val_counts = np.bincount(bundle.val.targets, minlength=10)
    assert np.all(np.abs(val_counts / (train_counts + val_counts) - 0.1) < 0.01)
    # Pixels: 0..16 scaled to 0..255, in the split's order.
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    train_idx, val_idx = stratified_split(digits.target, 0.1, 0)
    assert np.array_equal(bundle.train.images[:, 0].numpy(), expected[train_idx])
    assert np.array_equal(bundle.val.images[:, 0].numpy(), expected[val_idx])
    assert bundle.val.targets == digits.target[val_idx].tolist()
    assert int(bundle.train.images.max()) == 255


def test_digits_split_is_seeded():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4, val_fraction=0.25)
    assert torch.equal(a.val.images, b.val.images) and a.val.targets == b.val.targets
    assert not torch.equal(a.val.images, load_dataset("digits", seed=4).val.images)
    assert abs(len(c.val) / 1797 - 0.25) < 0.01


def test_digits_as_rgb():
    bundle = load_dataset("digits", channels=3)
    assert bundle.channels == 3 and bundle.train.images.shape[1:] == (3, 8, 8)
    assert torch.equal(bundle.train.images[:, 0], bundle.train.images[:, 2])
    assert bundle.description.endswith("3x8x8")
    image, label = bundle.train[0]
    assert image.shape == (3, 8, 8) and isinstance(label, int)


# ---- synthetic -----------------------------------------------------------------------------


def test_synthetic_bundle():
    bundle = load_dataset("synthetic:classes=3,size=12,per_class=10", seed=1)
    assert (bundle.name, bundle.channels, bundle.native_size, bundle.flip_safe) == (
        "synthetic",
        3,
        12,
        True,
    )
    assert len(bundle.classes) == 3 and len(bundle.train) == 27 and len(bundle.val) == 3
    assert bundle.train.images.shape[1:] == (3, 12, 12)
    assert bundle.description.startswith(
        "synthetic (classes=3, size=12, per_class=10, channels=3, data_seed=0): 27 train / 3 val"
    )
    # Many classes use 45/135 deg stripes, which a horizontal flip swaps.
    assert not load_dataset("synthetic:classes=13,size=8,per_class=2").flip_safe


def test_synthetic_channels_argument():
    gray = load_dataset("synthetic:classes=2,size=8,per_class=4", channels=1)
    assert gray.channels == 1 and gray.train.images.shape[1] == 1
    same = load_dataset("synthetic:classes=2,size=8,per_class=4,channels=1", channels=1)
    assert torch.equal(gray.train.images, same.train.images)
    with pytest.raises(UserError, match="channels=3 contradicts channels 1"):
        load_dataset("synthetic:channels=3", channels=1)


# ---- ImageFolder ---------------------------------------------------------------------------


def _colour_image(seed: int, size=(6, 5)) -> np.ndarray:
    """An RGB image with distinct pixel values (a PNG round trip must keep them exactly)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _write_folder(root: Path, counts: dict[str, int], ext=".png", size=(6, 5), seed=0):
    """root/<class>/<i><ext>; returns {path: (pixels, class)}."""
    written = {}
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            if ext == ".png":
                pixels = _colour_image(seed, size)
            else:  # flat colours survive JPEG almost exactly
                pixels = np.full((size[1], size[0], 3), (seed * 37) % 256, dtype=np.uint8)
                pixels[..., 1] = (seed * 91) % 256
            path = root / name / f"{i}{ext}"
            Image.fromarray(pixels).save(path)
            written[str(path)] = (pixels, name)
    return written


def _check_items(image_set: FileImageSet, written: dict, atol: int = 0):
    assert isinstance(image_set, FileImageSet)
    for i, path in enumerate(image_set.paths):
        pixels, name = written[path]
        image, label = image_set[i]
        assert image.dtype == torch.uint8 and image.shape == (3, *pixels.shape[:2])
        diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - pixels.astype(int))
        assert diff.max() <= atol
        assert image_set.classes[label] == name


def test_imagefolder_split(tmp_path):
    written = _write_folder(tmp_path, {"cat": 10, "dog": 10, "emu": 6})
    bundle = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.2, seed=0)
    assert bundle.name == "imagefolder" and bundle.classes == ["cat", "dog", "emu"]
    assert (bundle.channels, bundle.native_size, bundle.flip_safe) == (3, None, True)
    assert len(bundle.train) + len(bundle.val) == 26
    assert np.bincount(bundle.val.targets).tolist() == [2, 2, 1]
    assert not set(bundle.train.paths) & set(bundle.val.paths)
    _check_items(bundle.train, written)
    _check_items(bundle.val, written)
    assert bundle.skipped == []
    assert bundle.description == (
        f"imagefolder ({tmp_path}): 21 train / 5 val images, 3 classes, 3 channels, mixed sizes"
    )
    again = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.2, seed=0)
    assert again.val.paths == bundle.val.paths


def test_imagefolder_train_val_jpeg_square(tmp_path):
    written = _write_folder(tmp_path / "train", {"b": 3, "a": 2}, ext=".jpg", size=(8, 8))
    written |= _write_folder(tmp_path / "val", {"a": 1, "b": 2}, ext=".JPEG", size=(8, 8))
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")  # ignored: extension
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # ignored: hidden
    bundle = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.5)
    assert bundle.classes == ["a", "b"]
    assert (len(bundle.train), len(bundle.val)) == (5, 3)  # the folders, not val_fraction
    assert bundle.native_size == 8
    assert bundle.description.startswith(f"imagefolder ({tmp_path}, train/val folders): 5 train")
    assert bundle.description.endswith("2 classes, 3x8x8")
    _check_items(bundle.train, written, atol=3)
    _check_items(bundle.val, written, atol=3)


def test_imagefolder_gray(tmp_path):
    written = _write_folder(tmp_path, {"x": 2, "y": 2})
    bundle = load_dataset(f"imagefolder:{tmp_path}", channels=1)
    assert bundle.channels == 1 and bundle.train.channels == 1
    image, label = bundle.train[0]
    pixels, _ = written[bundle.train.paths[0]]
    assert image.shape == (1, 5, 6)
    assert np.array_equal(image[0].numpy(), np.asarray(Image.fromarray(pixels).convert("L")))


def test_imagefolder_nested_files_belong_to_their_class(tmp_path):
    _write_folder(tmp_path / "x" / "deeper", {"more": 2})
    _write_folder(tmp_path, {"y": 2})
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert bundle.classes == ["x", "y"]
    assert sorted(bundle.train.targets + bundle.val.targets) == [0, 0, 1, 1]


def test_imagefolder_corrupt_files_are_skipped_and_listed(tmp_path):
    _write_folder(tmp_path, {"a": 4, "b": 4})
    bad = [tmp_path / "a" / "broken.png", tmp_path / "b" / "garbage.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    bad[1].write_bytes(b"this is not a jpeg")
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert sorted(bundle.skipped) == sorted(str(p) for p in bad)
    assert len(bundle.train) + len(bundle.val) == 8
    assert bundle.description.endswith("; skipped 2 unreadable files")


def test_imagefolder_only_corrupt_files_in_a_class(tmp_path):
    _write_folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=f"class folder {tmp_path / 'b'} has no readable images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_empty_class_folder(tmp_path):
    _write_folder(tmp_path, {"a": 2})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match=f"class folder {tmp_path / 'empty'} has no image files"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_mismatched_train_val_classes(tmp_path):
    _write_folder(tmp_path / "train", {"a": 2, "b": 2})
    _write_folder(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(UserError) as err:
        load_dataset(f"imagefolder:{tmp_path}")
    assert str(err.value) == (
        f"imagefolder: class folders differ: {tmp_path / 'train'} has [a, b]"
        f" but {tmp_path / 'val'} has [a, c]"
    )


def test_imagefolder_train_without_val(tmp_path):
    _write_folder(tmp_path / "train", {"a": 2})
    with pytest.raises(UserError, match="found .*train but no .*val; give both or neither"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_without_class_folders(tmp_path):
    Image.fromarray(_colour_image(0)).save(tmp_path / "loose.png")
    with pytest.raises(UserError, match="has no class folders; expected PATH/<class>/<images>"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_too_few_images_to_split(tmp_path):
    _write_folder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(UserError, match="too few images to hold out a validation split"):
        load_dataset(f"imagefolder:{tmp_path}")


# ---- CIFAR ---------------------------------------------------------------------------------


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj, protocol: int, numpy1: bool = False):
    data = pickle.dumps(obj, protocol=protocol)
    if numpy1:  # the module name numpy 1.x (which wrote the real files) used
        assert protocol == 2
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def _write_cifar10(folder: Path, py2_style: bool = True) -> dict:
    """Batches like the real ones: bytes keys and names (as Python 2 wrote them), protocol 2."""
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s.encode()) if py2_style else (lambda s: s)
    names = [f"class{i}" for i in range(10)]
    _dump(folder / "batches.meta", {key("label_names"): [key(n) for n in names]}, 2)
    parts = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        rows, labels = _cifar_rows(3, i), [(i + k) % 10 for k in range(3)]
        batch = {key("data"): rows, key("labels"): labels, key("batch_label"): key(name)}
        _dump(folder / name, batch, 2, numpy1=py2_style)
        parts[name] = (rows, labels)
    return {"names": names, "parts": parts}


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10(tmp_path, subfolder):
    written = _write_cifar10(tmp_path / subfolder if subfolder else tmp_path)
    bundle = load_dataset(f"cifar10:{tmp_path}")
    assert bundle.name == "cifar10" and bundle.classes == written["names"]
    assert (bundle.channels, bundle.native_size, bundle.flip_safe) == (3, 32, True)
    assert bundle.train.images.shape == (15, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    assert len(bundle.val) == 3
    rows = np.concatenate([written["parts"][f"data_batch_{j}"][0] for j in range(1, 6)])
    labels = sum((written["parts"][f"data_batch_{j}"][1] for j in range(1, 6)), [])
    assert bundle.train.targets == labels
    assert np.array_equal(bundle.train.images.reshape(15, -1).numpy(), rows)
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    assert bundle.train.images[4, 1, 2, 3] == rows[4, 1024 + 2 * 32 + 3]
    test_rows, test_labels = written["parts"]["test_batch"]
    assert np.array_equal(bundle.val.images.reshape(3, -1).numpy(), test_rows)
    assert bundle.val.targets == test_labels
    folder = tmp_path / subfolder if subfolder else tmp_path
    assert bundle.description == (
        f"cifar10 ({folder}): 15 train / 3 val images, 10 classes, 3x32x32"
    )


def test_cifar10_gray(tmp_path):
    _write_cifar10(tmp_path, py2_style=False)
    bundle = load_dataset(f"cifar10:{tmp_path}", channels=1)
    assert bundle.channels == 1 and bundle.val.images.shape == (3, 1, 32, 32)


@pytest.mark.filterwarnings("error")  # e.g. torch's warning about a read-only numpy array
@pytest.mark.parametrize("subfolder", ["", "cifar-100-python"])
def test_cifar100_fine_labels(tmp_path, subfolder):
    folder = tmp_path / subfolder
    folder.mkdir(exist_ok=True)
    names = [f"fine{i}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20}, 5)
    train_rows, test_rows = _cifar_rows(4, 1), _cifar_rows(2, 2)
    fine, coarse = [99, 0, 42, 7], [19, 0, 1, 2]
    _dump(folder / "train", {"data": train_rows, "fine_labels": fine, "coarse_labels": coarse}, 4)
    _dump(folder / "test", {"data": test_rows, "fine_labels": np.array([3, 5])}, 5)
    bundle = load_dataset(f"cifar100:{tmp_path}")
    assert bundle.classes == names and bundle.train.targets == fine
    assert bundle.val.targets == [3, 5]
    assert np.array_equal(bundle.train.images.reshape(4, -1).numpy(), train_rows)
    assert np.array_equal(bundle.val.images.reshape(2, -1).numpy(), test_rows)


def test_cifar_missing_files_are_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(UserError) as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert str(err.value).startswith(f"cifar10: {folder} lacks data_batch_3, test_batch; expected")
    with pytest.raises(UserError, match="lacks train, test, meta; expected train, test, meta in"):
        load_dataset(f"cifar100:{tmp_path}")


class _Exploit:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("target", ["batches.meta", "data_batch_2"])
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_cifar_refuses_forbidden_globals(tmp_path, target, payload):
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Exploit(marker) if payload == "system" else _Eval()
    _dump(tmp_path / target, {b"data": evil, b"labels": [], b"label_names": evil}, 2)
    with pytest.raises(UserError) as err:
        load_dataset(f"cifar10:{tmp_path}")
    message = str(err.value)
    assert f"{tmp_path / target} is not a CIFAR python batch" in message
    assert (".system," if payload == "system" else "__builtin__.eval,") in message
    assert not marker.exists()
    if payload == "system":  # control: a plain unpickler does run the payload
        pickle.loads((tmp_path / target).read_bytes())
        assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"definitely not a pickle", "is not a CIFAR python batch \\(UnpicklingError"),
        (pickle.dumps([1, 2, 3]), "is not a CIFAR python batch \\(holds list\\)"),
        (pickle.dumps({"labels": [0]}), "no uint8 'data' rows"),
        (pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}), "expected 3072"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 integer"),
        (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}), "range 10..10"),
    ],
)
def test_cifar_malformed_batch(tmp_path, content, message):
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_4").write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert str(tmp_path / "data_batch_4") in str(err.value)


# ---- MNIST ---------------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    magic = 0x00000803 if array.ndim == 3 else 0x00000801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool, n_train=6, n_test=3, side=7) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(_idx(array))
        else:
            (folder / name).write_bytes(_idx(array))
    return arrays


@pytest.mark.parametrize(
    "kind, subfolder, gz",
    [
        ("mnist", "", False),
        ("mnist", "raw", True),
        ("fashion-mnist", "raw", False),
        ("fashion-mnist", "FashionMNIST/raw", True),
    ],
)
def test_mnist(tmp_path, kind, subfolder, gz):
    arrays = _write_mnist(tmp_path / subfolder, gz)
    bundle = load_dataset(f"{kind}:{tmp_path}")
    assert bundle.name == kind and bundle.channels == 1 and bundle.native_size == 7
    assert bundle.flip_safe == (kind == "fashion-mnist")
    expected = FASHION_MNIST_CLASSES if kind == "fashion-mnist" else [str(d) for d in range(10)]
    assert bundle.classes == expected and len(bundle.classes) == 10
    assert bundle.train.images.shape == (6, 1, 7, 7) and bundle.train.images.dtype == torch.uint8
    assert np.array_equal(bundle.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(bundle.val.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert bundle.train.targets == arrays["train-labels-idx1-ubyte"].tolist()
    assert bundle.val.targets == [0, 3, 6]
    assert bundle.description == (
        f"{kind} ({tmp_path / subfolder if subfolder else tmp_path}):"
        " 6 train / 3 val images, 10 classes, 1x7x7"
    )


def test_mnist_as_rgb(tmp_path):
    _write_mnist(tmp_path, gz=False)
    bundle = load_dataset(f"mnist:{tmp_path}", channels=3)
    assert bundle.train.images.shape == (6, 3, 7, 7) and bundle.channels == 3


def test_mnist_missing_files_are_named(tmp_path):
    _write_mnist(tmp_path / "raw", gz=True)
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="raw lacks t10k-labels-idx1-ubyte; expected train-images"):
        load_dataset(f"mnist:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"mnist: no IDX files in {empty}; expected"):
        load_dataset(f"mnist:{empty}")


def _corrupt(tmp_path: Path, name: str, content: bytes, gz: bool = False):
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / name
    if gz:
        path.unlink()
        path = tmp_path / (name + ".gz")
    path.write_bytes(content)
    return path


def test_mnist_bad_magic(tmp_path):
    labels = _idx(np.zeros(6, np.uint8))
    path = _corrupt(tmp_path, "train-images-idx3-ubyte", labels)  # a label file in its place
    with pytest.raises(UserError) as err:
        load_dataset(f"mnist:{tmp_path}")
    assert str(err.value) == (
        f"{path} is not an IDX images file: magic number 0x00000801, expected 0x00000803"
    )


def test_mnist_truncated_data(tmp_path):
    full = _idx(np.zeros((6, 7, 7), np.uint8))
    path = _corrupt(tmp_path, "train-images-idx3-ubyte", full[:-10])
    with pytest.raises(
        UserError, match=f"{path} is truncated: 284 data bytes for dimensions 6x7x7"
    ):
        load_dataset(f"mnist:{tmp_path}")


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08", b"\x00\x00\x08\x03\x00\x00"])
def test_mnist_truncated_header(tmp_path, content):
    path = _corrupt(tmp_path, "t10k-images-idx3-ubyte", content)
    with pytest.raises(UserError, match=str(path)):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_bad_gzip(tmp_path):
    path = _corrupt(tmp_path, "train-labels-idx1-ubyte", b"not gzip at all", gz=True)
    with pytest.raises(UserError, match=f"cannot read IDX file {path}"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_count_mismatch(tmp_path):
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", _idx(np.zeros(5, np.uint8)))
    with pytest.raises(UserError, match="holds 3 images but .*t10k-labels-idx1-ubyte holds 5"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_label_out_of_range(tmp_path):
    _corrupt(tmp_path, "t10k-labels-idx1-ubyte", _idx(np.array([0, 1, 12], np.uint8)))
    with pytest.raises(UserError, match="label 12 is out of range 0..9"):
        load_dataset(f"mnist:{tmp_path}")


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
    array = read_idx(path, 0x00000803)
    assert array.shape == (2, 3, 4) and array.flags.writeable
    assert array[1, 2, 3] == 23
