"""The pipeline's report: what a run found, top to bottom, from its steps' results.

1. a summary box: the accuracy reached, the recommended file and backend, its latency;
2. the data: a grid of training images with their augmented views;
3. training: the curves, the overfitting verdict, the final accuracies;
4. the init diagnostic;
5. compression (with a compress step): each round's MACs, parameters and top-1, the one kept;
6. the export: BatchNorm folding and each file's validation;
7. one table per backend x file (precision): top-1, p50/p99, throughput; the latency plot;
8. accuracy and latency: the chart of every model x precision x backend at batch 1
   (:mod:`.tradeoff`), the point recommended and why;
9. the recommendation: the tune plan's choice per batch size, why, what it costs;
10. the ``convforge serve`` and ``convforge predict`` commands that use it.

:func:`build` returns a :class:`~convforge.pipeline.document.Document`;
``report.md`` and ``report.html`` are its two renderings, ``tradeoff.png`` the chart.
"""

from __future__ import annotations

import platform
import shlex
from pathlib import Path

from convforge import __version__
from convforge.files import Staging
from convforge.pipeline import tradeoff
from convforge.pipeline.deploy import exported_files
from convforge.pipeline.document import Document
from convforge.pipeline.recipe import Recipe

CHART = "tradeoff.png"


def build(
    recipe: Recipe, out: Path, results: dict, plan, reused: list[str],
    staging: Staging | None = None,
) -> Document:  # fmt: skip
    """The report of the run in ``out`` (``plan``: the tune step's Plan); the chart it
    shows is written to ``out/tradeoff.png`` (staged in ``staging`` when given)."""
    doc = Document(f"convforge pipeline: {recipe.name}")
    if recipe.description:
        doc.text(recipe.description, muted=True)
    _summary(doc, recipe, results, plan)
    _data(doc, results["data"])
    if "pretrain" in results:
        _training(doc, recipe, results["pretrain"], "Pretraining", recipe.pretrain)
    _training(doc, recipe, results["train"], "Training", recipe.train)
    if "init" in results:
        _init(doc, results["init"])
    if "compress" in results:
        _compression(doc, results["compress"])
    _export(doc, results["export"])
    _backends(doc, results["bench"], out)
    _tradeoff(doc, results, plan, lambda: staging.file(out / CHART) if staging else out / CHART)
    _recommendation(doc, plan)
    _commands(doc, out, plan, results["data"])
    env = results["bench"]["environment"]
    doc.text(
        f"convforge {__version__}, Python {platform.python_version()}; measured on "
        f"{env.get('cpu')} ({env.get('logical_cores')} logical cores"
        f"{', ' + str(env['gpu']) if env.get('gpu') else ''}). "
        + (f"Reused from an earlier run: {', '.join(reused)}." if reused else "").strip(),
        muted=True,
    )
    return doc


def _summary(doc: Document, recipe: Recipe, results: dict, plan) -> None:
    train, images = results["train"], results["data"]["val_images"]
    first, last = plan.entries[0], plan.entries[-1]
    ref = plan.accuracy
    doc.summary(
        [
            ("Accuracy", f"**{train['best_val_acc']:.2%}** validation top-1 (PyTorch, epoch "
                         f"{train['best_epoch']} of {train['epochs']}, {images} images)"),
            ("Recommended", f"`{Path(first.file).name}` on **{first.backend}** "
                            f"({first.precision}) for batch {first.batch_size}"),
            ("Latency", f"**{first.p50_ms:.2f} ms** p50, {first.p99_ms:.2f} ms p99 at batch "
                        f"{first.batch_size}; {last.throughput_ips:,.0f} images/s at batch "
                        f"{last.batch_size} ({last.backend}, `{Path(last.file).name}`)"),
            ("Accuracy cost", f"{first.accuracy_delta_points:+.2f} points against the fp32 file "
                              f"({ref['reference']:.2%} on {ref['images']} images)"),
            *_compressed_summary(results.get("compress")),
        ]
    )  # fmt: skip


def _compressed_summary(c: dict | None) -> list[tuple[str, str]]:
    """The summary's line on the compressed model (none without a compress step)."""
    if c is None:
        return []
    o = c["original"]
    return [("Compressed", f"`{c['checkpoint']}`: **{c['speedup']:.2f}x fewer MACs**, "
                           f"{o['params'] / 1e6:.2f} -> {c['params'] / 1e6:.2f} M parameters, "
                           f"top-1 {o['top1']:.2%} -> {c['top1']:.2%} (PyTorch)")]  # fmt: skip


def _data(doc: Document, data: dict) -> None:
    doc.heading("Data")
    aug = data["augment"]
    on = [k.replace("_", " ") for k in ("flip", "crop", "rotation", "color_jitter", "erasing",
                                         "mixup", "cutmix") if aug.get(k)]  # fmt: skip
    if aug.get("auto") not in (None, "none"):
        on.append(f"auto-augment {aug['auto']}")
    doc.text(
        f"{data['description']}. Augmentation preset **{aug['preset']}** "
        f"({', '.join(on) or 'nothing on'}). Each row: one training image, first as evaluation "
        "sees it, then as training sees it in different epochs."
    )
    doc.image(data["grid"], "training images and their augmented views", width=620)


def _training(doc: Document, recipe: Recipe, train: dict, title: str, cfg) -> None:
    from convforge.builder.training.monitor import overfitting

    doc.heading(title)
    history = train["history"]
    final = history[-1]
    transfer = train.get("transfer")
    what = f"{recipe.model['arch']} on `{cfg.dataset}`, {cfg.input_size} px"
    if transfer:
        what += f", fine-tuned from the pretraining run ({transfer.get('strategy', '?')})"
    doc.text(
        f"{what}: best validation accuracy **{train['best_val_acc']:.2%}** at epoch "
        f"{train['best_epoch']} of {train['epochs']} ({train['images_per_s']:.0f} training "
        f"images/s). Checkpoint `{train['checkpoint']}`, every epoch in "
        f"`{train['folder']}/metrics.csv`."
    )
    if transfer:
        frozen = ", ".join(transfer.get("frozen") or []) or "nothing"
        doc.bullets([
            f"Strategy **{transfer.get('strategy')}**: {transfer.get('reason', '')}.",
            f"Frozen: {frozen}; the trainable backbone learns at "
            f"{transfer.get('backbone_lr_mult')} x the head's rate.",
        ])  # fmt: skip
    doc.image(f"{train['folder']}/curves.png", f"{title.lower()} curves")
    doc.text(_verdict(history, cfg.overfit_window, overfitting))
    doc.table(
        ["", "train", "validation"],
        [
            ["loss, last epoch", f"{final['train_loss']:.4f}", f"{final['val_loss']:.4f}"],
            ["top-1, last epoch", f"{final['train_acc']:.2%}", f"{final['val_acc']:.2%}"],
            ["top-1, best epoch", "", f"{train['best_val_acc']:.2%}"],
        ],
    )


def _verdict(history: list[dict], window: int, overfitting) -> str:
    """One sentence on overfitting, from the validation and training losses."""
    low = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    last = history[-1]
    gap = (last["train_acc"] - last["val_acc"]) * 100
    note = (" (training accuracy is measured on augmented images, so it can sit below "
            "validation)") if gap < 0 else ""  # fmt: skip
    if overfitting(history, window):
        return (
            f"**Overfitting:** validation loss rose while training loss fell in each of the "
            f"last {window} epochs; `best.pt` keeps the best validation epoch."
        )
    if low < len(history) - 1 - window and last["val_loss"] > 1.05 * history[low]["val_loss"]:
        return (
            f"**Some overfitting:** validation loss was lowest at epoch {low + 1} "
            f"({history[low]['val_loss']:.4f}) and ended {last['val_loss']:.4f}; "
            f"train-validation gap {gap:+.1f} points{note}."
        )
    return (
        f"**No overfitting seen:** validation loss was lowest at epoch {low + 1} of "
        f"{len(history)} and never rose while training loss fell for {window} epochs in a row; "
        f"train-validation gap {gap:+.1f} points{note}."
    )


def _init(doc: Document, init: dict) -> None:
    doc.heading("Initialization diagnostic")
    doc.text(
        "The lecture's experiment (`convforge diagnose init`): one batch of unit-Gaussian "
        "inputs through a fresh plain 10-layer CNN (64 channels, no normalization), the std of "
        "each activation layer's output under each init rule. The ratio of the last layer's "
        "std to the first's shows whether the signal survives depth (1 = kept)."
    )
    rows = []
    for activation, a in init["activations"].items():
        for rule, s in a["spread"].items():
            rows.append([activation, rule, f"{a['ratios'][rule]:.3g}", f"{s['median']:.3g}",
                         f"{s['min']:.3g} - {s['max']:.3g}"])  # fmt: skip
    doc.table(
        ["activation", "init", "ratio, seed 0", f"median, {init['seeds']} seeds", "range"], rows
    )
    doc.text(
        "One seed is one draw of weights and inputs, and with 64 channels and no normalization "
        "the ReLU ratio under kaiming swings between draws, which is why the median over seeds "
        "is the number to read: kaiming keeps ReLU's signal near 1 and xavier tanh's, while "
        "small weights collapse it."
    )
    for activation, a in init["activations"].items():
        doc.image(a["plot"], f"activation std by depth, {activation}")


def _export(doc: Document, export: dict) -> None:
    doc.heading("Export")
    fold = export["fold"]
    doc.text(
        f"BatchNorm folded into the convolutions ({fold['method']}): **{fold['folded']} "
        f"folded**, {fold['kept']} kept; the folded model differs from the original by at most "
        f"{_g(fold['max_abs_diff'])} (relative {_g(fold['max_rel_diff'])}). The ONNX graph "
        f"has {sum(export['nodes'].values())} nodes and {export['batchnorm_nodes']} "
        f"BatchNormalization, opset {export['opset']}."
    )
    small = export.get("small")
    if small:
        fold = small["fold"]
        doc.text(
            f"The compressed checkpoint `{small['checkpoint']}` is exported the same way, "
            f"beside it: **{fold['folded']} folded**, {fold['kept']} kept, at most "
            f"{_g(fold['max_abs_diff'])} from the unfolded model; "
            f"{sum(small['nodes'].values())} nodes."
        )
    rows = []
    for e in (export, small) if small else (export,):
        rows.append(_validation_row(Path(e["onnx"]).name, e["validation"]))
        rows += [_validation_row(Path(v["path"]).name, v["validation"])
                 for v in e["variants"].values()]  # fmt: skip
    doc.table(["file", "precision", "check", "max abs diff", "images", "top-1 PyTorch",
               "top-1 ONNX"], rows)  # fmt: skip
    doc.details("The full export report (`export.txt`)", _export_text(export))


def _export_text(export: dict) -> str:
    small = export.get("small")
    if not small:
        return export["text"]
    return f"{export['text']}\n\ncompressed model ({small['checkpoint']}):\n{small['text']}"


def _validation_row(name: str, v: dict) -> list:
    worst = max((r["max_abs_diff"] for r in v["runs"]), default=None)
    return [
        f"`{name}`",
        v["precision"],
        "pass" if v["passed"] else "FAIL",
        _g(worst),
        v["samples"],
        _pct(v["reference_accuracy"]),
        _pct(v["onnx_accuracy"]),
    ]


def _backends(doc: Document, bench: dict, out: Path) -> None:
    doc.heading("Backends")
    env = bench["environment"]
    doc.text(
        f"Each exported file on each backend that runs here, end to end (host batch in, "
        f"logits out), on {env.get('cpu')}. Top-1 on the validation images; p50/p99 over the "
        "timed runs of one process. The tune plan below times its candidates interleaved, "
        "so its numbers are the ones to compare."
    )
    groups: dict[tuple, list[dict]] = {}
    for r in bench["records"]:
        groups.setdefault((r["backend"], r["precision"]), []).append(r)
    for (backend, precision), records in groups.items():
        doc.heading(f"{backend} · {precision}", level=3)
        doc.table(
            ["file", "batch", "timing", "top-1", "p50 ms", "p99 ms", "images/s"],
            [
                [
                    f"`{Path(r['model']).name}`",
                    r["batch_size"],
                    r["timing"],
                    _pct(r.get("top1_accuracy")),
                    f"{r['p50_ms']:.3f}",
                    f"{r['p99_ms']:.3f}",
                    f"{r['throughput_ips']:,.0f}",
                ]
                for r in records
            ],  # fmt: skip
        )
    folder = f"{out.resolve()}/"
    doc.bullets([f"not run: {s.replace(folder, '')}" for s in bench["skipped"]])
    doc.image(bench["plot"], "p50 latency and throughput by batch size")


def _compression(doc: Document, c: dict) -> None:
    doc.heading("Compression")
    o, target = c["original"], c["target"]
    aim = (f"{target['speedup']:g}x fewer MACs" if "speedup" in target
           else f"{target['latency_ms']:g} ms at batch 1 on {target['backend']}")  # fmt: skip
    teacher = (f"distilled from the original (weight {c['distill_weight']:g})"
               if c["distill_weight"] > 0 else "on the labels alone")  # fmt: skip
    tuned = (f"fine-tuned {c['epochs']} epoch(s) on `{c['dataset']}` {teacher}"
             if c["epochs"] else "not fine-tuned (epochs: 0)")  # fmt: skip
    doc.text(
        f"`convforge compress` pruned whole channels (Torch-Pruning, importance "
        f"{c['importance']}) in {c['planned_rounds']} planned round(s) towards {aim}, each "
        f"{tuned}, and kept the last round within {c['max_drop']:g} top-1 points of the "
        f"original: round {c['kept']}, **"
        f"{c['speedup']:.2f}x fewer MACs** ({o['macs'] / 1e6:,.1f} M -> {c['macs'] / 1e6:,.1f} "
        f"M), top-1 **{o['top1']:.2%} -> {c['top1']:.2%}** (PyTorch, the validation split). "
        f"Checkpoint `{c['checkpoint']}`, in {c['seconds']:.0f} s."
    )
    latency = ["p50 ms"] if "latency_ms" in o else []
    doc.table(["", "target MMACs", "MMACs", "fewer MACs", "M params", "top-1", "pts",
               *latency, ""], _compress_rows(c, bool(latency)))  # fmt: skip


def _compress_rows(c: dict, latency: bool) -> list[list]:
    """The original, then each round: MACs, parameters, top-1, verdict (and latency)."""
    o = c["original"]

    def row(label, r, target, verdict):
        drop = "" if r is o else f"{100 * (r['top1'] - o['top1']):+.2f}"
        return [label, target, f"{r['macs'] / 1e6:,.1f}", f"{o['macs'] / r['macs']:.2f}x",
                f"{r['params'] / 1e6:.3f}", _pct(r["top1"]), drop,
                *([f"{r['latency_ms']:.3f}"] if latency else []), verdict]  # fmt: skip

    rows = [row("original", o, "", "")]
    for r in c["rounds"]:
        verdict = ("kept" if r["round"] == c["kept"] else "within" if r["passed"]
                   else "over the budget")  # fmt: skip
        rows.append(row(f"round {r['round']}", r, f"{r['target_macs'] / 1e6:,.1f}", verdict))
    return rows


def _tradeoff(doc: Document, results: dict, plan, chart_path) -> None:
    """The accuracy-latency chart (:mod:`.tradeoff`, drawn to ``chart_path()`` when it has
    a point), its points and the recommendation."""
    doc.heading("Accuracy and latency")
    small = results["export"].get("small")
    compressed = {Path(f).name for f in exported_files(small)} if small else set()
    pts = tradeoff.points(plan, results["bench"]["records"], compressed)
    bs = tradeoff.batch_size(plan)
    doc.text(
        f"Every model x precision x backend tune measured at batch {bs}: its p50 latency "
        "(the fastest of its settings, timed in tune's interleaved rounds) against its top-1 "
        "on tune's images. A point over the accuracy budget was not timed by tune; it sits at "
        "its latency in the bench tables, faded."
    )
    if not pts:
        doc.text(f"No configuration has both a latency and a top-1 at batch {bs}.")
        return
    chart = chart_path()
    tradeoff.draw(pts, plan, chart)
    doc.image(CHART, f"top-1 against p50 latency at batch {bs}", source=chart)
    doc.table(
        ["file", "model", "precision", "backend", "p50 ms", "top-1", "pts", "budget", "timed by"],
        [[f"`{p.file}`", p.model, p.precision, p.backend, f"{p.p50_ms:.3f}", _pct(p.top1),
          f"{p.delta_points:+.2f}", ("**recommended**" if p.recommended else "within")
          if p.within else "over", p.timed_by] for p in pts],
    )  # fmt: skip
    doc.text(tradeoff.why(pts, plan))


def _recommendation(doc: Document, plan) -> None:
    doc.heading("Recommendation")
    acc = plan.accuracy
    doc.text(
        f"`convforge tune` measured {plan.search['candidates']} candidates (backend x file x "
        f"settings x batch size) on this machine in {plan.search['seconds']:.0f} s, each timed "
        f"in interleaved rounds, and kept the fastest within {acc['max_drop_points']:g} "
        f"points of the fp32 file's top-1 ({acc['reference']:.2%} on {acc['images']} "
        f"validation images; one image is {100 / acc['images']:.2g} points). The plan is "
        "`plan.json`."
    )
    rows = []
    for e in plan.entries:
        rows.append([e.batch_size, e.backend, f"`{Path(e.file).name}`", e.precision,
                     _options(e.options), f"{e.p50_ms:.3f}", f"{e.p99_ms:.3f}",
                     f"{e.throughput_ips:,.0f}", f"{e.accuracy_delta_points:+.2f}"])  # fmt: skip
    doc.table(["batch", "backend", "file", "precision", "settings", "p50 ms", "p99 ms",
               "images/s", "top-1 pts"], rows)  # fmt: skip
    doc.bullets([_why(plan, e) for e in plan.entries])


def _why(plan, entry) -> str:
    """Why ``entry`` won its batch size, against the plain fp32 file and the runner-up."""
    same = [c for c in plan.candidates if c["batch_size"] == entry.batch_size]
    measured = sorted((c for c in same if c["p50_ms"] is not None and c["status"] in
                       ("chosen", "measured")), key=lambda c: c["p50_ms"])  # fmt: skip
    rejected = [c for c in same if c["status"] == "rejected"]
    reference = [c for c in measured if c["file"] == plan.model]
    text = f"Batch {entry.batch_size}: {entry.backend} on `{Path(entry.file).name}` "
    text += f"had the lowest p50 of {_count(len(measured), 'candidate')} measured to the end"
    if len(measured) > 1:
        second = measured[1]
        text += (f", {second['p50_ms'] / entry.p50_ms:.2f}x faster than the runner-up "
                 f"({second['backend']}, `{Path(second['file']).name}`)")  # fmt: skip
    if reference and plan.model != entry.file:
        best = reference[0]
        text += (f" and {best['p50_ms'] / entry.p50_ms:.2f}x faster than the fp32 file "
                 f"`{Path(plan.model).name}` at its best ({best['backend']})")  # fmt: skip
    cost = entry.accuracy_delta_points
    text += f". Accuracy: {cost:+.2f} points against fp32"
    text += " (no cost)." if abs(cost) < 1e-9 else "."
    if rejected:
        text += f" {len(rejected)} candidate(s) lost more than the budget and were left out."
    return text


def _commands(doc: Document, out: Path, plan, data: dict) -> None:
    doc.heading("Use it")
    model = shlex.quote(str(out / Path(plan.model).name))
    plan_path = shlex.quote(str(out / "plan.json"))
    sample = shlex.quote(str(out / data["sample"]))
    doc.text(
        "Serve the recommended configuration over the Open Inference Protocol (KServe v2, "
        "HTTP and gRPC); the plan picks the backend, file and settings for the server's batch "
        "size:"
    )
    doc.code(f"convforge serve {model} --plan {plan_path}")
    doc.text(
        f"Classify an image with it (`{data['sample']}` is a validation image of class "
        f"{data['sample_class']!r}):"
    )
    doc.code(f"convforge predict {model} {sample} --plan {plan_path}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _options(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _g(value) -> str:
    return "-" if value is None else f"{value:.3g}"
