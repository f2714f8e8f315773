"""Figures: learning curves and tables of images, written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

from dirnet_jax.workdir import atomic_output


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def learning_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str,
) -> None:
    """One line per run: {label: (steps, values)} → PNG at `path`."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    for k, (label, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, values, label=label, color=colors[k % len(colors)], lw=1.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8, frameon=False)
    _save(fig, path)


def image_table(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    cmap: str = "gray",
    shared_range: bool = True,
) -> None:
    """A grid of [H, W] images, rows × columns, with labels → PNG at `path`."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(1.2 * n_cols + 0.8, 1.2 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    lo = min(float(np.min(im)) for row in rows for im in row) if shared_range else None
    hi = max(float(np.max(im)) for row in rows for im in row) if shared_range else None
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            ax = axes[r, c]
            ax.imshow(np.asarray(im), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
