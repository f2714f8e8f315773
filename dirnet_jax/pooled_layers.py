"""The regressor's later conv layers at inference, ``pool2(elu(conv3×3(x) + bias))`` on
many-channel activations, as one GPU kernel each (Pallas, Triton backend). On an H200 it
took the 128² layer in 0.97 ms with one TF32 product (1.47 with three) against cuDNN's
1.74, and lifted batch 512 from 145,000 to 168,700 pairs/s; on every layer it takes, 160,300
(cuDNN is faster at 64² and 32², where one row of 32 or 16 pooled columns is a small
product; benchmarks/NOTES.md). So `layers.pooled_conv` takes it on CUDA for the 128² layer,
with one product.

Why: at 256², batch 512 on an H200, the second layer (16 → 16 channels at 128²) took 1.3
of 3.9 ms in cuDNN: its convolution 0.76 ms, a conversion of its 537 MB input into a
workspace 0.35 ms and the pooling after it 0.17 ms (benchmarks/NOTES.md). This kernel reads
the input once and writes only the pooled output: 0.67 GB, ~0.3 ms at the copy bandwidth
measured there.

How: one program per pooled row of one image. The 4×4 input positions feeding each pooling
window are gathered as [W/2, C] matrices (zero outside the image: masked loads, at the
edges only) and multiplied on tensor cores by the kernel's [C, Cout] taps, accumulated
per position in the window; then bias, ELU (its expm1 as the first layer's kernel
computes it, `first_layer.EXPM1`) and the mean or max.

Float32 to about 3e-6 of the largest value (on an H200) by three TF32 products
(``passes=3``): each value x = big + small, big its TF32 part (the low 13 mantissa bits
cleared, `tf32.tf32_split`), x·w ≈ small·w_big + big·w_small + big·w_big, the kernel's split
done once outside. This is Triton's own ``tf32x3`` without its per-product NaN guard and
with every product accumulated in place: 2,192 instead of 3,544 instructions per thread,
94 instead of 124 registers (sm_90a, `python -m benchmarks.sass`). ``passes=1`` is one
TF32 product, the precision of XLA's own convolution on a GPU at default precision.
Pallas' interpreter computes each product at full precision.

A second form, the window gathered by input rows ([W/2, 4·C] times [4·C, 4·Cout], four
products a pass instead of 36, several pooled rows a program), had a third of the
barriers in its sm_90a code but took the 128² layer in 1.42 ms against this one's 0.97 on
the H200 (run 6), and was removed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dirnet_jax import first_layer
from dirnet_jax.dispatch import kernels_off, plgpu
from dirnet_jax.first_layer import pool_window, power_of_two
from dirnet_jax.tf32 import tf32_dot, tf32_split

WARPS = 4  # run 7, batch 512, the 128² layer: 0.90 ms; at 2 warps 1.21, at 8 1.67
PASSES = 3  # tensor-core products per tap: float32 to ~3e-6 (1: TF32, as XLA's conv)


def applies(x_shape: tuple[int, ...], features: int, downsampling: str) -> bool:
    """Whether `conv_elu_pool2_dense` takes this layer: 2-D activations of even height whose
    half width, channels and features are powers of two of at least 16 (the sizes of
    Triton's matrix products), avg or max pooling. ``DIRNET_POOLED_LAYERS=xla`` in the
    environment turns it off."""
    if kernels_off("DIRNET_POOLED_LAYERS") or len(x_shape) != 4:
        return False
    h, w, c = x_shape[1:]
    return (
        downsampling in ("avg", "max")
        and h % 2 == 0
        and w % 2 == 0
        and all(power_of_two(n, least=16) for n in (w // 2, c, features))
    )


def _kernel(x_ref, wb_ref, ws_ref, b_ref, o_ref, *, rows, width, pool, passes, interpret):
    """Pooled row r of pair b, every column: [W/2, Cout]."""
    pid = pl.program_id(0)
    b, r = pid // rows, pid % rows
    col = 2 * jax.lax.broadcasted_iota(jnp.int32, (width // 2,), 0) - 1
    acc = {}  # (a, b) position in the pooling window → conv output [W/2, Cout]
    for u in range(4):  # input row 2r − 1 + u
        row = 2 * r - 1 + u
        for v in range(4):  # input column 2c − 1 + v
            taken = gathered(x_ref, b, row, col + v, 2 * rows, width, u in (0, 3), v in (0, 3),
                             interpret)  # fmt: skip
            split = tf32_split(taken) if passes == 3 else None  # (big, small)
            for a in range(2):
                for bb in range(2):
                    dy, dx = u - a, v - bb
                    if not (0 <= dy < 3 and 0 <= dx < 3):
                        continue
                    w = wb_ref[dy, dx, :, :], ws_ref[dy, dx, :, :]
                    acc[a, bb] = tf32_dot(taken, split, *w, interpret, acc.get((a, bb)))
    bias = b_ref[:][None, :]
    window = [acc[a, bb] + bias for a in range(2) for bb in range(2)]
    expm1 = first_layer.EXPM1S[first_layer.EXPM1]  # as the first layer's kernel
    o_ref[b, r, :, :] = pool_window(window, pool, expm1).astype(o_ref.dtype)


def gathered(x_ref, b, row, cols, height, width, edge_row, edge_col, interpret, channel=None):
    """Row `row`, columns `cols` [N] of image b of x_ref [B, H, W, C], zero outside the
    image, in float32: [N, C], or [N] of one `channel`. Masked loads only where the caller
    says the row or the columns may leave the image (`edge_row`, `edge_col`)."""
    channels = slice(None) if channel is None else channel
    if not (edge_row or edge_col):
        return x_ref[b, row, cols, channels].astype(jnp.float32)
    inside = (cols >= 0) & (cols < width) & (row >= 0) & (row < height)
    inside = inside if channel is not None else inside[:, None]
    ref = x_ref.at[b, jnp.clip(row, 0, height - 1), jnp.clip(cols, 0, width - 1), channels]
    if interpret:  # the interpreter takes no masked gather
        return jnp.where(inside, ref[...], 0).astype(jnp.float32)
    return plgpu.load(ref, mask=inside, other=0).astype(jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("downsampling", "out_dtype", "passes", "interpret", "num_warps")
)
def conv_elu_pool2_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    out_dtype=jnp.float32,
    passes: int = PASSES,
    interpret: bool = False,
    num_warps: int = WARPS,
) -> jax.Array:
    """``pool2(elu(conv(x, kernel, SAME) + bias))`` for 2-D activations (see `applies`).

    Args:
      x: [B, H, W, C] (float32 or bfloat16); kernel: [3, 3, C, Cout]; bias: [Cout].
      downsampling: "avg" or "max"; out_dtype: the output's dtype (sums in float32).
      passes: tensor-core products per tap: 3 (float32 to ~3e-6 of the largest value) or
        1 (one TF32 product).
      interpret: run Pallas' interpreter (any backend: the tests on a CPU).
      num_warps: per Triton program (one pooled row).

    Returns:
      [B, H/2, W/2, Cout].
    """
    if not applies(x.shape, kernel.shape[-1], downsampling):
        raise ValueError(f"conv_elu_pool2_dense does not take {x.shape} → {kernel.shape[-1]}")
    if passes not in (1, 3):
        raise ValueError(f"passes is 1 or 3, not {passes}")
    batch, h, w, _ = x.shape
    cout, rows = kernel.shape[-1], h // 2
    big, small = tf32_split(kernel.astype(jnp.float32))
    body = functools.partial(
        _kernel, rows=rows, width=w, pool=downsampling, passes=passes, interpret=interpret
    )
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch, rows, w // 2, cout), out_dtype),
        grid=(batch * rows,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(x, big, small, bias.astype(jnp.float32))  # bf16 read as is
