"""A straightforward JAX DIRNet: the kind of prototype the issue's targets were set against.

Flax's own layers (`nn.Conv`, `nn.BatchNorm`, `nn.elu`, `nn.avg_pool`), the B-spline field
as one einsum with the per-axis matrices (`dirnet_jax.bspline.bspline_matrix`, as the
PyTorch twin uses them), `jax.scipy.ndimage.map_coordinates` for the bilinear warp, the
per-pair NCC as its formula, optax's Adam, the whole step in one `jax.jit`. None of our
speed work: no fused layers, no `conv_taps`, no folded BatchNorm, no several steps per
call. Its parameters are named as `dirnet_jax.models.Regressor`'s, so it runs on the same
variables and gives the same losses, gradients and registrations within float32 rounding
(`tests/test_prototype.py`). `benchmarks.core` times it next to ours: the issue's
targets are ~2.5–3.4× its prototype's speed, and this one ran at its prototype's 28²
training speed on the issue's CPU (benchmarks/NOTES.md).

Every paper variant, 2-D, float32, the NCC loss and the edge boundary: A2's downsampling
is a strided `nn.Conv`, C1's extra convs and C2's dense head are flax's layers in the
paper's order, and B2's field is one product with `dirnet_jax.tps.tps_matrix` (tested
against scipy's RBFInterpolator on its own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.scipy.ndimage import map_coordinates

from dirnet_jax import DIRNetConfig
from dirnet_jax.bspline import bspline_matrix
from dirnet_jax.tps import tps_matrix


def check(config: DIRNetConfig) -> None:
    """Raise ValueError for what the prototype does not build."""
    baseline = DIRNetConfig()
    differs = [
        name for name in ("boundary", "compute_dtype", "similarity", "channels",
                          "regularizer_weight")
        if getattr(config, name) != getattr(baseline, name)
    ]  # fmt: skip
    if len(config.image_shape) != 2:
        differs.append("image_shape")
    if differs:
        raise ValueError(
            "the prototype builds 2-D float32 networks of one channel trained by NCC alone "
            f"with the edge boundary; this config differs in {', '.join(differs)}"
        )


class Regressor(nn.Module):
    """[B, H, W, 2] stacked pair → [B, H/2^d, W/2^d, 2] control grid, flax's layers."""

    config: DIRNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config

        def block(x, layer):  # layer (no bias) → BatchNorm → ELU
            norm = nn.BatchNorm(use_running_average=not train, momentum=cfg.bn_momentum,
                                epsilon=1e-5)  # fmt: skip
            return nn.elu(norm(layer(x)))

        def conv(x, size, **kwargs):
            return block(x, nn.Conv(cfg.features, (size, size), use_bias=False, **kwargs))

        def downsample(x):
            if cfg.downsampling == "strided":
                return conv(x, 2, strides=(2, 2), padding="VALID")
            pool = nn.avg_pool if cfg.downsampling == "avg" else nn.max_pool
            return pool(x, (2, 2), strides=(2, 2))

        overlap = cfg.receptive_field == "overlap"  # C1: a conv before and after the last
        last = cfg.num_downsamplings - 1
        for i in range(cfg.num_conv_layers):
            x = conv(x, 3)
            if i < cfg.num_downsamplings:
                x = conv(x, 3) if overlap and i == last else x
                x = downsample(x)
                x = conv(x, 3) if overlap and i == last else x
        init = nn.initializers.normal(1e-5)
        if cfg.receptive_field == "global":  # C2: two dense layers, a dense output
            batch, grid = x.shape[0], x.shape[1:3]
            x = x.reshape(batch, -1)
            for _ in range(2):
                x = block(x, nn.Dense(cfg.dense_features, use_bias=False))
            out = nn.Dense(grid[0] * grid[1] * 2, kernel_init=init, name="output")(x)
            return out.reshape(batch, *grid, 2)
        x = conv(conv(x, 1), 1)
        return nn.Conv(2, (1, 1), kernel_init=init, name="output")(x)


def ncc(x: jax.Array, y: jax.Array, eps: float = 1e-8) -> jax.Array:
    """[B] normalized cross-correlation of [B, H, W, C] pairs."""
    axes = (1, 2, 3)
    x = x - x.mean(axes, keepdims=True)
    y = y - y.mean(axes, keepdims=True)
    var_x, var_y = (x * x).mean(axes), (y * y).mean(axes)
    return (x * y).mean(axes) / jnp.sqrt((var_x + eps) * (var_y + eps))


def registration(config: DIRNetConfig) -> Callable[..., tuple[jax.Array, Any]]:
    """(variables, fixed, moving, train) → (warped [B, H, W, 1], new batch_stats or None)."""
    check(config)
    net = Regressor(config)
    height, width = config.image_shape
    grid_h, grid_w = height >> config.num_downsamplings, width >> config.num_downsamplings
    if config.transformer == "tps":
        matrix = jnp.asarray(tps_matrix((height, width), (grid_h, grid_w)))  # [control, H·W]
    else:
        order = 3 if config.transformer == "cubic" else 2
        rows = jnp.asarray(bspline_matrix(height, grid_h, order))  # [H, grid_h]
        cols = jnp.asarray(bspline_matrix(width, grid_w, order))

    def field_of(grid):  # [B, grid_h, grid_w, 2] → [B, H, W, 2]
        if config.transformer == "tps":
            flat = jnp.einsum("np,bnc->bpc", matrix, grid.reshape(grid.shape[0], -1, 2),
                              precision="highest")  # fmt: skip
            return flat.reshape(grid.shape[0], height, width, 2)
        return jnp.einsum("hk,bklc,wl->bhwc", rows, grid, cols, precision="highest")

    ii, jj = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in (height, width)),
                          indexing="ij")  # fmt: skip

    def warp_one(image, field):  # [H, W, 1], [H, W, 2]
        coords = [ii + field[..., 0], jj + field[..., 1]]
        return map_coordinates(image[..., 0], coords, order=1, mode="nearest")[..., None]

    def register(variables, fixed, moving, train):
        x = jnp.concatenate([fixed, moving], axis=-1)
        if train:
            grid, updated = net.apply(variables, x, True, mutable=["batch_stats"])
        else:
            grid, updated = net.apply(variables, x, False), None
        return jax.vmap(warp_one)(moving, field_of(grid)), updated

    return register


def init(config: DIRNetConfig, key: jax.Array) -> dict[str, Any]:
    """The prototype's own initial variables ({'params', 'batch_stats'})."""
    check(config)
    shape = (1, *config.image_shape, 2 * config.channels)
    return Regressor(config).init(key, jnp.zeros(shape), False)


def loss_fn(config: DIRNetConfig) -> Callable[..., tuple[jax.Array, Any]]:
    """(params, batch_stats, fixed, moving) → (−NCC averaged over the batch, new stats)."""
    register = registration(config)

    def loss(params, batch_stats, fixed, moving):
        variables = {"params": params, "batch_stats": batch_stats}
        warped, updated = register(variables, fixed, moving, True)
        return -ncc(fixed, warped).mean(), updated["batch_stats"]

    return loss


def train_step(config: DIRNetConfig) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
    """(Adam, step): step(params, batch_stats, opt_state, fixed, moving) → (params,
    batch_stats, opt_state, loss), one jitted call per step, its state donated."""
    tx = optax.adam(config.learning_rate)
    grad = jax.value_and_grad(loss_fn(config), has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, fixed, moving):
        (loss, batch_stats), grads = grad(params, batch_stats, fixed, moving)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return tx, step


def register_fn(config: DIRNetConfig) -> Callable[..., jax.Array]:
    """Jitted (variables, fixed, moving) → warped [B, H, W, 1]: inference, BatchNorm by its
    running averages."""
    register = registration(config)
    return jax.jit(lambda variables, fixed, moving: register(variables, fixed, moving, False)[0])
