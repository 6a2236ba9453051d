"""``imagefolder:PATH``: ``PATH/<class>/<images>``, or ``PATH/train/<class>/...`` and
``PATH/val/<class>/...``.

Images are read lazily (:class:`FileImageSet`); every file is opened once here
to check PIL can read it, and unreadable ones are skipped and reported. A
single folder is split into train and val by a seeded stratified split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from convforge.builder.data.images import FileImageSet, stratified_split
from convforge.builder.data.sources.bundle import (
    DataBundle,
    describe,
    missing_folder,
    shape_text,
)
from convforge.errors import UserError

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


def load(path: Path, val_fraction: float, seed: int, channels: int) -> DataBundle:
    """The ImageFolder at ``path`` with ``channels`` channels (PIL converts each image)."""
    if not path.is_dir():
        raise missing_folder("imagefolder", path, _FOLDER_LAYOUT)
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
    description = describe(
        "imagefolder",
        f"{path}, train/val folders" if presplit else str(path),
        train,
        val,
        shape_text(channels, native),
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
