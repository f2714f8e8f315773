"""Float32 products on tensor cores, which read TF32 (sign, exponent and 10 of float32's 23
mantissa bits): one TF32 product (the precision of XLA's own convolutions on a GPU at
default precision, ~3e-4 of the largest value) or three, which carry float32's accuracy
(~3e-6). Shared by the Triton kernels (`first_layer`, `pooled_layers`, `train_conv`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

TF32_BITS = 0xFFFFE000  # the float32 bits a TF32 product reads: sign, exponent, 10 of 23


def tf32_split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x as big + small (exactly): big its TF32 part, small the rest (|small| < 2⁻¹⁰ |x|)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(TF32_BITS)
    big = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return big, x - big


def tf32_terms(x, x_split, w_big, w_small):
    """The (lhs, rhs) products whose sum is x·w for w = w_big + w_small (`tf32_split`): with
    x's split (big, small), the three that carry float32's accuracy through TF32 products;
    with None, x·w itself (one TF32 product on a GPU)."""
    if x_split is None:
        return ((x, w_big + w_small),)  # w exactly
    big, small = x_split
    return ((small, w_big), (big, w_small), (big, w_big))


CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # xᵀ · w: summed over their rows (pixels)


def tf32_dot(x, x_split, w_big, w_small, interpret, acc=None, transpose_x=False):
    """acc + x·w (xᵀ·w with `transpose_x`) for w = w_big + w_small: `tf32_terms`' products
    on tensor cores, each added in turn (Triton folds acc + dot into the product's
    accumulator); with acc None, their sum alone. x [M, K] ([K, M] transposed), x_split its
    `tf32_split` or None, w_big, w_small [K, N]."""
    for lhs, rhs in tf32_terms(x, x_split, w_big, w_small):
        options = dict(precision=dot_precision(interpret), preferred_element_type=jnp.float32)
        if transpose_x:
            term = jax.lax.dot_general(lhs, rhs, CONTRACT_ROWS, **options)
        else:
            term = jnp.dot(lhs, rhs, **options)
        acc = term if acc is None else acc + term
    return acc


def dot_precision(interpret: bool):
    """Each product on tensor cores as TF32; in Pallas' interpreter at full precision."""
    return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
