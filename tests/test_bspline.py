"""B-spline transformer: against scipy's tensor-product B-spline, closed forms, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.interpolate import NdBSpline

from dirnet_jax.bspline import bspline_field, bspline_matrix, control_point_positions

SHAPES = [((28, 28), (7, 7)), ((256, 256), (16, 16)), ((30, 21), (7, 3)), ((12, 9), (1, 3))]
ORDERS = [2, 3]


def scipy_bspline_field(grid: np.ndarray, spatial_shape, order: int) -> np.ndarray:
    """Reference: extend the grid linearly by hand, evaluate scipy's NdBSpline at pixels."""
    pad = 4
    knots, coeffs = [], grid
    for axis, (size, g) in enumerate(zip(spatial_shape, grid.shape[:-1], strict=True), start=0):
        s = size / g
        c = np.moveaxis(coeffs, axis, 0)
        slope_lo, slope_hi = (c[1] - c[0], c[-1] - c[-2]) if g > 1 else (0 * c[0], 0 * c[0])
        lo = [c[0] - k * slope_lo for k in range(pad, 0, -1)]
        hi = [c[-1] + k * slope_hi for k in range(1, pad + 1)]
        coeffs = np.moveaxis(np.concatenate([np.stack(lo), c, np.stack(hi)]), 0, axis)
        first_centre = (-pad + 0.5) * s - 0.5
        n = g + 2 * pad
        knots.append(first_centre - (order + 1) / 2 * s + s * np.arange(n + order + 1))
    pixels = np.stack(
        np.meshgrid(*[np.arange(s, dtype=float) for s in spatial_shape], indexing="ij"), -1
    )
    spline = NdBSpline(tuple(knots), coeffs, order)
    return spline(pixels.reshape(-1, len(spatial_shape))).reshape(*spatial_shape, -1)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("spatial_shape,grid_shape", SHAPES)
def test_matches_scipy_ndbspline(rng, order, spatial_shape, grid_shape):
    grid = rng.normal(size=(2, *grid_shape, 2)) * 3
    ours = np.asarray(bspline_field(jnp.asarray(grid, jnp.float32), spatial_shape, order))
    for b in range(2):
        ref = scipy_bspline_field(grid[b], spatial_shape, order)
        np.testing.assert_allclose(ours[b], ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("spatial_shape,grid_shape", SHAPES)
def test_partition_of_unity_everywhere(order, spatial_shape, grid_shape):
    for size, g in zip(spatial_shape, grid_shape, strict=True):
        np.testing.assert_allclose(bspline_matrix(size, g, order).sum(1), 1.0, atol=1e-6)
    const = jnp.full((1, *grid_shape, 2), 3.7, jnp.float32)
    field = bspline_field(const, spatial_shape, order)
    np.testing.assert_allclose(field, 3.7, atol=5e-6)  # borders included


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("spatial_shape,grid_shape", SHAPES[:3])
def test_linear_grid_gives_linear_field_everywhere(order, spatial_shape, grid_shape):
    centres = [
        control_point_positions(s, g) for s, g in zip(spatial_shape, grid_shape, strict=True)
    ]
    pixels = [np.arange(s, dtype=float) for s in spatial_shape]

    def affine(r, c):
        return np.stack([0.3 * r - 0.1 * c + 1.5, -0.2 * r + 0.05 * c - 2.0], -1)

    grid = affine(*np.meshgrid(*centres, indexing="ij"))[None].astype(np.float32)
    field = bspline_field(jnp.asarray(grid), spatial_shape, order)[0]
    np.testing.assert_allclose(field, affine(*np.meshgrid(*pixels, indexing="ij")), atol=2e-4)


def test_zero_grid_is_exactly_zero():
    field = bspline_field(jnp.zeros((2, 7, 7, 2)), (28, 28), 3)
    assert field.shape == (2, 28, 28, 2)
    assert np.all(np.asarray(field) == 0.0)


@pytest.mark.parametrize(
    "order,expected",
    [
        (3, {7: 4 / 6 * 6, 4: 1 / 6 * 6, 10: 1 / 6 * 6, 1: 0.0, 13: 0.0}),
        (2, {7: 6 / 8 * 6, 4: 1 / 8 * 6, 10: 1 / 8 * 6, 1: 0.0, 13: 0.0}),
    ],
)
def test_hand_computed_values_at_control_points(order, expected):
    # Spacing 3 puts control point k on pixel 3k+1. Control point 2 (pixel 7) holds 6.
    # Cubic at a knot: (c[k-1] + 4 c[k] + c[k+1]) / 6; quadratic: (c[k-1] + 6 c[k] + c[k+1]) / 8.
    assert np.allclose(control_point_positions(21, 7), 3 * np.arange(7) + 1)
    values = np.zeros(7, np.float32)
    values[2] = 6.0
    field = np.asarray(bspline_field(jnp.asarray(values)[None, :, None], (21,), order))[0, :, 0]
    for pixel, value in expected.items():
        assert field[pixel] == pytest.approx(value, abs=1e-5)
    # Pixel 8 sits a third of the spacing past control point 2, so it gets 6·β(1/3).
    t = 1 / 3
    at_pixel_8 = {3: 6 * (2 / 3 - t**2 + t**3 / 2), 2: 6 * (3 / 4 - t**2)}
    assert field[8] == pytest.approx(at_pixel_8[order], abs=1e-5)


def test_three_dimensional_grid(rng):
    grid = rng.normal(size=(1, 3, 4, 2, 3))
    ours = np.asarray(bspline_field(jnp.asarray(grid, jnp.float32), (12, 8, 6), 3))[0]
    np.testing.assert_allclose(ours, scipy_bspline_field(grid[0], (12, 8, 6), 3), atol=2e-5)


def test_gradients():
    with jax.enable_x64(True):
        grid = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 2)))
        field = jax.jit(lambda g: bspline_field(g, (16, 16), 3))
        check_grads(field, (grid,), order=2, modes=["fwd", "rev"])


def test_contractions_run_at_highest_precision():
    # On GPUs the default precision is TF32-like (3.7e-4 off on a constant grid); every
    # contraction of the transformer must ask for HIGHEST.
    jaxpr = jax.make_jaxpr(lambda g: bspline_field(g, (28, 28), 3))(jnp.zeros((1, 7, 7, 2)))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots
    for eqn in dots:
        assert set(eqn.params["precision"]) == {jax.lax.Precision.HIGHEST}


def test_mismatched_dimensions_raise():
    with pytest.raises(ValueError, match="number of spatial dimensions"):
        bspline_field(jnp.zeros((1, 7, 7, 2)), (28, 28, 28), 3)
    with pytest.raises(ValueError, match="order"):
        bspline_matrix(28, 7, 4)


def test_matrix_cached_per_shape():
    bspline_matrix.cache_clear()
    for _ in range(3):
        bspline_field(jnp.zeros((1, 7, 7, 2)), (28, 28), 3)
    info = bspline_matrix.cache_info()
    assert info.misses == 1 and info.hits >= 2
