"""``cifar10:PATH``, ``cifar100:PATH``: the "python version" pickle batches.

The batches are pickles, so they are read by an Unpickler that builds only
builtin containers and numpy arrays and refuses every other global. The test
batch is the validation split.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convforge.builder.data.images import TensorImageSet
from convforge.builder.data.sources.bundle import (
    DataBundle,
    missing_folder,
    tensor_bundle,
    to_channels,
)
from convforge.errors import UserError


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


def load(kind: str, path: Path, channels: int | None) -> DataBundle:
    """The CIFAR-10/100 batches in ``path`` or its archive folder; test batch = val split."""
    layout = _CIFAR[kind]
    names = (*layout.train, layout.test, layout.meta)
    expected = f"{', '.join(names)} in PATH or PATH/{layout.subfolder}"
    if not path.is_dir():
        raise missing_folder(kind, path, expected)
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
    return tensor_bundle(kind, str(folder), train, val, flip_safe=True)
