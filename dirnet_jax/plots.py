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
    """One line per run: {label: (steps, values)} → PNG at `path` (see `curves_figure`)."""
    _save(curves_figure(curves, ylabel=ylabel, title=title), path)


ZOOM_BELOW = 0.25  # the last half's span, as a share of the whole span, that gets a zoom


def curves_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, ylabel: str, title: str
) -> Figure:
    """One line per run: {label: (steps, values)}. Where the untrained start lies far from
    the rest (the last half of the iterations spans under `ZOOM_BELOW` of all values'
    range), a second panel shows that last half alone, where runs differ at the end."""
    import matplotlib

    steps = np.concatenate([np.asarray(s, dtype=float) for s, _ in curves.values()])
    values = np.concatenate([np.asarray(v, dtype=float) for _, v in curves.values()])
    half = steps.max() / 2 if steps.size else 0.0
    late = values[steps >= half]
    zoom = late.size > 1 and np.ptp(late) < ZOOM_BELOW * np.ptp(values)
    fig = _figure(figsize=(11.5, 4.2) if zoom else (6.5, 4.2))
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    colors = matplotlib.colormaps["tab10"].colors
    for ax in axes:
        for k, (label, (s, v)) in enumerate(curves.items()):
            ax.plot(s, v, label=label, color=colors[k % len(colors)], lw=1.5)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].set_title(title)
    axes[0].legend(ncol=2, fontsize=8, frameon=False)
    if zoom:
        margin = 0.05 * (np.ptp(late) or abs(late[0]) or 1.0)
        axes[1].set_xlim(half, steps.max())
        axes[1].set_ylim(late.min() - margin, late.max() + margin)
        axes[1].set_title(f"the last half (iterations ≥ {half:g}), zoomed")
    return fig


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
