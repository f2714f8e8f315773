"""Similarity losses between fixed and warped images, one value per pair.

Every loss maps ``fixed, warped: [B, *spatial, C]`` to ``[B]`` (lower is better); training
averages over the batch. Any differentiable function of that signature plugs in through
``DIRNetConfig.similarity``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def ncc(x: jax.Array, y: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Normalized cross-correlation per pair.

    Args:
      x, y: [B, *spatial, C] images.
      eps: added to each variance, so flat (and all-zero) images give a finite NCC of 0
        and finite gradients; negligible against the variance of any real image.

    Returns:
      [B] NCC in [-1, 1], computed over all pixels and channels of each pair.
    """
    axes = tuple(range(1, x.ndim))
    xc, yc = _centered(x, axes), _centered(y, axes)
    cov = (xc * yc).mean(axis=axes)
    var_x = (xc * xc).mean(axis=axes)
    var_y = (yc * yc).mean(axis=axes)
    return cov / jnp.sqrt((var_x + eps) * (var_y + eps))


def _centered(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x minus its mean over `axes`, shifted first by its first pixel (the gradient's
    formula unchanged): a flat image centres to exact zeros, where its float32 mean alone
    is off by rounding that depends on the order XLA sums in (a flat 28² image of 0.7:
    5e-6, which made NCC(x, x) 0.003)."""
    first = (slice(None),) + (slice(0, 1),) * (x.ndim - 1)
    x = x - jax.lax.stop_gradient(x[first])
    return x - x.mean(axis=axes, keepdims=True)


def ncc_loss(fixed: jax.Array, warped: jax.Array) -> jax.Array:
    """[B] negative NCC (the paper's loss)."""
    return -ncc(fixed, warped)


def mse_loss(fixed: jax.Array, warped: jax.Array) -> jax.Array:
    """[B] mean squared intensity difference."""
    return jnp.mean((fixed - warped) ** 2, axis=tuple(range(1, fixed.ndim)))


SIMILARITIES: dict[str, LossFn] = {"ncc": ncc_loss, "mse": mse_loss}


def get_loss(similarity: str | LossFn) -> LossFn:
    """The per-pair loss for a name in SIMILARITIES, or the callable itself."""
    if callable(similarity):
        return similarity
    try:
        return SIMILARITIES[similarity]
    except KeyError:
        raise ValueError(
            f"unknown similarity {similarity!r}; choose one of {sorted(SIMILARITIES)} "
            "or pass a function (fixed, warped) -> [B] loss"
        ) from None
