"""Measures of a registration: folding of the deformation, overlap and surface distance of
warped label masks (Dice, 95th percentile and mean of the symmetric surface distance)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of x ↦ x + u(x), by central differences.

    Args:
      displacement: [B, *spatial, ndim] field in pixels, components in axis order.

    Returns:
      [B, *spatial]; ≤ 0 where the deformation folds.
    """
    u = np.asarray(displacement, np.float64)
    ndim = u.shape[-1]
    # d u_i / d x_j for every i, j: gradients along the spatial axes 1 … ndim.
    grads = np.stack(np.gradient(u, axis=tuple(range(1, ndim + 1))), axis=-1)
    return np.linalg.det(np.eye(ndim) + grads)  # [..., i, j] = δ_ij + ∂u_i/∂x_j


def folded_fraction(displacement: np.ndarray) -> np.ndarray:
    """[B] fraction of pixels where the Jacobian determinant is ≤ 0."""
    det = jacobian_determinant(displacement)
    return (det <= 0).reshape(det.shape[0], -1).mean(axis=1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (NaN when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: inside, with a face-neighbour outside (or off-image)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Symmetric surface distances, in the units of `spacing` (axis order): from every
    surface pixel of `a` to the nearest of `b`, and from `b` to `a`."""
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        return np.array([np.nan])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return np.concatenate([to_b[sa], to_a[sb]])


def mask_metrics(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """Dice, 95th percentile (hd95_mm) and mean (mad_mm) of the symmetric surface distance."""
    distances = surface_distances(a, b, spacing)
    return {
        "dice": dice(a, b),
        "hd95_mm": float(np.percentile(distances, 95)),
        "mad_mm": float(np.mean(distances)),
    }


def summarize(values) -> dict[str, float]:
    """{"mean", "std", "n"} over the finite values (NaN marks an undefined measure)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}
