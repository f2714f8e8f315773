"""BatchNorm over the last axis: flax's `nn.BatchNorm`, normalising by one multiply-add.

Flax computes ``(x − mean) · (scale / √(var + ε)) + bias``, whose ``x − mean`` XLA keeps
in memory for the backward pass (at 256², batch 32, 134 MB per first layer). Here
``x · mul + (bias − mean · mul)``: one multiply-add per value, nothing stored but x. It
loses digits only where |mean| ≫ √var, like the one-pass variance both use
(E[x²] − E[x]²). Variables, statistics, running averages and initial values are flax's,
so checkpoints and `fold_batchnorm` do not change.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., C] → mean and variance over every axis but the last, each [C] float32, as
    flax's (one pass, float32 sums, the variance clipped at 0)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean, mean_sq = x.mean(axes), jax.lax.square(x).mean(axes)
    return mean, jnp.maximum(0.0, mean_sq - jax.lax.square(mean))


class BatchNorm(nn.Module):
    """`nn.BatchNorm(use_running_average, momentum, epsilon, dtype)` over the last axis:
    params 'scale', 'bias'; batch_stats 'mean', 'var' (updated in training, not at init)."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, layer: tuple[Callable, int] | None = None) -> jax.Array:
        """x: [..., C] → [..., C] in `dtype` (default: x's, at least float32).

        With `layer` = (fn, C), training only: x is the input of the layer before this
        BatchNorm, and ``fn(x, scale, bias) → (y, mean, var)`` computes that layer, this
        BatchNorm with its batch statistics (mean, var [C]) and what follows, all at once;
        y is returned and the running averages take mean and var.
        """
        shape = (layer[1] if layer else x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)

        def update(mean, var):
            if not self.is_initializing():
                keep = self.momentum
                ra_mean.value = keep * ra_mean.value + (1 - keep) * mean
                ra_var.value = keep * ra_var.value + (1 - keep) * var

        if layer is not None:
            if self.use_running_average:
                raise ValueError("a BatchNorm applied by its layer runs in training only")
            scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
            y, mean, var = layer[0](x, scale, bias)
            update(mean, var)
            return y
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = batch_stats(x)
            update(mean, var)
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = x * mul + (bias - mean * mul)
        return y.astype(self.dtype or jnp.result_type(x, scale))
