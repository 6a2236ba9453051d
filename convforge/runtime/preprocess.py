"""Images in, the model's input batch out: the evaluation preprocessing, from metadata.

Mirrors the export's evaluation transform (torchvision's ``Resize`` +
``CenterCrop`` + ``ToDtype(scale=True)`` + ``Normalize``) with PIL and numpy
(no torch): convert to the model's channels (L or RGB); if ``resize_size``
equals the input size, resize to input_size x input_size (the small-image
path), otherwise resize the shorter side to ``resize_size`` (the longer one
to ``int(resize_size * long / short)``, as torchvision) and center-crop
input_size with torchvision's anchor (``round((resized - crop) / 2)``).
Bilinear resampling with PIL's antialiasing, as torchvision's
``Resize(antialias=True)`` does. The result is float32 [N, C, H, W], scaled
to [0, 1] and normalized with the model's mean and std; or, for a file whose
input format is uint8, the uint8 pixels [N, H, W, C] themselves, never
converted to float (the graph normalizes them).

Three things make it faster than the transform it mirrors, each within the
tolerance the tests hold it to against torchvision on real JPEGs:

* JPEG draft mode: a JPEG file at least twice the resized size in both
  sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's
  ``Image.draft``), the largest scale that still leaves at least the resized
  size, so the antialiased resize that follows still downsamples. Decoding a
  4000x3000 photo at 1/8 skips most of the inverse DCT and colour
  conversion.
* Only the crop is resized: one ``Image.resize(..., box=...)`` of the source
  region that survives the centre crop gives the same pixels as resizing the
  whole image and cropping (PIL's filter taps outside the box still read the
  image), at a fraction of the work. Where the crop is larger than the resized
  image (``resize_size`` < input size), only the part inside is resized and
  pasted onto black, so no aspect ratio allocates more than the output.
* Batches are decoded on a thread pool of at most :data:`MAX_WORKERS`
  threads (PIL releases the GIL while it decodes and resizes); each image
  lands in its own row, so the result equals the sequential one.

Paths and bytes are untrusted files: ``formats`` and ``max_pixels`` (see
:func:`to_pil`; :data:`UPLOAD_FORMATS` and :data:`UPLOAD_MAX_PIXELS` for a
server) bound what they may decode to, and anything Pillow raises on a broken
file becomes a one-line UserError.

Results can differ from torchvision's by a grey level in some pixels (PIL's
and torch's antialiasing round differently), and draft-decoded JPEGs by a
few more near sharp edges.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from convforge.contract import ModelInfo
from convforge.errors import UserError

# What a server decodes from clients: the common photo formats, nothing that runs a helper
# program (EPS runs Ghostscript) or has seldom-exercised parsers (PSD, TIFF, ...).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")
# The most pixels (width x height) a client's image may declare: a 20 KB PNG can declare
# 400 MP, whose decoded pixels would take 1.2 GB.
UPLOAD_MAX_PIXELS = 40_000_000
MAX_WORKERS = 8  # threads decoding one batch: past this, memory bandwidth wins, not cores
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def to_pil(
    image, channels: int, need=None, *, formats=None, max_pixels: int | None = None
) -> Image.Image:
    """A file path, an encoded image file's bytes (JPEG, PNG, ...), a PIL image or a
    uint8 array (H, W) / (H, W, C) as a PIL image in the model's mode (L or RGB).

    ``need(width, height) -> (width, height)``, for paths and bytes, returns the
    smallest size the caller's resize needs; a JPEG at least twice that size is then
    decoded in draft mode at a reduced scale that still covers it.

    For paths and bytes (untrusted files), ``formats`` is the Pillow format names
    that may be decoded (None: every format Pillow knows; a server passes
    :data:`UPLOAD_FORMATS`) and ``max_pixels`` the most pixels (width x height, as the
    file's header declares them, checked before anything is decoded) a file may have
    (None: Pillow's decompression-bomb limit only). A file in another format, over
    the limit or failing to decode for any reason is a one-line UserError.
    """
    mode = "L" if channels == 1 else "RGB"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist")
        return _decode(path, f"image {path}", mode, need, formats, max_pixels)
    if isinstance(image, bytes):
        what = f"the {len(image)} bytes given"
        return _decode(io.BytesIO(image), what, mode, need, formats, max_pixels)
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(
                f"image arrays must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                f"{list(image.shape)}; preprocessed float batches go to Backend.run"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 3 and image.shape[2] not in (3, 4):
            raise UserError(f"image arrays need 1, 3 or 4 channels last, got {image.shape[2]}")
        pil = Image.fromarray(image)
    else:
        raise UserError(
            "images must be file paths, bytes, PIL images or uint8 arrays, got "
            f"{type(image).__name__}"
        )
    return pil.convert(mode)


def _decode(source, what: str, mode: str, need, formats, max_pixels) -> Image.Image:
    """Decode an image file (path or file object) to ``mode``, in draft mode where ``need``
    allows; see :func:`to_pil` for ``formats`` and ``max_pixels``."""
    try:
        with Image.open(source, formats=formats) as im:
            width, height = im.size  # from the header: nothing is decoded yet
            if max_pixels is not None and width * height > max_pixels:
                raise UserError(
                    f"cannot read {what}: image is {width}x{height} "
                    f"({width * height / 1e6:.1f} MP); at most {max_pixels / 1e6:g} MP"
                )
            if need is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, need(width, height))
            im.load()
            return im.convert(mode)  # inside: some modes (TIFF's LAB) cannot convert
    except UserError:
        raise
    except UnidentifiedImageError:
        accepted = " (JPEG, PNG, ...)" if formats is None else f"; accepts {', '.join(formats)}"
        raise UserError(f"cannot read {what}: not a readable image{accepted}") from None
    except MemoryError:
        raise  # the server's state, not the file's fault
    except Exception as e:
        # The file is untrusted: Pillow's plugins fail on broken data with whatever they
        # hit (SyntaxError, struct.error, EOFError, zlib.error, OSError, ValueError,
        # DecompressionBombError, a DecompressionBombWarning made an error, ...).
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else f"corrupt image data ({type(e).__name__})"
        raise UserError(f"cannot read {what}: {reason}") from None


def preprocess(
    images,
    info: ModelInfo,
    workers: int | None = None,
    *,
    formats=None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """The model's input batch for ``images`` (a list of anything :func:`to_pil` takes).

    Normalized float32 (or float16, as the graph's input is) for a float-input
    file, uint8 pixels for a uint8-input one, each in the graph's layout: [N, C,
    H, W] or [N, H, W, C] (a convforge uint8 export, or a file made elsewhere). ``workers``
    bounds the threads that decode a batch (default: the CPUs, at most
    :data:`MAX_WORKERS`; 1 decodes in this thread). ``formats`` and ``max_pixels``
    limit what paths and bytes may decode to (see :func:`to_pil`); for images from
    clients pass :data:`UPLOAD_FORMATS` and :data:`UPLOAD_MAX_PIXELS`. Any bad image is
    a one-line UserError.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise UserError("no images given")
    spec = info.spec
    c, size, resize_size = spec.channels, spec.height, info.resize_size
    raw = spec.dtype == "uint8"
    out = np.empty(spec.shape(len(images)), dtype=spec.dtype)
    mean = np.asarray(info.mean, dtype=np.float32).reshape(1, 1, c)
    std = np.asarray(info.std, dtype=np.float32).reshape(1, 1, c)

    def one(i: int) -> None:
        pil = load_pixels(images[i], c, size, resize_size, formats=formats, max_pixels=max_pixels)
        x = np.asarray(pil).reshape(size, size, c)
        if not raw:
            x = (x.astype(np.float32) / 255.0 - mean) / std
        # (H, W, C) as decoded; an NCHW graph takes (C, H, W). The assignment casts (fp16).
        out[i] = x.transpose(2, 0, 1) if spec.layout == "NCHW" else x

    workers = min(len(images), usable_cpus() if workers is None else workers, MAX_WORKERS)
    if workers <= 1:
        for i in range(len(images)):
            one(i)
    else:
        # list() re-raises the first image's error (a UserError naming the file) here
        list(_executor().map(one, range(len(images))))
    return out


def load_pixels(
    image,
    channels: int,
    size: int,
    resize_size: int,
    *,
    formats=None,
    max_pixels: int | None = None,
) -> Image.Image:
    """``image`` decoded, resized and center-cropped to ``size`` x ``size`` (see the module);
    ``formats`` and ``max_pixels`` as for :func:`to_pil`. Never allocates more than the
    decoded image and the output, whatever the aspect ratio."""
    opened = {}  # the full-scale size of a file opened here (draft mode may decode less)

    def need(width: int, height: int) -> tuple[int, int]:
        opened["size"] = (width, height)
        return resized_size(width, height, size, resize_size)

    pil = to_pil(image, channels, need, formats=formats, max_pixels=max_pixels)
    width, height = opened.get("size", pil.size)
    if resize_size == size:
        return pil.resize((size, size), Image.BILINEAR)
    new_w, new_h = resized_size(width, height, size, resize_size)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)  # torchvision's anchor
    # Draft mode decodes ceil(width / s) pixels, pixel j covering source pixels [j s, (j+1) s).
    s = next(s for s in (1, 2, 4, 8) if -(-width // s) == pil.width)
    sx, sy = width / s / new_w, height / s / new_h  # decoded pixels per resized pixel
    # The crop window's part inside the resized image: all of it, unless the crop is larger
    # than the resized image in a side (torchvision pads with 0). Resizing only this part
    # keeps a 1x60000 image from becoming a resize_size x (resize_size * 60000) one.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + size, new_w), min(top + size, new_h)
    # min(): (new_w * sx) may round to just past the decoded width, which PIL refuses
    box = (x0 * sx, y0 * sy, min(x1 * sx, pil.width), min(y1 * sy, pil.height))
    part = pil.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=box)
    if part.size == (size, size):
        return part
    out = Image.new(pil.mode, (size, size))  # black, as torchvision's padding
    out.paste(part, (x0 - left, y0 - top))
    return out


def resized_size(width: int, height: int, size: int, resize_size: int) -> tuple[int, int]:
    """The whole image after the eval transform's Resize, before its CenterCrop."""
    if resize_size == size:
        return size, size
    short, long = sorted((width, height))
    new_long = int(resize_size * long / short)  # torchvision's rounding
    return (resize_size, new_long) if width <= height else (new_long, resize_size)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    """The process's decoding pool, created on first use (threads are idle between batches)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=min(usable_cpus(), MAX_WORKERS), thread_name_prefix="convforge-decode"
            )
        return _pool
