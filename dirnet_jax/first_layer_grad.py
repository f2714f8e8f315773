"""Training's first layer, ``pool2(elu(BatchNorm(conv3×3(x))))`` with the batch's
statistics, as GPU kernels (Pallas, Triton backend) that never write its full-resolution
values: the statistics' sums, and the backward pass's sums and kernel gradient. A
candidate: `models.first_layer_train` runs them on CUDA where they take the shape.

Why: in a 256² training step at batch 32 on an H200, the first layer's full-resolution
arrays ([32, 256, 256, 16], 134 MB each: the conv z, the gradients of y and z, and the
passes reading them) took ~0.5 of the step's ~1.46 ms of kernels
(benchmarks/measured/gpu-h200-profile-run5.txt), where its input is 17 MB and its pooled
output and gradient 34 MB each.

How: one program per pooled row of one image, as inference's kernel (`first_layer`; the
images zero-padded and read as row and column pairs): the conv at the four positions of
each pooling window is recomputed from the 4×4 input values feeding it, [W/2, F] each.
With BatchNorm's multiplier and shift (mul, shift = bias − mean·mul), y = z·mul + shift,
and the pooled gradient g, each pass computes per window

    g_y = pool'(elu(y), g) · elu'(y)            (avg: g/4; max: g/ties at the maximum)

and sums over the program's pixels, which XLA adds up over programs:

* `stats_gpu`: Σ z and Σ z² per channel (the batch statistics, one pass as flax's);
* `backward_sums_gpu`: Σ g_y and Σ z·g_y (BatchNorm's backward needs only these);
* `kernel_grad_gpu`: Σ x_shifted · g_z per tap and input channel, with
  g_z = mul·g_y + c0 + c1·z (c0, c1: the statistics' own gradient, per channel).

All in float32 arithmetic (the input has two channels: no matrix product). ELU's expm1 is
exp − 1, as inference's kernel computes it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dirnet_jax import first_layer

WARPS = 8  # as inference's kernel, whose [W/2, F] window sums these repeat
# The kernel gradient's shape: pooled rows per program, pooled columns per step (0: all)
# and warps. One row, every column, 8 warps: one trip, 18 sums across columns per program
# (sm_90a: 3,736 instructions, 217 registers); benchmarks/layers.py times others, which
# loop over blocks of columns and rows with 18 [block, F] sums in registers.
GRAD_ROWS, GRAD_BLOCK, GRAD_WARPS = 1, 0, 8


def applies(x_shape: tuple[int, ...], features: int, downsampling: str) -> bool:
    """Whether the kernels take a first layer of this shape (`first_layer.applies` with one
    pooled row per program). ``DIRNET_FIRST_LAYER=xla`` turns them off."""
    return first_layer.applies(x_shape, features, downsampling, 1)


def _values(x_ref, b, r, tw, cin, start=0):
    """The 4×4 input values feeding pooled row r of image b: (u, v, channel) → [tw],
    input row 2r − 1 + u, columns 2c − 1 + v for the pooled columns c = start … start +
    tw − 1."""
    return {
        (u, v, ch): x_ref[
            b, r + (1 + u) // 2, (1 + u) % 2, pl.ds(start + (1 + v) // 2, tw), (1 + v) % 2, ch
        ]
        for u in range(4)
        for v in range(4)
        for ch in range(cin)
    }


def _convs(values, w_ref, cin):
    """The conv at the four pooling-window positions (a, b) in order: 4 × [W/2, F]."""
    out = []
    for a in range(2):
        for bb in range(2):
            acc = None
            for dy in range(3):
                for dx in range(3):
                    for ch in range(cin):
                        term = values[a + dy, bb + dx, ch][:, None] * w_ref[dy, dx, ch, :][None, :]
                        acc = term if acc is None else acc + term
            out.append(acc)
    return out


def _grad_y(z, mul, shift, g, pool):
    """g_y at the four window positions from the conv z (4 × [W/2, F]) and the pooled
    gradient g [W/2, F]: the gradients of pooling and of ELU (1 where y > 0, exp(y)
    elsewhere), as autodiff of `models.pool2` and `elu` gives them."""
    y = [zk * mul + shift for zk in z]
    positive = [yk > 0 for yk in y]
    exp = [jnp.exp(jnp.where(p, 0.0, yk)) for p, yk in zip(positive, y, strict=True)]
    if pool == "avg":
        g_a = [g * 0.25] * 4
    else:  # the maximum's gradient, split between ties as jnp.max's
        a = [jnp.where(p, yk, e - 1) for p, yk, e in zip(positive, y, exp, strict=True)]
        top = jnp.maximum(jnp.maximum(a[0], a[1]), jnp.maximum(a[2], a[3]))
        at_top = [ak == top for ak in a]
        ties = sum((t.astype(jnp.float32) for t in at_top[1:]), at_top[0].astype(jnp.float32))
        g_a = [jnp.where(t, g / ties, 0.0) for t in at_top]
    return [ga * jnp.where(p, 1.0, e) for ga, p, e in zip(g_a, positive, exp, strict=True)]


def _stats_kernel(x_ref, w_ref, o_ref, *, rows, tw, cin):
    """Program p (pooled row r of image b): Σ z and Σ z² over its pixels, [2, F]."""
    pid = pl.program_id(0)
    z = _convs(_values(x_ref, pid // rows, pid % rows, tw, cin), w_ref, cin)
    o_ref[pid, 0, :] = jnp.sum(z[0] + z[1] + z[2] + z[3], axis=0)
    o_ref[pid, 1, :] = jnp.sum(z[0] * z[0] + z[1] * z[1] + z[2] * z[2] + z[3] * z[3], axis=0)


def _sums_kernel(x_ref, w_ref, m_ref, g_ref, o_ref, *, rows, tw, cin, pool):
    """Program p: Σ g_y and Σ z·g_y over its pixels, [2, F]."""
    pid = pl.program_id(0)
    b, r = pid // rows, pid % rows
    z = _convs(_values(x_ref, b, r, tw, cin), w_ref, cin)
    g = g_ref[b, r, :, :].astype(jnp.float32)
    g_y = _grad_y(z, m_ref[0, :][None, :], m_ref[1, :][None, :], g, pool)
    o_ref[pid, 0, :] = jnp.sum(g_y[0] + g_y[1] + g_y[2] + g_y[3], axis=0)
    zg = z[0] * g_y[0] + z[1] * g_y[1] + z[2] * g_y[2] + z[3] * g_y[3]
    o_ref[pid, 1, :] = jnp.sum(zg, axis=0)


def _kernel_grad_kernel(x_ref, w_ref, m_ref, g_ref, o_ref, *, rows, tw, cin, pool, per, block):
    """Program p: Σ over its pixels (`per` pooled rows of one image, `block` pooled columns
    at a time) of x_shifted · g_z per tap and input channel, [9, Cin, F] (m_ref: mul,
    shift, c0, c1, each [F])."""
    pid = pl.program_id(0)
    b, first = pid // (rows // per), (pid % (rows // per)) * per
    mul, shift = m_ref[0, :][None, :], m_ref[1, :][None, :]
    c0, c1 = m_ref[2, :][None, :], m_ref[3, :][None, :]
    steps_per_row = tw // block

    def step(i, acc):
        # lax's div and rem: jnp's // and % do not lower in a Triton loop
        r = first + jax.lax.div(i, steps_per_row)
        start = jax.lax.rem(i, steps_per_row) * block
        values = _values(x_ref, b, r, block, cin, start)
        z = _convs(values, w_ref, cin)
        g = g_ref[b, r, pl.ds(start, block), :].astype(jnp.float32)
        g_y = _grad_y(z, mul, shift, g, pool)
        g_z = [mul * gy + c0 + c1 * zk for gy, zk in zip(g_y, z, strict=True)]
        out = []
        for dy, dx, ch in _tap_channels(cin):
            total = acc[len(out)]
            for k, (a, bb) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                term = values[a + dy, bb + dx, ch][:, None] * g_z[k]
                total = term if total is None else total + term
            out.append(total)
        return tuple(out)

    trips = per * steps_per_row
    if trips == 1:  # straight-line code
        sums = step(0, (None,) * (9 * cin))
    else:
        zero = jnp.zeros((block, m_ref.shape[-1]), jnp.float32)
        sums = jax.lax.fori_loop(0, trips, step, (zero,) * (9 * cin))
    for t, (dy, dx, ch) in enumerate(_tap_channels(cin)):
        o_ref[pid, 3 * dy + dx, ch, :] = jnp.sum(sums[t], axis=0)


def _tap_channels(cin):
    """(dy, dx, channel) of every tap and input channel, in the kernel's order."""
    return [(dy, dx, ch) for dy in range(3) for dx in range(3) for ch in range(cin)]


def _call(
    body, x, kernel, out_rows: tuple[int, ...], *operands, interpret, rows_per_program=1,
    warps=WARPS, **params,
):  # fmt: skip
    """body over one program per `rows_per_program` pooled rows: the padded pairs of x, the
    kernel, `operands`; its [programs, *out_rows] float32 sums, summed over programs."""
    batch, h, w, cin = x.shape
    rows, tw = h // 2, w // 2
    body = functools.partial(body, rows=rows, tw=tw, cin=cin, **params)
    partial_sums = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch * rows // rows_per_program, *out_rows), jnp.float32),
        grid=(batch * rows // rows_per_program,),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(first_layer.padded_pairs(x.astype(jnp.float32)), kernel.astype(jnp.float32), *operands)
    return partial_sums.sum(axis=0)


def _check(x, kernel, downsampling):
    if not applies(x.shape, kernel.shape[-1], downsampling):
        raise ValueError(f"first_layer_grad does not take {x.shape} → {kernel.shape[-1]}")


@functools.partial(jax.jit, static_argnames=("interpret",))
def stats_gpu(x: jax.Array, kernel: jax.Array, interpret: bool = False) -> jax.Array:
    """Σ z and Σ z² over images and pixels of z = conv(x, kernel) (SAME, zero padding).

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, F]; interpret: Pallas' interpreter (tests).

    Returns:
      [2, F] float32.
    """
    _check(x, kernel, "avg")
    return _call(_stats_kernel, x, kernel, (2, kernel.shape[-1]), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("downsampling", "interpret"))
def backward_sums_gpu(
    x: jax.Array,
    kernel: jax.Array,
    mul_shift: jax.Array,
    g: jax.Array,
    downsampling: str,
    interpret: bool = False,
) -> jax.Array:
    """Σ g_y and Σ z·g_y over images and pixels (see the module's docstring).

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, F]; mul_shift: [2, F], BatchNorm's multiplier
        and shift; g: [B, H/2, W/2, F], the pooled output's gradient; downsampling: "avg"
        or "max"; interpret: Pallas' interpreter (tests).

    Returns:
      [2, F] float32.
    """
    _check(x, kernel, downsampling)
    f = kernel.shape[-1]
    return _call(_sums_kernel, x, kernel, (2, f), mul_shift.astype(jnp.float32), g,
                 interpret=interpret, pool=downsampling)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("downsampling", "interpret", "rows", "block", "warps"))
def kernel_grad_gpu(
    x: jax.Array,
    kernel: jax.Array,
    coefficients: jax.Array,
    g: jax.Array,
    downsampling: str,
    interpret: bool = False,
    rows: int = GRAD_ROWS,
    block: int = GRAD_BLOCK,
    warps: int = GRAD_WARPS,
) -> jax.Array:
    """The kernel's gradient, Σ over images and pixels of x_shifted · g_z per tap.

    Args:
      x, kernel, g, downsampling, interpret: as `backward_sums_gpu`.
      coefficients: [4, F]: mul, shift, and c0, c1 of g_z = mul·g_y + c0 + c1·z.
      rows, block, warps: pooled rows per program (their gcd with H/2), pooled columns
        per step (0: all; at most W/2, a power of two), warps per program.

    Returns:
      [3, 3, Cin, F] float32.
    """
    _check(x, kernel, downsampling)
    cin, f = kernel.shape[-2:]
    half_h, half_w = x.shape[1] // 2, x.shape[2] // 2
    per, block = math.gcd(half_h, rows), min(block or half_w, half_w)
    grad = _call(_kernel_grad_kernel, x, kernel, (9, cin, f), coefficients.astype(jnp.float32),
                 g, interpret=interpret, pool=downsampling, rows_per_program=per, per=per,
                 block=block, warps=warps)  # fmt: skip
    return grad.reshape(3, 3, cin, f)
