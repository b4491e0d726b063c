"""ROC and CMC plots as PNG files (matplotlib's Agg canvas; no global backend change)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.atomic import atomic_open


def _new_axes() -> tuple[Any, Any]:
    """A 6x5-inch figure on its own Agg canvas, and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig: Any, ax: Any, title: str, path: str | os.PathLike[str]) -> None:
    """Title, grid and legend, then the PNG written atomically."""
    ax.set_title(title)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def save_roc_png(
    path: str | os.PathLike[str],
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "ROC",
    tar_at_far: Mapping[float, float] | None = None,
) -> None:
    """Write a log-FAR ROC plot of ``{label: (fpr, tpr)}`` curves to ``path`` (atomically).

    ``tar_at_far`` (``{far: tar}``, from the first curve) is marked on the plot.
    """
    fig, ax = _new_axes()
    for label, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, dtype=np.float64)
        keep = fpr > 0
        ax.plot(fpr[keep], np.asarray(tpr)[keep], lw=1.2, label=label)
    if tar_at_far:
        xs = list(tar_at_far)
        ax.scatter(xs, [tar_at_far[x] for x in xs], s=12, color="k", zorder=3)
        for x in xs:
            ax.annotate(
                f"{100 * tar_at_far[x]:.2f}",
                (x, tar_at_far[x]),
                fontsize=7,
                xytext=(2, -10),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    _finish(fig, ax, title, path)


def save_cmc_png(
    path: str | os.PathLike[str],
    curves: Mapping[str, np.ndarray],
    *,
    title: str = "CMC",
) -> None:
    """Write a CMC plot (identification rate against rank 1..R) of ``{label: (R,) rates}``
    to ``path`` (atomically)."""
    fig, ax = _new_axes()
    for label, rates in curves.items():
        rates = np.asarray(rates, dtype=np.float64)
        ax.plot(np.arange(1, rates.size + 1), rates, lw=1.2, marker=".", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    _finish(fig, ax, title, path)
