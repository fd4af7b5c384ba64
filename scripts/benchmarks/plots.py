"""The figure helper of the benchmark report's plots (matplotlib, no display needed)."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: Path, size: tuple[float, float], xlabel: str, ylabel: str, legend_size: int = 8):
    """Yields the axis of a new figure; labels it, adds the legend and saves it as ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot, axis = plt.subplots(figsize=size)
    yield axis
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=legend_size)
    plot.tight_layout()
    plot.savefig(path, dpi=110)
    plt.close(plot)
