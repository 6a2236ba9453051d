"""``convforge annotate``: write convforge metadata into an ONNX file made elsewhere.

    annotate("r18.onnx", "r18.cf.onnx", ModelOverrides(classes=("tench", ...), resize_size=256))

From then on the file serves with its labels and preprocessing like one of
convforge's exports (:func:`convforge.contract.read_info` finds everything in
it). Only ``metadata_props`` change: the graph, its weights and its names are
copied as they are, and the written file is checked to give the same logits
as the original on one random batch, with the same backend, before it
replaces anything: the checked file is the one renamed onto the output, and
a failure leaves no file behind (nor a changed output). Whatever is not given is the default
a file without metadata gets (ImageNet statistics, resize to input / 0.875),
written out, so the file says what it runs with. The values are a
:class:`~convforge.overrides.ModelOverrides`, the same that ``predict``, ``bench``,
``serve`` and ``tune`` take from their command line for one run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from convforge import __version__, contract
from convforge.errors import UserError, check_int
from convforge.files import Staging, together
from convforge.overrides import ModelOverrides


def annotate(
    source, out, overrides: ModelOverrides | None = None, *, backend: str = "auto"
) -> dict:
    """Write ``source`` with convforge metadata to ``out``, ``overrides`` in place of the
    defaults; return what was written and how it was checked. UserError for a value that
    does not fit the graph (labels count, channel count, an output or layout it does not
    have)."""
    source, out = Path(source), Path(out)
    given = overrides or ModelOverrides()
    output, layout = given.output, given.layout
    model = contract.load_onnx(source)
    outputs = [o.name for o in model.graph.output]
    if output is not None and output not in outputs:
        raise UserError(f"--output {output!r} is not an output of {source}; it has: "
                        f"{', '.join(outputs)}")  # fmt: skip
    if layout is not None and layout not in contract.LAYOUTS:
        raise UserError(f"--layout {layout!r}; accepted: {', '.join(contract.LAYOUTS)}")
    # The original with the layout and output asked for: what it computes, read as asked.
    contract.write_props(model, contract.encode({
        k: v for k, v in (("layout", layout), ("output", output)) if v is not None
    }))  # fmt: skip
    with _scratch(model, out) as reference:
        return _annotate(source, out, model, reference, given, backend)


def _annotate(source, out, model, reference, given: ModelOverrides, backend) -> dict:
    info = contract.read_info(reference)
    resize = given.resize_size
    spec = info.spec
    if spec.height != spec.width:
        raise UserError(f"{source}: input is {spec.height}x{spec.width}; annotate takes square")
    values = {
        "version": __version__,
        "arch": info.arch if info.arch != "unknown" else source.stem,
        "mean": _per_channel("--mean", given.mean, info.mean, spec.channels),
        "std": _per_channel("--std", given.std, info.std, spec.channels),
        "input_size": spec.height,
        "resize_size": check_int("--resize", resize) if resize is not None else info.resize_size,
        "channels": spec.channels,
        "layout": spec.layout,
        "output": info.output_name,
    }
    if spec.dtype == "uint8":
        values["input_format"] = "uint8"
    if values["resize_size"] < spec.height:
        raise UserError(f"--resize {values['resize_size']} is below the input size {spec.height}")
    if any(s <= 0 for s in values["std"]):
        raise UserError(f"--std must be positive, got {values['std']}")
    if given.classes is not None:
        values["classes"] = _labels(given.classes, model, info.output_name)
    contract.write_props(model, contract.encode(values))
    with together() as staging:  # the checked bytes are what replaces ``out``
        path = staging.file(out)
        _write(path, model, out)
        checked = _same_logits(source, reference, path, backend)
    return {"path": str(out), "metadata": values, "checked": checked}


@contextlib.contextmanager
def _scratch(model, out: Path):
    """``model`` written to a hidden scratch .onnx beside ``out``, always removed afterwards."""
    staging = Staging()  # never published: only its temporary name and clean-up are used
    try:
        path = staging.file(out)
        _write(path, model, out)
        yield path
    finally:
        staging.discard()


def _write(path: Path, model, out: Path) -> None:
    try:
        path.write_bytes(model.SerializeToString())
    except OSError as e:
        raise UserError(f"cannot write beside {out}: {e}") from None


def _per_channel(flag: str, given, default: list[float], channels: int) -> list[float]:
    if given is None:
        return list(default)
    if len(given) != channels:
        raise UserError(f"{flag} takes {channels} value(s), one per channel; got {len(given)}")
    return [float(v) for v in given]


def _labels(labels: list[str], model, output: str) -> list[str]:
    labels = [label.strip() for label in labels if label.strip()]
    if not labels:
        raise UserError("no labels given (one class name per line)")
    value = next(o for o in model.graph.output if o.name == output)
    dims = value.type.tensor_type.shape.dim
    k = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value > 0 else None
    if k is not None and len(labels) != k:
        raise UserError(f"{len(labels)} labels for output {output!r} of {k} scores")
    return labels


def _same_logits(source: Path, reference: Path, written: Path, backend: str) -> dict:
    """Run ``reference`` (the source, its output and layout as asked) and ``written`` on one
    random batch with the same backend; UserError unless the logits are equal."""
    from convforge.runtime import backends
    from convforge.runtime.bench import random_batch

    first, _ = backends.load_backend(backend, str(reference))
    try:
        batch = random_batch(np.random.default_rng(0), first.spec, first.spec.batch or 2)
        want = first.run(batch)
    finally:
        first.close()
    second = backends.create(first.name, str(written)).load()
    try:
        got = second.run(batch)
    finally:
        second.close()
    if not np.array_equal(got, want):
        raise UserError(
            f"the annotated file gives other logits than {source} (max diff "
            f"{np.abs(got - want).max():.3g} on {first.name}); nothing was written"
        )
    return {"backend": first.name, "batch": list(batch.shape), "identical": True}
