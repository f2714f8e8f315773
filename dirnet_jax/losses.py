"""The training loss's two terms, one value per pair: the similarity of the fixed and the
warped image, and a smoothness penalty on the displacement field.

Every similarity maps ``fixed, warped: [B, *spatial, C]`` to ``[B]`` (lower is better);
every regularizer maps ``displacement: [B, *spatial, ndim]`` (pixels, components in axis
order) to ``[B]``. Training minimises the batch mean of
``similarity + regularizer_weight · regularizer`` (`objective`). Any differentiable function
of those signatures plugs in through ``DIRNetConfig.similarity`` or ``.regularizer``. The
paper's DIRNet has no regularizer (weight 0, the default): its B-spline is smooth by
construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:
    from dirnet_jax.config import DIRNetConfig
    from dirnet_jax.models import Registration

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
RegularizerFn = Callable[[jax.Array], jax.Array]


def ncc(x: jax.Array, y: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Normalized cross-correlation per pair.

    Args:
      x, y: [B, *spatial, C] images.
      eps: added to each variance, so flat (and all-zero) images give a finite NCC of 0
        and finite gradients; negligible against the variance of any real image.

    Returns:
      [B] NCC in [-1, 1], computed over all pixels and channels of each pair.
    """
    xc, yc = _centered(_per_pair(x)), _centered(_per_pair(y))
    cov = (xc * yc).mean(axis=1)
    var_x = (xc * xc).mean(axis=1)
    var_y = (yc * yc).mean(axis=1)
    return cov / jnp.sqrt((var_x + eps) * (var_y + eps))


def _per_pair(x: jax.Array) -> jax.Array:
    """[B, *spatial, C] → [B, N]. XLA:CPU's library reductions (YNNPACK) over the spatial
    axes of [B, H, W, 1] ran ~3× slower than over the same values as [B, N]: NCC forward
    and backward at 28², batch 32, 351 against 124 µs, the training step ~7 % faster
    (benchmarks/NOTES.md), the same values bit for bit."""
    return x.reshape(x.shape[0], -1)


def _centered(x: jax.Array) -> jax.Array:
    """x [B, N] minus its mean per row, shifted first by its first pixel (the gradient's
    formula unchanged): a flat image centres to exact zeros, where its float32 mean alone
    is off by rounding that depends on the order XLA sums in (a flat 28² image of 0.7:
    5e-6, which made NCC(x, x) 0.003)."""
    x = x - jax.lax.stop_gradient(x[:, :1])
    return x - x.mean(axis=1, keepdims=True)


def ncc_loss(fixed: jax.Array, warped: jax.Array) -> jax.Array:
    """[B] negative NCC (the paper's loss)."""
    return -ncc(fixed, warped)


def mse_loss(fixed: jax.Array, warped: jax.Array) -> jax.Array:
    """[B] mean squared intensity difference."""
    return jnp.mean((_per_pair(fixed) - _per_pair(warped)) ** 2, axis=1)


SIMILARITIES: dict[str, LossFn] = {"ncc": ncc_loss, "mse": mse_loss}


def _forward_difference(u: jax.Array, axis: int) -> jax.Array:
    """u[i + 1] − u[i] along `axis`: one fewer position there."""
    return lax.slice_in_dim(u, 1, None, axis=axis) - lax.slice_in_dim(u, 0, -1, axis=axis)


def _mean_square(d: jax.Array) -> jax.Array:
    """[B, *positions, ndim] → [B]: the mean over positions of the squares, summed over
    the components."""
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim - 1))).sum(axis=-1)


def _spatial_axes(displacement: jax.Array, least: int, name: str) -> range:
    """The spatial axes of a [B, *spatial, ndim] field, each `least` or more long."""
    spatial = displacement.shape[1:-1]
    if displacement.shape[-1] != len(spatial) or min(spatial, default=0) < least:
        raise ValueError(
            f"{name} takes a displacement field [B, *spatial, ndim] at least {least} pixels "
            f"along each axis, got shape {displacement.shape}"
        )
    return range(1, displacement.ndim - 1)


def diffusion(displacement: jax.Array) -> jax.Array:
    """[B, *spatial, ndim] → [B]: Σ_a mean (∂_a u)², first derivatives by forward
    differences (in pixels), summed over the components. 0 for a translation."""
    axes = _spatial_axes(displacement, 2, "diffusion")
    return sum(_mean_square(_forward_difference(displacement, a)) for a in axes)


def bending_energy(displacement: jax.Array) -> jax.Array:
    """[B, *spatial, ndim] → [B]: Σ_a mean (∂²_a u)² + 2 Σ_{a<b} mean (∂_a ∂_b u)², second
    derivatives by differences of forward differences (in pixels; exact for a quadratic
    field), summed over the components. 0 for an affine field."""
    axes = _spatial_axes(displacement, 3, "bending_energy")
    total = 0.0
    for a in axes:
        d_a = _forward_difference(displacement, a)
        total = total + _mean_square(_forward_difference(d_a, a))
        for b in axes[a:]:  # the spatial axes after a
            total = total + 2 * _mean_square(_forward_difference(d_a, b))
    return total


REGULARIZERS: dict[str, RegularizerFn] = {"bending": bending_energy, "diffusion": diffusion}


def _named(kind: str, table: dict[str, Callable], value: str | Callable, takes: str) -> Callable:
    if callable(value):
        return value
    try:
        return table[value]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {value!r}; choose one of {sorted(table)} or pass a function {takes}"
        ) from None


def get_loss(similarity: str | LossFn) -> LossFn:
    """The per-pair loss for a name in SIMILARITIES, or the callable itself."""
    return _named("similarity", SIMILARITIES, similarity, "(fixed, warped) -> [B] loss")


def get_regularizer(regularizer: str | RegularizerFn) -> RegularizerFn:
    """The per-pair penalty for a name in REGULARIZERS, or the callable itself."""
    return _named("regularizer", REGULARIZERS, regularizer, "(displacement) -> [B] penalty")


def objective(config: DIRNetConfig, fixed: jax.Array, reg: Registration) -> jax.Array:
    """[B] training loss of registered pairs: the similarity of `fixed` and `reg.warped`,
    plus `config.regularizer_weight` times the regularizer of `reg.displacement` (not
    computed at weight 0)."""
    loss = get_loss(config.similarity)(fixed, reg.warped)
    if config.regularizer_weight:
        loss = loss + config.regularizer_weight * get_regularizer(config.regularizer)(
            reg.displacement
        )
    return loss
