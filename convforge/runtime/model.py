"""The Model API: an exported file + a backend -> top-k labels for images.

    from convforge.runtime import load
    with load("model.onnx", backend="auto") as model:
        for top in model.predict(["cat.jpg", "dog.png"], topk=3):
            print(top[0].label, top[0].probability)

Preprocessing (channels, resize, crop, normalization) comes from the file's
metadata (:mod:`convforge.contract`), so nothing else is needed to serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convforge.contract import ModelInfo, read_info
from convforge.errors import UserError, check_int
from convforge.runtime import backends
from convforge.runtime.backends.base import Backend
from convforge.runtime.evaluate import run_in_chunks
from convforge.runtime.preprocess import preprocess


@dataclass(frozen=True)
class Prediction:
    label: str  # class name from the model's metadata
    index: int  # logit position
    probability: float  # softmax probability, in [0, 1]


def top_k(logits: np.ndarray, classes: list[str], k: int) -> list[list[Prediction]]:
    """Per row of ``logits`` [N, K], its ``k`` most probable classes (softmax), best first;
    UserError for output of another shape (a model that is not an image classifier)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise UserError(
            f"the model's output has shape {list(logits.shape)}, not [N, classes]: top-k "
            "classes need an image classifier (convforge bench times any model)"
        )
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
    return [
        [Prediction(classes[j] if j < len(classes) else str(j), int(j), float(p[j])) for j in row]
        for p, row in zip(probs, order, strict=True)
    ]


class Model:
    """A loaded model: :meth:`predict` for images, :meth:`logits` for preprocessed batches."""

    def __init__(self, info: ModelInfo, backend: Backend, batch_size: int = 32, skipped=()) -> None:
        self.info = info
        self.backend = backend
        self.batch_size = check_int("batch size", batch_size)
        self.skipped = list(skipped)  # auto's candidates that could not run it: backend, why

    def preprocess(self, images) -> np.ndarray:
        """The input batch for file paths, PIL images or uint8 arrays: float32 [N, C, H, W]
        normalized, or uint8 [N, H, W, C] pixels for a uint8-input file (no floats made)."""
        return preprocess(images, self.info)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, K] logits for a preprocessed batch (as :meth:`preprocess` makes it),
        run in chunks of ``batch_size``, or of the file's fixed batch size (the last chunk
        padded as :mod:`convforge.runtime.evaluate` says, the padding's logits dropped)."""
        fixed = self.info.spec.batch
        chunk = fixed or self.batch_size
        if (
            not isinstance(batch, np.ndarray)
            or batch.ndim != 4
            or (len(batch) <= chunk and fixed in (None, len(batch)))
        ):
            return self.backend.run(batch)
        return run_in_chunks(self.backend.run, batch, chunk, pad=bool(fixed))

    def predict(self, images, topk: int = 5) -> list[list[Prediction]]:
        """For each image, its ``topk`` most probable classes, best first."""
        check_int("topk", topk)
        return top_k(self.logits(self.preprocess(images)), self.info.classes, topk)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    path, backend: str = "auto", batch_size: int = 32, plan=None, overrides=None, **options
) -> Model:
    """Load an exported model (.onnx, or .pt2 for the torch backend) on ``backend``.

    The file runs in its own precision (OpenVINO computes fp32 files in f32, not bf16):
    lower numerics (bf16, tf32, fp16 casts) come only from ``options`` or a plan.
    ``options`` go to a named backend (e.g. ``threads=2`` for ort-cpu). A backend
    asked for by name that cannot run raises BackendUnavailable naming why;
    ``auto`` takes the first of :data:`~.backends.AUTO_ORDER` that loads and
    lists the others in :attr:`Model.skipped`. ``overrides`` (a
    :class:`~convforge.overrides.ModelOverrides`: mean, std, resize, labels, output,
    layout) win over the file's metadata, for the Model and its backend alike.

    ``plan`` (a ``convforge tune`` plan file or :class:`~.plan.Plan`) runs the plan's
    backend, file and options for the batch size closest to ``batch_size``
    (:func:`load_plan`); ``path`` must be a file the plan was made for,
    and ``backend``/``options`` stay unset. A file changed since tuning is a UserError
    unless the plan given is a :class:`~.plan.Plan` with ``force`` set.
    """
    if plan is not None:
        from convforge.runtime.plan import Plan

        if backend != "auto" or options:
            raise UserError("load(plan=...) runs the plan's backend and options; give neither")
        plan = plan if isinstance(plan, Plan) else Plan.read(plan)
        plan.check_model(path)
        return load_plan(plan, batch_size, overrides=overrides)
    info = read_info(path, overrides)
    engine, skipped = backends.load_backend(backend, str(path), overrides=overrides, **options)
    return Model(info, engine, batch_size, skipped)


def load_plan(plan, batch_size: int = 1, check: bool = True, overrides=None) -> Model:
    """A :class:`Model` running ``plan``'s entry for ``batch_size`` (a
    :class:`~convforge.runtime.plan.Plan`, :meth:`~.plan.Plan.entry`): its backend, file
    and options, with ``Model.batch_size`` the entry's. The entry's file is checked
    against the plan's hash first (:meth:`~.plan.Plan.check_file`); ``check`` also warns
    when the plan was measured on another machine (:meth:`~.plan.Plan.check_environment`).
    ``overrides`` as :func:`load` takes them."""
    entry = plan.entry(batch_size)
    plan.check_file(entry)
    if check:
        plan.check_environment()
    return load(entry.file, backend=entry.backend, batch_size=entry.batch_size,
                overrides=overrides, **entry.options)  # fmt: skip
