"""The export pipeline: fold, trace, emit ONNX, validate, write; plus precision variants.

:func:`export_onnx` is the core for any module; :func:`export_checkpoint` is
what ``convforge export`` runs: rebuild the model from a builder checkpoint,
take validation and calibration images from the checkpoint's own dataset
(or ``--dataset``), write ``model.onnx`` + ``model.pt2`` (+ ``model.fp16.onnx``,
``model.int8.onnx``, uint8-input twins, a Triton repository) and
``model.export.json``. All or nothing: every file is staged under a temporary
name (:func:`convforge.files.together`) and checked, and only when all of them
pass do they replace their targets, together; a failure anywhere leaves no new
file and every old one as it was.

A compressed checkpoint (one ``convforge compress`` wrote) exports like any
other; every file it gives carries the ``compressed`` metadata key, and the
report compares the model with the original
(:mod:`convforge.export.compressed_report`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from convforge import contract
from convforge.errors import UserError
from convforge.export.compressed_report import compressed_section, format_section
from convforge.export.fold import FoldReport, fold_batchnorm
from convforge.export.int8 import CALIBRATION_METHODS, INT8_TARGETS
from convforge.export.onnx_export import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    save_program,
    serialize,
    to_onnx,
    trace,
)
from convforge.export.validate import (
    INT8_MAX_DROP,
    ValidationInputs,
    ValidationReport,
    check_metadata,
    reference_logits,
    validate,
)
from convforge.files import Staging, together
from convforge.runtime.onnx_info import op_histogram
from convforge.settings import check_ranges, setting

if TYPE_CHECKING:  # the builder is imported when a checkpoint is read, not with this module
    from convforge.builder.checkpoint import Checkpoint

RANDOM_SAMPLES = 32  # validation batch when no real images are at hand


class ValidationFailed(UserError):
    """An exported model disagrees with the original beyond tolerance; nothing was written."""


@dataclass
class ExportReport:
    onnx: str  # path of the fp32 model
    program: str | None  # path of the .pt2 torch.export program
    opset: int
    fold: FoldReport
    validation: ValidationReport
    nodes: dict[str, int]  # op histogram of the fp32 graph
    batchnorm_nodes: int
    seconds: dict[str, float]  # per stage: fold, trace, onnx, validate
    variants: dict[str, dict] = field(default_factory=dict)  # precision -> path + validation
    triton_repo: str | None = None
    compressed: dict | None = None  # a compressed checkpoint: vs the original (compressed_report)
    model: onnx.ModelProto | None = field(default=None, repr=False)  # fp32 graph, not serialized

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["fold"] = self.fold.as_dict()
        out["validation"] = self.validation.as_dict()
        out["variants"] = {
            name: {
                "path": v["path"],
                "validation": v["report"].as_dict(),
                **({"int8_search": v["search"].as_dict()} if "search" in v else {}),
            }
            for name, v in self.variants.items()
        }
        return out

    def format(self) -> str:
        lines = [self.fold.format(), "", self.validation.format()]
        for v in self.variants.values():
            lines += ["", v["search"].format()] if "search" in v else [""]
            lines += [v["report"].format(), f"  -> {v['path']}"]
        lines += [
            "",
            f"{self.onnx}: opset {self.opset}, {sum(self.nodes.values())} nodes, "
            f"{self.batchnorm_nodes} BatchNormalization; program {self.program}",
            "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
        ]
        if self.triton_repo:
            lines.append(f"Triton model repository: {self.triton_repo}")
        if self.compressed:
            lines += ["", *format_section(self.compressed)]
        return "\n".join(lines)


def export_onnx(
    module: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    samples: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    staging: Staging | None = None,
) -> ExportReport:
    """Fold ``module``'s BatchNorms, export to ONNX at ``path`` (+ ``.pt2``), validate.

    ``input_size`` is (C, H, W); the batch dimension is dynamic. ``samples``
    (float32 [N, C, H, W], preprocessed) validate the export; without them a
    random batch does. Raises :class:`ValidationFailed` (writing nothing)
    when the ONNX disagrees with ``module`` beyond tolerance. The two files
    appear together once both are written and checked; with ``staging`` they
    are staged in it instead, for the caller to publish with its other files.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    source = "dataset"
    if samples is None:
        source = "random"
        samples = np.random.default_rng(0).standard_normal((RANDOM_SAMPLES, *input_size))
        samples = samples.astype(np.float32)
    module = module.eval()
    seconds = {}
    t = time.perf_counter()
    folded, fold_report = fold_batchnorm(module, example=torch.from_numpy(samples[:8]))
    seconds["fold"] = time.perf_counter() - t
    t = time.perf_counter()
    program = trace(folded, input_size)
    seconds["trace"] = time.perf_counter() - t
    t = time.perf_counter()
    model = to_onnx(program, opset)
    seconds["onnx"] = time.perf_counter() - t
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if fold_report.kept == 0 and bn_nodes:
        raise AssertionError(f"every BatchNorm was folded, yet the ONNX has {bn_nodes}")
    info = {**(metadata or {}), **contract.encode({"folded_bn": fold_report.folded})}
    contract.write_props(model, info)
    t = time.perf_counter()
    checks = ValidationInputs.of(module, samples, labels=labels, source=source)
    program_path = path.with_suffix(".pt2")
    with together(staging) as group:
        report = write_validated(model, path, group, checks, "fp32")
        seconds["validate"] = time.perf_counter() - t
        save_program(program, group.file(program_path), info)
    return ExportReport(
        str(path),
        str(program_path),
        opset,
        fold_report,
        report,
        op_histogram(model),
        bn_nodes,
        {k: round(v, 2) for k, v in seconds.items()},
        model=model,
    )


@dataclass
class ExportOptions:
    opset: int = setting(DEFAULT_OPSET, f"ONNX opset, {MIN_OPSET}-{MAX_OPSET}")
    fp16: bool = setting(False, "also write <name>.fp16.onnx (fp16 weights and compute, fp32 I/O)")
    int8: bool = setting(
        False, "also write <name>.int8.onnx (QDQ, per-channel, static calibration)"
    )
    int8_target: str = setting(
        "cpu",
        "cpu (uint8 activations: ONNX Runtime, OpenVINO) or tensorrt (symmetric int8)",
        choices=INT8_TARGETS,
    )
    calib_samples: int = setting(256, "training images to calibrate int8 activations on", minimum=1)
    calib_method: str = setting(
        "minmax", f"int8 calibration: {', '.join(CALIBRATION_METHODS)}",
        choices=CALIBRATION_METHODS,
    )  # fmt: skip
    int8_max_drop: float = setting(
        INT8_MAX_DROP,
        "top-1 points the int8 file may lose against fp32; when every-layer int8 loses more, "
        "the most sensitive layers stay in float until it fits (refused if no mix does)",
        minimum=0,
        maximum=100,
    )
    val_samples: int = setting(512, "validation images that check each export, at most", minimum=1)
    dataset: str | None = setting(
        None,
        "validate and calibrate on this dataset (e.g. imagefolder:DIR) instead of the one "
        "the checkpoint names, e.g. when that folder has moved; it must have the same classes",
    )
    triton_repo: str | None = setting(None, "also write a Triton model repository here")
    triton_max_batch_size: int = setting(32, "the Triton model's max_batch_size", minimum=1)
    input_format: str = setting(
        "float32",
        "float32, or uint8: also write <name>.uint8.onnx (and <name>.fp16.uint8.onnx, "
        "<name>.int8.uint8.onnx for the variants) taking uint8 [N, H, W, C] pixels, "
        "/255, mean and std inside the graph",
        choices=contract.INPUT_FORMATS,
    )

    def check(self) -> ExportOptions:
        """Self, or a UserError naming the option out of its declared choices or range
        (before any work)."""
        return check_ranges(self)


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, opts: ExportOptions, staging: Staging | None = None
) -> ExportReport:
    """``convforge export``: checkpoint -> validated ONNX (+ variants, Triton repo, report).

    Every file is checked before any appears, and they appear together (see the
    module docstring). The checkpoint's dataset (or ``opts.dataset``) gives the
    validation and calibration images; when it cannot be loaded, a plain fp32
    export validates on random inputs, and one with ``--fp16`` or ``--int8``
    is refused with a UserError naming what is missing and ``--dataset``.
    With ``staging``, the files are staged in it, for the caller to publish
    with its own.
    """
    opts.check()
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"output path must end in .onnx, got {out}")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    ck, model = _rebuild(checkpoint)
    data = ck.data_config
    input_size = (data["channels"], data["input_size"], data["input_size"])
    samples, labels, calib = _images(ck, opts)
    info = _metadata(checkpoint, ck, opts)
    with together(staging) as staging:
        report = export_onnx(model, out, input_size, opset=opts.opset, metadata=info,
                             samples=samples, labels=labels, staging=staging)  # fmt: skip
        checks = None
        if samples is not None:
            checks = ValidationInputs.of(
                model, samples, labels=labels, int8_max_drop=opts.int8_max_drop
            )
        _variants(ExportJob(model, out, opts, staging, checks, calib), report)
        if ck.compress:
            report.compressed = compressed_section(ck, model, input_size)
        report_path = staging.file(out.with_suffix(".export.json"))
        report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


@dataclass(frozen=True)
class ExportJob:
    """One ``convforge export`` after its fp32 file: what each variant step needs."""

    module: nn.Module  # the checkpoint's model, unfolded: the reference of every check
    out: Path  # the fp32 file; each variant is written beside it
    opts: ExportOptions
    staging: Staging  # every file is staged here, to appear together with the others
    checks: ValidationInputs | None  # the checkpoint's validation images; None: none at hand
    calibration: np.ndarray | None  # int8 calibration images (None unless opts.int8)


def _rebuild(checkpoint: str | Path) -> tuple[Checkpoint, nn.Module]:
    """The checkpoint and its model, rebuilt from its config with its weights loaded."""
    from convforge.builder.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    return ck, ck.build_model()


def _metadata(checkpoint: str | Path, ck: Checkpoint, opts: ExportOptions) -> dict[str, str]:
    """The encoded metadata of the fp32 file (:func:`convforge.contract.metadata`)."""
    data = ck.data_config
    return contract.metadata(
        arch=ck.model_config.arch,
        classes=data["classes"],
        mean=data["mean"],
        std=data["std"],
        input_size=data["input_size"],
        resize_size=data.get("resize_size", data["input_size"]),
        channels=data["channels"],
        source_sha256=contract.sha256_of(checkpoint),
        dataset=_dataset(ck, opts),
        compressed=ck.compress,
    )


def _variants(job: ExportJob, report: ExportReport) -> None:
    """Stage the variants ``job.opts`` asks for beside the fp32 file: fp16, int8, uint8
    twins, the Triton repository. ``job.checks`` is None only when neither fp16 nor int8
    is asked."""
    from convforge.export import precision

    if job.opts.fp16:
        _variant(job, report, "fp16", precision.to_fp16(report.model))
    if job.opts.int8:
        _int8_variant(job, report)
    if job.opts.input_format == "uint8":
        _uint8_variants(job, report)
    if job.opts.triton_repo:
        report.triton_repo = _triton_repo(job, report)


def _int8_variant(job: ExportJob, report: ExportReport) -> None:
    """The int8 file: the fewest layers in float that keep top-1 within the budget."""
    from convforge.export.int8_accuracy import int8_within_budget

    opts = job.opts
    int8, search = int8_within_budget(
        report.model, job.calibration, job.checks, target=opts.int8_target, method=opts.calib_method
    )
    # TensorRT runs the Q/DQ graph as written; see convforge.export.validate.
    _variant(job, report, "int8", int8, optimized=opts.int8_target != "tensorrt")
    report.variants["int8"]["search"] = search


def _variant(
    job: ExportJob, report: ExportReport, name: str, model: onnx.ModelProto, optimized=True
) -> None:
    path = job.out.with_suffix(f".{name}.onnx")
    result = write_validated(model, path, job.staging, job.checks, name, optimized)
    report.variants[name] = {"path": str(path), "report": result, "model": model}


def _uint8_variants(job: ExportJob, report: ExportReport) -> None:
    """Beside each file written so far, its uint8-input twin (convforge.export.input_format):
    ``<name>.uint8.onnx``, ``<name>.fp16.uint8.onnx``, ``<name>.int8.uint8.onnx``.

    Each is validated like its float twin (same precision criterion), on the
    pixels behind the validation samples, against the original model run on
    those same pixels normalized in float32 as the evaluation transform does.
    """
    from convforge.export import input_format

    meta = contract.decode(contract.read_props(report.model))
    if job.checks is None:
        c, h, w = report.model.graph.input[0].type.tensor_type.shape.dim[1:]
        shape = (RANDOM_SAMPLES, h.dim_value, w.dim_value, c.dim_value)
        pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    else:
        pixels = input_format.pixels_of(job.checks.samples, meta["mean"], meta["std"])
    floats = input_format.normalized(pixels, meta["mean"], meta["std"])  # what fp32 sees
    checks = ValidationInputs(
        pixels,
        reference_logits(job.module, floats),
        labels=job.checks.labels if job.checks else None,
        source=report.validation.source,
        int8_max_drop=job.opts.int8_max_drop,
    )
    sources = {"fp32": (report.model, job.out)}
    sources.update({k: (v["model"], Path(v["path"])) for k, v in report.variants.items()})
    for name, (model, path) in sources.items():
        target = path.with_suffix(".uint8.onnx")
        optimized = not (name == "int8" and job.opts.int8_target == "tensorrt")  # as _variant
        result = write_validated(
            input_format.to_uint8_input(model), target, job.staging, checks, name, optimized
        )
        report.variants[f"{name}.uint8"] = {"path": str(target), "report": result}


def _triton_repo(job: ExportJob, report: ExportReport) -> str:
    """The Triton model folder, serving the int8 file when there is one, else the fp32."""
    from convforge.export.triton import write_triton_repo

    best = job.out.with_suffix(".int8.onnx") if job.opts.int8 else job.out
    repo = write_triton_repo(
        job.staging.temporary(best),
        job.opts.triton_repo,
        job.out.stem.replace(".", "_"),
        contract.decode(contract.read_props(report.model))["classes"],
        max_batch_size=job.opts.triton_max_batch_size,
        staging=job.staging,
    )
    return str(repo)


def write_validated(
    model: onnx.ModelProto,
    path: Path,
    staging: Staging,
    checks: ValidationInputs,
    precision: str,
    accuracy_optimized: bool = True,
) -> ValidationReport:
    """Stage ``model`` for ``path`` in ``staging``, and check the staged file.

    The bytes go to a temporary file beside ``path``, which is read back
    through the file contract and run by the runtime's ``ort-cpu`` backend on
    ``checks`` (:mod:`convforge.export.validate`); it becomes ``path`` when
    ``staging`` is published. Raises :class:`ValidationFailed` if the check fails.
    """
    expected = contract.read_props(model)
    tmp = staging.file(path)
    tmp.write_bytes(serialize(model))
    check_metadata(tmp, expected)
    report = validate(tmp, checks, precision, accuracy_optimized)
    if not report.passed:
        raise ValidationFailed(
            f"{precision} export failed validation, {path.name} not written: {report.criterion}"
        )
    return report


def _dataset(ck: Checkpoint, opts: ExportOptions) -> dict:
    """The dataset the export checks on (``--dataset``, else the checkpoint's) and its split,
    as the ``dataset`` metadata key holds them."""
    train_cfg = ck.train_config
    return {
        "spec": opts.dataset or ck.data_config["dataset"],
        "val_fraction": train_cfg.get("val_fraction", 0.1),
        "seed": train_cfg.get("seed", 0),
    }


def _images(ck: Checkpoint, opts: ExportOptions):
    """Validation samples + labels and calibration images from the checkpoint's dataset, or
    from ``opts.dataset`` (which must have the checkpoint's classes).

    When the checkpoint's dataset cannot be loaded here (a moved folder), a
    plain export gets (None, None, None) and validates on random inputs; fp16
    and int8, judged on real images, raise a UserError that names the folder
    and ``--dataset``.
    """
    from convforge.builder.data import augment
    from convforge.builder.data.sources import load_dataset

    data, dataset = ck.data_config, _dataset(ck, opts)
    try:
        bundle = load_dataset(
            dataset["spec"],
            val_fraction=dataset["val_fraction"],
            seed=dataset["seed"],
            channels=data["channels"],
        )
    except UserError as e:
        if opts.dataset:
            raise UserError(f"--dataset {opts.dataset}: {e}") from None
        wanted = [flag for flag, on in (("--fp16", opts.fp16), ("--int8", opts.int8)) if on]
        if not wanted:
            return None, None, None
        raise UserError(
            f"{' and '.join(wanted)} {'need' if len(wanted) > 1 else 'needs'} the checkpoint's "
            f"dataset to validate{' and calibrate' if opts.int8 else ''} on, and it cannot be "
            f"loaded: {e}; pass --dataset {dataset['spec'].partition(':')[0]}:PATH with its "
            "images where they are now"
        ) from None
    if opts.dataset and list(bundle.classes) != list(data["classes"]):
        raise UserError(
            f"--dataset {opts.dataset} has classes {_names(bundle.classes)}, but the checkpoint "
            f"was trained on {_names(data['classes'])}"
        )
    tf = augment.eval_transform(data["input_size"], data["mean"], data["std"], bundle.native_size)
    rng = np.random.default_rng(0)

    def take(images, n):
        idx = rng.permutation(len(images))[:n].tolist()
        view = images.with_transform(tf)
        x = torch.stack([view[i][0] for i in idx]).numpy().astype(np.float32)
        return x, np.array([images.targets[i] for i in idx])

    samples, labels = take(bundle.val, opts.val_samples)
    calib = take(bundle.train, opts.calib_samples)[0] if opts.int8 else None
    return samples, labels, calib


def _names(classes, shown: int = 5) -> str:
    """``[a, b, c, ... (12)]``: a class list short enough for one line."""
    more = f", ... ({len(classes)})" if len(classes) > shown else ""
    return "[" + ", ".join(map(str, classes[:shown])) + more + "]"
