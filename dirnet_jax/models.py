"""DIRNet: a ConvNet regressor of control-point displacements, a spline transformer and a
resampler, composed into one pure function of (variables, fixed, moving).

Conventions as in :mod:`dirnet_jax.bspline`. The regressor sees ``concat([fixed, moving])``
on channels. Its architecture (all layers but the output: convolution without bias,
BatchNorm, ELU):

* ``patch`` (baseline): ``num_downsamplings`` × [3×3 conv, 2×2 downsample] (and, with
  ``conv_layers`` larger, further 3×3 convs at the grid's resolution), then two 1×1 convs
  and a linear 1×1 output with ``ndim`` channels: one output pixel per control point, each
  seeing (about) its own patch.
* ``overlap`` (C1): an extra 3×3 conv before and after the last downsampling, so the
  receptive fields of neighbouring control points overlap.
* ``global`` (C2): the same conv stack, flattened into two dense layers of
  ``dense_features`` and a linear dense output of ``grid × ndim``: every control point sees
  the whole image, and the network only accepts its training size.

Downsampling is average pooling (baseline), max pooling (A1) or a 2×2 stride-2 conv (A2).
The output layer starts at (nearly) zero, so an untrained DIRNet is (nearly) the identity.

Inference computes the same function faster: BatchNorm's running averages folded into the
layers (`fold_batchnorm`), and the layers in the fast forms of :mod:`dirnet_jax.layers`
(on CUDA GPUs Triton kernels where they take the shape). Training computes them there too:
the first conv by `layers.conv_taps`, and in float32 on CUDA GPUs its first layer at once
(`layers.first_layer_train`) and its later 3×3 convs by `dirnet_jax.train_conv`. The
module-level switches here choose among them when a program is traced.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dirnet_jax import first_layer_grad, layers, train_conv
from dirnet_jax.batchnorm import BatchNorm
from dirnet_jax.bspline import cubic_bspline_field, quadratic_bspline_field
from dirnet_jax.config import DIRNetConfig
from dirnet_jax.dispatch import default_platform
from dirnet_jax.elu import elu, elu_unguarded
from dirnet_jax.resample import warp
from dirnet_jax.tps import tps_field

TRANSFORM_FNS = {
    "cubic": cubic_bspline_field,
    "quadratic": quadratic_bspline_field,
    "tps": tps_field,
}

# Small enough that an untrained network is the identity to ~1e-4 px, large enough that
# every layer receives gradient from the first step.
OUTPUT_INIT = nn.initializers.normal(stddev=1e-5)

# XLA:GPU puts runs of 5 or more kernels into a CUDA graph by default and launches the
# rest one by one. From one kernel up, a 256² pair took 0.19 ms on an H200 against 0.31
# (as XLA_FLAGS; compiled in here, 0.25 against 0.30 in another run; batch 512 and
# training unchanged; benchmarks/NOTES.md). Other backends ignore it.
INFER_COMPILER_OPTIONS = {"xla_gpu_graph_min_graph_size": 1}


# The compute dtypes whose training computes its 3×3 convs by Triton kernels on CUDA where
# they take the shape (`layers.conv_taps_train`, `train_conv.conv3x3`, and the first
# layer at once below, float32 only), XLA's elsewhere. On an H200, 256² batch 32
# (benchmarks/NOTES.md): float32 881 steps/s against 551 with XLA's convolutions (run 6);
# bfloat16 (the kernels read it, their sums in float32) 742 against 663 with cuDNN's (run 7).
TRAIN_CONV_DTYPES = ("float32", "bfloat16")
# `train_conv.conv3x3`'s form for the convolution and its gradients: "pairs" (a product per
# kernel row for two output columns; run 6: 749 steps/s against the "taps" form's 701).
TRAIN_CONV_FORM = "pairs"


# Training's first conv, BatchNorm, ELU and pooling at once (`layers.first_layer_train`),
# with this conv for XLA's path (None: layer by layer), on the platforms named
# (`dispatch.default_platform()` when the step is traced: CUDA, not ROCm, where its
# kernels would fall back to XLA's slower path), in float32 with the training kernels on
# and where first_layer_grad's kernels take the shape (256², not 28²). On an H200 (run 6,
# with TRAIN_FIRST_LAYER_PASSES and `layers.TRAIN_FIRST_LAYER_FORWARD`) 840 steps/s against
# 701 layer by layer; on a CPU, and on the H200 with XLA's gradients (run 5), it was
# slower, so there it stays layer by layer.
train_first_layer_conv: Callable[[jax.Array, jax.Array], jax.Array] | None = layers.conv_taps_train
TRAIN_FIRST_LAYER_PLATFORMS = ("cuda",)
# How first_layer_grad's kernels compute the conv and the kernel gradient: 3, three TF32
# products on tensor cores (float32 to ~3e-6 of the largest value); 0, float32
# multiply-adds (run 6: 743 steps/s against 840, with `layers.TRAIN_FIRST_LAYER_FORWARD`).
TRAIN_FIRST_LAYER_PASSES = 3


class Regressor(nn.Module):
    """Maps an image pair to control-point displacements in pixels."""

    config: DIRNetConfig
    folded: bool = False  # BatchNorm folded into the layers before it: `fold_batchnorm`

    @nn.compact
    def __call__(self, fixed: jax.Array, moving: jax.Array, *, train: bool) -> jax.Array:
        """fixed, moving: [B, *spatial, C] → control grid [B, *grid, ndim]."""
        cfg = self.config
        x = layers.stack_channels(fixed, moving)
        ndim = x.ndim - 2

        if self.folded and train:
            raise ValueError("a regressor with BatchNorm folded in only runs in inference mode")

        # Layers named as flax would name them (Conv_0, BatchNorm_0, …), but by us, so that a
        # fused layer can take the name and parameters of the conv it replaces.
        made: collections.Counter[str] = collections.Counter()

        def name(kind: str) -> str:
            made[kind] += 1
            return f"{kind}_{made[kind] - 1}"

        def normalized(linear, kind, x):
            """linear (Conv or Dense, no bias) → BatchNorm → ELU."""
            x = linear(use_bias=self.folded, dtype=cfg.compute_dtype, name=name(kind))(x)
            if not self.folded:
                x = BatchNorm(
                    use_running_average=not train,
                    momentum=cfg.bn_momentum,
                    epsilon=layers.BN_EPSILON,
                    dtype=cfg.compute_dtype,
                    name=name("BatchNorm"),
                )(x)
            return elu_unguarded(x) if self.folded else elu(x)  # folded: inference only

        # Training's 3×3 convs by Triton kernels on CUDA (see TRAIN_CONV_DTYPES).
        kernels = train and cfg.compute_dtype in TRAIN_CONV_DTYPES

        def layer(x, kernel, strides=1, padding="SAME"):
            # The first conv by `conv_taps` in training and in folded inference (where no
            # fused layer took it); plain at unfolded inference, the benchmarks' reference.
            if (train or self.folded) and not made["Conv"] and (kernel, strides) == (3, 1):
                conv = layers.conv_taps_train if kernels else layers.conv_taps
                tap_conv = functools.partial(layers.TapConv, cfg.features, conv=conv)
                return normalized(tap_conv, "Conv", x)
            taken = kernels and train_conv.applies(x.shape, cfg.features)
            if taken and (kernel, strides) == (3, 1):
                conv = functools.partial(train_conv.conv3x3, form=TRAIN_CONV_FORM)
                tap_conv = functools.partial(layers.TapConv, cfg.features, conv=conv)
                return normalized(tap_conv, "Conv", x)
            conv = functools.partial(
                layers.conv_layer, cfg.features, (kernel,) * ndim, strides=strides, padding=padding
            )
            return normalized(conv, "Conv", x)

        def downsample(x):
            if cfg.downsampling == "strided":
                return layer(x, 2, strides=2, padding="VALID")
            return layers.pool2(x, jnp.mean if cfg.downsampling == "avg" else jnp.max)

        overlap = cfg.receptive_field == "overlap"
        last_down = cfg.num_downsamplings - 1
        for i in range(cfg.num_conv_layers):
            # Training: the first conv, BatchNorm, ELU and pooling at once
            # (`first_layer_train`; see `train_first_layer_conv`).
            if (
                kernels
                and i == 0
                and cfg.compute_dtype == "float32"  # bfloat16's is untimed
                and train_first_layer_conv is not None
                and default_platform() in TRAIN_FIRST_LAYER_PLATFORMS
                and train_conv.enabled()
                and first_layer_grad.applies(
                    x.shape, cfg.features, cfg.downsampling, TRAIN_FIRST_LAYER_PASSES
                )
                and not (overlap and i == last_down)
            ):
                kernel = layers.ConvKernel(cfg.features, name=name("Conv"))(x)
                fused = functools.partial(
                    layers.first_layer_of, kernel=kernel, downsampling=cfg.downsampling,
                    conv=train_first_layer_conv, dtype=cfg.compute_dtype or jnp.float32,
                    passes=TRAIN_FIRST_LAYER_PASSES,
                )  # fmt: skip
                bn = BatchNorm(
                    use_running_average=False, momentum=cfg.bn_momentum, epsilon=layers.BN_EPSILON,
                    name=name("BatchNorm"),
                )  # fmt: skip
                x = bn(x, layer=(fused, cfg.features))
                continue
            # Inference: a conv followed by pooling as one function of both, the first as
            # one loop (`fused_first_layer`), the others by `pooled_conv`.
            if (
                self.folded
                and cfg.downsampling in ("avg", "max")
                and i < cfg.num_downsamplings
                and not (overlap and i == last_down)
            ):
                x = layers.ConvELUPool(
                    cfg.features, cfg.downsampling, cfg.compute_dtype, i == 0, name=name("Conv")
                )(x, (fixed, moving) if i == 0 else None)
                continue
            x = layer(x, 3)
            if i < cfg.num_downsamplings:
                if i == last_down and overlap:
                    x = layer(x, 3)
                x = downsample(x)
                if i == last_down and overlap:
                    x = layer(x, 3)

        if cfg.receptive_field == "global":
            batch, grid_shape = x.shape[0], x.shape[1:-1]
            x = x.reshape(batch, -1)
            for _ in range(2):
                x = normalized(functools.partial(nn.Dense, cfg.dense_features), "Dense", x)
            output = nn.Dense(math.prod(grid_shape) * ndim, kernel_init=OUTPUT_INIT, name="output")
            return output(x.astype(jnp.float32)).reshape(batch, *grid_shape, ndim)

        x = layer(x, 1)
        x = layer(x, 1)
        output = nn.Conv(ndim, (1,) * ndim, kernel_init=OUTPUT_INIT, name="output")
        return output(x.astype(jnp.float32))


def fold_batchnorm(variables: dict[str, Any]) -> dict[str, Any]:
    """Inference-mode BatchNorm folded into the kernel and bias of the layer before it.

    ``BN(x @ W) = x @ (W * s) + (β − μ s)`` with ``s = γ / sqrt(σ² + ε)``, per output
    channel: variables for ``Regressor(config, folded=True)``, which then skips BatchNorm.
    Layers pair with BatchNorms in creation order (every Conv but the output, then every
    Dense but the output).
    """
    params, stats = variables["params"], variables["batch_stats"]

    def numbered(prefix, tree):
        names = [k for k in tree if k.startswith(prefix + "_")]
        return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))

    linear = numbered("Conv", params) + numbered("Dense", params)
    norms = numbered("BatchNorm", params)
    if len(linear) != len(norms):
        raise ValueError(
            f"{len(linear)} layers but {len(norms)} BatchNorms: not a DIRNet regressor"
        )
    folded = {k: v for k, v in params.items() if not k.startswith("BatchNorm_")}
    for layer, norm in zip(linear, norms, strict=True):
        bn, mean, var = params[norm], stats[norm]["mean"], stats[norm]["var"]
        s = bn["scale"] * jax.lax.rsqrt(var + layers.BN_EPSILON)
        folded[layer] = {"kernel": params[layer]["kernel"] * s, "bias": bn["bias"] - mean * s}
    return {"params": folded}


class Registration(NamedTuple):
    warped: jax.Array  # [B, *spatial, C] moving image warped onto the fixed one
    displacement: jax.Array  # [B, *spatial, ndim] dense field, pixels
    grid: jax.Array  # [B, *grid, ndim] control-point displacements, pixels


def check_pair(config: DIRNetConfig, fixed: jax.Array, moving: jax.Array) -> None:
    """Raise a one-line ValueError unless (fixed, moving) is a batch this DIRNet accepts."""
    expect = f"[B, {', '.join(map(str, config.image_shape))}, {config.channels}]"
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} differ in shape")
    if fixed.ndim != config.ndim + 2 or fixed.shape[-1] != config.channels:
        raise ValueError(f"images of shape {fixed.shape} given to a model for {expect}")
    if fixed.shape[0] == 0:
        raise ValueError("an empty batch of pairs")
    spatial = fixed.shape[1:-1]
    if config.receptive_field == "global" and spatial != config.image_shape:
        raise ValueError(
            f"the global-head DIRNet (C2) only takes its training size {expect}, got {fixed.shape}"
        )
    if any(s % config.downsampling_factor for s in spatial):
        raise ValueError(
            f"image size {spatial} is not a multiple of the downsampling factor "
            f"{config.downsampling_factor}"
        )


def init_variables(config: DIRNetConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} for `config` at its image shape.

    One compiled program per network (`config.network()`: seeds and schedules share it).
    Run op by op, flax's init compiled each of its operations alone (~100 programs for
    its forward pass at the image shape): 9 s of a fresh process's start at 28² on a
    2-core AVX2 CPU, against 3 s (benchmarks/NOTES.md)."""
    return _init_variables(config.network(), key)


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(network: DIRNetConfig, key: jax.Array) -> dict[str, Any]:
    dummy = jnp.zeros((1, *network.image_shape, network.channels), jnp.float32)
    return dict(Regressor(network).init(key, dummy, dummy, train=False))


def apply(
    config: DIRNetConfig,
    variables: dict[str, Any],
    fixed: jax.Array,
    moving: jax.Array,
    *,
    train: bool = False,
) -> tuple[Registration, Any]:
    """Register a batch of pairs: a pure function to call inside your own `jax.jit` (or
    `jax.grad`). Outside one JAX runs it op by op: on the 2-core CPU, a 28² batch of 32
    took 6.7 s at the first call and 120 ms after, against 0.76 s and 2.2 ms jitted.
    `register` is the jitted inference call. It is not jitted here because what it
    traces depends on `dispatch.split_over` and on the switches of this module and of
    `dirnet_jax.layers`, which a cached trace would not see.

    Args:
      config: the DIRNet's configuration.
      variables: {'params', 'batch_stats'} of the regressor.
      fixed, moving: [B, *spatial, C] image pairs.
      train: use batch statistics in BatchNorm (and return their running averages);
        otherwise the running averages, folded into the layers (`fold_batchnorm`).

    Returns:
      (Registration, new batch_stats when `train`, else None).
    """
    check_pair(config, fixed, moving)
    if not train:  # running averages folded into the layers: fewer ops, the same grid (tested)
        return _infer(config, fold_batchnorm(variables), fixed, moving), None
    grid, updates = Regressor(config).apply(
        variables, fixed, moving, train=True, mutable=["batch_stats"]
    )
    return transform(config, grid, moving), updates["batch_stats"]


def transform(config: DIRNetConfig, grid: jax.Array, moving: jax.Array) -> Registration:
    """Control grid [B, *grid, ndim] → dense field → warped moving images."""
    displacement = TRANSFORM_FNS[config.transformer](grid, moving.shape[1:-1])
    warped = warp(moving, displacement, mode=config.boundary)
    return Registration(warped, displacement, grid)


def _infer(config: DIRNetConfig, folded: Any, fixed: jax.Array, moving: jax.Array) -> Registration:
    """Inference with variables from `fold_batchnorm`."""
    grid = Regressor(config, folded=True).apply(folded, fixed, moving, train=False)
    return transform(config, grid, moving)


# On XLA:CPU a pass over this many pixels keeps the regressor's activations in cache:
# 32 pairs at 256² run 1.36× faster as 16 passes of 2 than as one pass (128²: 1.3×).
CPU_PIXELS_PER_PASS = 2**17


def pairs_per_pass(config: DIRNetConfig, batch: int) -> int:
    """How many pairs `register` runs at once: the whole batch on an accelerator; on a CPU,
    as many as fit in CPU_PIXELS_PER_PASS (a `lax.map` over the rest; same results)."""
    if jax.default_backend() != "cpu":
        return batch
    return max(1, min(batch, CPU_PIXELS_PER_PASS // math.prod(config.image_shape)))


@functools.partial(
    jax.jit, static_argnums=0, static_argnames="chunk", compiler_options=INFER_COMPILER_OPTIONS
)
def register(
    config: DIRNetConfig,
    variables: dict[str, Any],
    fixed: jax.Array,
    moving: jax.Array,
    *,
    chunk: int | None = None,
) -> Registration:
    """Register unseen pairs in one pass (inference mode), jitted per config and shape.

    fixed, moving: [B, *spatial, C] → Registration(warped, displacement, grid).
    `chunk`: pairs per pass of the network (default `pairs_per_pass`); inference mode
    treats pairs independently, so it changes the speed and not the result.
    """
    check_pair(config, fixed, moving)
    folded = fold_batchnorm(variables)  # once, outside the passes
    return _infer_in_passes(config, folded, fixed, moving, chunk)


def _infer_in_passes(config, folded, fixed, moving, chunk):
    """`_infer` over the batch in passes of `chunk` pairs (see `register`)."""
    batch = fixed.shape[0]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of pairs, got {chunk}")
    chunk = pairs_per_pass(config, batch) if chunk is None else chunk
    if chunk >= batch:
        return _infer(config, folded, fixed, moving)
    whole = batch - batch % chunk

    def chunks(a):
        return a[:whole].reshape(whole // chunk, chunk, *a.shape[1:])

    head = jax.lax.map(lambda fm: _infer(config, folded, *fm), (chunks(fixed), chunks(moving)))
    head = jax.tree.map(lambda a: a.reshape(whole, *a.shape[2:]), head)
    if whole == batch:
        return head
    tail = _infer(config, folded, fixed[whole:], moving[whole:])
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, tail)


@functools.partial(
    jax.jit, static_argnums=0, static_argnames="chunk", compiler_options=INFER_COMPILER_OPTIONS
)
def _register_folded(config, folded, fixed, moving, *, chunk=None):
    check_pair(config, fixed, moving)
    return _infer_in_passes(config, folded, fixed, moving, chunk)


def registrar(config: DIRNetConfig, variables: dict[str, Any]) -> Callable[..., Registration]:
    """`register` bound to one config and one set of variables, BatchNorm folded into them
    once here instead of at every call: the same registrations with less work per call,
    for a stream of pairs where each call's latency counts (one pair at a time).

    Returns:
      fn(fixed, moving, *, chunk=None) → Registration, as ``register(config, variables,
      fixed, moving, chunk=chunk)``.
    """
    folded = jax.jit(fold_batchnorm)(variables)
    return functools.partial(_register_folded, config, folded)


def register_batched(
    config: DIRNetConfig,
    variables: dict[str, Any],
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    batch_size: int = 256,
) -> Registration:
    """`register` over any number of pairs, in chunks of `batch_size` (the last one padded,
    so one trace serves every chunk). Arrays in and out are host NumPy arrays.
    """
    fixed, moving = np.asarray(fixed, np.float32), np.asarray(moving, np.float32)
    check_pair(config, fixed, moving)
    n = fixed.shape[0]
    parts, in_flight = [], None

    def fetch(out, pad):
        parts.append([a[: a.shape[0] - pad] for a in jax.device_get(out)])

    for start in range(0, n, batch_size):
        f, m = fixed[start : start + batch_size], moving[start : start + batch_size]
        pad = batch_size - f.shape[0] if n > batch_size else 0
        if pad:
            f = np.concatenate([f, np.repeat(f[-1:], pad, axis=0)])
            m = np.concatenate([m, np.repeat(m[-1:], pad, axis=0)])
        out = register(config, variables, f, m)  # dispatched: runs while the last is fetched
        if in_flight is not None:
            fetch(*in_flight)
        in_flight = (out, pad)
    fetch(*in_flight)
    return Registration(*(np.concatenate(p) for p in zip(*parts, strict=True)))
