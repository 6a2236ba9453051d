"""The report's accuracy-latency chart: every configuration tune measured at batch 1, and the
one it recommends.

    points = tradeoff.points(plan, bench_records, compressed={"small.onnx", ...})
    tradeoff.draw(points, plan, Path("tradeoff.png"))
    tradeoff.why(points, plan)     # one sentence: the recommended point and why

One point per (model: original or compressed, precision, backend): the fastest
of its candidates in the tune plan at the plan's smallest batch size (1 in
every shipped recipe), at the top-1 tune measured for it. Tune times only the
candidates within its accuracy budget; a combination it rejected for accuracy
is placed at the latency ``bench`` measured for it, marked as over the budget.
The recommended point is the plan's choice for that batch size: the fastest
within the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "bf16": "D"}  # others: "P"


@dataclass
class Point:
    file: str  # the .onnx file's name
    model: str  # "original" or "compressed"
    precision: str
    backend: str
    p50_ms: float
    top1: float  # in [0, 1]: top-1 (or agreement with the reference) on tune's images
    delta_points: float  # against the reference (the original fp32 file)
    within: bool  # within tune's accuracy budget
    timed_by: str  # "tune" (interleaved rounds) or "bench" (tune rejected it for accuracy)
    options: dict = field(default_factory=dict)
    recommended: bool = False


def batch_size(plan) -> int:
    """The batch size the chart is drawn for: the plan's smallest."""
    return min(plan.search["batch_sizes"])


def points(plan, bench_records: list[dict], compressed: set[str]) -> list[Point]:
    """The chart's points (module docstring), the recommended one marked; ``compressed``:
    the names of the compressed model's files."""
    bs = batch_size(plan)
    groups: dict[tuple, list[dict]] = {}
    for c in plan.candidates:
        if c["batch_size"] == bs and c["accuracy"] is not None:
            name = Path(c["file"]).name
            model = "compressed" if name in compressed else "original"
            groups.setdefault((model, c["precision"], c["backend"]), []).append(c)
    chosen = next((e for e in plan.entries if e.batch_size == bs), None)
    out = []
    for (model, precision, backend), cands in groups.items():
        timed = [c for c in cands if c["p50_ms"] is not None]
        if timed:
            best = next((c for c in timed if c["status"] == "chosen"),
                        min(timed, key=lambda c: c["p50_ms"]))  # fmt: skip
            p50, within, timed_by = best["p50_ms"], True, "tune"
        else:  # every candidate lost more than the budget: tune did not time them
            best = max(cands, key=lambda c: c["accuracy"])
            p50 = _bench_p50(bench_records, best["file"], backend, bs)
            if p50 is None:
                continue
            within, timed_by = False, "bench"
        point = Point(Path(best["file"]).name, model, precision, backend, p50, best["accuracy"],
                      best["accuracy_delta_points"], within, timed_by, best["options"])  # fmt: skip
        point.recommended = chosen is not None and (point.file, backend, precision) == (
            Path(chosen.file).name, chosen.backend, chosen.precision)  # fmt: skip
        out.append(point)
    return sorted(out, key=lambda p: (p.model != "original", p.backend, p.precision))


def _bench_p50(records: list[dict], file: str, backend: str, bs: int) -> float | None:
    """bench's end-to-end p50 for ``file`` on ``backend`` at batch ``bs`` (None: not run)."""
    name = Path(file).name
    found = [r["p50_ms"] for r in records
             if Path(r["model"]).name == name and r["backend"] == backend
             and r["batch_size"] == bs and r["timing"] == "end-to-end"]  # fmt: skip
    return min(found, default=None)


def why(pts: list[Point], plan) -> str:
    """One sentence: which point is recommended and why (fastest within the budget), what it
    gains on the original fp32 file and what faster point the budget ruled out."""
    bs, budget = batch_size(plan), plan.accuracy["max_drop_points"]
    best = next((p for p in pts if p.recommended), None)
    if best is None:
        return f"No configuration ran within the {budget:g}-point budget at batch {bs}."
    within = [p for p in pts if p.within]
    text = (
        f"Recommended at batch {bs}: `{best.file}` on **{best.backend}** ({best.model}, "
        f"{best.precision}), {best.p50_ms:.3f} ms p50 at {best.top1:.2%} "
        f"({best.delta_points:+.2f} points against the original fp32 file), the fastest of "
        f"the {len(within)} points within the {budget:g}-point accuracy budget"
    )
    fp32 = [p for p in within if p.model == "original" and p.precision == "fp32"]
    if fp32 and not (best.model == "original" and best.precision == "fp32"):
        base = min(fp32, key=lambda p: p.p50_ms)
        text += (f"; {base.p50_ms / best.p50_ms:.2f}x faster than the original fp32 file at "
                 f"its fastest ({base.backend}, {base.p50_ms:.3f} ms)")  # fmt: skip
    over = [p for p in pts if not p.within and p.p50_ms < best.p50_ms]
    if over:
        o = min(over, key=lambda p: p.p50_ms)
        text += (f". Faster but over the budget: `{o.file}` on {o.backend} "
                 f"({o.p50_ms:.3f} ms, {o.delta_points:+.2f} points)")  # fmt: skip
    return text + "."


def draw(pts: list[Point], plan, path) -> None:
    """PNG of ``pts``: x = p50 latency (ms), y = top-1 (%); colour = backend, marker =
    precision, filled = original, hollow = compressed, faded = over the budget; the
    recommended point ringed and named; lines at the reference's top-1 and at the budget."""
    from convforge.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {b: f"C{i % 10}" for i, b in enumerate(dict.fromkeys(p.backend for p in pts))}
    for p in pts:
        colour = colours[p.backend]
        ax.scatter([p.p50_ms], [100 * p.top1], s=70, marker=MARKERS.get(p.precision, "P"),
                   facecolors=colour if p.model == "original" else "white", edgecolors=colour,
                   linewidths=1.8, alpha=1.0 if p.within else 0.4, zorder=3)  # fmt: skip
        if p.recommended:  # the one point named: many sit close together (the table has all)
            ax.scatter([p.p50_ms], [100 * p.top1], s=420, facecolors="none",
                       edgecolors="black", linewidths=2, zorder=4)  # fmt: skip
            ax.annotate(f"recommended: {p.file}, {p.backend}", (p.p50_ms, 100 * p.top1),
                        fontsize=9, weight="bold", xytext=(24, -28), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "black"})  # fmt: skip
    _axes(ax, pts, plan, colours)
    save_png(fig, path)


def _log_x(ax) -> None:
    """A log latency axis labelled in plain numbers (0.2, 0.5, 1, 2, 5, 10), not 10^0."""
    from matplotlib.ticker import FuncFormatter

    def plain(value, _pos, minor=False):
        lead = round(value / 10 ** math.floor(math.log10(value)))
        return "" if minor and lead not in (2, 5) else f"{value:g}"

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, p: plain(v, p, minor=True)))


def _axes(ax, pts: list[Point], plan, colours: dict) -> None:
    """Reference and budget lines, labels, scale and a legend that explains the encoding."""
    from matplotlib.lines import Line2D

    acc = plan.accuracy
    reference = 100 * acc["reference"]
    ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
    ax.axhline(reference - acc["max_drop_points"], color="C3", linestyle="--", linewidth=1)
    latencies = [p.p50_ms for p in pts]
    if max(latencies) / min(latencies) > 8:
        _log_x(ax)
    metric = "top-1" if acc.get("metric", "top1") == "top1" else "agreement with fp32"
    ax.set(xlabel=f"p50 latency at batch {batch_size(plan)} (ms)", ylabel=f"{metric} (%)",
           title="accuracy and latency: each model x precision x backend")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.1)
    # The points and the lines (a budget below 0% is off the chart), room for the label
    # below; nothing is above 100%, so no tick either.
    lines = [y for y in (reference, reference - acc["max_drop_points"]) if y >= 0]
    ys = [100 * p.top1 for p in pts] + lines
    pad = max(0.5, 0.12 * (max(ys) - min(ys)))
    low, high = min(ys) - 2 * pad, min(max(ys) + pad, 100 + pad / 4)
    ax.set_ylim(low, high)
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= 100])
    ax.set_ylim(low, high)
    mark = {"linestyle": "none", "markersize": 8}
    handles = [Line2D([], [], marker="o", color=c, label=b, **mark) for b, c in colours.items()]
    for precision in dict.fromkeys(p.precision for p in pts):
        handles.append(Line2D([], [], marker=MARKERS.get(precision, "P"), color="grey",
                              label=precision, **mark))  # fmt: skip
    if any(p.model == "compressed" for p in pts):
        handles += [
            Line2D([], [], marker="o", color="black", label="original", **mark),
            Line2D([], [], marker="o", color="black", markerfacecolor="white",
                   label="compressed", **mark),
        ]  # fmt: skip
    handles += [
        Line2D([], [], color="grey", linestyle=":", label="original fp32 top-1"),
        Line2D([], [], color="C3", linestyle="--",
               label=f"budget: -{acc['max_drop_points']:g} points"),
    ]  # fmt: skip
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
              frameon=False)  # fmt: skip
