"""Matplotlib without a display, and PNGs written atomically (a plot appears whole or not at all)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless ``Agg`` backend (imported lazily: training need not load it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(
    fig: Any, path: Path, title: str | None = None, fontsize: float | None = None, keep: bool = False
) -> Any:
    """Add ``title`` as the figure's suptitle, lay out, write ``path`` (PNG, dpi 100) via a temporary name.

    Returns ``path`` and closes the figure; with ``keep`` returns the figure, still open (tests inspect it).
    """
    if title is not None:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    if keep:
        return fig
    pyplot().close(fig)
    return path
