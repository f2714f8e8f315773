"""The regressor's layers in their fast forms (`dirnet_jax.layers`) against independent
references: XLA's and scipy's convolutions, flax's layers and pooling, autodiff of the
unfused layer."""

import functools
import itertools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.ndimage import correlate

from dirnet_jax import layers
from dirnet_jax.layers import TapConv, conv_elu_pool2, conv_taps, pool2, stack_channels
from tests import conftest


@pytest.mark.parametrize("shape", [(2, 8, 6, 2), (3, 4, 6, 2, 3)])
@pytest.mark.parametrize("downsampling", ["avg", "max"])
def test_fused_first_layer_is_conv_elu_pool(rng, shape, downsampling):
    x = rng.normal(size=shape).astype(np.float32)
    ndim, cin = len(shape) - 2, shape[-1]
    kernel = rng.normal(size=(3,) * ndim + (cin, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    spatial = "DHW"[-ndim:]
    conv = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1,) * ndim,
        "SAME",
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=jax.lax.Precision.HIGHEST,
    )
    pool = nn.avg_pool if downsampling == "avg" else nn.max_pool
    expected = pool(nn.elu(conv + bias), (2,) * ndim, strides=(2,) * ndim)
    # Compiled whole: op by op, its ~200 operations compiled one by one took 2-8 s.
    got = jax.jit(conv_elu_pool2, static_argnums=3)(x, kernel, bias, downsampling)
    assert got.shape == expected.shape and float(jnp.abs(expected).max()) > 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="avg or max"):
        conv_elu_pool2(x, kernel, bias, "strided")


@pytest.mark.parametrize("shape,cout", [((2, 7, 6, 2), 5), ((2, 4, 5, 3, 2), 3), ((1, 6, 6, 1), 4)])
def test_conv_taps_is_a_zero_padded_correlation(rng, shape, cout):
    x = rng.normal(size=shape).astype(np.float32)
    ndim, cin = len(shape) - 2, shape[-1]
    kernel = rng.normal(size=(3,) * ndim + (cin, cout)).astype(np.float32)
    # Independent reference: scipy's correlation per image and channel pair, zeros outside.
    expected = np.zeros((*shape[:-1], cout))
    for b, c, o in itertools.product(range(shape[0]), range(cin), range(cout)):
        expected[b, ..., o] += correlate(
            x[b, ..., c].astype(np.float64), kernel[..., c, o], mode="constant"
        )
    got = conv_taps(jnp.asarray(x), jnp.asarray(kernel))
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 5, 2), (2, 4, 3, 5, 2)])
def test_conv_taps_gradients_are_the_convolutions(rng, shape):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ndim = len(shape) - 2
    kernel = jnp.asarray(rng.normal(size=(3,) * ndim + (2, 4)), jnp.float32)
    spatial = "DHW"[-ndim:]

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1,) * ndim, "SAME", precision=jax.lax.Precision.HIGHEST,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        )  # fmt: skip

    cotangent = jnp.asarray(rng.normal(size=(*shape[:-1], 4)), jnp.float32)
    got = jax.vjp(conv_taps, x, kernel)[1](cotangent)
    expected = jax.vjp(conv, x, kernel)[1](cotangent)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    # and against finite differences of the products themselves
    check_grads(conv_taps, (x, kernel), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("use_bias", [False, True])
def test_tap_conv_is_flax_conv_with_its_parameters(rng, use_bias):
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
    taps, flax_conv = TapConv(6, use_bias=use_bias), nn.Conv(6, (3, 3), use_bias=use_bias)
    variables = taps.init(jax.random.key(3), x)
    expected = flax_conv.init(jax.random.key(3), x)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)  # same initial values
    variables = jax.tree.map(lambda v: v + 0.1, variables)
    np.testing.assert_allclose(
        taps.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5
    )
    half = TapConv(6, use_bias=use_bias, dtype=jnp.bfloat16).apply(variables, x)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half, flax_conv.apply(variables, x), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("downsampling", ["avg", "max"])
@pytest.mark.parametrize("kernels,passes", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_first_layer_train_gradients_are_the_reference_layers(rng, downsampling, kernels, passes):
    # The backward written out (two sums per channel) against autodiff of the layer as the
    # regressor computes it unfused, with cotangents on the batch statistics too (they
    # are zero in training, where only the running averages read them). `kernels`: the
    # sums and the kernel's gradient by first_layer_grad's kernels (interpreted here),
    # by float32 multiply-adds (passes 0) or products of the window matrix (3); without
    # `kernels`, XLA's path in their place off CUDA.
    x = jnp.asarray(rng.uniform(size=(3, 16, 32, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 16)) * 0.5, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, 16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16) * 0.3, jnp.float32)
    cotangents = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
                       for shape in [(3, 8, 16, 16), (16,), (16,)])  # fmt: skip
    args = (x, kernel, scale, bias)
    fused = functools.partial(
        layers.first_layer_train, downsampling=downsampling, conv=conv_taps,
        dtype=jnp.float32, interpret=kernels, passes=passes,
    )  # fmt: skip
    reference = functools.partial(
        layers._first_layer_reference, downsampling=downsampling, conv=conv_taps,
        dtype=jnp.float32,
    )  # fmt: skip

    @functools.partial(jax.jit, static_argnums=0)  # op by op: ~200 programs compiled, 8 s
    def values_and_grads(layer, args, cotangents):
        values, vjp = jax.vjp(layer, *args)
        return values, vjp(cotangents)

    got, got_grads = values_and_grads(fused, args, cotangents)
    expected, expected_grads = values_and_grads(reference, args, cotangents)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert float(jnp.abs(b).max()) > 1  # every gradient non-trivial
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("shape", [(3, 8, 6, 5), (2, 4, 6, 8, 3)])
@pytest.mark.parametrize("reduce,flax_pool", [(jnp.mean, nn.avg_pool), (jnp.max, nn.max_pool)])
def test_pool2_is_flax_pooling_values_and_gradients(rng, shape, reduce, flax_pool):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    window = (2,) * (len(shape) - 2)
    reference = flax_pool(x, window, strides=window)
    np.testing.assert_allclose(pool2(x, reduce), reference, rtol=1e-6, atol=1e-6)
    weights = jnp.asarray(rng.normal(size=reference.shape), jnp.float32)
    grad = jax.grad(lambda x: (pool2(x, reduce) * weights).sum())(x)
    grad_ref = jax.grad(lambda x: (flax_pool(x, window, strides=window) * weights).sum())(x)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)


def test_pool2_max_splits_ties_as_jnp_max(rng):
    x = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    x[:, :4, :4] = 0.5  # windows of four ties
    x[:, 4:, :2] = np.repeat(x[:, 4:, :1], 2, axis=2)  # of two
    weights = jnp.asarray(rng.normal(size=(2, 3, 4, 3)), jnp.float32)

    def plain(x):  # jnp.max's own rule
        return jnp.max(x.reshape(2, 3, 2, 4, 2, 3), axis=(2, 4))

    grads = [jax.grad(lambda x, f=f: (f(x) * weights).sum())(jnp.asarray(x))
             for f in (functools.partial(pool2, reduce=jnp.max), plain)]  # fmt: skip
    np.testing.assert_array_equal(*grads)
    np.testing.assert_allclose(grads[0][:, 0, 0], weights[:, 0, 0] / 4, rtol=1e-6)


def test_window_weights_go_to_the_first_largest_where_none_equals_the_maximum():
    # [1, 2, 2, 1] windows of four (axes 2 and 4 of the [B, h, 2, w, 2, C] reshape).
    x = jnp.asarray([[3.0, 1.0], [3.0, 2.0]]).reshape(1, 1, 2, 1, 2, 1)
    top = jnp.max(x, axis=(2, 4), keepdims=True)
    ties = layers._window_weights(x, top, (2, 4))
    np.testing.assert_array_equal(ties.reshape(2, 2), [[0.5, 0.0], [0.5, 0.0]])
    # The maximum as rounded in another fusion: no value equals it.
    other = layers._window_weights(x, top + 2e-7, (2, 4))
    np.testing.assert_array_equal(other.reshape(2, 2), [[1.0, 0.0], [0.0, 0.0]])
    x = x.at[0, 0, 1, 0, 1, 0].set(5.0)
    other = layers._window_weights(x, jnp.max(x, axis=(2, 4), keepdims=True) - 1e-6, (2, 4))
    np.testing.assert_array_equal(other.reshape(2, 2), [[0.0, 0.0], [0.0, 1.0]])


POOL_MAX_AT_O0 = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from dirnet_jax.layers import pool2
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.float32)
s = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
loss = lambda x, s: jnp.sum(jnp.sin(pool2(x * s + 0.1, jnp.max)))
flax_loss = lambda x, s: jnp.sum(jnp.sin(nn.max_pool(x * s + 0.1, (2, 2), strides=(2, 2))))
grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, s)
want = jax.jit(jax.grad(flax_loss, argnums=(0, 1)))(x, s)
for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
"""


# XLA:CPU's older emitters (where this jaxlib still has them) round the copies
# differently in most windows: there a count of at least 1 gave wrong gradients.
@pytest.mark.parametrize("xla_flags", ["", conftest.OLDER_EMITTERS])
def test_pool2_max_gradient_is_right_where_xla_rounds_copies_differently(xla_flags):
    # At LLVM -O0 XLA:CPU computes x·s + 0.1 once for the maximum and again, rounded
    # otherwise, where the gradient compares with it: jnp.max's rule gave NaN for s, and a
    # count of at least 1 no gradient to such windows. Both must be flax's gradient.
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_FLAGS": xla_flags}
    proc = subprocess.run([sys.executable, "-c", POOL_MAX_AT_O0], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if "Unknown flag in XLA_FLAGS" in proc.stderr:
        pytest.skip(f"this jaxlib has no {xla_flags}")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_stack_channels_is_concatenate(rng):
    a, b = (rng.normal(size=(2, 5, 4, 3)).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(stack_channels(a, b), np.concatenate([a, b], axis=-1))
