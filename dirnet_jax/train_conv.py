"""Training's 3×3 convolutions (SAME zero padding, stride 1) and their gradients as GPU
kernels (Pallas, Triton backend): the default for float32 training on CUDA GPUs where they
take the shape (`models.Regressor`), XLA's convolution elsewhere.

Why: a 256² training step at batch 32 on an H200 spent ~0.74 of its ~1.5 ms of kernels in
cuDNN's work for these layers: the kernel gradient 0.39 ms (sm80 `wgrad`, all 16-channel
layers together), a conversion of their inputs into a workspace 0.20 and the input
gradient 0.14 (benchmarks/NOTES.md). What they must move is small: at 128² the layer's
input and output gradient are 34 MB each, and the kernel gradient is 2,304 numbers. On
the H200 the 128² layer's conv and both gradients took 0.34 against cuDNN's 0.60 ms, the
first conv's kernel gradient 0.41 against XLA's 0.74 ms, and a whole step 1.26× the
steps/s (benchmarks/NOTES.md).

How: the convolution is 9 matrix products per output row, one per tap, of the input row
shifted by the tap ([W, Cin], gathered with zeros outside the image) by the tap's [Cin,
Cout] weights. The input gradient is the same convolution of the output gradient by the
flipped, transposed kernel. The kernel gradient is, per tap, Σ over pixels of x_shiftedᵀ ·
g: each program sums ``ROWS`` rows of one image into 9 [Cin, Cout] matrices, and XLA adds
the programs' sums. Products on tensor cores, one TF32 product each (``passes=1``, the
precision of cuDNN's at XLA's default precision: ~3e-4 of the largest value on the H200) or
three (``passes=3``, ~3e-6; see `pooled_layers`). Pallas' interpreter computes each product
at full precision.

A second form of all three (``form="pairs"``, training's default: `models.TRAIN_CONV_FORM`;
on the H200 0.36 against the taps form's 0.39 ms for the 128² layer, run 6) takes two
output columns at once:
per kernel row, the input columns 2c − 1 … 2c + 2 under output columns 2c and 2c + 1
gathered as a [W/2, 4·Cin] matrix (`first_layer.window_gather`), times the row's taps placed
for both columns ([4·Cin, 2·Cout], `pair_weights`): 3 products an output row instead of 9,
and their output is the row's memory as it lies. Its kernel gradient multiplies that window,
transposed, by the output gradient of both columns: per kernel row one [4·Cin, 2·Cout]
product a step instead of three [Cin, Cout].

The first conv (two input channels, fixed and moving, at full resolution; `layers.conv_taps`)
gets its kernel gradient from `taps_kernel_grad_gpu` (`with_taps_grad`): the same sums as
float32 products and additions, as two channels make no matrix product (~3e-6 of the
largest value at 256², batch 32, where XLA's TF32 gradient is off by 3e-4). It reads the
layer's output gradient (134 MB at 256², batch 32) and the images once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dirnet_jax.dispatch import cuda_or_xla, kernels_off, plgpu
from dirnet_jax.first_layer import fitting_rows, power_of_two, program_pixels, window_gather
from dirnet_jax.pooled_layers import gathered
from dirnet_jax.tf32 import tf32_dot, tf32_split

WARPS = 4  # the convolution's: 528 instructions, 62 registers (1 warp: 1,600 and 176)
# The kernel gradient: image rows per program (fewer where the height is not a multiple),
# columns per product, warps per program. By the sm_90a counts (benchmarks/sass.py): one
# warp (a [16, 16] product is one warp's; more warps repeat it) and 32 columns (194
# registers; a whole 128-column row needs 255), and 4 rows so that a 128² layer at batch
# 32 has 1,024 programs.
ROWS, BLOCK, GRAD_WARPS = 4, 32, 1
# The same for inputs of few channels (`taps_kernel_grad_gpu`): elementwise [32, Cout]
# sums, 4 warps: 163 instructions a trip, 115 registers (1 warp: 700 and 255).
TAPS_ROWS, TAPS_BLOCK, TAPS_WARPS = 4, 32, 4
PASSES = 1  # tensor-core products per tap: TF32, as cuDNN's at default precision (3: float32)
# The convolution's form: "taps" (a product per tap, one output row a program) or "pairs"
# (a product per kernel row for two output columns at once; untimed), and the pairs form's
# program: pairs of output columns (rows × every pair) and warps. At 64 and 4 warps its
# sm_90a code is ~500 instructions with 7 barriers at 128², 64² and 32² (the taps form:
# 464–528 with 19–37); at 128 and 8 warps about as much, but a 32² layer at batch 32 has
# 128 programs, fewer than an H200's SMs (benchmarks/NOTES.md).
CONV_FORM = "taps"
PAIRS_PIXELS, PAIRS_WARPS = 64, 4
# The pairs form's kernel gradient: image rows per program, column pairs per product,
# warps (a [4·Cin, 2·Cout] product per kernel row; benchmarks/NOTES.md).
PAIRS_ROWS, PAIRS_BLOCK, PAIRS_GRAD_WARPS = 4, 32, 4
TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]


def applies(x_shape: tuple[int, ...], features: int) -> bool:
    """Whether the kernels take a convolution of [B, H, W, C] into `features` channels: 2-D,
    width, channels and features powers of two of at least 16 (the sizes of Triton's
    matrix products). ``DIRNET_TRAIN_CONV=xla`` in the environment turns them off."""
    if not _enabled_for(x_shape):
        return False
    return all(power_of_two(n, least=16) for n in (x_shape[2], x_shape[3], features))


def enabled() -> bool:
    """Training's kernels not turned off by ``DIRNET_TRAIN_CONV=xla`` in the environment
    (`models` also keeps training's first layer apart then)."""
    return not kernels_off("DIRNET_TRAIN_CONV")


def _enabled_for(x_shape: tuple[int, ...]) -> bool:
    """2-D activations, and the kernels not turned off (`enabled`)."""
    return enabled() and len(x_shape) == 4


def applies_few(x_shape: tuple[int, ...], features: int) -> bool:
    """Whether `taps_kernel_grad_gpu` takes a convolution of [B, H, W, C] into `features`
    channels: 2-D, width and features powers of two (Triton's block shapes), C at most 4
    (an unrolled loop over channels). ``DIRNET_TRAIN_CONV=xla`` turns it off."""
    if not _enabled_for(x_shape):
        return False
    return power_of_two(x_shape[2], least=16) and power_of_two(features) and x_shape[3] <= 4


def xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's SAME, stride-1 convolution of [B, *spatial, Cin] with [k, …, k, Cin, Cout]."""
    axes = "DHW"[3 - (x.ndim - 2) :]
    numbers = (f"N{axes}C", f"{axes}IO", f"N{axes}C")
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * (x.ndim - 2), "SAME", dimension_numbers=numbers
    )


def _conv_kernel(x_ref, wb_ref, ws_ref, o_ref, *, height, width, passes, interpret):
    """Output row r of image b: [W, Cout]."""
    pid = pl.program_id(0)
    b, r = pid // height, pid % height
    cols = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    acc = None
    for dy, dx in TAPS:
        taken = gathered(x_ref, b, r + dy - 1, cols + dx - 1, height, width, dy != 1, dx != 1,
                         interpret)  # fmt: skip
        split = tf32_split(taken) if passes == 3 else None
        acc = tf32_dot(taken, split, wb_ref[dy, dx, :, :], ws_ref[dy, dx, :, :], interpret, acc)
    o_ref[b, r, :, :] = acc.astype(o_ref.dtype)


def _conv_kernel_pairs(x_ref, wb_ref, ws_ref, o_ref, *, height, width, passes, interpret, th):
    """Output rows r0 … r0 + th − 1 of image b as [th·W/2, 2·Cout] (o_ref is
    [B, H·W/2, 2·Cout]): per kernel row, the input columns 2c − 1 … 2c + 2 under each pair
    of output columns 2c, 2c + 1, [th·W/2, 4·Cin], times `pair_weights`."""
    tw = width // 2
    b, r0, r, c = program_pixels(height, th, tw)  # output rows r, columns 2c, 2c + 1
    acc = None
    for dy in range(3):  # input row r + dy − 1
        taken = window_gather(x_ref, b, r + dy - 1, c, 1, interpret)  # [th·W/2, 4·Cin]
        split = tf32_split(taken) if passes == 3 else None
        acc = tf32_dot(taken, split, wb_ref[dy, :, :], ws_ref[dy, :, :], interpret, acc)
    o_ref[b, pl.ds(r0 * tw, th * tw), :] = acc.astype(o_ref.dtype)


def pair_weights(kernel: jax.Array) -> jax.Array:
    """kernel [3, 3, Cin, F] as [3, 4·Cin, 2·F]: for kernel row dy, the input columns
    2c − 1 … 2c + 2 (`window_gather`'s) to output columns 2c (first F) and 2c + 1 (last F):
    the row's taps placed at column offset 0 and 1, zeros where they do not reach."""
    cin, f = kernel.shape[2:]
    placed = [jnp.pad(kernel, [(0, 0), (j, 1 - j), (0, 0), (0, 0)]) for j in range(2)]
    return jnp.stack(placed, axis=3).reshape(3, 4 * cin, 2 * f)


def pairs_shape(h: int, w: int) -> int | None:
    """Output rows per program of the pairs form for [H, W] inputs: the most up to
    PAIRS_PIXELS pairs of columns that divide H (a power of two); None where the form does
    not take the width (fewer than 32 columns: a product of fewer than 16 rows)."""
    return fitting_rows(h, w // 2, PAIRS_PIXELS) if w >= 32 else None


def _check(x_shape, features, passes):
    if not applies(x_shape, features):
        raise ValueError(f"train_conv's kernels do not take {x_shape} → {features} channels")
    if passes not in (1, 3):
        raise ValueError(f"passes is 1 or 3, not {passes}")


@functools.partial(jax.jit, static_argnames=("passes", "interpret", "form"))
def conv_gpu(
    x: jax.Array,
    kernel: jax.Array,
    passes: int = PASSES,
    interpret: bool = False,
    form: str = CONV_FORM,
) -> jax.Array:
    """``conv(x, kernel)``, SAME zero padding, stride 1, as one Triton kernel.

    Args:
      x: [B, H, W, Cin] (float32 or bfloat16); kernel: [3, 3, Cin, Cout].
      passes: 1 (one TF32 product per tap) or 3 (float32 to ~3e-6 of the largest value).
      interpret: run Pallas' interpreter (any backend: the tests on a CPU).
      form: "taps" or "pairs" (see CONV_FORM; where it does not take the width, `taps`).

    Returns:
      [B, H, W, Cout] in the dtype of x and kernel (sums in float32).
    """
    _check(x.shape, kernel.shape[-1], passes)
    if form not in ("taps", "pairs"):
        raise ValueError(f"form is taps or pairs, not {form!r}")
    batch, h, w, _ = x.shape
    cout, dtype = kernel.shape[-1], jnp.result_type(x, kernel)
    th = pairs_shape(h, w) if form == "pairs" else None
    weights = kernel.astype(jnp.float32)
    options = dict(height=h, width=w, passes=passes, interpret=interpret)
    if th is None:
        body, out_shape, grid, warps = _conv_kernel, (batch, h, w, cout), batch * h, WARPS
    else:  # pixel pairs flat, [B, H·W/2, 2·Cout]: the same memory as [B, H, W, Cout]
        body, out_shape = _conv_kernel_pairs, (batch, h * w // 2, 2 * cout)
        grid, warps, options["th"] = batch * h // th, PAIRS_WARPS, th
        weights = pair_weights(weights)
    return pl.pallas_call(
        functools.partial(body, **options),
        out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
        grid=(grid,),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(x, *tf32_split(weights)).reshape(batch, h, w, cout)


def _kernel_grad_kernel(x_ref, g_ref, o_ref, *, height, width, rows, block, passes, interpret):
    """Program p: Σ over rows p·rows … p·rows + rows − 1 of image b of x_shiftedᵀ · g, per
    tap, `block` columns at a time: [9, Cin, Cout]."""
    b, block_at = _block_of(height, width, rows, block)

    def windows(r, cols):  # [block, Cin] per tap
        for dy, dx in TAPS:
            yield gathered(x_ref, b, r + dy - 1, cols + dx - 1, height, width, dy != 1,
                           dx != 1, interpret)  # fmt: skip

    sums = (len(TAPS), x_ref.shape[-1], g_ref.shape[-1])
    steps = rows * (width // block)
    _kernel_grad_loop(g_ref, o_ref, b, block_at, steps, block, windows, sums, passes, interpret)


def _kernel_grad_kernel_pairs(
    x_ref, g_ref, o_ref, *, height, width, rows, block, passes, interpret
):  # fmt: skip
    """Program p: Σ over rows p·rows … p·rows + rows − 1 of image b, `block` pairs of
    columns at a time, of x_windowᵀ · g_pair per kernel row: [3, 4·Cin, 2·Cout] (g_ref is
    [B, H, W/2, 2·Cout]: output columns 2c and 2c + 1 side by side)."""
    b, block_at = _block_of(height, width // 2, rows, block)

    def windows(r, c):  # [block, 4·Cin] per kernel row: input columns 2c − 1 … 2c + 2
        for dy in range(3):
            yield window_gather(x_ref, b, r + dy - 1, c[:, None], 1, interpret)

    sums = (3, 4 * x_ref.shape[-1], g_ref.shape[-1])
    steps = rows * (width // 2 // block)
    _kernel_grad_loop(g_ref, o_ref, b, block_at, steps, block, windows, sums, passes, interpret)


def _kernel_grad_loop(g_ref, o_ref, b, block_at, steps, block, windows, sums, passes, interpret):
    """The kernel-gradient loop: over `steps` (block_at: step → row, first column,
    columns), Σ windowᵀ · g for each window that `windows(row, columns)` yields ([block, K]
    each) and g the step's [block, N] rows of g_ref; written to o_ref[program] as `sums`
    ([windows, K, N])."""

    def step(i, acc):
        r, start, cols = block_at(i)
        g = g_ref[b, r, pl.ds(start, block), :].astype(jnp.float32)
        g_big, g_small = tf32_split(g)
        out = []
        for total, taken in zip(acc, windows(r, cols), strict=True):
            split = tf32_split(taken) if passes == 3 else None
            total = tf32_dot(taken, split, g_big, g_small, interpret, total, transpose_x=True)
            out.append(total)
        return tuple(out)

    zero = tuple(jnp.zeros(sums[1:], jnp.float32) for _ in range(sums[0]))
    for k, total in enumerate(jax.lax.fori_loop(0, steps, step, zero)):
        o_ref[pl.program_id(0), k, :, :] = total


@functools.partial(
    jax.jit, static_argnames=("passes", "interpret", "rows", "block", "warps", "form")
)
def kernel_grad_gpu(
    x: jax.Array,
    g: jax.Array,
    passes: int = PASSES,
    interpret: bool = False,
    rows: int | None = None,
    block: int | None = None,
    warps: int | None = None,
    form: str = CONV_FORM,
) -> jax.Array:
    """The gradient of Σ g · conv(x, kernel) with respect to the kernel, by Triton.

    Args:
      x: [B, H, W, Cin], the convolution's input; g: [B, H, W, Cout], the gradient of its
        output (float32 or bfloat16).
      passes, interpret, form: as `conv_gpu`.
      rows, block, warps: image rows per program (their greatest common divisor with H),
        columns (the pairs form: pairs of columns) per product, warps per program; None:
        the form's own (benchmarks/layers.py times other choices).

    Returns:
      [3, 3, Cin, Cout] float32: Σ over images and pixels p of x[p + tap − 1]ᵀ · g[p].
    """
    _check(x.shape, g.shape[-1], passes)
    batch, h, w, cin = x.shape
    f = g.shape[-1]
    if form != "pairs" or pairs_shape(h, w) is None:
        shape = (rows or ROWS, block or BLOCK, warps or GRAD_WARPS)
        body = functools.partial(_kernel_grad_kernel, passes=passes)
        return _summed(body, x, g, *shape, interpret, (9, cin, f)).reshape(3, 3, cin, f)
    shape = (rows or PAIRS_ROWS, block or PAIRS_BLOCK, warps or PAIRS_GRAD_WARPS)
    body = functools.partial(_kernel_grad_kernel_pairs, passes=passes)
    pairs = g.reshape(batch, h, w // 2, 2 * f)
    sums = _summed(body, x, pairs, *shape, interpret, (3, 4 * cin, 2 * f), w // 2)
    sums = sums.reshape(3, 4, cin, 2, f)  # [dy, input column 2c − 1 + v, Cin, 2c + j, F]
    return jnp.stack([sums[:, dx, :, 0] + sums[:, dx + 1, :, 1] for dx in range(3)], axis=1)


def _summed(body, x, g, rows, block, warps, interpret, sums_shape, columns=None):
    """Σ over programs of body's sums [*sums_shape], each program `rows` rows of one image
    (their gcd with H) `block` of `columns` (default W) at a time, float32."""
    batch, h, w, _ = x.shape
    rows = math.gcd(h, rows)
    programs = batch * h // rows
    body = functools.partial(body, height=h, width=w, rows=rows,
                             block=min(columns or w, block), interpret=interpret)  # fmt: skip
    partial_sums = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((programs, *sums_shape), jnp.float32),
        grid=(programs,),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(x, g)
    return partial_sums.sum(axis=0)


def _block_of(height, width, rows, block):
    """In a kernel-gradient program: its image b and a function of the loop's step i → (row,
    first column, the block's columns [block])."""
    pid = pl.program_id(0)
    blocks, per_row = height // rows, width // block
    b, first = pid // blocks, (pid % blocks) * rows

    def at(i):
        # lax's div and rem: i ≥ 0, and jnp's // and % do not lower in a Triton loop
        r, start = first + jax.lax.div(i, per_row), jax.lax.rem(i, per_row) * block
        return r, start, start + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)

    return b, at


def _taps_grad_kernel(x_ref, g_ref, o_ref, *, height, width, rows, block, interpret):
    """Program p: Σ over rows p·rows … p·rows + rows − 1 of image b of x_shifted[..., c] · g
    per tap and input channel c, `block` columns at a time: [9, Cin, Cout]. Products and
    sums elementwise (few input channels make no matrix product), summed over the columns
    once at the end."""
    b, block_at = _block_of(height, width, rows, block)
    cin, cout = x_ref.shape[-1], g_ref.shape[-1]

    def step(i, acc):
        r, start, cols = block_at(i)
        g = g_ref[b, r, pl.ds(start, block), :].astype(jnp.float32)  # [block, Cout]
        sums = []
        for dy, dx in TAPS:
            for c in range(cin):
                taken = gathered(x_ref, b, r + dy - 1, cols + dx - 1, height, width, dy != 1,
                                 dx != 1, interpret, channel=c)  # fmt: skip
                sums.append(acc[len(sums)] + taken[:, None] * g)
        return tuple(sums)

    zero = tuple(jnp.zeros((block, cout), jnp.float32) for _ in range(len(TAPS) * cin))
    sums = jax.lax.fori_loop(0, rows * (width // block), step, zero)
    for t in range(len(TAPS)):
        for c in range(cin):
            o_ref[pl.program_id(0), t, c, :] = jnp.sum(sums[t * cin + c], axis=0)


@functools.partial(jax.jit, static_argnames=("interpret", "rows", "block", "warps"))
def taps_kernel_grad_gpu(
    x: jax.Array,
    g: jax.Array,
    interpret: bool = False,
    rows: int = TAPS_ROWS,
    block: int = TAPS_BLOCK,
    warps: int = TAPS_WARPS,
) -> jax.Array:
    """`kernel_grad_gpu` for inputs of few channels (the first layer's: fixed and moving),
    in float32 arithmetic (no tensor cores).

    Args:
      x: [B, H, W, Cin] (any Cin); g: [B, H, W, Cout] (see `applies_few`).
      interpret, rows, block, warps: as `kernel_grad_gpu`.

    Returns:
      [3, 3, Cin, Cout] float32.
    """
    if not applies_few(x.shape, g.shape[-1]):
        raise ValueError(f"taps_kernel_grad_gpu does not take {x.shape} → {g.shape[-1]}")
    cin, f = x.shape[-1], g.shape[-1]
    sums = _summed(_taps_grad_kernel, x, g, rows, block, warps, interpret, (9, cin, f))
    return sums.reshape(3, 3, cin, f)


def with_taps_grad(forward, interpret: bool = False, grad_shape: tuple[int, ...] = ()):
    """`forward(x, kernel)` (a SAME, stride-1 3×3 convolution of few input channels, such as
    `layers.conv_taps`) with its kernel gradient by `taps_kernel_grad_gpu` on CUDA where
    `applies_few` takes the shape; forward's own gradients elsewhere, and its input
    gradient always (training never asks for the images' gradient, so XLA drops it).

    interpret: the kernel in Pallas' interpreter on every backend (the tests);
    grad_shape: (rows, block, warps) of `taps_kernel_grad_gpu`, or a prefix of them.
    """

    @jax.custom_vjp
    def conv(x, kernel):
        return forward(x, kernel)

    def fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def forward_kernel_grad(x, kernel, g):
        return jax.vjp(functools.partial(forward, x), kernel)[1](g)[0]

    def gpu_kernel_grad(x, kernel, g):
        return taps_kernel_grad_gpu(x, g, interpret, *grad_shape).astype(kernel.dtype)

    def bwd(residuals, g):
        x, kernel = residuals
        if not applies_few(x.shape, kernel.shape[-1]):
            return jax.vjp(forward, x, kernel)[1](g)
        dx = jax.vjp(lambda x: forward(x, kernel), x)[1](g)[0]
        # The forward's kernel gradient inside its branch only: on CUDA nothing computes it.
        grads = (gpu_kernel_grad, forward_kernel_grad, x, kernel, g)
        return dx, cuda_or_xla(*grads, interpret=interpret, batched=(True, False, True),
                               summed=True)  # fmt: skip

    conv.defvjp(fwd, bwd)
    return conv


def flipped(kernel: jax.Array) -> jax.Array:
    """The kernel whose convolution is the transpose of kernel's (SAME, stride 1): taps
    reversed, input and output channels swapped. [3, 3, Cin, Cout] → [3, 3, Cout, Cin]."""
    return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


def _gpu_grads(x, kernel, g, interpret=False, passes=PASSES, grad_shape=(), form=CONV_FORM):
    dx = conv_gpu(g, flipped(kernel), passes, interpret, form).astype(x.dtype)
    dw = kernel_grad_gpu(x, g, passes, interpret, *grad_shape, form=form)
    return dx, dw.astype(kernel.dtype)


def _xla_grads(x, kernel, g):
    return jax.vjp(xla_conv, x, kernel)[1](g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    interpret: bool = False,
    passes: int = PASSES,
    grad_shape: tuple[int, ...] = (),
    form: str = CONV_FORM,
) -> jax.Array:
    """``conv(x, kernel)``, SAME zero padding, stride 1, and its gradients: on CUDA GPUs by
    this module's kernels where `applies` says they take the shape, by XLA elsewhere.

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, Cout], both of one dtype.
      interpret: the kernels in Pallas' interpreter on every backend (the tests).
      passes: TF32 products per tap, as `conv_gpu`.
      grad_shape: (rows, block, warps) of `kernel_grad_gpu`, or a prefix of them (the
        rest its defaults).
      form: the convolution's and the input gradient's, as `conv_gpu`.

    Returns:
      [B, H, W, Cout].
    """
    return _conv3x3_forward(x, kernel, interpret, passes, form)


def _conv3x3_forward(x, kernel, interpret, passes, form):
    gpu = functools.partial(conv_gpu, passes=passes, interpret=interpret, form=form)
    taken = applies(x.shape, kernel.shape[-1])
    return cuda_or_xla(gpu, xla_conv, x, kernel, taken=taken, interpret=interpret)


def _conv3x3_fwd(x, kernel, interpret, passes, grad_shape, form):
    return _conv3x3_forward(x, kernel, interpret, passes, form), (x, kernel)


def _conv3x3_bwd(interpret, passes, grad_shape, form, residuals, g):
    x, kernel = residuals
    gpu = functools.partial(
        _gpu_grads, interpret=interpret, passes=passes, grad_shape=grad_shape, form=form
    )
    taken = applies(x.shape, kernel.shape[-1])
    return cuda_or_xla(gpu, _xla_grads, x, kernel, g, taken=taken, interpret=interpret,
                       batched=(True, False, True), summed=(False, True))  # fmt: skip


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
