"""BatchNorm as one multiply-add: against float64 NumPy and flax's BatchNorm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirnet_jax import models, variant
from dirnet_jax.batchnorm import BatchNorm
from dirnet_jax.losses import get_loss
from tests.test_models import MNIST, perturbed

KW = dict(momentum=0.9, epsilon=1e-5)


def random_variables(rng, features):
    return {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 1, features), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.normal(0, 1, features), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
        },
    }


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (2, 3, 4, 5, 2), (7, 4)])
def test_batch_norm_against_float64_numpy(rng, shape):
    x = (rng.normal(0, 2, shape) + rng.normal(0, 3, shape[-1])).astype(np.float32)
    v = random_variables(rng, shape[-1])
    scale, bias = (np.float64(v["params"][k]) for k in ("scale", "bias"))
    axes = tuple(range(len(shape) - 1))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axes), x64.var(axes)

    y, updated = BatchNorm(False, **KW).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=2e-5)
    for key, batch in (("mean", mean), ("var", var)):
        expected = 0.9 * np.float64(v["batch_stats"][key]) + 0.1 * batch
        np.testing.assert_allclose(updated["batch_stats"][key], expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.asarray(y, np.float64).mean(axes), bias, atol=1e-5)  # invariants
    assert np.allclose(np.asarray(y, np.float64).std(axes), np.abs(scale), rtol=1e-3)

    ra_mean, ra_var = (np.float64(v["batch_stats"][k]) for k in ("mean", "var"))
    expected = (x64 - ra_mean) / np.sqrt(ra_var + 1e-5) * scale + bias
    np.testing.assert_allclose(BatchNorm(True, **KW).apply(v, x), expected, atol=2e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_batch_norm_is_flax_batch_norm(rng, dtype):
    x = jnp.asarray(rng.normal(1, 2, (8, 6, 5, 4)), dtype or jnp.float32)
    ours, flax_bn = BatchNorm(False, dtype=dtype, **KW), nn.BatchNorm(False, dtype=dtype, **KW)
    init = ours.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, init, flax_bn.init(jax.random.key(0), x))
    v = random_variables(rng, 4)
    y, stats = ours.apply(v, x, mutable=["batch_stats"])
    want, want_stats = flax_bn.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == want.dtype == (dtype or jnp.float32)
    tol = 1e-5 if dtype is None else 2e-2
    np.testing.assert_allclose(np.float32(y), np.float32(want), rtol=tol, atol=tol)
    jax.tree.map(np.testing.assert_array_equal, stats, want_stats)

    def loss(module, v, x):  # through the batch statistics too
        y = module.apply(v, x, mutable=["batch_stats"])[0]
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(4))

    if dtype is None:
        got = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(v, x)
        expected = jax.grad(functools.partial(loss, flax_bn), argnums=(0, 1))(v, x)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
        jax.tree.map(close, got, expected)


@pytest.mark.parametrize("name", ["baseline", "C2"])
def test_the_network_is_the_one_with_flax_batch_norm(rng, name, monkeypatch):
    # The same variables at init, and the same loss, gradients and running averages.
    config = variant(name, MNIST.replace(features=8, dense_features=32))
    fixed, moving = (jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32) for _ in "ab")
    variables = perturbed(config)

    def loss(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        reg, stats = models.apply(config, v, fixed, moving, train=True)
        return get_loss(config.similarity)(fixed, reg.warped).mean(), stats

    def step():
        init = models.init_variables(config, jax.random.key(0))
        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return init, value, grads, stats

    ours = step()
    monkeypatch.setattr(models, "BatchNorm", nn.BatchNorm)
    flax_bn = step()
    jax.tree.map(np.testing.assert_array_equal, ours[0], flax_bn[0])
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, ours[1:], flax_bn[1:])
