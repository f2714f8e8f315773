"""Thin-plate spline transformer (the paper's ablation B2).

Same control points and conventions as :mod:`dirnet_jax.bspline` (patch centres, pixels,
components in axis order). Each displacement component is interpolated by the polyharmonic
spline ``u(x) = a_0 + a·x + Σ_k w_k φ(|x − c_k|)`` with ``φ(r) = r² log r`` in 2D (``−r``
in 3D), which passes through every control value and reproduces affine fields exactly.

The whole interpolation (solve, then evaluate at every pixel) is linear in the control values
and depends only on the grid and image size: it is folded into one ``[control points, pixels]``
matrix per shape, built once in float64 (NumPy, cached), so each call is one matrix product.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dirnet_jax.bspline import HIGHEST, control_point_positions


def radial_basis(r2: np.ndarray, ndim: int) -> np.ndarray:
    """Polyharmonic kernel of the thin-plate spline, given squared distances."""
    if ndim == 2:  # r² log r = ½ r² log r², 0 at r = 0; in place (a 256² map's is 134 MB)
        out = np.zeros_like(r2)
        np.log(r2, out=out, where=r2 > 0)
        out *= r2
        out *= 0.5  # exact: the same values as 0.5 * r2 * log(r2)
        return out
    if ndim == 3:
        return -np.sqrt(r2)
    raise ValueError(f"thin-plate splines are implemented for 2D and 3D, not {ndim}D")


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared distances between the points of a [n, ndim] and b [m, ndim],
    one axis at a time (a sum over a length-ndim last axis took 1.3 s at 256², this 0.1)."""
    return sum((a[:, None, d] - b[None, :, d]) ** 2 for d in range(a.shape[1]))


def control_points(spatial_shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> np.ndarray:
    """[n, ndim] float64 positions of the control points in pixels, in grid (C) order."""
    axes = [control_point_positions(s, g) for s, g in zip(spatial_shape, grid_shape, strict=True)]
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def _unit(spatial_shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> float:
    """Length unit for the spline: the largest spacing.

    The interpolant does not change under isotropic scaling (the side conditions absorb the
    log-scale term), and the solve is better conditioned when distances are O(grid).
    """
    return max(s / g for s, g in zip(spatial_shape, grid_shape, strict=True))


@functools.cache
def tps_matrix(spatial_shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> np.ndarray:
    """[n, P] float32 map from the n control values to the P pixels of the dense field.

    Control-major, as XLA's product reads it on CPUs and GPUs: stored [P, n], XLA folded a
    transpose of the whole constant (64 MB at 256², 1.1 s of an H200's compile, 0.3 s of
    this CPU's). Solved and evaluated in float64, then rounded once. Folding the solve into
    the pixel map matters: applying a float32 solver at run time cancels catastrophically
    (1.8e-2 px error on a 16×16 grid at 256×256, against 1e-5 px for this map).
    """
    unit = _unit(spatial_shape, grid_shape)
    pts = control_points(spatial_shape, grid_shape) / unit
    n, ndim = pts.shape
    if n < ndim + 1:
        raise ValueError(f"a thin-plate spline needs at least {ndim + 1} control points, got {n}")
    poly = np.concatenate([np.ones((n, 1)), pts], axis=1)  # [n, ndim + 1]
    system = np.zeros((n + ndim + 1, n + ndim + 1))
    system[:n, :n] = radial_basis(squared_distances(pts, pts), ndim)
    system[:n, n:] = poly
    system[n:, :n] = poly.T
    rhs = np.concatenate([np.eye(n), np.zeros((ndim + 1, n))])
    solver = np.linalg.solve(system, rhs)  # control values -> (w, a0, a)

    axes = [np.arange(size) / unit for size in spatial_shape]
    pixels = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, ndim)
    r2 = squared_distances(pixels, pts)  # [P, n]
    design = np.concatenate([radial_basis(r2, ndim), np.ones((len(pixels), 1)), pixels], axis=1)
    return np.ascontiguousarray((design @ solver).T, dtype=np.float32)


def tps_field(grid: jax.Array, spatial_shape: tuple[int, ...]) -> jax.Array:
    """Dense field from thin-plate spline control values.

    Args:
      grid: [B, *grid_shape, ndim] control-point displacements, in pixels.
      spatial_shape: image size (H, W, …) of the dense field.

    Returns:
      [B, *spatial_shape, ndim] displacement field.
    """
    grid_shape = tuple(int(g) for g in grid.shape[1:-1])
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(grid_shape) != len(spatial_shape):
        raise ValueError(
            f"control grid {grid_shape} and image {spatial_shape} differ in number of dimensions"
        )
    matrix = tps_matrix(spatial_shape, grid_shape)
    batch = grid.shape[0]
    field = jnp.einsum(
        "np,bnd->bpd", matrix, grid.reshape(batch, matrix.shape[0], -1), precision=HIGHEST
    )
    return field.reshape(batch, *spatial_shape, -1)
