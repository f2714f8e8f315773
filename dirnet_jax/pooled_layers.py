"""The regressor's later conv layers at inference, ``pool2(elu(conv3×3(x) + bias))`` on
many-channel activations, as one GPU kernel each (Pallas, Triton backend). A candidate:
on an H200 it took the 128² layer in 0.91 ms with one TF32 product (1.37 with three)
against cuDNN's 1.60, but with three products on every layer it bought nothing end to end
(the 64² and 32² layers were slower than cuDNN's; benchmarks/NOTES.md). So
`models.pooled_conv` still runs XLA's convolution, ELU and pooling, and benchmarks/core.py
swaps this in with one product (`baseline-tritonpool`, `-tritonpool2`: the 128² layer).

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

A candidate form (``form="rows"``; untimed): the four input rows under each pooling row
gathered as [W/2, 4·C] matrices, one per row, each of its rows the 4·C contiguous values of
input columns 2c − 1 … 2c + 2 (`first_layer.window_gather`), times that row's weights for
all four pooling positions at once (`row_weights`, [4·C, 4·Cout]): 4 products per pass
instead of the taps form's 36 of K = C, from four gathers instead of sixteen, then the
positions' ELU and pooling as a reduction over a [M, 4, Cout] view. A program takes
several pooled rows (`program_shape`: 128 pooled pixels), stacked as the products' M, so
the narrower layers fill Hopper's wgmma too.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dirnet_jax import first_layer
from dirnet_jax.first_layer import (
    fitting_rows,
    pool_wide,
    pool_window,
    power_of_two,
    program_pixels,
    wide_weights,
    window_gather,
)
from dirnet_jax.tf32 import tf32_dot, tf32_split

WARPS = 4
PASSES = 3  # tensor-core products per tap: float32 to ~3e-6 (1: TF32, as XLA's conv)
FORM = "taps"  # a key of FORMS
# The rows form's program: pooled pixels (rows × every column) and warps. At 128 pixels
# and 8 warps its sm_90a code is 912–976 instructions and 112–128 registers at every
# layer's width (one product; benchmarks/NOTES.md); at 64 (one 128² row, 4 warps) 1,288.
ROWS_PIXELS, ROWS_WARPS = 128, 8


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


def _kernel_rows(
    x_ref, wb_ref, ws_ref, b_ref, o_ref, *, rows, width, pool, passes, interpret, th=1
):  # fmt: skip
    """Pooled rows r0 … r0 + th − 1 of pair b, every column, as [th·W/2, Cout] (o_ref is
    [B, H/2·W/2, Cout]): per input row of the window, one product by `row_weights`."""
    tw = width // 2
    b, r0, r, c = program_pixels(rows, th, tw)  # pooled rows r, columns c: [th·W/2, 1]
    acc = None  # the conv at the four pooling positions, [th·W/2, 4·Cout]
    for u in range(4):  # input row 2r − 1 + u
        taken = window_gather(x_ref, b, 2 * r - 1 + u, c, 1, interpret)  # [th·W/2, 4·C]
        split = tf32_split(taken) if passes == 3 else None
        acc = tf32_dot(taken, split, wb_ref[u, :, :], ws_ref[u, :, :], interpret, acc)
    pooled = pool_wide(acc, b_ref[:], pool, first_layer.EXPM1S[first_layer.EXPM1])
    o_ref[b, pl.ds(r0 * tw, th * tw), :] = pooled.astype(o_ref.dtype)


def row_weights(kernel: jax.Array) -> jax.Array:
    """kernel [3, 3, Cin, F] as [4, 4·Cin, 4·F]: for input row u of the 4×4 window (its
    `window_gather` columns), the kernel placed at pooling position p = 2a + b in the
    window, in columns p·F … p·F + F − 1 (zeros where it does not reach): the rows of
    `first_layer.wide_weights` in blocks of 4·Cin."""
    cin, f = kernel.shape[2:]
    return wide_weights(kernel).reshape(4, 4 * cin, 4 * f)


FORMS = {"taps": _kernel, "rows": _kernel_rows}


def program_shape(form: str, h: int, w: int) -> tuple[int, int]:
    """(pooled rows, warps) per program of `form` for [H, W] inputs: the taps form one row
    and WARPS; the rows form the most rows up to ROWS_PIXELS pooled pixels that divide H/2
    (a power of two), and ROWS_WARPS."""
    if form != "rows":
        return 1, WARPS
    return fitting_rows(h // 2, w // 2, ROWS_PIXELS), ROWS_WARPS


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
    jax.jit,
    static_argnames=(
        "downsampling", "out_dtype", "passes", "interpret", "form", "rows_per_program",
        "num_warps",
    ),
)  # fmt: skip
def conv_elu_pool2_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    out_dtype=jnp.float32,
    passes: int = PASSES,
    interpret: bool = False,
    form: str = FORM,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> jax.Array:
    """``pool2(elu(conv(x, kernel, SAME) + bias))`` for 2-D activations (see `applies`).

    Args:
      x: [B, H, W, C] (float32 or bfloat16); kernel: [3, 3, C, Cout]; bias: [Cout].
      downsampling: "avg" or "max"; out_dtype: the output's dtype (sums in float32).
      passes: tensor-core products per tap: 3 (float32 to ~3e-6 of the largest value) or
        1 (one TF32 product).
      interpret: run Pallas' interpreter (any backend: the tests on a CPU).
      form: "taps" (a product per tap) or "rows" (per input row of the window).
      rows_per_program, num_warps: pooled rows and warps per Triton program, None for the
        form's own (`program_shape`); more than one row in the rows form only.

    Returns:
      [B, H/2, W/2, Cout].
    """
    if form not in FORMS:
        raise ValueError(f"form is one of {', '.join(FORMS)}, not {form!r}")
    if not applies(x.shape, kernel.shape[-1], downsampling):
        raise ValueError(f"conv_elu_pool2_dense does not take {x.shape} → {kernel.shape[-1]}")
    if passes not in (1, 3):
        raise ValueError(f"passes is 1 or 3, not {passes}")
    batch, h, w, _ = x.shape
    cout, rows = kernel.shape[-1], h // 2
    th, warps = program_shape(form, h, w)
    th, warps = rows_per_program or th, num_warps or warps
    if not (th == 1 or (form == "rows" and power_of_two(th) and rows % th == 0)):
        raise ValueError(f"{th} pooled rows per program: the rows form takes a power of two "
                         f"dividing {rows}")  # fmt: skip
    weights = kernel.astype(jnp.float32)
    out_shape = (batch, rows, w // 2, cout)
    if form == "rows":  # the output's pixels flat
        weights = row_weights(weights)
        out_shape = (batch, rows * w // 2, cout)
    big, small = tf32_split(weights)
    body = functools.partial(
        FORMS[form], rows=rows, width=w, pool=downsampling, passes=passes, interpret=interpret
    )
    if form == "rows":
        body = functools.partial(body, th=th)
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(batch * rows // th,),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(x, big, small, bias.astype(jnp.float32)).reshape(batch, rows, w // 2, cout)  # bf16 read as is
