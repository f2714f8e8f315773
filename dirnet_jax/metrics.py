"""Measures of a registration: folding of the deformation."""

from __future__ import annotations

import numpy as np


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
