"""Similarity losses: NCC against numpy's corrcoef, invariances, flat images, MSE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("flat", [0.0, 0.7])
def test_ncc_finite_on_flat_images(rng, flat):
    x = jnp.full((2, 8, 8, 1), flat)
    y = jnp.asarray(rng.uniform(size=(2, 8, 8, 1)), jnp.float32)
    for a, b in [(x, y), (y, x), (x, x)]:
        assert np.all(np.isfinite(ncc(a, b)))
        np.testing.assert_allclose(ncc(a, b), 0.0, atol=1e-5)  # float32 mean of a constant
        grads = jax.grad(lambda u, v: ncc_loss(u, v).mean(), argnums=(0, 1))(a, b)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_mse_hand_computed():
    x = jnp.zeros((2, 2, 2, 1))
    y = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]]).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(mse_loss(x, y), [1.0, 1.0])


def test_get_loss():
    assert get_loss("ncc") is ncc_loss
    assert get_loss(mse_loss) is mse_loss
    with pytest.raises(ValueError, match="unknown similarity"):
        get_loss("mutual_information")
