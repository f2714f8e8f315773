"""Thin-plate spline transformer: against scipy's RBFInterpolator, interpolation, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.interpolate import RBFInterpolator

from dirnet_jax.bspline import control_point_positions
from dirnet_jax.tps import control_points, tps_field, tps_matrix


def pixel_coords(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)


@pytest.mark.parametrize("spatial_shape,grid_shape", [((28, 28), (7, 7)), ((40, 24), (5, 3))])
def test_matches_scipy_rbf_interpolator(rng, spatial_shape, grid_shape):
    grid = rng.normal(size=(2, *grid_shape, 2)) * 3
    ours = np.asarray(tps_field(jnp.asarray(grid, jnp.float32), spatial_shape))
    pts = np.stack(
        np.meshgrid(
            *[
                control_point_positions(s, g)
                for s, g in zip(spatial_shape, grid_shape, strict=True)
            ],
            indexing="ij",
        ),
        -1,
    ).reshape(-1, 2)
    query = pixel_coords(spatial_shape).reshape(-1, 2)
    for b in range(2):
        rbf = RBFInterpolator(pts, grid[b].reshape(-1, 2), kernel="thin_plate_spline", degree=1)
        ref = rbf(query).reshape(*spatial_shape, 2)
        np.testing.assert_allclose(ours[b], ref, atol=1e-4)


def test_interpolates_its_control_points(rng):
    # Spacing 3: control point k sits on pixel 3k + 1.
    grid = rng.normal(size=(1, 7, 7, 2)).astype(np.float32) * 4
    field = np.asarray(tps_field(jnp.asarray(grid), (21, 21)))[0]
    at_controls = field[1::3, 1::3]
    np.testing.assert_allclose(at_controls, grid[0], atol=1e-4)


@pytest.mark.parametrize("spatial_shape,grid_shape", [((28, 28), (7, 7)), ((256, 256), (16, 16))])
def test_reproduces_constant_and_affine_fields_everywhere(spatial_shape, grid_shape):
    pts = control_points(spatial_shape, grid_shape).reshape(*grid_shape, 2)

    def affine(p):
        return np.stack([0.02 * p[..., 0] - 0.01 * p[..., 1] + 2.5, 3.0 + 0 * p[..., 0]], -1)

    grid = jnp.asarray(affine(pts)[None], jnp.float32)
    field = np.asarray(tps_field(grid, spatial_shape))[0]
    np.testing.assert_allclose(field, affine(pixel_coords(spatial_shape)), atol=5e-5)


def test_zero_grid_is_exactly_zero():
    assert np.all(np.asarray(tps_field(jnp.zeros((2, 7, 7, 2)), (28, 28))) == 0.0)


def test_system_solved_once_per_shape():
    tps_matrix.cache_clear()
    f = jax.jit(lambda g: tps_field(g, (28, 28)))
    for k in range(3):
        tps_field(jnp.full((1, 7, 7, 2), float(k)), (28, 28))
        f(jnp.full((2, 7, 7, 2), float(k)))
    assert tps_matrix.cache_info().misses == 1


def test_gradients():
    with jax.enable_x64(True):
        grid = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 2)))
        field = jax.jit(lambda g: tps_field(g, (16, 16)))
        check_grads(field, (grid,), order=2, modes=["fwd", "rev"])


def test_highest_precision():
    jaxpr = jax.make_jaxpr(lambda g: tps_field(g, (28, 28)))(jnp.zeros((1, 7, 7, 2)))
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            assert set(eqn.params["precision"]) == {jax.lax.Precision.HIGHEST}


def test_too_few_control_points():
    with pytest.raises(ValueError, match="at least 3 control points"):
        tps_field(jnp.zeros((1, 1, 2, 2)), (8, 8))
