"""Training's first layer, ``pool2(elu(BatchNorm(conv3×3(x))))`` with the batch's
statistics, as GPU kernels (Pallas, Triton backend) that never write its full-resolution
values: the statistics' sums, and the backward pass's sums and kernel gradient.
`layers.first_layer_train` runs them on CUDA where they take the shape (float32 training's
default there since run 6: 0.64 ms for the layer against 0.82 layer by layer).

Why: in a 256² training step at batch 32 on an H200, the first layer's full-resolution
arrays ([32, 256, 256, 16], 134 MB each: the conv z, the gradients of y and z, and the
passes reading them) took ~0.5 of the step's ~1.46 ms of kernels
(benchmarks/measured/gpu-h200-profile-run5.txt), where its input is 17 MB and its pooled
output and gradient 34 MB each.

How: one program per pooled row of one image, as inference's kernel (`first_layer`; with
float32 sums the images zero-padded and read as row and column pairs): the conv at the
four positions of each pooling window is recomputed from the 4×4 input values feeding it,
[W/2, F] each.
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

from dirnet_jax import first_layer
from dirnet_jax.dispatch import plgpu
from dirnet_jax.tf32 import tf32_dot, tf32_split

WARPS = 8  # as inference's kernel, whose [W/2, F] window sums these repeat
# `passes`, how each kernel computes the conv and the kernel gradient: 0, float32
# multiply-adds over the 4×4 window's [W/2] vectors (as inference's default kernel); 1 or
# 3, TF32 matrix products on tensor cores of the window as one [W/2, 16·Cin] matrix
# (`first_layer.window_gather`), three carrying float32's accuracy (`tf32`). sm_90a issue
# floors at 256², batch 32 (benchmarks/NOTES.md): stats 41 → 17 µs with three products,
# backward sums 45 → 33, kernel gradient 117 → 48. `models.TRAIN_FIRST_LAYER_PASSES`
# chooses: 3 (on an H200 the layer took 0.64 ms against 0.85 with passes 0; run 6).
# The kernel gradient's shape by passes: pooled rows per program, pooled columns per step
# (0: all) and warps, the lowest sm_90a issue floor of those counted. Passes 0: one row,
# every column, 8 warps (one trip, 18 sums across columns per program: 3,744
# instructions, 211 registers); 3: 4 rows of 16 columns a step, one warp (50,414
# instructions over 32 trips, 241 registers); 1: one row, 4 warps (2,648, 217).
# benchmarks/layers.py times others.
GRAD_SHAPES = {0: (1, 0, 8), 1: (1, 0, 4), 3: (4, 16, 1)}


def applies(x_shape: tuple[int, ...], features: int, downsampling: str, passes: int = 0) -> bool:
    """Whether the kernels take a first layer of this shape: `first_layer.applies` with one
    pooled row per program, as its padded-pairs forms (passes 0) or its window-matrix form
    (TF32 products). ``DIRNET_FIRST_LAYER=xla`` turns them off."""
    form = "dot" if passes else "broadcast"
    return first_layer.applies(x_shape, features, downsampling, 1, form=form)


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


def _conv_window(x_ref, w_refs, b, r, tw, cin, passes, interpret, start=0):
    """The conv at the four pooling-window positions of pooled row r of image b, columns
    start … start + tw − 1, 4 × [tw, F]; and what the kernel gradient multiplies g_z by:
    the window's values (passes 0: `_values`, w_refs the kernel) or its matrix and that
    matrix's TF32 split (w_refs `first_layer.window_weights`, split)."""
    if passes == 0:
        values = _values(x_ref, b, r, tw, cin, start)
        return _convs(values, w_refs[0], cin), values
    c = jax.lax.broadcasted_iota(jnp.int32, (tw, 1), 0) + start
    window = first_layer.window_gather(x_ref, b, 2 * r - 1, c, 4, interpret)
    split = tf32_split(window) if passes == 3 else None
    wb_ref, ws_ref = w_refs  # `first_layer.window_weights` [4, 16·Cin, F], split
    convs = [tf32_dot(window, split, wb_ref[p], ws_ref[p], interpret) for p in range(4)]
    return convs, (window, split)


def _grad_y(z, mul, shift, g, pool):
    """g_y at the four window positions from the conv z (4 × [W/2, F]) and the pooled
    gradient g [W/2, F]: the gradients of pooling and of ELU (1 where y > 0, exp(y)
    elsewhere), as autodiff of `layers.pool2` and `elu` gives them."""
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


def _stats_kernel(x_ref, *refs, rows, tw, cin, passes, interpret):
    """Program p (pooled row r of image b): Σ z and Σ z² over its pixels, [2, F]."""
    *w_refs, o_ref = refs
    pid = pl.program_id(0)
    z, _ = _conv_window(x_ref, w_refs, pid // rows, pid % rows, tw, cin, passes, interpret)
    o_ref[pid, 0, :] = jnp.sum(z[0] + z[1] + z[2] + z[3], axis=0)
    o_ref[pid, 1, :] = jnp.sum(z[0] * z[0] + z[1] * z[1] + z[2] * z[2] + z[3] * z[3], axis=0)


def _sums_kernel(x_ref, *refs, rows, tw, cin, pool, passes, interpret):
    """Program p: Σ g_y and Σ z·g_y over its pixels, [2, F]."""
    *w_refs, m_ref, g_ref, o_ref = refs
    pid = pl.program_id(0)
    b, r = pid // rows, pid % rows
    z, _ = _conv_window(x_ref, w_refs, b, r, tw, cin, passes, interpret)
    g = g_ref[b, r, :, :].astype(jnp.float32)
    g_y = _grad_y(z, m_ref[0, :][None, :], m_ref[1, :][None, :], g, pool)
    o_ref[pid, 0, :] = jnp.sum(g_y[0] + g_y[1] + g_y[2] + g_y[3], axis=0)
    zg = z[0] * g_y[0] + z[1] * g_y[1] + z[2] * g_y[2] + z[3] * g_y[3]
    o_ref[pid, 1, :] = jnp.sum(zg, axis=0)


def _kernel_grad_kernel(
    x_ref, *refs, rows, tw, cin, pool, per, block, passes, interpret
):  # fmt: skip
    """Program p: Σ over its pixels (`per` pooled rows of one image, `block` pooled columns
    at a time) of x_shifted · g_z per tap and input channel, [9, Cin, F] (passes 0); or of
    windowᵀ · g_z per pooling position, [4, 16·Cin, F] (passes 1, 3). m_ref: mul, shift,
    c0, c1, each [F]."""
    *w_refs, m_ref, g_ref, o_ref = refs
    pid = pl.program_id(0)
    b, first = pid // (rows // per), (pid % (rows // per)) * per
    mul, shift = m_ref[0, :][None, :], m_ref[1, :][None, :]
    c0, c1 = m_ref[2, :][None, :], m_ref[3, :][None, :]
    steps_per_row = tw // block
    f = m_ref.shape[-1]
    if passes:
        add, write = functools.partial(_window_grads, interpret=interpret), _write_window_grads
        count, shape = 4, (16 * cin, f)
    else:
        add, write = functools.partial(_tap_grads, cin=cin), _write_tap_grads
        count, shape = 9 * cin, (block, f)

    def step(i, acc):
        # lax's div and rem: jnp's // and % do not lower in a Triton loop
        r = first + jax.lax.div(i, steps_per_row)
        start = jax.lax.rem(i, steps_per_row) * block
        z, inputs = _conv_window(x_ref, w_refs, b, r, block, cin, passes, interpret, start)
        g = g_ref[b, r, pl.ds(start, block), :].astype(jnp.float32)
        g_y = _grad_y(z, mul, shift, g, pool)
        g_z = [mul * gy + c0 + c1 * zk for gy, zk in zip(g_y, z, strict=True)]
        return add(acc, inputs, g_z)

    trips = per * steps_per_row
    if trips == 1:  # straight-line code
        sums = step(0, (None,) * count)
    else:
        sums = jax.lax.fori_loop(0, trips, step, (jnp.zeros(shape, jnp.float32),) * count)
    write(o_ref, pid, sums, cin)


def _tap_grads(acc, values, g_z, cin):
    """acc (9·Cin × [block, F] or Nones) plus x_shifted · g_z per tap and input channel,
    over the four pooling positions; summed over the block's pixels at the end."""
    out = []
    for t, (dy, dx, ch) in enumerate(_tap_channels(cin)):
        total = acc[t]
        for k, (a, bb) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            term = values[a + dy, bb + dx, ch][:, None] * g_z[k]
            total = term if total is None else total + term
        out.append(total)
    return tuple(out)


def _write_tap_grads(o_ref, pid, sums, cin):
    for t, (dy, dx, ch) in enumerate(_tap_channels(cin)):
        o_ref[pid, 3 * dy + dx, ch, :] = jnp.sum(sums[t], axis=0)


def _write_window_grads(o_ref, pid, sums, cin):
    for position, total in enumerate(sums):
        o_ref[pid, position, :, :] = total


def _window_grads(acc, inputs, g_z, interpret):
    """acc (4 × [16·Cin, F] or Nones) plus windowᵀ · g_z at each pooling position, by TF32
    products: three where the window's split is given (`_conv_window`), else one."""
    window, split = inputs
    out = []
    for p, g in enumerate(g_z):
        out.append(tf32_dot(window, split, *tf32_split(g), interpret, acc[p], transpose_x=True))
    return tuple(out)


def _tap_channels(cin):
    """(dy, dx, channel) of every tap and input channel, in the kernel's order."""
    return [(dy, dx, ch) for dy in range(3) for dx in range(3) for ch in range(cin)]


def _call(
    body, x, kernel, out_rows: tuple[int, ...], *operands, interpret, passes,
    rows_per_program=1, warps=WARPS, **params,
):  # fmt: skip
    """body over one program per `rows_per_program` pooled rows: the padded pairs of x and
    the kernel (passes 0) or x and its window weights split for TF32
    (`first_layer.window_weights`), `operands`; its [programs, *out_rows] float32 sums,
    summed over programs."""
    batch, h, w, cin = x.shape
    rows, tw = h // 2, w // 2
    body = functools.partial(
        body, rows=rows, tw=tw, cin=cin, passes=passes, interpret=interpret, **params
    )
    kernel = kernel.astype(jnp.float32)
    weights = (kernel,) if passes == 0 else tf32_split(first_layer.window_weights(kernel))
    images = x.astype(jnp.float32)  # the window matrix's gather masks the edges itself
    images = first_layer.padded_pairs(images) if passes == 0 else images
    partial_sums = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((batch * rows // rows_per_program, *out_rows), jnp.float32),
        grid=(batch * rows // rows_per_program,),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(images, *weights, *operands)
    return partial_sums.sum(axis=0)


def _check(x, kernel, downsampling, passes):
    if passes not in (0, 1, 3):
        raise ValueError(f"passes is 0, 1 or 3, not {passes}")
    if passes and not first_layer.power_of_two(x.shape[-1]):
        raise ValueError(f"TF32 products take a power of two of channels, not {x.shape[-1]}")
    if not applies(x.shape, kernel.shape[-1], downsampling):
        raise ValueError(f"first_layer_grad does not take {x.shape} → {kernel.shape[-1]}")


@functools.partial(jax.jit, static_argnames=("interpret", "passes"))
def stats_gpu(
    x: jax.Array, kernel: jax.Array, interpret: bool = False, passes: int = 0
) -> jax.Array:
    """Σ z and Σ z² over images and pixels of z = conv(x, kernel) (SAME, zero padding).

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, F]; interpret: Pallas' interpreter (tests);
      passes: 0, 1 or 3 (see the module's constants).

    Returns:
      [2, F] float32.
    """
    _check(x, kernel, "avg", passes)
    return _call(_stats_kernel, x, kernel, (2, kernel.shape[-1]), interpret=interpret,
                 passes=passes)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("downsampling", "interpret", "passes"))
def backward_sums_gpu(
    x: jax.Array,
    kernel: jax.Array,
    mul_shift: jax.Array,
    g: jax.Array,
    downsampling: str,
    interpret: bool = False,
    passes: int = 0,
) -> jax.Array:
    """Σ g_y and Σ z·g_y over images and pixels (see the module's docstring).

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, F]; mul_shift: [2, F], BatchNorm's multiplier
        and shift; g: [B, H/2, W/2, F], the pooled output's gradient; downsampling: "avg"
        or "max"; interpret: Pallas' interpreter (tests); passes: as `stats_gpu`.

    Returns:
      [2, F] float32.
    """
    _check(x, kernel, downsampling, passes)
    f = kernel.shape[-1]
    return _call(_sums_kernel, x, kernel, (2, f), mul_shift.astype(jnp.float32), g,
                 interpret=interpret, passes=passes, pool=downsampling)  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("downsampling", "interpret", "rows", "block", "warps", "passes")
)
def kernel_grad_gpu(
    x: jax.Array,
    kernel: jax.Array,
    coefficients: jax.Array,
    g: jax.Array,
    downsampling: str,
    interpret: bool = False,
    rows: int | None = None,
    block: int | None = None,
    warps: int | None = None,
    passes: int = 0,
) -> jax.Array:
    """The kernel's gradient, Σ over images and pixels of x_shifted · g_z per tap.

    Args:
      x, kernel, g, downsampling, interpret, passes: as `backward_sums_gpu`.
      coefficients: [4, F]: mul, shift, and c0, c1 of g_z = mul·g_y + c0 + c1·z.
      rows, block, warps: pooled rows per program (their gcd with H/2), pooled columns
        per step (0: all; at most W/2, a power of two, at least 16 with TF32 products),
        warps per program; None: `GRAD_SHAPES[passes]`'s.

    Returns:
      [3, 3, Cin, F] float32.
    """
    _check(x, kernel, downsampling, passes)
    given, default = (rows, block, warps), GRAD_SHAPES[passes]
    rows, block, warps = (d if v is None else v for v, d in zip(given, default, strict=True))
    cin, f = kernel.shape[-2:]
    half_h, half_w = x.shape[1] // 2, x.shape[2] // 2
    per, block = math.gcd(half_h, rows), min(block or half_w, half_w)
    if passes and block < 16:
        raise ValueError(f"TF32 products take at least 16 pooled columns a step, not {block}")
    out_rows = (9, cin, f) if passes == 0 else (4, 16 * cin, f)
    grad = _call(_kernel_grad_kernel, x, kernel, out_rows, coefficients.astype(jnp.float32),
                 g, interpret=interpret, passes=passes, pool=downsampling,
                 rows_per_program=per, per=per, block=block, warps=warps)  # fmt: skip
    if passes == 0:
        return grad.reshape(3, 3, cin, f)
    # The window's gradient back to the kernel's: window_weights is linear.
    return jax.linear_transpose(first_layer.window_weights, kernel.astype(jnp.float32))(grad)[0]
