"""Figures: learning curves and tables of images, written atomically as PNG.

matplotlib is imported where a figure is drawn, not with this module: a command that stops
before its figures (a bad flag, a signal, a cluster's non-primary process) skips its
import, 0.5–0.6 s on the 2-core CPU."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from dirnet_jax.workdir import atomic_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure without pyplot: no global figure state, no GUI backend."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


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
    import matplotlib

    fig = _figure(figsize=(6.5, 4.2))
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
    rows: Sequence[Sequence[np.ndarray | None]],
    path: str | os.PathLike,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    cmap: str | Sequence[str] = "gray",
    shared_range: bool = True,
    colorbar: Sequence[bool] | None = None,
) -> None:
    """A grid of [H, W] images, rows × columns, with labels → PNG at `path`.

    `cmap` may differ per row; with `shared_range` every row shares one intensity range
    (each row its own). A None cell stays empty; `colorbar` adds one per row.
    """
    n_rows, n_cols = len(rows), len(rows[0])
    cmaps = [cmap] * n_rows if isinstance(cmap, str) else list(cmap)
    fig = _figure(figsize=(1.2 * n_cols + 0.8 + 0.4 * bool(colorbar), 1.2 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        present = [np.asarray(im) for im in row if im is not None]
        lo = min(float(im.min()) for im in present) if shared_range else None
        hi = max(float(im.max()) for im in present) if shared_range else None
        shown = None
        for c, im in enumerate(row):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if im is None:
                ax.set_frame_on(False)  # empty, but keeps its row label
            else:
                shown = ax.imshow(
                    np.asarray(im), cmap=cmaps[r], vmin=lo, vmax=hi, interpolation="nearest"
                )
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=9)
        if colorbar and colorbar[r] and shown is not None:
            fig.colorbar(shown, ax=list(axes[r]), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    _save(fig, path)
