"""``--dataset`` specs turned into train and validation ImageSets. Nothing is ever downloaded.

A spec is ``KIND`` or ``KIND:ARG`` (see :data:`DATASETS`):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (the default).
* ``synthetic`` or ``synthetic:key=value,...``: procedural images (:mod:`.synthetic`).
* ``imagefolder:PATH``: ``PATH/<class>/<images>``, or ``PATH/train/<class>/...`` and
  ``PATH/val/<class>/...``.
* ``cifar10:PATH``, ``cifar100:PATH``: the "python version" pickle batches.
* ``mnist:PATH``, ``fashion-mnist:PATH``: the four IDX files, optionally gzipped.

:func:`load_dataset` returns a :class:`DataBundle`. Datasets without a test
part (digits, synthetic, a single ImageFolder) get a seeded stratified split;
the test part of CIFAR and MNIST is the validation split. Every problem a user
can fix (a missing file, a malformed one, a bad spec) is a one-line UserError.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from convforge.builder.data import synthetic
from convforge.builder.data.images import (
    FileImageSet,
    ImageSet,
    TensorImageSet,
    stratified_split,
)
from convforge.errors import UserError, check_choice

DATASETS = ("digits", "synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist")
_NEEDS_PATH = ("imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist")
_NO_ARG = ("digits",)  # (synthetic's ARG is optional: key=value options, not a path)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class DataBundle:
    """A dataset ready for training: the two splits and what the trainer needs to know."""

    name: str  # the spec's kind, e.g. "digits", "imagefolder"
    train: ImageSet
    val: ImageSet
    classes: list[str]
    channels: int  # 1 or 3
    native_size: int | None  # side in px when every image is square and the same size, else None
    flip_safe: bool  # do horizontal flips keep the label's meaning? (not for digits or MNIST)
    description: str  # one line for logs: source, split sizes, classes, image shape
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped (ImageFolder)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/data/c"`` -> ``("cifar10", "/data/c")``, ``"digits"`` -> ``("digits", None)``.

    The kind is everything before the first ``:`` (so a PATH may contain
    colons). UserError for an unknown kind, a missing PATH, or an ARG where
    the kind takes none.
    """
    kind, sep, arg = spec.strip().partition(":")
    kind, arg = kind.strip(), arg.strip()
    check_choice("dataset", kind, DATASETS)
    if kind in _NEEDS_PATH and not arg:
        raise UserError(f"dataset {kind!r} needs a folder: use {kind}:PATH")
    if kind in _NO_ARG and sep:
        raise UserError(f"dataset {kind!r} takes no path or options, got {spec!r}; use {kind}")
    return kind, (arg or None)


def load_dataset(
    spec: str, *, val_fraction: float = 0.1, seed: int = 0, channels: int | None = None
) -> DataBundle:
    """Load the dataset ``spec`` names (see the module docstring) from local files.

    ``val_fraction`` and ``seed`` shape the stratified split of datasets
    without a test part. ``channels`` (1 or 3) is the channel count of the
    images delivered: None keeps the dataset's own (ImageFolder: 3), 1 turns
    colour into gray (PIL's "L" weights), 3 repeats gray into RGB.
    """
    kind, arg = parse_spec(spec)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels!r}")
    if kind == "digits":
        return _load_digits(val_fraction, seed, channels)
    if kind == "synthetic":
        return _load_synthetic(arg, val_fraction, seed, channels)
    path = Path(arg).expanduser()
    if kind == "imagefolder":
        return _load_imagefolder(path, val_fraction, seed, channels or 3)
    if kind in ("cifar10", "cifar100"):
        return _load_cifar(kind, path, channels)
    return _load_mnist(kind, path, channels)


# ---- shared helpers ----------------------------------------------------------------------


def to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` with ``channels`` channels (None: unchanged).

    Gray to RGB repeats the plane; RGB to gray uses PIL's integer luma
    formula, so a converted tensor equals ``Image.convert("L")`` exactly.
    """
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    rgb = images.to(torch.int32)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(1)


def _shape_text(channels: int, native_size: int | None) -> str:
    if native_size is None:
        return f"{channels} channels, mixed sizes"
    return f"{channels}x{native_size}x{native_size}"


def _describe(kind: str, source: str, train: ImageSet, val: ImageSet, shape: str) -> str:
    return (
        f"{kind} ({source}): {len(train)} train / {len(val)} val images, "
        f"{len(train.classes)} classes, {shape}"
    )


def _tensor_bundle(
    kind: str,
    source: str,
    train: TensorImageSet,
    val: TensorImageSet,
    flip_safe: bool,
) -> DataBundle:
    """A bundle of two in-memory sets (square images of one size)."""
    _, channels, height, width = train.images.shape
    native = height if height == width else None
    shape = f"{channels}x{height}x{width}"
    return DataBundle(
        name=kind,
        train=train,
        val=val,
        classes=train.classes,
        channels=channels,
        native_size=native,
        flip_safe=flip_safe,
        description=_describe(kind, source, train, val, shape),
    )


def _split_bundle(
    kind: str,
    source: str,
    images: torch.Tensor,
    labels: Sequence[int],
    classes: list[str],
    val_fraction: float,
    seed: int,
    flip_safe: bool,
) -> DataBundle:
    """Split one labelled tensor into train and val by a seeded stratified split."""
    everything = TensorImageSet(images, labels, classes)
    train_idx, val_idx = stratified_split(everything.targets, val_fraction, seed)
    return _tensor_bundle(
        kind, source, everything.subset(train_idx), everything.subset(val_idx), flip_safe
    )


def _missing_folder(kind: str, path: Path, expected: str) -> UserError:
    """The error for a PATH that is not a folder, naming what belongs there."""
    if path.is_file():
        hint = " (extract the archive first)" if path.name.endswith((".tar.gz", ".tgz")) else ""
        return UserError(f"{kind}: {path} is a file, not a folder{hint}; expected {expected}")
    return UserError(f"{kind}: folder {path} does not exist; expected {expected}")


# ---- digits and synthetic ----------------------------------------------------------------


def _load_digits(val_fraction: float, seed: int, channels: int | None) -> DataBundle:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloaded

    digits = load_digits()
    # Values are 0..16; scale to 0..255 the same way for every pixel.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    return _split_bundle(
        "digits",
        "scikit-learn",
        to_channels(images, channels),
        digits.target.tolist(),
        [str(d) for d in range(10)],
        val_fraction,
        seed,
        flip_safe=False,  # a mirrored 2, 3 or 7 is not that digit
    )


def _load_synthetic(
    options_text: str | None, val_fraction: float, seed: int, channels: int | None
) -> DataBundle:
    options = synthetic.parse_options(options_text, channels=channels)
    pixels, labels, classes = synthetic.generate(options)
    return _split_bundle(
        "synthetic",
        options.describe(),
        torch.from_numpy(pixels),
        labels.tolist(),
        classes,
        val_fraction,
        seed,
        flip_safe=synthetic.flip_safe(options.classes),
    )


# ---- ImageFolder -------------------------------------------------------------------------

_FOLDER_LAYOUT = "PATH/<class>/<images> or PATH/train/<class>/... and PATH/val/<class>/..."


def _visible(name: str) -> bool:
    # Hidden entries (.ipynb_checkpoints, macOS ._* files) are never classes or images.
    return not name.startswith(".")


def _class_folders(root: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


def _image_files(folder: Path) -> list[str]:
    """Image files (by extension) anywhere under ``folder``, in a stable order."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += [
            os.path.join(parent, f)
            for f in sorted(files)
            if _visible(f) and has_file_allowed_extension(f, IMG_EXTENSIONS)
        ]
    return found


def _image_size(path: str) -> tuple[int, int] | None:
    """``(width, height)`` if PIL can open and verify the file, else None."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except Exception:  # any failure to parse an untrusted file means "unreadable"
        return None


@dataclass
class _Scan:
    """The readable images of one ImageFolder root."""

    paths: list[str]
    targets: list[int]
    sizes: set[tuple[int, int]]  # distinct (width, height) seen
    skipped: list[str]  # files with an image extension that PIL could not read


def _scan(root: Path, classes: list[str]) -> _Scan:
    scan = _Scan([], [], set(), [])
    for label, name in enumerate(classes):
        folder = root / name
        files = _image_files(folder)
        if not files:
            raise UserError(
                f"imagefolder: class folder {folder} has no image files"
                f" ({', '.join(IMG_EXTENSIONS)})"
            )
        readable = 0
        for path in files:
            size = _image_size(path)
            if size is None:
                scan.skipped.append(path)
                continue
            scan.paths.append(path)
            scan.targets.append(label)
            scan.sizes.add(size)
            readable += 1
        if not readable:
            raise UserError(
                f"imagefolder: class folder {folder} has no readable images"
                f" ({len(files)} unreadable)"
            )
    return scan


def _classes_of(root: Path) -> list[str]:
    classes = _class_folders(root)
    if not classes:
        raise UserError(f"imagefolder: {root} has no class folders; expected {_FOLDER_LAYOUT}")
    return classes


def _load_imagefolder(path: Path, val_fraction: float, seed: int, channels: int) -> DataBundle:
    if not path.is_dir():
        raise _missing_folder("imagefolder", path, _FOLDER_LAYOUT)
    train_dir, val_dir = path / "train", path / "val"
    presplit = train_dir.is_dir() and val_dir.is_dir()
    if presplit:
        classes = _classes_of(train_dir)
        val_classes = _classes_of(val_dir)
        if classes != val_classes:
            raise UserError(
                f"imagefolder: class folders differ: {train_dir} has [{', '.join(classes)}]"
                f" but {val_dir} has [{', '.join(val_classes)}]"
            )
        train_scan, val_scan = _scan(train_dir, classes), _scan(val_dir, classes)
        train = FileImageSet(train_scan.paths, train_scan.targets, classes, channels)
        val = FileImageSet(val_scan.paths, val_scan.targets, classes, channels)
        scans = [train_scan, val_scan]
    else:
        if train_dir.is_dir() != val_dir.is_dir():
            have, lack = (train_dir, val_dir) if train_dir.is_dir() else (val_dir, train_dir)
            raise UserError(
                f"imagefolder: found {have} but no {lack}; give both or neither ({_FOLDER_LAYOUT})"
            )
        classes = _classes_of(path)
        scan = _scan(path, classes)
        everything = FileImageSet(scan.paths, scan.targets, classes, channels)
        train_idx, val_idx = stratified_split(everything.targets, val_fraction, seed)
        if not val_idx:
            raise UserError(
                f"imagefolder: {path} has too few images to hold out a validation split"
                " (a class needs at least 2)"
            )
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        scans = [scan]
    sizes = set().union(*(s.sizes for s in scans))
    skipped = [p for s in scans for p in s.skipped]
    (width, height) = next(iter(sizes))
    native = width if len(sizes) == 1 and width == height else None
    description = _describe(
        "imagefolder",
        f"{path}, train/val folders" if presplit else str(path),
        train,
        val,
        _shape_text(channels, native),
    )
    if skipped:
        description += f"; skipped {len(skipped)} unreadable files"
    return DataBundle(
        name="imagefolder",
        train=train,
        val=val,
        classes=classes,
        channels=channels,
        native_size=native,
        flip_safe=True,
        description=description,
        skipped=skipped,
    )


# ---- CIFAR -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    subfolder: str  # the folder the official archive extracts to
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str  # class names in the meta file
    labels_key: str  # labels in each batch


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": _CifarLayout(
        "cifar-100-python", ("train",), "test", "meta", "fine_label_names", "fine_labels"
    ),
}


def _numpy_module(name: str):
    """``numpy._core.<name>`` (numpy 2) or ``numpy.core.<name>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(text, "latin1"); allow only that codec.
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every global a CIFAR python batch may name: builtin containers and numpy arrays.

    Both the module names numpy 1 and numpy 2 write (``numpy.core`` /
    ``numpy._core``) and Python 2's ``__builtin__`` appear in real files.
    """
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    for builtins_name in ("builtins", "__builtin__"):
        for cls in (list, dict, tuple, set, frozenset, str, bytes, bytearray, int, float, bool):
            allowed[(builtins_name, cls.__name__)] = cls
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An Unpickler that builds only builtin containers and numpy arrays, nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 pickles: keep their str as bytes
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserError(
                f"{self.path} is not a CIFAR python batch: it references {module}.{name},"
                " which is refused (only builtin containers and numpy arrays are loaded)"
            ) from None


def _unpickle_cifar(path: Path) -> dict[str, object]:
    """The dict in a CIFAR python batch, with bytes keys decoded to str."""
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # any failure to parse an untrusted file is the user's
        raise UserError(f"{path} is not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR python batch (holds {type(content).__name__})")
    return {_text(k): v for k, v in content.items()}


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _cifar_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data [N, 3072] uint8, labels [N] int64)`` of one batch file, checked."""
    content = _unpickle_cifar(path)
    data, labels = content.get("data"), content.get(labels_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise UserError(f"{path} is not a CIFAR python batch (no uint8 'data' rows)")
    if data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: rows have {data.shape[1]} values, expected 3072 (3x32x32)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise UserError(f"{path}: expected {len(data)} integer {labels_key!r}")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise UserError(
            f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    # Contiguous and writable, so torch can view the rows as images without copying or warning.
    return np.require(data, requirements=["C_CONTIGUOUS", "WRITEABLE"]), labels


def _find_files(root: Path, subfolders: Sequence[str], names: Sequence[str]) -> Path | None:
    """The first of ``root`` and ``root/<sub>`` holding every file in ``names``, else None."""
    for folder in (root, *(root / s for s in subfolders)):
        if all((folder / n).is_file() for n in names):
            return folder
    return None


def _load_cifar(kind: str, path: Path, channels: int | None) -> DataBundle:
    layout = _CIFAR[kind]
    names = (*layout.train, layout.test, layout.meta)
    expected = f"{', '.join(names)} in PATH or PATH/{layout.subfolder}"
    if not path.is_dir():
        raise _missing_folder(kind, path, expected)
    folder = _find_files(path, [layout.subfolder], names)
    if folder is None:
        nearest = path / layout.subfolder if (path / layout.subfolder).is_dir() else path
        missing = [n for n in names if not (nearest / n).is_file()]
        raise UserError(f"{kind}: {nearest} lacks {', '.join(missing)}; expected {expected}")
    meta = _unpickle_cifar(folder / layout.meta)
    names_value = meta.get(layout.names_key)
    if not isinstance(names_value, (list, tuple)) or not names_value:
        raise UserError(f"{folder / layout.meta}: no {layout.names_key!r} list of class names")
    classes = [_text(n) for n in names_value]
    train_parts = [_cifar_batch(folder / n, layout.labels_key, len(classes)) for n in layout.train]
    test_data, test_labels = _cifar_batch(folder / layout.test, layout.labels_key, len(classes))

    def tensor_set(data: np.ndarray, labels: np.ndarray) -> TensorImageSet:
        images = torch.from_numpy(data).view(-1, 3, 32, 32)  # rows are R plane, G, B; row-major
        return TensorImageSet(to_channels(images, channels), labels.tolist(), classes)

    train = tensor_set(
        np.concatenate([d for d, _ in train_parts]), np.concatenate([lb for _, lb in train_parts])
    )
    val = tensor_set(test_data, test_labels)
    return _tensor_bundle(kind, str(folder), train, val, flip_safe=True)


# ---- MNIST and Fashion-MNIST -------------------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_SUBFOLDERS = {
    # PATH/raw, and torchvision's own download layout under PATH.
    "mnist": ("raw", "MNIST/raw"),
    "fashion-mnist": ("raw", "FashionMNIST/raw"),
}


def _find_idx(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gzipped if it ends in .gz), shaped by its header.

    UserError naming the file for a wrong ``magic``, a short header, or data
    that does not match the dimensions.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    what = "images" if magic == _IDX_IMAGES else "labels"
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file too short)" if found is None else f"0x{found:08x}"
        raise UserError(
            f"{path} is not an IDX {what} file: magic number {shown}, expected 0x{magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated: its header needs {header} bytes, has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "malformed"
        raise UserError(
            f"{path} is {state}: {len(raw) - header} data bytes for dimensions"
            f" {'x'.join(map(str, dims))} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_part(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, _IDX_IMAGES), read_idx(labels_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= 10:
        raise UserError(f"{labels_path}: label {labels.max()} is out of range 0..9")
    return images, labels


def _load_mnist(kind: str, path: Path, channels: int | None) -> DataBundle:
    subfolders = _MNIST_SUBFOLDERS[kind]
    expected = (
        f"{', '.join(_MNIST_FILES)} (each optionally .gz) in PATH or"
        f" {' or '.join('PATH/' + s for s in subfolders)}"
    )
    if not path.is_dir():
        raise _missing_folder(kind, path, expected)
    found, lacking = None, None
    for folder in (path, *(path / s for s in subfolders)):
        files = [_find_idx(folder, base) for base in _MNIST_FILES]
        if all(files):
            found = files
            break
        if any(files) and lacking is None:  # a partial set: name what it lacks
            missing = [base for base, f in zip(_MNIST_FILES, files, strict=True) if f is None]
            lacking = f"{folder} lacks {', '.join(missing)}"
    if found is None:
        raise UserError(f"{kind}: {lacking or 'no IDX files in ' + str(path)}; expected {expected}")
    train_images, train_labels = _mnist_part(found[0], found[1])
    val_images, val_labels = _mnist_part(found[2], found[3])
    if train_images.shape[1:] != val_images.shape[1:]:
        raise UserError(
            f"{found[0]} has {train_images.shape[1:]} images but {found[2]} has"
            f" {val_images.shape[1:]}"
        )
    classes = FASHION_MNIST_CLASSES if kind == "fashion-mnist" else [str(d) for d in range(10)]

    def tensor_set(images: np.ndarray, labels: np.ndarray) -> TensorImageSet:
        tensor = to_channels(torch.from_numpy(images).unsqueeze(1), channels)
        return TensorImageSet(tensor, labels.tolist(), list(classes))

    return _tensor_bundle(
        kind,
        str(found[0].parent),
        tensor_set(train_images, train_labels),
        tensor_set(val_images, val_labels),
        flip_safe=kind == "fashion-mnist",  # a mirrored shoe is a shoe; a mirrored 3 is not a 3
    )
