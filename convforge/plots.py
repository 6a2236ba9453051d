"""Matplotlib for reports: headless (Agg) figures, saved atomically as PNG."""

from __future__ import annotations

import io
import os

from convforge.files import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
