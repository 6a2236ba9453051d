"""Procedural images whose classes differ in structure, not colour (``--dataset synthetic``).

Each class is a combination of a *shape* (disc, square, triangle, ring,
plus, frame) and a *texture* (the orientation and, with many classes, the
frequency of a stripe grating that fills the shape; "0deg" stripes vary
along x, i.e. they are vertical). Everything else is
drawn at random for every image, independently of the class: background and
foreground colours, the second stripe colour, position, scale, a small
rotation, the stripes' phase, a background ramp and pixel noise. So the
expected colour of an image is the same for every class, and a model has to
learn shapes and orientations to do better than chance.

Generation is vectorised numpy and seeded by ``data_seed``: the same options
always give the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from convforge.errors import UserError

SHAPES = ("disc", "square", "triangle", "ring", "plus", "frame")
MAX_ORIENTATIONS = 4  # distinct stripe orientations (0, 45, 90, 135 deg) before adding frequencies
MAX_BYTES = 2**31  # refuse option sets whose images would need more memory than this
_CHUNK_PIXELS = 2**21  # pixels per image plane rendered at once (bounds the float32 temporaries)


@dataclass(frozen=True)
class SyntheticOptions:
    """The ``synthetic:key=value,...`` options (all integers)."""

    classes: int = 10  # number of classes, at least 2
    size: int = 32  # image side in px, at least 8
    per_class: int = 100  # images per class, at least 2 (so each class can be split)
    channels: int = 3  # 1 (gray) or 3 (RGB)
    data_seed: int = 0  # seeds the images themselves (the split has its own seed)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


_MINIMUMS = {"classes": 2, "size": 8, "per_class": 2, "channels": 1, "data_seed": 0}


def parse_options(text: str | None, *, channels: int | None = None) -> SyntheticOptions:
    """Options from ``"classes=5,size=16"`` (None or "" gives the defaults); UserError if bad.

    ``channels``, when given, is the channel count asked for elsewhere (the
    ``channels`` argument of ``load_dataset``): it replaces the default and
    must agree with a ``channels=`` option.
    """
    keys = [f.name for f in fields(SyntheticOptions)]
    values: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise UserError(
                f"bad synthetic option {item!r}; use key=value with keys: {', '.join(keys)}"
            )
        if key in values:
            raise UserError(f"synthetic option {key} is given twice")
        try:
            number = int(value.strip())
        except ValueError:
            raise UserError(f"synthetic option {key} must be an integer, got {value!r}") from None
        if number < _MINIMUMS[key]:
            raise UserError(f"synthetic option {key} must be >= {_MINIMUMS[key]}, got {number}")
        values[key] = number
    if channels is not None:
        if values.setdefault("channels", channels) != channels:
            raise UserError(
                f"synthetic option channels={values['channels']} contradicts channels {channels}"
            )
    options = SyntheticOptions(**values)
    if options.channels not in (1, 3):
        raise UserError(f"synthetic option channels must be 1 or 3, got {options.channels}")
    total = options.classes * options.per_class * options.channels * options.size**2
    if total > MAX_BYTES:
        raise UserError(
            f"synthetic images would take {total / 2**30:.1f} GiB; "
            f"lower classes, per_class or size (limit {MAX_BYTES / 2**30:.0f} GiB)"
        )
    return options


@dataclass(frozen=True)
class _Layout:
    """How class indices map to (shape, orientation, frequency level)."""

    num_shapes: int
    num_orientations: int
    num_frequencies: int

    @classmethod
    def for_classes(cls, num_classes: int) -> _Layout:
        num_shapes = min(num_classes, len(SHAPES))
        textures = math.ceil(num_classes / num_shapes)
        num_orientations = min(textures, MAX_ORIENTATIONS)
        return cls(num_shapes, num_orientations, math.ceil(textures / num_orientations))

    def parts(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texture = labels // self.num_shapes
        return (
            labels % self.num_shapes,
            texture % self.num_orientations,
            texture // self.num_orientations,
        )


def class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. ``"disc"`` (few classes) or ``"ring-45deg"`` / ``"plus-90deg-f2"``."""
    layout = _Layout.for_classes(num_classes)
    names = []
    for label in range(num_classes):
        shape, orient, freq = (int(p[0]) for p in layout.parts(np.array([label])))
        name = SHAPES[shape]
        if layout.num_orientations > 1:
            name += f"-{round(180 * orient / layout.num_orientations)}deg"
        if layout.num_frequencies > 1:
            name += f"-f{freq + 1}"
        names.append(name)
    return names


def flip_safe(num_classes: int) -> bool:
    """Whether a horizontal flip keeps every class's meaning.

    A flip turns stripes at angle ``a`` into ``180 - a``: 0 and 90 deg stay
    put, 45 and 135 deg swap. Up to 12 classes use only 0 and 90 deg.
    """
    return _Layout.for_classes(num_classes).num_orientations <= 2


def _shape_coverage(kind: str, u: np.ndarray, v: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside the shape, given coordinates in units of the shape's radius.

    ``m`` is a distance-like measure, 1 on the outline; ``(1 - m) * radius``
    is roughly the distance in px to the outline, which gives anti-aliased
    edges one pixel wide.
    """
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if kind == "disc":
        m = r
    elif kind == "square":
        m = np.maximum(au, av) / 0.85
    elif kind == "triangle":
        # Equilateral, pointing up: inside where all three edge normals give <= the inradius.
        angles = np.deg2rad([90.0, 210.0, 330.0])
        m = np.max([np.cos(a) * u + np.sin(a) * v for a in angles], axis=0) / 0.55
    elif kind == "ring":
        m = np.abs(r - 0.72) / 0.28
    elif kind == "plus":
        m = np.minimum(np.maximum(au / 0.32, av), np.maximum(au, av / 0.32))
    elif kind == "frame":
        m = np.abs(np.maximum(au, av) - 0.7) / 0.2
    else:  # pragma: no cover - SHAPES lists every kind
        raise AssertionError(kind)
    return np.clip((1.0 - m) * radius_px[:, None, None] + 0.5, 0.0, 1.0)


def _offset_colours(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Colours at least 0.25 away from ``base`` in every channel, yet uniform on [0, 1] overall.

    Shifting a uniform colour by any amount modulo 1 keeps it uniform, so the
    contrast is guaranteed without making the colour depend on anything.
    """
    return (base + rng.uniform(0.25, 0.75, size=base.shape)) % 1.0


@dataclass
class _Draws:
    """Per-image random parameters (arrays of length N); see :func:`_draw`."""

    shape: np.ndarray  # index into SHAPES (from the label)
    radius: np.ndarray  # shape radius, in half-image units
    centre: np.ndarray  # [N, 2] x, y in [-1, 1]
    spin: np.ndarray  # shape rotation, radians
    theta: np.ndarray  # stripes' direction, radians
    cycles: np.ndarray  # stripes per image width
    phase: np.ndarray  # stripes' phase, radians
    bg: np.ndarray  # [N, C] background colour in [0, 1]
    fg: np.ndarray  # [N, C] first stripe colour
    fg2: np.ndarray  # [N, C] second stripe colour
    ramp_dir: np.ndarray  # direction of the background's brightness ramp, radians

    def take(self, part: slice) -> _Draws:
        return _Draws(**{f.name: getattr(self, f.name)[part] for f in fields(self)})


def _draw(rng: np.random.Generator, labels: np.ndarray, size: int, channels: int) -> _Draws:
    """Everything random about each image; only shape, stripe angle and frequency use the label."""
    n = len(labels)
    layout = _Layout.for_classes(int(labels.max()) + 1)
    shape, orient, freq = layout.parts(labels)
    radius = rng.uniform(0.45, 0.8, n)
    centre = rng.uniform(-1.0, 1.0, (n, 2)) * (0.95 - radius[:, None])  # stays inside the image
    spin = rng.uniform(-np.pi / 9, np.pi / 9, n)  # +-20 deg
    if layout.num_orientations > 1:
        step = np.pi / layout.num_orientations
        theta = orient * step + rng.uniform(-step / 6, step / 6, n)
    else:  # orientation is not a class feature: any angle
        theta = rng.uniform(0.0, np.pi, n)
    # At most one cycle per 3.5 px, so even the finest stripes survive sampling.
    top = size / 3.5
    levels = np.geomspace(min(4.0, top), top, layout.num_frequencies)
    cycles = levels[freq] * rng.uniform(0.9, 1.1, n)
    phase = rng.uniform(0.0, 2 * np.pi, n)
    bg = rng.uniform(0.0, 1.0, (n, channels))
    fg = _offset_colours(rng, bg)
    fg2 = _offset_colours(rng, fg)
    ramp_dir = rng.uniform(0.0, 2 * np.pi, n)
    return _Draws(shape, radius, centre, spin, theta, cycles, phase, bg, fg, fg2, ramp_dir)


def _render(d: _Draws, size: int, noise: np.random.Generator) -> np.ndarray:
    """uint8 ``[n, C, size, size]`` images for the parameters ``d``."""
    n = len(d.shape)

    def col(values: np.ndarray) -> np.ndarray:  # per image (and channel) -> broadcastable
        return values.astype(np.float32).reshape(n, -1, 1, 1)

    # Pixel centres in [-1, 1]; y grows downwards like image rows.
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    ys, xs = np.meshgrid(axis, axis, indexing="ij")

    # Coordinates in the shape's frame, in units of its radius.
    dx, dy = xs - col(d.centre[:, 0])[:, 0], ys - col(d.centre[:, 1])[:, 0]
    cos_s, sin_s = col(np.cos(d.spin) / d.radius)[:, 0], col(np.sin(d.spin) / d.radius)[:, 0]
    u, v = cos_s * dx + sin_s * dy, cos_s * dy - sin_s * dx
    radius_px = d.radius * size / 2
    coverage = np.empty((n, size, size), dtype=np.float32)
    for kind_index, kind in enumerate(SHAPES):
        sel = d.shape == kind_index
        if sel.any():
            coverage[sel] = _shape_coverage(kind, u[sel], v[sel], radius_px[sel])
    coverage = coverage[:, None]

    # The image is 2 wide in these coordinates, so pi * cycles gives `cycles` per image width.
    wave = np.pi * d.cycles
    along = col(np.cos(d.theta) * wave) * xs + col(np.sin(d.theta) * wave) * ys
    along += col(d.phase)
    stripes = np.sin(along, out=along) * 0.5 + 0.5
    ramp = col(0.12 * np.cos(d.ramp_dir)) * xs + col(0.12 * np.sin(d.ramp_dir)) * ys

    # Background where coverage is 0, striped foreground where it is 1.
    foreground = col(d.fg2) + (col(d.fg) - col(d.fg2)) * stripes
    background = col(d.bg) + ramp
    image = background + (foreground - background) * coverage
    image += noise.standard_normal(image.shape, dtype=np.float32) * np.float32(0.03)
    image *= 255.0
    return np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8)


def generate(options: SyntheticOptions) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images, labels, classes)``: uint8 ``[N, C, S, S]``, int64 ``[N]``, class names.

    Images come class by class (``per_class`` of label 0, then label 1, ...).
    Rendering goes in chunks of a fixed size to bound memory; the result
    depends only on ``options``.
    """
    size, channels = options.size, options.channels
    rng = np.random.default_rng([options.data_seed, 0])
    noise = np.random.default_rng([options.data_seed, 1])
    labels = np.repeat(np.arange(options.classes, dtype=np.int64), options.per_class)
    draws = _draw(rng, labels, size, channels)
    images = np.empty((len(labels), channels, size, size), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, len(labels), chunk):
        part = slice(start, start + chunk)
        images[part] = _render(draws.take(part), size, noise)
    return images, labels, class_names(options.classes)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, filled shapes, a little blur and
    sensor-like noise, so that it compresses (and decodes) like a camera picture, not like a
    flat synthetic one. For tests and benchmarks of the decode path (the classes of
    ``--dataset synthetic`` are :func:`generate`'s)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = [128 + 100 * np.sin(x / width * 3 + c) * np.cos(y / height * 2 + c) for c in range(3)]
    image = Image.fromarray(np.stack(base, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 30, min(width, height) // 6))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r // 2, cx + r, cy + r], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(1, min(width, height) // 400)))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
