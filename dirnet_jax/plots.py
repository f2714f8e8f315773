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


def save(fig: Figure, path: str | os.PathLike) -> None:
    """`fig` as a PNG at `path`, written atomically."""
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
    save(curves_figure(curves, ylabel=ylabel, title=title), path)


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
    save(fig, path)


def deformed_grid(displacement: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The lines of a grid of pixel spacing `step` carried by x ↦ x + u(x).

    Args:
      displacement: [H, W, 2] u in pixels, (row, col) components.
      step: pixels between grid lines; the last row and column are lines too.

    Returns:
      (rows, cols): [R, W, 2] the lines through rows 0, step, …, H − 1 and [C, H, 2] those
      through columns 0, step, …, W − 1, each point (row, col) = x + u(x).
    """
    u = np.asarray(displacement, np.float64)
    height, width = u.shape[:2]
    x = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), axis=-1) + u
    through = [np.unique(np.r_[np.arange(0, n, step), n - 1]) for n in (height, width)]
    return x[through[0]], x[:, through[1]].transpose(1, 0, 2)


def registration_figure(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    displacement: np.ndarray,
    jacobian: np.ndarray,
    *,
    grid_step: int,
    title: str,
    labels: np.ndarray | None = None,
    warped_labels: np.ndarray | None = None,
) -> Figure:
    """One registered pair at a glance.

    Top: the fixed image (with the warped labels' outlines), the moving one (with its
    labels'), the warped one, and the moving one under the fixed image's grid carried by
    x ↦ x + u(x), where each grid cell of the fixed image came from. Bottom: |moving − fixed|
    and |warped − fixed| on one scale, and the Jacobian determinant (1: no change of area;
    black: folded, ≤ 0).

    Args: [H, W] images, [H, W, 2] displacement in pixels (row, col), [H, W] Jacobian
    determinant, [H, W] integer label masks.
    """
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm

    images = [np.asarray(a, np.float64) for a in (fixed, moving, warped)]
    lo, hi = min(a.min() for a in images), max(a.max() for a in images)
    fig = _figure(figsize=(9.6, 5.2), layout="constrained")
    axes = fig.subplots(2, 4)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    gray = dict(cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    names = ["fixed", "moving", "warped", "moving, fixed grid carried"]
    for ax, image, name in zip(axes[0], [*images, images[1]], names, strict=True):
        ax.imshow(image, **gray)
        ax.set_title(name, fontsize=9)
    for ax, mask in ((axes[0, 0], warped_labels), (axes[0, 1], labels)):
        if mask is not None and np.ptp(mask) > 0:
            levels = np.unique(mask)[:-1] + 0.5  # every boundary between two labels
            ax.contour(mask, levels=levels, colors="yellow", linewidths=0.8)
    rows, cols = deformed_grid(displacement, grid_step)
    for line in (*rows, *cols):
        axes[0, 3].plot(line[:, 1], line[:, 0], color="orange", lw=0.7)
    axes[0, 3].set_xlim(-0.5, images[1].shape[1] - 0.5)
    axes[0, 3].set_ylim(images[1].shape[0] - 0.5, -0.5)

    axes[1, 0].set_frame_on(False)
    differences = [np.abs(images[1] - images[0]), np.abs(images[2] - images[0])]
    top = max(d.max() for d in differences) or 1.0
    names = ["|moving − fixed|", "|warped − fixed|"]
    for ax, d, name in zip(axes[1, 1:3], differences, names, strict=True):
        shown = ax.imshow(d, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    fig.colorbar(shown, ax=list(axes[1, 1:3]), shrink=0.9)
    det = np.asarray(jacobian, np.float64)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(det.max())))
    shown = axes[1, 3].imshow(det, cmap="coolwarm", norm=norm, interpolation="nearest")
    folded = np.ma.masked_where(det > 0, np.ones_like(det))
    axes[1, 3].imshow(folded, cmap=matplotlib.colors.ListedColormap(["black"]), vmin=0, vmax=1)
    axes[1, 3].set_title(f"Jacobian det. ({(det <= 0).mean():.2%} ≤ 0)", fontsize=9)
    fig.colorbar(shown, ax=axes[1, 3], shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig
