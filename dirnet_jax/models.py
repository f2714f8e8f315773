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
layers (`fold_batchnorm`), and the first conv, its ELU and the pooling after it as one
elementwise loop (`conv_elu_pool2`; on CUDA GPUs a Triton kernel, `dirnet_jax.first_layer`).
On CUDA GPUs the second layer (128² at 256²) is a Triton kernel too (`pooled_conv`,
`dirnet_jax.pooled_layers`). Training, and inference where no fused layer takes it (A2),
compute the first conv (two input channels) as sums of products of shifted slices
(`conv_taps`). Training in float32 on CUDA GPUs computes its first layer at once, conv,
BatchNorm, ELU and pooling without writing its full-resolution activations
(`first_layer_train`, `dirnet_jax.first_layer_grad`), and its later 3×3 convs and their
gradients by Triton kernels (`dirnet_jax.train_conv`) where they take the shape; XLA
computes them elsewhere.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dirnet_jax import first_layer, first_layer_grad, pooled_layers, train_conv
from dirnet_jax.batchnorm import BatchNorm, batch_stats
from dirnet_jax.bspline import cubic_bspline_field, quadratic_bspline_field
from dirnet_jax.config import DIRNetConfig
from dirnet_jax.dispatch import cuda_or_xla, default_platform
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
BN_EPSILON = 1e-5

# XLA:GPU puts runs of 5 or more kernels into a CUDA graph by default and launches the
# rest one by one. From one kernel up, a 256² pair took 0.19 ms on an H200 against 0.31
# (as XLA_FLAGS; compiled in here, 0.25 against 0.30 in another run; batch 512 and
# training unchanged; benchmarks/NOTES.md). Other backends ignore it.
INFER_COMPILER_OPTIONS = {"xla_gpu_graph_min_graph_size": 1}


def pool2(x: jax.Array, reduce: Callable[..., jax.Array]) -> jax.Array:
    """2×…×2 pooling with stride 2 of [B, *spatial, C] (sizes even): `reduce` (jnp.mean,
    jnp.max) over the window axes of a reshape. Same values as nn.avg_pool / nn.max_pool,
    but its gradient is a broadcast where reduce_window's was a padded reduce_window
    (~100 µs of a 3.6 ms 28² training step on XLA:CPU); jnp.max's never NaN
    (`_window_max`)."""
    spatial = x.shape[1:-1]
    split = [d for s in spatial for d in (s // 2, 2)]
    windows = tuple(range(2, 2 * len(spatial) + 1, 2))
    x = x.reshape(x.shape[0], *split, x.shape[-1])
    return _window_max(x, windows) if reduce is jnp.max else reduce(x, axis=windows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, axis)``, whose gradient (split evenly between ties, as jnp.max's) is
    never NaN: see `_window_max_jvp`."""
    return jnp.max(x, axis=axis)


@_window_max.defjvp
def _window_max_jvp(axis, primals, tangents):
    # jnp.max's rule, but its count of the window's values equal to the maximum is taken
    # as at least 1. XLA may compute x anew in each fusion that reads it and round the
    # copies differently (mul and add fused into one FMA in one copy only): then no value
    # equals the maximum, jnp.max's rule divides 0 by 0, and training stops on a NaN (A1 at
    # LLVM -O0 on the CPU: 28 % of the windows). Such a window's gradient is 0 instead.
    (x,), (t,) = primals, tangents
    top = jnp.max(x, axis=axis, keepdims=True)
    at = (x == top).astype(t.dtype)
    count = jnp.maximum(jnp.sum(at, axis=axis), 1)
    return jnp.squeeze(top, axis), jnp.sum(t * at, axis=axis) / count


def stack_channels(a: jax.Array, b: jax.Array) -> jax.Array:
    """``concatenate([a, b], axis=-1)`` for [..., C] arrays, written as a select between
    zero-padded copies: XLA:CPU (jax 0.10) runs a concatenate along the minor axis ~20×
    slower (388 µs against 19 µs for one 256×256 pair; 9 ms of a batch-32 call)."""
    c = a.shape[-1]
    keep = [(0, 0)] * (a.ndim - 1)
    a, b = jnp.pad(a, [*keep, (0, c)]), jnp.pad(b, [*keep, (c, 0)])
    return jnp.where(jax.lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 1) < c, a, b)


def _tap_sum(
    padded: jax.Array, kernel: jax.Array, counts: tuple[int, ...], start: tuple[int, ...], step: int
) -> jax.Array:
    """Σ over kernel taps and input channels of ``padded[:, start + tap :: step][..., c] ·
    kernel[tap, c]``, `counts` positions per spatial axis: a convolution as one elementwise
    loop. [B, *padded spatial, Cin] → [B, *counts, Cout], float32."""
    acc = jnp.float32(0)
    for tap in itertools.product(range(kernel.shape[0]), repeat=len(counts)):
        window = tuple(
            slice(s + t, s + t + step * (n - 1) + 1, step)
            for s, t, n in zip(start, tap, counts, strict=True)
        )
        for c in range(padded.shape[-1]):
            value = padded[(slice(None), *window, c)][..., None].astype(jnp.float32)
            acc = acc + value * kernel[(*tap, c)].astype(jnp.float32)
    return acc


def _pad_same(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, [(0, 0), *[(size // 2, size // 2)] * (x.ndim - 2), (0, 0)])


@jax.custom_vjp
def conv_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv(x, kernel)`` (SAME zero padding, stride 1) as sums of products of shifted
    slices of x, for inputs of few channels (the first layer: fixed and moving). On
    XLA:CPU ~4.5× faster than the convolution (256², batch 32, 2 → 16 channels: 7.6
    against 34 ms). The gradients are XLA's, of its own convolution: the products'
    own gradient is a reduction per tap and channel (98 against 21 ms).

    Args:
      x: [B, *spatial, Cin]; kernel: [k, …, k, Cin, Cout] (k odd).

    Returns:
      [B, *spatial, Cout] in the dtype of x and kernel (accumulated in float32).
    """
    out = _tap_sum(_pad_same(x, kernel.shape[0]), kernel, x.shape[1:-1], (0,) * (x.ndim - 2), 1)
    return out.astype(jnp.result_type(x, kernel))


def _conv_taps_fwd(x, kernel):
    return conv_taps(x, kernel), (x, kernel)


def _conv_taps_bwd(residuals, cotangent):
    return jax.vjp(train_conv.xla_conv, *residuals)[1](cotangent)


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_elu_pool2(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, downsampling: str
) -> jax.Array:
    """``pool2(elu(conv(x, kernel, SAME) + bias))``, written as sums of products of strided
    slices of x: one elementwise loop that never writes the full-resolution activations.

    For the first layer, whose input has few channels (fixed and moving): on XLA:CPU ~3×
    faster than the convolution, ELU and pooling it replaces (256², batch 1 and 32); on a
    GPU it is one fused kernel reading the images and writing the pooled output.

    Args:
      x: [B, *spatial, Cin] (spatial sizes even).
      kernel: [3, …, 3, Cin, Cout]; bias: [Cout].
      downsampling: "avg" or "max" over each 2×…×2 window.

    Returns:
      [B, *spatial / 2, Cout] float32 (accumulated in float32 whatever the inputs).
    """
    half = tuple(n // 2 for n in x.shape[1:-1])
    padded = _pad_same(x.astype(jnp.float32), kernel.shape[0])
    kernel = kernel.astype(jnp.float32)
    window = [  # the activation at each position of the pooling window
        elu_unguarded(_tap_sum(padded, kernel, half, offset, 2) + bias.astype(jnp.float32))
        for offset in itertools.product(range(2), repeat=len(half))
    ]
    if downsampling == "avg":
        return sum(window[1:], window[0]) / len(window)
    if downsampling == "max":
        return functools.reduce(jnp.maximum, window)
    raise ValueError(f"conv_elu_pool2 pools by avg or max, not {downsampling!r}")


def fused_first_layer(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    dtype: Any,
    form: str | None = None,
    num_warps: int | None = None,
) -> jax.Array:
    """`conv_elu_pool2` in `dtype`: on CUDA GPUs the Triton kernel of
    :mod:`dirnet_jax.first_layer` (its `form` and warps; None: `first_layer.default_form`
    for x's channels) where it takes the shape, XLA's loop elsewhere."""
    if form is None:
        form, num_warps = first_layer.default_form(x.shape[-1])

    def xla(x, kernel, bias):
        return conv_elu_pool2(x, kernel, bias, downsampling).astype(dtype)

    gpu = functools.partial(first_layer.conv_elu_pool2_gpu, downsampling=downsampling,
                            out_dtype=dtype, num_warps=num_warps, form=form)  # fmt: skip
    taken = first_layer.applies(x.shape, kernel.shape[-1], downsampling, form=form)
    return cuda_or_xla(gpu, xla, x, kernel, bias, taken=taken)


# Whether inference's first layer reads the pair as two images on CUDA
# (`fused_first_layer_pair`) instead of their stacked copy, which XLA took 124 µs to write
# at 256², batch 512 (run 7). Run 8, H200, 256², against the stacked pair in the same
# process: 195,100 against 190,400 pairs/s at batch 512, 84,000 against 59,700 at 32,
# one pair 0.23 against 0.25 ms.
INFER_FIRST_LAYER_PAIR = True


def fused_first_layer_pair(
    fixed: jax.Array,
    moving: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    dtype: Any,
    interpret: bool = False,
) -> jax.Array:
    """`fused_first_layer` of ``stack_channels(fixed, moving)``: on CUDA GPUs, where the
    default form is a window-matrix one and takes the shape, the kernel reads the two
    images as they are (`first_layer.conv_elu_pool2_pair_gpu`; `interpret`: in Pallas'
    interpreter everywhere, the tests); elsewhere the pair is stacked first."""
    form, num_warps = first_layer.default_form(2 * fixed.shape[-1])

    def xla(fixed, moving, kernel, bias):
        return fused_first_layer(stack_channels(fixed, moving), kernel, bias, downsampling, dtype)

    gpu = functools.partial(first_layer.conv_elu_pool2_pair_gpu, downsampling=downsampling,
                            out_dtype=dtype, num_warps=num_warps, form=form,
                            interpret=interpret)  # fmt: skip
    taken = first_layer.pair_applies(fixed.shape, kernel.shape[-1], downsampling, form)
    return cuda_or_xla(gpu, xla, fixed, moving, kernel, bias, taken=taken, interpret=interpret)


def _first_layer_reference(x, kernel, scale, bias, downsampling, conv, dtype):
    """Training's first layer as the regressor computes it unfused: `conv`, BatchNorm with
    the batch's statistics, ELU, pooling; float32, the output in `dtype`."""
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    z = conv(x, kernel)
    mean, var = batch_stats(z)
    mul = jax.lax.rsqrt(var + BN_EPSILON) * scale
    y = elu(z * mul + (bias - mean * mul))
    return pool2(y, jnp.mean if downsampling == "avg" else jnp.max).astype(dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def first_layer_train(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    downsampling: str,
    conv: Callable[[jax.Array, jax.Array], jax.Array] = conv_taps,
    dtype: Any = jnp.float32,
    interpret: bool = False,
    grad_shape: tuple[int, ...] = (),
    passes: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training's first layer, ``pool2(elu(BatchNorm(conv(x, kernel))))`` with the batch's
    statistics, without writing its full-resolution activations (float32 training on GPUs:
    `train_first_layer_conv`).

    The statistics are sums of the conv and its square (two input channels: a sum of
    products per value, recomputed where it is read). With them BatchNorm is a scale and
    a shift of the conv, so the layer is inference's folded first layer
    (`fused_first_layer`, the Triton kernel on CUDA) with kernel·mul and bias − mean·mul.
    The gradients recompute what they need from x instead of reading stored activations
    (`_first_layer_train_bwd`). On CUDA GPUs, where the shape suits them, the sums and the
    kernel's gradient are the Triton kernels of `dirnet_jax.first_layer_grad`; elsewhere
    XLA's, ending in `conv`'s own gradients. Sums in float32 whatever `dtype`.

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, F]; scale, bias: BatchNorm's [F].
      downsampling: "avg" or "max"; conv: the SAME 3×3 convolution (x, kernel) → [B, H,
        W, F] of XLA's path; dtype: the output's; interpret: first_layer_grad's kernels
        in Pallas' interpreter on every backend (the tests); grad_shape: (rows, block,
        warps) of `first_layer_grad.kernel_grad_gpu`, or a prefix of them; passes: how
        first_layer_grad's kernels compute (0: float32 multiply-adds, 1 or 3: TF32
        products).

    Returns:
      (pooled [B, H/2, W/2, F] in dtype, batch mean [F], batch variance [F]).
    """
    out, _ = _first_layer_train_fwd(
        x, kernel, scale, bias, downsampling, conv, dtype, interpret, grad_shape, passes
    )
    return out


def _first_layer_train_fwd(
    x, kernel, scale, bias, downsampling, conv, dtype, interpret, _, passes
):  # fmt: skip
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)

    def xla(x, kernel):
        z = conv(x, kernel)
        axes = tuple(range(z.ndim - 1))
        return jnp.stack([z.sum(axes), jax.lax.square(z).sum(axes)])

    gpu = functools.partial(first_layer_grad.stats_gpu, interpret=interpret, passes=passes)
    taken = first_layer_grad.applies(x.shape, kernel.shape[-1], downsampling, passes)
    sums = cuda_or_xla(gpu, xla, x32, k32, taken=taken, interpret=interpret, summed=True)
    mean, mean_sq = sums / x[..., 0].size
    var = jnp.maximum(0.0, mean_sq - jax.lax.square(mean))  # as `batch_stats`
    mul = jax.lax.rsqrt(var + BN_EPSILON) * scale
    pooled = fused_first_layer(
        x, k32 * mul, bias - mean * mul, downsampling, dtype, *TRAIN_FIRST_LAYER_FORWARD
    )
    return (pooled, mean, var), (x, kernel, scale, bias, mean, mean_sq)


def _first_layer_train_bwd(
    downsampling, conv, dtype, interpret, grad_shape, passes, residuals, cotangents
):  # fmt: skip
    """The reference's gradients, written out so that no full-resolution value is stored:
    BatchNorm's backward needs only two sums per channel, Σ g_y and Σ z·g_y (y the
    normalized conv z, g_y its gradient), and the kernel's gradient is Σ x_shifted · g_z
    with g_z = mul·g_y + c0 + c1·z (c0, c1 from the statistics' own gradient). On CUDA
    Triton kernels compute both from x and the pooled gradient; elsewhere XLA fuses each
    full-resolution value into the reduction that reads it."""
    x, kernel, scale, bias, mean, mean_sq = residuals
    g_pooled, g_mean, g_var = cotangents
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    (_, var), stats_vjp = jax.vjp(
        lambda m, q: (m, jnp.maximum(0.0, q - jax.lax.square(m))), mean, mean_sq
    )
    r = jax.lax.rsqrt(var + BN_EPSILON)
    mul = r * scale
    shift = bias - mean * mul
    reduce = jnp.mean if downsampling == "avg" else jnp.max

    def xla_grad_y(x, kernel, mul, shift, g):
        z = conv(x, kernel)
        y = z * mul + shift
        (g_y,) = jax.vjp(lambda y: pool2(elu(y), reduce).astype(dtype), y)[1](g)
        return z, g_y

    def xla_sums(x, kernel, mul_shift_mean, g):  # Σ g_y, Σ (z − mean)·g_y
        mul, shift, mean = mul_shift_mean
        z, g_y = xla_grad_y(x, kernel, mul, shift, g)
        axes = tuple(range(z.ndim - 1))
        return jnp.stack([g_y.sum(axes), ((z - mean) * g_y).sum(axes)])

    def xla_kernel_grad(x, kernel, coefficients, g):
        mul, shift, c0, c1 = coefficients
        z, g_y = xla_grad_y(x, kernel, mul, shift, g)
        return jax.vjp(functools.partial(conv, x), kernel)[1](mul * g_y + c0 + c1 * z)[0]

    n = x[..., 0].size

    def coefficients_of(sum_g, centred):
        """mul, shift, c0, c1 of g_z = mul·g_y + c0 + c1·z from Σ g_y and Σ (z − mean) g_y.
        y = (z − mean)·r·scale + bias: the gradients of the statistics (mean = Σ z / N,
        mean_sq = Σ z² / N) give c0 = g_m / N and c1 = 2·g_q / N."""
        g_m, g_q = stats_vjp((g_mean - mul * sum_g, g_var - 0.5 * scale * r**3 * centred))
        return jnp.stack([mul, shift, g_m / n, 2 * g_q / n])

    taken = first_layer_grad.applies(x.shape, kernel.shape[-1], downsampling, passes)
    kernels = functools.partial(  # (x, kernel, coefficients, g) → sums over the batch
        cuda_or_xla, taken=taken, interpret=interpret, batched=(True, False, False, True),
        summed=True,
    )  # fmt: skip
    options = dict(zip(("rows", "block", "warps"), grad_shape, strict=False))
    mul_shift_mean = jnp.stack([mul, shift, mean])

    def sums(x, kernel, mul_shift_mean, g):
        sum_g, sum_zg = first_layer_grad.backward_sums_gpu(
            x, kernel, mul_shift_mean[:2], g, downsampling, interpret, passes
        )
        return jnp.stack([sum_g, sum_zg - mul_shift_mean[2] * sum_g])

    def grad(*args):
        return first_layer_grad.kernel_grad_gpu(
            *args, downsampling, interpret, passes=passes, **options
        )

    sum_g, centred = kernels(sums, xla_sums, x32, k32, mul_shift_mean, g_pooled)
    coefficients = coefficients_of(sum_g, centred)
    g_kernel = kernels(grad, xla_kernel_grad, x32, k32, coefficients, g_pooled)
    g_scale, g_bias = r * centred, sum_g
    # The images' gradient (training never asks for it, so XLA drops it): XLA's.
    z, g_y = xla_grad_y(x32, k32, mul, shift, g_pooled)
    g_z = mul * g_y + coefficients[2] + coefficients[3] * z
    g_x = jax.vjp(lambda x: conv(x, k32), x32)[1](g_z)[0]
    return g_x.astype(x.dtype), g_kernel.astype(kernel.dtype), g_scale, g_bias


first_layer_train.defvjp(_first_layer_train_fwd, _first_layer_train_bwd)


def _first_layer_of(x, scale, bias, *, kernel, downsampling, conv, dtype, passes):
    """`first_layer_train` as `BatchNorm`'s `layer` function: (x, scale, bias) → (y, mean,
    var)."""
    return first_layer_train(x, kernel, scale, bias, downsampling, conv, dtype, False, (), passes)


def xla_pooled_conv(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, downsampling: str, dtype: Any
) -> jax.Array:
    """A later folded layer and its pooling: XLA's convolution (cuDNN on GPUs), ELU and
    `pool2`, in `dtype`. [B, *spatial, C] → [B, *spatial / 2, Cout]."""
    y = train_conv.xla_conv(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
    return pool2(elu_unguarded(y), jnp.mean if downsampling == "avg" else jnp.max)


# Inputs at least this wide go to `pooled_layers` on CUDA GPUs (float32): the 128² layer
# of a 256² pair. On an H200 at batch 512 that gave 168,700 pairs/s against 145,000 with
# cuDNN's; the kernel on every layer 160,300 (the narrower layers were slower than
# cuDNN's in run 5); benchmarks/NOTES.md, run 6.
POOLED_KERNEL_MIN_WIDTH = 128
# The compute dtypes whose layers `pooled_conv` gives the kernel (it reads bfloat16 as it
# is, its sums in float32, and writes the layer's dtype). bfloat16 with the kernel at
# batch 512: 221,700 pairs/s against float32's 191,400 in the same process (run 9), and
# bfloat16 with cuDNN's 128² layer 186,200 (run 8); benchmarks/NOTES.md, run 9.
INFER_POOLED_DTYPES = ("float32", "bfloat16")


def pooled_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    dtype: Any,
    interpret: bool = False,
) -> jax.Array:
    """`xla_pooled_conv`, on CUDA GPUs by the Triton kernel of `dirnet_jax.pooled_layers`
    where it takes the layer, the input is at least POOLED_KERNEL_MIN_WIDTH wide and in
    `dtype`, one of INFER_POOLED_DTYPES (one TF32 product per tap: the precision of XLA's
    convolution at default precision). `interpret`: the kernel on every backend, in
    Pallas' interpreter (the tests)."""

    def xla(x, kernel, bias):
        return xla_pooled_conv(x, kernel, bias, downsampling, dtype)

    gpu = functools.partial(pooled_layers.conv_elu_pool2_dense, downsampling=downsampling,
                            out_dtype=dtype, passes=1, interpret=interpret)  # fmt: skip
    taken = (
        pooled_layers.applies(x.shape, kernel.shape[-1], downsampling)
        and x.shape[2] >= POOLED_KERNEL_MIN_WIDTH
        and x.dtype == jnp.dtype(dtype)
        and jnp.dtype(dtype).name in INFER_POOLED_DTYPES
    )
    return cuda_or_xla(gpu, xla, x, kernel, bias, taken=taken, interpret=interpret)


class ConvELUPool(nn.Module):
    """A folded 3×3 conv layer and the pooling after it, with the parameters of the nn.Conv
    it stands for ('kernel', 'bias'): `fused_first_layer` for the first layer (`first`),
    `pooled_conv` for the others."""

    features: int
    downsampling: str
    dtype: Any = None
    first: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, pair: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x: [B, *spatial, C]; pair: the first layer's (fixed, moving) that x stacks, read
        as they are where INFER_FIRST_LAYER_PAIR says so."""
        shape = (3,) * (x.ndim - 2) + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or x.dtype
        if self.first and pair is not None and INFER_FIRST_LAYER_PAIR:
            return fused_first_layer_pair(*pair, kernel, bias, self.downsampling, dtype)
        layer = fused_first_layer if self.first else pooled_conv
        return layer(x, kernel, bias, self.downsampling, dtype)


class TapConv(nn.Module):
    """A 3×3 conv layer computed by `conv` (`conv_taps`, or a function of the same
    signature: `train_conv.conv3x3`), with the parameters of the nn.Conv it stands for
    ('kernel', and 'bias' if `use_bias`): the same initial values under the same name."""

    features: int
    use_bias: bool = False
    dtype: Any = None
    conv: Callable[[jax.Array, jax.Array], jax.Array] = conv_taps

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3,) * (x.ndim - 2) + (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = self.conv(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(dtype)
        return y


def conv_layer(features: int, kernel_size: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """The regressor's conv layers but the first, the fused ones and training's 3×3 convs
    that `dirnet_jax.train_conv` takes: flax's nn.Conv."""
    return nn.Conv(features, kernel_size, **kwargs)


# Training's first conv: `conv_taps`, with its kernel gradient by a Triton kernel on CUDA
# GPUs where it takes the shape (`train_conv.with_taps_grad`), conv_taps' own elsewhere.
conv_taps_train = train_conv.with_taps_grad(conv_taps)

# The compute dtypes whose training computes its 3×3 convs by Triton kernels on CUDA where
# they take the shape (`conv_taps_train`, `train_conv.conv3x3`, and the first layer at
# once below, float32 only), XLA's elsewhere. On an H200, 256² batch 32 (benchmarks/NOTES.md):
# float32 881 steps/s against 551 with XLA's convolutions (run 6); bfloat16 (the kernels
# read it, their sums in float32) 742 against 663 with cuDNN's (run 7).
TRAIN_CONV_DTYPES = ("float32", "bfloat16")
# `train_conv.conv3x3`'s form for the convolution and its gradients: "pairs" (a product per
# kernel row for two output columns; run 6: 749 steps/s against the "taps" form's 701).
TRAIN_CONV_FORM = "pairs"


class ConvKernel(nn.Module):
    """The 'kernel' of a 3×3 conv layer without bias (nn.Conv's initial value under
    nn.Conv's name), for a layer that applies it itself (`first_layer_train`)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, *spatial, Cin] → kernel [3, …, 3, Cin, features]."""
        shape = (3,) * (x.ndim - 2) + (x.shape[-1], self.features)
        return self.param("kernel", nn.initializers.lecun_normal(), shape)


# Training's first conv, BatchNorm, ELU and pooling at once (`first_layer_train`), with
# this conv for XLA's path (None: layer by layer), on the platforms named
# (`dispatch.default_platform()` when the step is traced: CUDA, not ROCm, where its
# kernels would fall back to XLA's slower path), in float32 with the training kernels on
# and where first_layer_grad's kernels take the shape (256², not 28²). On an H200 (run 6, with the
# forms below) 840 steps/s against 701 layer by layer; on a CPU, and on the H200 with
# XLA's gradients (run 5), it was slower, so there it stays layer by layer.
train_first_layer_conv: Callable[[jax.Array, jax.Array], jax.Array] | None = conv_taps_train
TRAIN_FIRST_LAYER_PLATFORMS = ("cuda",)
# How first_layer_grad's kernels compute the conv and the kernel gradient: 3, three TF32
# products on tensor cores (float32 to ~3e-6 of the largest value); 0, float32
# multiply-adds (run 6: 743 steps/s against 840, with the forward below)...
TRAIN_FIRST_LAYER_PASSES = 3
# ...and the forward's (`fused_first_layer`'s form and warps): the 4×4 windows' matrix
# times the window weights, three TF32 products (inference keeps its own form: at batch
# 512 this one was no faster there).
TRAIN_FIRST_LAYER_FORWARD = ("dot", 4)


class Regressor(nn.Module):
    """Maps an image pair to control-point displacements in pixels."""

    config: DIRNetConfig
    folded: bool = False  # BatchNorm folded into the layers before it: `fold_batchnorm`

    @nn.compact
    def __call__(self, fixed: jax.Array, moving: jax.Array, *, train: bool) -> jax.Array:
        """fixed, moving: [B, *spatial, C] → control grid [B, *grid, ndim]."""
        cfg = self.config
        x = stack_channels(fixed, moving)
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
                    epsilon=BN_EPSILON,
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
                conv = conv_taps_train if kernels else conv_taps
                return normalized(functools.partial(TapConv, cfg.features, conv=conv), "Conv", x)
            taken = kernels and train_conv.applies(x.shape, cfg.features)
            if taken and (kernel, strides) == (3, 1):
                conv = functools.partial(train_conv.conv3x3, form=TRAIN_CONV_FORM)
                tap_conv = functools.partial(TapConv, cfg.features, conv=conv)
                return normalized(tap_conv, "Conv", x)
            conv = functools.partial(
                conv_layer, cfg.features, (kernel,) * ndim, strides=strides, padding=padding
            )
            return normalized(conv, "Conv", x)

        def downsample(x):
            if cfg.downsampling == "strided":
                return layer(x, 2, strides=2, padding="VALID")
            return pool2(x, jnp.mean if cfg.downsampling == "avg" else jnp.max)

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
                kernel = ConvKernel(cfg.features, name=name("Conv"))(x)
                fused = functools.partial(
                    _first_layer_of, kernel=kernel, downsampling=cfg.downsampling,
                    conv=train_first_layer_conv, dtype=cfg.compute_dtype or jnp.float32,
                    passes=TRAIN_FIRST_LAYER_PASSES,
                )  # fmt: skip
                bn = BatchNorm(
                    use_running_average=False, momentum=cfg.bn_momentum, epsilon=BN_EPSILON,
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
                x = ConvELUPool(
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

    layers = numbered("Conv", params) + numbered("Dense", params)
    norms = numbered("BatchNorm", params)
    if len(layers) != len(norms):
        raise ValueError(
            f"{len(layers)} layers but {len(norms)} BatchNorms: not a DIRNet regressor"
        )
    folded = {k: v for k, v in params.items() if not k.startswith("BatchNorm_")}
    for layer, norm in zip(layers, norms, strict=True):
        bn, mean, var = params[norm], stats[norm]["mean"], stats[norm]["var"]
        s = bn["scale"] * jax.lax.rsqrt(var + BN_EPSILON)
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
    traces depends on `dispatch.split_over` and on this module's switches, which a
    cached trace would not see.

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
