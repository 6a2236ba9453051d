"""Per-epoch metrics: metrics.csv, curves.png, and the overfitting watch.

The lecture's advice made mechanical: plot training against validation loss
and accuracy every epoch; when validation loss keeps rising while training
loss keeps falling, the model is memorizing the training set.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from convforge.files import atomic_write
from convforge.plots import pyplot, save_png

COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "ema_val_loss",
    "ema_val_acc",
    "seconds",
    "images_per_s",
]


def overfitting(history: list[dict], window: int) -> bool:
    """True when val loss rose and train loss fell at each of the last ``window`` epochs."""
    if window < 1 or len(history) < window + 1:
        return False
    recent = history[-(window + 1) :]
    pairs = list(zip(recent, recent[1:], strict=False))
    return all(
        b["val_loss"] > a["val_loss"] and b["train_loss"] < a["train_loss"] for a, b in pairs
    )


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """All epochs so far, one row each, written atomically (columns: :data:`COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_curves(path: Path, history: list[dict], title: str) -> None:
    """PNG of loss and accuracy, train vs validation (and EMA when present), by epoch."""
    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", ms=3, label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", ms=3, label="val")
        if history[-1].get(f"ema_val_{key}") is not None:
            ema = [h.get(f"ema_val_{key}") for h in history]
            ax.plot(epochs, ema, marker="o", ms=3, label="val (EMA)")
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)
