"""The regressor's later conv layers at inference, ``pool2(elu(conv3×3(x) + bias))`` on
many-channel activations, as one GPU kernel each (Pallas, Triton backend). A candidate:
not yet timed on a GPU, so `models.pooled_conv` still runs XLA's convolution, ELU and
pooling, and benchmarks/core.py swaps this in (`baseline-tritonpool`).

Why: at 256², batch 512 on an H200, the second layer (16 → 16 channels at 128²) took 1.3
of 3.9 ms in cuDNN: its convolution 0.76 ms, a conversion of its 537 MB input into a
workspace 0.35 ms and the pooling after it 0.17 ms (benchmarks/NOTES.md). This kernel reads
the input once and writes only the pooled output: 0.67 GB, ~0.3 ms at the copy bandwidth
measured there.

How: one program per pooled row of one image. The 4×4 input positions feeding each pooling
window are gathered as [W/2, C] matrices (zero outside the image) and multiplied on tensor
cores by the kernel's [C, Cout] taps, in float32 to about 1e-6 (three TF32 products,
``TF32_TF32_F32_X3``; Pallas' interpreter at full precision), accumulated per position in
the window; then bias, ELU (as exp − 1, `first_layer.exp_minus_one`) and the mean or max.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dirnet_jax.first_layer import exp_minus_one, pool_window, power_of_two

WARPS = 4


def applies(x_shape: tuple[int, ...], features: int, downsampling: str) -> bool:
    """Whether `conv_elu_pool2_dense` takes this layer: 2-D activations of even height whose
    half width, channels and features are powers of two of at least 16 (the sizes of
    Triton's matrix products), avg or max pooling. ``DIRNET_POOLED_LAYERS=xla`` in the
    environment turns it off."""
    if os.environ.get("DIRNET_POOLED_LAYERS", "") == "xla" or len(x_shape) != 4:
        return False
    h, w, c = x_shape[1:]
    return (
        downsampling in ("avg", "max")
        and h % 2 == 0
        and w % 2 == 0
        and all(power_of_two(n, least=16) for n in (w // 2, c, features))
    )


def _kernel(x_ref, w_ref, b_ref, o_ref, *, rows, width, pool, precision):
    """Pooled row r of pair b, every column: [W/2, Cout]."""
    pid = pl.program_id(0)
    b, r = pid // rows, pid % rows
    col = 2 * jax.lax.broadcasted_iota(jnp.int32, (width // 2,), 0) - 1
    acc = {}  # (a, b) position in the pooling window → conv output [W/2, Cout]
    for u in range(4):  # input row 2r − 1 + u
        row = 2 * r - 1 + u
        row_inside = (row >= 0) & (row < 2 * rows)
        for v in range(4):  # input column 2c − 1 + v
            inside = ((col + v >= 0) & (col + v < width))[:, None] & row_inside
            taken = x_ref[b, jnp.clip(row, 0, 2 * rows - 1), jnp.clip(col + v, 0, width - 1), :]
            taken = jnp.where(inside, taken.astype(jnp.float32), 0.0)  # [W/2, C]
            for a in range(2):
                for bb in range(2):
                    dy, dx = u - a, v - bb
                    if 0 <= dy < 3 and 0 <= dx < 3:
                        term = jnp.dot(
                            taken,
                            w_ref[dy, dx, :, :],
                            precision=precision,
                            preferred_element_type=jnp.float32,
                        )
                        acc[a, bb] = term if (a, bb) not in acc else acc[a, bb] + term
    bias = b_ref[:][None, :]
    window = [acc[a, bb] + bias for a in range(2) for bb in range(2)]
    o_ref[b, r, :, :] = pool_window(window, pool, exp_minus_one).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("downsampling", "out_dtype", "interpret"))
def conv_elu_pool2_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    out_dtype=jnp.float32,
    interpret: bool = False,
) -> jax.Array:
    """``pool2(elu(conv(x, kernel, SAME) + bias))`` for 2-D activations (see `applies`).

    Args:
      x: [B, H, W, C]; kernel: [3, 3, C, Cout]; bias: [Cout].
      downsampling: "avg" or "max"; out_dtype: the output's dtype (sums in float32).
      interpret: run Pallas' interpreter (any backend: the tests on a CPU).

    Returns:
      [B, H/2, W/2, Cout].
    """
    if not applies(x.shape, kernel.shape[-1], downsampling):
        raise ValueError(f"conv_elu_pool2_dense does not take {x.shape} → {kernel.shape[-1]}")
    batch, h, w, _ = x.shape
    cout = kernel.shape[-1]
    precision = (
        jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    )
    body = functools.partial(_kernel, rows=h // 2, width=w, pool=downsampling, precision=precision)
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch, h // 2, w // 2, cout), out_dtype),
        grid=(batch * h // 2,),
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
    )(x, kernel.astype(jnp.float32), bias.astype(jnp.float32))
