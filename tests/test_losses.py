"""Similarity losses: NCC against numpy's corrcoef, invariances, flat images, MSE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dirnet_jax.losses import get_loss, mse_loss, ncc, ncc_loss


def test_ncc_matches_corrcoef_per_pair(rng):
    x = rng.normal(size=(4, 9, 8, 1)).astype(np.float32)
    y = (x + rng.normal(size=x.shape) * np.array([0.1, 1, 3, 10])[:, None, None, None]).astype(
        np.float32
    )
    ours = np.asarray(ncc(jnp.asarray(x), jnp.asarray(y)))
    ref = [np.corrcoef(x[b].ravel(), y[b].ravel())[0, 1] for b in range(4)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert len(set(np.round(ours, 3))) == 4  # per pair, not pooled over the batch


def test_ncc_invariances(rng):
    x = jnp.asarray(rng.uniform(size=(3, 10, 10, 1)), jnp.float32)
    np.testing.assert_allclose(ncc(x, x), 1.0, atol=1e-5)
    for a, b in [(2.0, 0.5), (0.1, -3.0), (50.0, 7.0)]:
        np.testing.assert_allclose(ncc(x, a * x + b), 1.0, atol=1e-5)
    np.testing.assert_allclose(ncc(x, -2.0 * x + 1.0), -1.0, atol=1e-5)


@pytest.mark.parametrize("side", [8, 28])
@pytest.mark.parametrize("flat", [0.0, 0.7, 0.3333])
def test_ncc_of_a_flat_image_is_zero(rng, flat, side):
    # Exactly, whatever order XLA sums in: a flat 28² image of 0.7 has a float32 mean 5e-6
    # off, which centring by the mean alone turned into NCC(x, x) = 0.003.
    x = jnp.full((2, side, side, 1), flat, jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, side, side, 1)), jnp.float32)
    for a, b in [(x, y), (y, x), (x, x)]:
        np.testing.assert_array_equal(ncc(a, b), 0.0)
        grads = jax.grad(lambda u, v: ncc_loss(u, v).mean(), argnums=(0, 1))(a, b)
        assert all(np.all(np.isfinite(g)) for g in grads)
        if a is x and b is y:  # nothing in y correlates with a flat image
            np.testing.assert_array_equal(grads[1], 0.0)


def test_ncc_gradient_is_the_centred_formulas(rng):
    # Shifting by the first pixel (held constant) leaves the gradient as it was; checked
    # against finite differences in float64 and against the formula without the shift.
    x, y = (jnp.asarray(rng.normal(size=(2, 6, 5, 1)) + 3.0) for _ in "xy")
    with jax.enable_x64():
        x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
        check_grads(ncc, (x64, y64), order=1, modes=("rev",))

    def unshifted(a, b):
        ac, bc = a - a.mean(keepdims=True), b - b.mean(keepdims=True)
        return (ac * bc).mean() / jnp.sqrt(((ac * ac).mean() + 1e-8) * ((bc * bc).mean() + 1e-8))

    for b in range(2):
        got = jax.grad(lambda u, v: ncc(u, v)[0], argnums=(0, 1))(x[b : b + 1], y[b : b + 1])
        want = jax.grad(unshifted, argnums=(0, 1))(x[b : b + 1], y[b : b + 1])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_mse_hand_computed():
    x = jnp.zeros((2, 2, 2, 1))
    y = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]]).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(mse_loss(x, y), [1.0, 1.0])


def test_get_loss():
    assert get_loss("ncc") is ncc_loss
    assert get_loss(mse_loss) is mse_loss
    with pytest.raises(ValueError, match="unknown similarity"):
        get_loss("mutual_information")
