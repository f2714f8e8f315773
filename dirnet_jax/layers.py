"""The regressor's layers in the forms that compute them fast, each the same function as
the plain layers it stands for (flax's conv, BatchNorm, ELU and pooling; tested), and the
flax modules that take those layers' parameters under their names.

Conventions as in :mod:`dirnet_jax.bspline`: arrays [B, *spatial, C], kernels
[3, …, 3, Cin, Cout]. `dirnet_jax.models.Regressor` chooses among them:

* Inference (BatchNorm folded): the first conv, its ELU and the pooling after it as one
  elementwise loop (`conv_elu_pool2`; on CUDA GPUs a Triton kernel,
  `dirnet_jax.first_layer`), and on CUDA GPUs the second layer (128² at 256²) as a Triton
  kernel too (`pooled_conv`, `dirnet_jax.pooled_layers`): `ConvELUPool`.
* Training, and inference where no fused layer takes it (A2): the first conv (two input
  channels) as sums of products of shifted slices (`conv_taps`, `TapConv`). Training in
  float32 on CUDA GPUs computes its first layer at once, conv, BatchNorm, ELU and pooling,
  without writing its full-resolution activations (`first_layer_train`,
  `dirnet_jax.first_layer_grad`).
* Pooling as a reduction over the window axes of a reshape (`pool2`), and the pair
  stacked on channels by a select (`stack_channels`).

The switches in capitals here are read when a program is traced; `benchmarks.core.swapped`
sets them, and swaps the functions, for the GPU's A/B rows.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dirnet_jax import first_layer, first_layer_grad, pooled_layers, train_conv
from dirnet_jax.batchnorm import batch_stats
from dirnet_jax.dispatch import cuda_or_xla
from dirnet_jax.elu import elu, elu_unguarded

# BatchNorm's ε in the regressor (flax's default), also in `first_layer_train`'s own
# normalisation.
BN_EPSILON = 1e-5


def pool2(x: jax.Array, reduce: Callable[..., jax.Array]) -> jax.Array:
    """2×…×2 pooling with stride 2 of [B, *spatial, C] (sizes even): `reduce` (jnp.mean,
    jnp.max) over the window axes of a reshape. Same values as nn.avg_pool / nn.max_pool,
    but its gradient is a broadcast where reduce_window's was a padded reduce_window
    (~100 µs of a 3.6 ms 28² training step on XLA:CPU); jnp.max's never NaN or lost
    (`_window_max`)."""
    spatial = x.shape[1:-1]
    split = [d for s in spatial for d in (s // 2, 2)]
    windows = tuple(range(2, 2 * len(spatial) + 1, 2))
    x = x.reshape(x.shape[0], *split, x.shape[-1])
    return _window_max(x, windows) if reduce is jnp.max else reduce(x, axis=windows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, axis)``, whose gradient (split evenly between ties, as jnp.max's)
    reaches every window where XLA rounded x's copies differently: see `_window_weights`."""
    return jnp.max(x, axis=axis)


@_window_max.defjvp
def _window_max_jvp(axis, primals, tangents):
    (x,), (t,) = primals, tangents
    top = jnp.max(x, axis=axis, keepdims=True)
    return jnp.squeeze(top, axis), jnp.sum(t * _window_weights(x, top, axis), axis=axis)


def _window_weights(x: jax.Array, top: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """Each value's share [x.shape] of its window's gradient (window: `axis`; top: the
    windows' maxima, kept dims): split evenly between the values equal to top, as
    jnp.max's rule; all to the window's first largest value where none equals top.

    XLA may compute x anew in each fusion that reads it and round the copies differently
    (mul and add fused into one FMA in one copy only; `optimization_barrier` does not stop
    it): then no value of a window equals the maximum computed from the other copy.
    jnp.max's rule divides 0 by 0 there (A1's gradients were NaN at LLVM -O0 on the CPU:
    28 % of the windows); a count taken as at least 1 gives such a window no gradient.
    Its first largest value instead is the maximum up to that rounding."""
    at = (x == top).astype(x.dtype)
    count = jnp.sum(at, axis=axis, keepdims=True)
    window = tuple(range(x.ndim - len(axis), x.ndim))  # the window's axes moved last
    moved = jnp.moveaxis(x, axis, window)
    flat = moved.reshape(*moved.shape[: -len(axis)], -1)
    first = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=x.dtype)
    first = jnp.moveaxis(first.reshape(moved.shape), window, axis)
    return jnp.where(count > 0, at / jnp.maximum(count, 1), first)


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
    if downsampling not in ("avg", "max"):
        raise ValueError(f"conv_elu_pool2 pools by avg or max, not {downsampling!r}")
    half = tuple(n // 2 for n in x.shape[1:-1])
    padded = _pad_same(x.astype(jnp.float32), kernel.shape[0])
    kernel = kernel.astype(jnp.float32)
    window = [  # the activation at each position of the pooling window
        elu_unguarded(_tap_sum(padded, kernel, half, offset, 2) + bias.astype(jnp.float32))
        for offset in itertools.product(range(2), repeat=len(half))
    ]
    if downsampling == "avg":
        return sum(window[1:], window[0]) / len(window)
    return functools.reduce(jnp.maximum, window)


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


# How `first_layer_train` computes its forward (`fused_first_layer`'s form and warps): the
# 4×4 windows' matrix times the window weights, three TF32 products (inference keeps its
# own form: at batch 512 this one was no faster there).
TRAIN_FIRST_LAYER_FORWARD = ("dot", 4)


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
    `models.train_first_layer_conv`).

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


def first_layer_of(x, scale, bias, *, kernel, downsampling, conv, dtype, passes):
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


class ConvKernel(nn.Module):
    """The 'kernel' of a 3×3 conv layer without bias (nn.Conv's initial value under
    nn.Conv's name), for a layer that applies it itself (`first_layer_train`)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, *spatial, Cin] → kernel [3, …, 3, Cin, features]."""
        shape = (3,) * (x.ndim - 2) + (x.shape[-1], self.features)
        return self.param("kernel", nn.initializers.lecun_normal(), shape)
