"""Running a batch larger than a backend takes, and top-1 accuracy: one policy for all.

``Model.logits``, ``tune``, ``bench --accuracy`` and the server's batcher run
rows through a backend the same way: in chunks of at most ``chunk`` rows;
where the backend runs one batch size only (a fixed-batch file, a captured
CUDA graph), a short chunk is padded to that size with **copies of its last
row** and the padding's outputs are dropped. A copy of a real row, not
zeros, so the padding stays inside the range of the inputs the file was
calibrated and validated on (zeros are out of range for a uint8 file's
normalization and can overflow an fp16 or int8 path's intermediate values).
"""

from __future__ import annotations

import numpy as np

from convforge.errors import UserError


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` with copies of its last row appended up to ``size`` rows (as is when full)."""
    if len(rows) >= size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def run_in_chunks(run, rows: np.ndarray, chunk: int, pad: bool) -> np.ndarray:
    """``run`` (a backend's ``run``) over ``rows`` in chunks of ``chunk``; ``pad``: every
    chunk padded to ``chunk`` rows (:func:`pad_rows`), the padding's outputs dropped."""
    out = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        n = len(part)
        out.append(run(pad_rows(part, chunk) if pad else part)[:n])
    return np.concatenate(out)


def top1(backend, rows: np.ndarray, chunk: int) -> np.ndarray:
    """The argmax class of each of ``rows`` run through a loaded ``backend`` in chunks of
    ``chunk`` (or of the file's fixed batch size), padded where the backend runs one size.
    UserError when its output is not [N, classes]."""
    fixed = backend.spec.batch if backend.spec is not None else None
    logits = run_in_chunks(
        backend.run, rows, fixed or chunk, pad=bool(backend.single_batch_size or fixed)
    )
    if logits.ndim != 2:
        raise UserError(
            f"{backend.path}: its output has shape {list(logits.shape)}, not [N, classes]; "
            "tune checks top-1 accuracy, which needs an image classifier (convforge bench "
            "times any model)"
        )
    return logits.argmax(axis=1)


def accuracy(model, images: list, labels: list[int]) -> float:
    """Top-1 accuracy of a loaded :class:`~convforge.runtime.model.Model` on raw ``images``
    (preprocessed from the file's metadata), 64 images at a time."""
    hits = 0
    for i in range(0, len(images), 64):
        top = model.predict(images[i : i + 64], topk=1)
        hits += sum(t[0].index == y for t, y in zip(top, labels[i : i + 64], strict=True))
    return hits / max(len(labels), 1)
