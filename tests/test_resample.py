"""Resampler: against scipy.ndimage.map_coordinates, np.roll, identity and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.ndimage import map_coordinates

from dirnet_jax.resample import identity_grid, sample, warp

SCIPY_MODE = {"edge": "nearest", "zeros": "grid-constant"}


def scipy_warp(image, displacement, order, mode):
    """Reference warp of one [*spatial, C] image by [*spatial, ndim] with scipy."""
    spatial = image.shape[:-1]
    coords = np.moveaxis(identity_grid(spatial) + displacement, -1, 0)
    return np.stack(
        [
            map_coordinates(image[..., c], coords, order=order, mode=SCIPY_MODE[mode], cval=0.0)
            for c in range(image.shape[-1])
        ],
        -1,
    )


@pytest.mark.parametrize("mode", ["edge", "zeros"])
@pytest.mark.parametrize("order", [1, 0])
@pytest.mark.parametrize("spatial", [(12, 10), (7, 6, 5)])
def test_matches_scipy_map_coordinates(rng, mode, order, spatial):
    image = rng.normal(size=(3, *spatial, 2)).astype(np.float32)
    # Large enough to leave the image on every side, so the boundary mode is exercised.
    displacement = rng.uniform(-4, 4, size=(3, *spatial, len(spatial))).astype(np.float32)
    ours = np.asarray(warp(jnp.asarray(image), jnp.asarray(displacement), order=order, mode=mode))
    for b in range(3):
        ref = scipy_warp(
            image[b].astype(np.float64), displacement[b].astype(np.float64), order, mode
        )
        np.testing.assert_allclose(ours[b], ref, atol=1e-5)


def test_zero_displacement_is_exactly_the_identity(rng):
    image = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    for order in (0, 1):
        for mode in ("edge", "zeros"):
            out = warp(jnp.asarray(image), jnp.zeros((2, 9, 11, 2)), order=order, mode=mode)
            assert np.array_equal(np.asarray(out), image)


@pytest.mark.parametrize("shift", [(2, -3), (-1, 0), (0, 4)])
def test_integer_shift_equals_roll_in_the_interior(rng, shift):
    image = rng.normal(size=(1, 16, 16, 1)).astype(np.float32)
    displacement = jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (1, 16, 16, 2))
    out = np.asarray(warp(jnp.asarray(image), displacement))
    rolled = np.roll(image, (-shift[0], -shift[1]), axis=(1, 2))  # out(x) = image(x + shift)
    interior = (slice(None), slice(4, 12), slice(4, 12))
    np.testing.assert_array_equal(out[interior], rolled[interior])


def test_row_component_moves_rows():
    # Convention check: component 0 is the row (i) offset, component 1 the column (j) offset.
    image = jnp.zeros((1, 8, 8, 1)).at[0, 5, 2, 0].set(1.0)
    down = jnp.zeros((1, 8, 8, 2)).at[..., 0].set(1.0)  # out(i, j) = image(i + 1, j)
    assert warp(image, down)[0, 4, 2, 0] == 1.0
    right = jnp.zeros((1, 8, 8, 2)).at[..., 1].set(1.0)
    assert warp(image, right)[0, 5, 1, 0] == 1.0


def test_nearest_keeps_labels(rng):
    labels = rng.integers(0, 4, size=(2, 10, 10, 1)).astype(np.int32)
    out = warp(jnp.asarray(labels), jnp.asarray(rng.normal(size=(2, 10, 10, 2)) * 2), order=0)
    assert out.dtype == jnp.int32
    assert set(np.unique(np.asarray(out))) <= set(np.unique(labels))


def test_gradients(rng):
    with jax.enable_x64(True):
        image = jnp.asarray(rng.normal(size=(2, 8, 7, 2)))
        # Keep sample points away from pixel boundaries, where bilinear has kinks.
        displacement = jnp.asarray(
            rng.integers(-2, 3, size=(2, 8, 7, 2)) + rng.uniform(0.2, 0.8, size=(2, 8, 7, 2))
        )
        for mode in ("edge", "zeros"):
            check_grads(  # compiled: op by op, each operation compiles alone
                jax.jit(lambda im, d, mode=mode: warp(im, d, mode=mode)),
                (image, displacement),
                order=1,
                modes=["fwd", "rev"],
                eps=1e-4,
            )


def test_sample_at_arbitrary_points():
    image = jnp.arange(12.0).reshape(1, 3, 4, 1)
    coords = jnp.asarray([[[0.5, 0.5], [2.0, 3.0], [1.0, 1.25]]])  # [1, 3, 2]
    out = np.asarray(sample(image, coords))[0, :, 0]
    np.testing.assert_allclose(out, [2.5, 11.0, 5.25])


def test_bad_arguments():
    image = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="boundary mode"):
        warp(image, jnp.zeros((1, 4, 4, 2)), mode="wrap")
    with pytest.raises(ValueError, match="order"):
        warp(image, jnp.zeros((1, 4, 4, 2)), order=3)
    with pytest.raises(ValueError, match="does not fit"):
        warp(image, jnp.zeros((1, 4, 5, 2)))
