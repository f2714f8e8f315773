"""Inference's first layer, ``pool2(elu(conv3×3(x) + bias))``, as one GPU kernel (Pallas,
Triton backend): it reads the images once and writes only the pooled activations.

On an H200 (256², batch 512; benchmarks/NOTES.md) XLA's own fusion of the same layer
(`layers.conv_elu_pool2`) took 1.6 ms, plus 0.35 ms for the strided slices it reads; this
kernel takes 0.94 ms, and a whole `register` call 3.9 ms instead of 4.6. It does the same
sums in the same order in float32, and computes ELU's expm1 as exp − 1 (`EXPM1`; within
about 1.2e-7 of it, 0.3 ms less than libdevice's expm1).

Layout trick: the images are zero-padded by 2 and reshaped to
``[B, H/2 + 2, 2, W/2 + 2, 2, C]`` (row pair, row parity, column pair, column parity,
channel), a free reshape. Pooled pixel (r, c) reads the 4×4 input window at rows
2r − 1 … 2r + 2, that is padded rows 2r + 1 … 2r + 4 = pair r + (1 + u) // 2, parity
(1 + u) % 2 for u = 0 … 3, and likewise for columns: every load is a slice of whole
pairs, with no edge to mask.

Two more forms (`dot`, `dot1`) compute the conv on tensor cores: the 4×4
window of every pooled column, 16·C values, gathered from the images unpadded (masked at
the edges: no padding pass) as one row of a [W/2, 16·C] matrix (`window_gather`), times
the kernel placed at each pooling position in the window, the four side by side
(`wide_weights`), by three TF32 products (float32's accuracy, ~3e-6 of the largest value)
or one. `dot1`, one TF32 product (the precision of XLA's own convolution on a GPU at
default precision, ~3e-4 of the largest value), is inference's default on CUDA: on an
H200 (run 7, batch 512) 0.87 ms against 1.31 for the broadcast form and 1.12 for `dot`,
and `register` 189,700 pairs/s against 173,500. `dot`, three products (float32's
accuracy), runs training's forward (`layers.TRAIN_FIRST_LAYER_FORWARD`), and
`first_layer_grad` uses the same matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dirnet_jax.dispatch import kernels_off, plgpu
from dirnet_jax.tf32 import tf32_dot, tf32_split

# The kernel's form (`FORMS`), pooled rows and warps per Triton program, and ELU's expm1
# (`EXPM1S`): the fastest of those benchmarks/layers.py timed on an H200 (run 7).
FORM, ROWS, WARPS, EXPM1 = "dot1", 1, 4, "exp"
# The form and warps for inputs whose channels the window matrix does not take (not a
# power of two): the default until run 7 (1.31 ms).
OTHER_FORM, OTHER_WARPS = "broadcast", 8


def default_form(channels: int) -> tuple[str, int]:
    """(form, warps) of the kernel for inputs of this many channels: FORM's where it
    takes them, else OTHER_FORM's."""
    if FORM in DOT_FORMS and not power_of_two(channels):
        return OTHER_FORM, OTHER_WARPS
    return FORM, WARPS


def applies(
    x_shape: tuple[int, ...],
    features: int,
    downsampling: str,
    rows_per_program: int = ROWS,
    form: str = FORM,
) -> bool:
    """Whether `conv_elu_pool2_gpu` takes a first layer of this shape: 2-D images whose
    half width and feature count are powers of two (Triton's block shapes), avg or max
    pooling; the window-matrix forms (DOT_FORMS) also need a power of two of channels.
    ``DIRNET_FIRST_LAYER=xla`` in the environment turns it off."""
    if kernels_off("DIRNET_FIRST_LAYER") or len(x_shape) != 4:
        return False
    h, w, cin = x_shape[1:]
    return (
        downsampling in ("avg", "max")
        and h % 2 == 0
        and w % 2 == 0
        and power_of_two(w // 2, least=16)
        and power_of_two(features)
        and (h // 2) % rows_per_program == 0
        and (form not in DOT_FORMS or power_of_two(cin))
    )


def pair_applies(
    image_shape: tuple[int, ...], features: int, downsampling: str, form: str = FORM
) -> bool:
    """Whether `conv_elu_pool2_pair_gpu` takes a pair of images of this shape ([B, H, W, C]
    each): a window-matrix form (DOT_FORMS), a power of two of channels per image, and a
    stacked pair that `applies` takes."""
    stacked = (*image_shape[:-1], 2 * image_shape[-1])
    return (
        form in DOT_FORMS
        and power_of_two(image_shape[-1])
        and applies(stacked, features, downsampling, form=form)
    )


def power_of_two(n: int, least: int = 1) -> bool:
    """Whether n is a power of two of at least `least` (a size Triton's blocks take)."""
    return n >= least and n & (n - 1) == 0


def _load(x_ref, b, r0, th, tw, u, v, ch):
    """Input row 2r − 1 + u, column 2c − 1 + v, channel ch for pooled rows r0 … r0 + th and
    every column c: [th, tw]."""
    return x_ref[
        b, pl.ds(r0 + (1 + u) // 2, th), (1 + u) % 2, pl.ds((1 + v) // 2, tw), (1 + v) % 2, ch
    ]


def pool_window(window, pool, expm1):
    """ELU of the four conv outputs of each pooling window, then their mean or max."""
    window = [jnp.where(y > 0, y, expm1(y)) for y in window]
    if pool == "avg":
        return (window[0] + window[1] + window[2] + window[3]) / 4
    return jnp.maximum(jnp.maximum(window[0], window[1]), jnp.maximum(window[2], window[3]))


def _program(rows, th):
    """(pair, first pooled row) of this program."""
    pid = pl.program_id(0)
    return pid // (rows // th), (pid % (rows // th)) * th


def program_pixels(rows, th, tw):
    """This program's image b and first row r0 of `rows`, `th` rows a program, and its
    th·tw pixels as row r and column c, [th·tw, 1] each (pixel m: row r0 + m // tw, column
    m % tw)."""
    b, r0 = _program(rows, th)
    m = jax.lax.broadcasted_iota(jnp.int32, (th * tw, 1), 0)
    return b, r0, r0 + jax.lax.div(m, tw), jax.lax.rem(m, tw)


def fitting_rows(rows: int, per_row: int, pixels: int) -> int:
    """The most rows, a power of two dividing `rows`, whose `per_row` pixels each come to at
    most `pixels` (at least one row): a program's rows where its products' M is
    rows × per_row."""
    th = 1
    while 2 * th * per_row <= pixels and rows % (2 * th) == 0:
        th *= 2
    return th


def _kernel_broadcast(x_ref, w_ref, b_ref, o_ref, *, rows, th, tw, cin, cout, pool, expm1):
    """Pooled rows [r0, r0 + th) of one pair as [th, tw, Cout] arrays: each input value
    times a row of the kernel."""
    b, r0 = _program(rows, th)
    acc = {}  # (a, b) position in the pooling window → conv output [th, tw, Cout]
    for u in range(4):
        for v in range(4):
            for ch in range(cin):
                _add_taps(acc, _load(x_ref, b, r0, th, tw, u, v, ch)[:, :, None], w_ref, u, v, ch)
    o_ref[b, pl.ds(r0, th), :, :] = _pooled(acc, b_ref, pool, expm1).astype(o_ref.dtype)


def _add_taps(acc, xv, w_ref, u, v, ch):
    """Add input values xv [th, tw, 1] at window position (u, v), channel ch, times their
    kernel rows [Cout] to the conv output of each pooling position (a, b) they feed."""
    for a in range(2):
        for bb in range(2):
            dy, dx = u - a, v - bb
            if 0 <= dy < 3 and 0 <= dx < 3:
                term = xv * w_ref[dy, dx, ch, :][None, None, :]
                acc[a, bb] = term if (a, bb) not in acc else acc[a, bb] + term


def _pooled(acc, b_ref, pool, expm1):
    """The four conv outputs of `_add_taps` plus bias, ELU, pooled: [th, tw, Cout]."""
    bias = b_ref[:][None, None, :]
    return pool_window([acc[a, bb] + bias for a in range(2) for bb in range(2)], pool, expm1)


def _kernel_unpadded(x_ref, w_ref, b_ref, o_ref, *, rows, th, tw, cin, cout, pool, expm1):
    """The broadcast form on the images unpadded (``[B, H/2, 2, W/2, 2, C]``), one pooled
    row per program: rows and columns outside the image are clamped and their values
    zeroed, so no padding pass comes before the kernel."""
    b, r = _program(rows, 1)
    c = jax.lax.broadcasted_iota(jnp.int32, (tw,), 0)
    acc = {}
    for u in range(4):  # input row 2r − 1 + u: pair r + (u − 1) // 2, parity (u − 1) % 2
        pair = r + (u - 1) // 2
        row_inside = (pair >= 0) & (pair < rows)
        for v in range(4):
            cols = c + (v - 1) // 2
            inside = row_inside & (cols >= 0) & (cols < tw)
            for ch in range(cin):
                xv = x_ref[
                    b, jnp.clip(pair, 0, rows - 1), (u - 1) % 2, jnp.clip(cols, 0, tw - 1),
                    (v - 1) % 2, ch,
                ]  # fmt: skip
                _add_taps(acc, jnp.where(inside, xv, 0.0)[None, :, None], w_ref, u, v, ch)
    o_ref[b, pl.ds(r, 1), :, :] = _pooled(acc, b_ref, pool, expm1).astype(o_ref.dtype)


def window_gather(x_ref, b, row, c, n, interpret):
    """Input rows row … row + n − 1 (`row` a scalar or [M, 1]) of image b of x_ref
    [B, H, W, C] under pooling columns c [M, 1], zero outside the image, in float32:
    [M, 4·n·C], column (4u + v)·C + ch holding row + u, column 2c − 1 + v, channel ch (in
    each input row, 4·C contiguous values). With n = 4 and row 2r − 1, the 4×4 input
    windows of pooled row r, one per row of the matrix; masked at the edges, so no padding
    pass comes first."""
    height, width, cin = x_ref.shape[1:]
    k = jax.lax.broadcasted_iota(jnp.int32, (1, 4 * n * cin), 1)
    u, v = jax.lax.div(k, 4 * cin), jax.lax.rem(jax.lax.div(k, cin), 4)
    rows, cols, ch = row + u, 2 * c - 1 + v, jax.lax.rem(k, cin)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    ref = x_ref.at[b, jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1), ch]
    if interpret:  # the interpreter takes no masked gather
        return jnp.where(inside, ref[...], 0).astype(jnp.float32)
    return plgpu.load(ref, mask=inside, other=0).astype(jnp.float32)


def window_weights(kernel: jax.Array) -> jax.Array:
    """kernel [3, 3, Cin, F] as the matrix [4, 16·Cin, F] that takes the 4×4 input window
    (`window_gather`'s columns) to the conv at pooling position (a, b), at 2a + b: the
    kernel placed at (a, b) in the window, zeros where it does not reach."""
    placed = [
        jnp.pad(kernel, [(a, 1 - a), (bb, 1 - bb), (0, 0), (0, 0)])
        for a in range(2)
        for bb in range(2)
    ]
    return jnp.stack(placed).reshape(4, 16 * kernel.shape[2], kernel.shape[3])


def _kernel_dot(
    *refs, images=1, rows, th, tw, cin, cout, pool, expm1, passes, interpret
):  # fmt: skip
    """One pooled row per program, its convs as matrix products on tensor cores: the 4×4
    input window of every pooled column gathered as one [tw, 16·Cin] matrix, times the four
    pooling positions' weights side by side ([16·Cin, 4·Cout], `wide_weights`), `passes`
    TF32 products (`tf32.tf32_dot`). refs: `images` image refs (one; or the pair, fixed
    and moving, each times its half of the kernel, the products summed), the weights'
    TF32 split of each, the bias, the output."""
    x_refs, w_refs, (b_ref, o_ref) = refs[:images], refs[images:-2], refs[-2:]
    b, r = _program(rows, 1)
    c = jax.lax.broadcasted_iota(jnp.int32, (tw, 1), 0)
    convs = None  # [tw, 4·Cout]
    for x_ref, wb_ref, ws_ref in zip(x_refs, w_refs[::2], w_refs[1::2], strict=True):
        window = window_gather(x_ref, b, 2 * r - 1, c, 4, interpret)
        split = tf32_split(window) if passes == 3 else None
        convs = tf32_dot(window, split, wb_ref[...], ws_ref[...], interpret, convs)
    o_ref[b, r, :, :] = pool_wide(convs, b_ref[:], pool, expm1).astype(o_ref.dtype)


def wide_weights(kernel: jax.Array) -> jax.Array:
    """kernel [3, 3, Cin, F] as [16·Cin, 4·F]: `window_weights` side by side, pooling
    position p in columns p·F … p·F + F − 1, so that one product of the window matrix gives
    the conv at all four (its rows in input-row blocks of 4·Cin: `pooled_layers`' rows)."""
    cin, f = kernel.shape[2:]
    return window_weights(kernel).transpose(1, 0, 2).reshape(16 * cin, 4 * f)


def pool_wide(convs, bias, pool, expm1):
    """The conv at the four pooling positions side by side, [M, 4·F] (`wide_weights`), plus
    bias [F], ELU, then their mean or max: [M, F] (by a [M, 4, F] view and a reduction over
    its middle axis, which Pallas lowers where a slice of columns it does not)."""
    y = convs.reshape(convs.shape[0], 4, bias.shape[-1]) + bias[None, None, :]
    y = jnp.where(y > 0, y, expm1(y))
    return jnp.sum(y, axis=1) / 4 if pool == "avg" else jnp.max(y, axis=1)


def padded_pairs(x: jax.Array) -> jax.Array:
    """[B, H, W, C] zero-padded by 2 as row and column pairs: [B, H/2 + 2, 2, W/2 + 2, 2, C]
    (the layout the kernels read; see the module's docstring)."""
    batch, h, w, c = x.shape
    padded = jnp.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    return padded.reshape(batch, h // 2 + 2, 2, w // 2 + 2, 2, c)


def exp_minus_one(y: jax.Array) -> jax.Array:
    """``exp(y) − 1``: expm1 within 1.2e-7 absolute for y ≤ 0 (ELU's branch), cheaper."""
    return jnp.exp(y) - 1


def exp2_minus_one(y: jax.Array) -> jax.Array:
    """``2^(y·log2 e) − 1``: as `exp_minus_one`, by the GPU's exp2 instruction without
    expf's range reduction (904 instead of 1,096 instructions per thread in the first
    kernel, sm_90a); within 2e-7 of expm1 for y ≤ 0 on a CPU."""
    return jnp.exp2(y * LOG2_E) - 1


LOG2_E = 1.4426950408889634

FORMS = {
    "broadcast": _kernel_broadcast,
    "unpadded": _kernel_unpadded,
    "dot": functools.partial(_kernel_dot, passes=3),  # float32 to ~3e-6 of the largest
    "dot1": functools.partial(_kernel_dot, passes=1),  # TF32, as XLA's conv by default
}
DOT_FORMS = ("dot", "dot1")  # the forms reading the window weights, split for TF32
EXPM1S = {"expm1": jnp.expm1, "exp": exp_minus_one, "exp2": exp2_minus_one}


@functools.partial(
    jax.jit,
    static_argnames=(
        "downsampling", "out_dtype", "rows_per_program", "num_warps", "interpret", "form"
    ),
)  # fmt: skip
def conv_elu_pool2_gpu(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    out_dtype=jnp.float32,
    rows_per_program: int = ROWS,
    num_warps: int = WARPS,
    interpret: bool = False,
    form: str = FORM,
) -> jax.Array:
    """`layers.conv_elu_pool2` for 2-D images as one Triton kernel (see `applies`).

    Args:
      x: [B, H, W, Cin]; kernel: [3, 3, Cin, Cout]; bias: [Cout].
      downsampling: "avg" or "max"; out_dtype: the output's dtype (sums in float32).
      rows_per_program, num_warps: pooled rows and warps per Triton program.
      interpret: run Pallas' interpreter (any backend: the tests on a CPU).
      form: a key of FORMS.

    Returns:
      [B, H/2, W/2, Cout].
    """
    return kernel_call(
        x, kernel, bias, downsampling, out_dtype, rows_per_program, num_warps, interpret, form
    )


def kernel_call(
    x, kernel, bias, downsampling, out_dtype, rows_per_program, num_warps, interpret,
    form=FORM, expm1=EXPM1S[EXPM1],
):  # fmt: skip
    """`conv_elu_pool2_gpu`, unjitted, its `form` (a key of FORMS) and ELU's `expm1`
    chosen by the caller (benchmarks/layers.py times them)."""
    if form in DOT_FORMS and not power_of_two(x.shape[-1]):
        raise ValueError(f"the {form} form takes a power of two of channels, not {x.shape[-1]}")
    if not applies(x.shape, kernel.shape[-1], downsampling, rows_per_program):
        raise ValueError(f"conv_elu_pool2_gpu does not take {x.shape} → {kernel.shape[-1]}")
    if form in ("unpadded", *DOT_FORMS) and rows_per_program != 1:
        raise ValueError(f"the {form} form computes one pooled row per program")
    batch, h, w, cin = x.shape
    cout = kernel.shape[-1]
    rows, tw, th = h // 2, w // 2, rows_per_program
    x = x.astype(jnp.float32)
    if form == "unpadded":
        pairs = x.reshape(batch, rows, 2, tw, 2, cin)
    elif form in DOT_FORMS:  # gathered from the images as they are (`window_gather`)
        pairs = x
    else:
        pairs = padded_pairs(x)
    body = functools.partial(
        FORMS[form], rows=rows, th=th, tw=tw, cin=cin, cout=cout, pool=downsampling, expm1=expm1
    )
    weights = (kernel.astype(jnp.float32),)
    if form in DOT_FORMS:
        body = functools.partial(body, interpret=interpret)
        weights = tf32_split(wide_weights(kernel.astype(jnp.float32)))
    out = jax.ShapeDtypeStruct((batch, rows, tw, cout), out_dtype)
    return _pooled_call(body, out, batch * rows // th, num_warps, interpret, pairs, *weights, bias)


def _pooled_call(body, out, programs, num_warps, interpret, *operands):
    """body over `programs` Triton programs of `num_warps` warps, writing `out` (a
    ShapeDtypeStruct); its operands, the last the bias (read in float32)."""
    *operands, bias = operands
    return pl.pallas_call(
        body,
        out_shape=out,
        grid=(programs,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*operands, bias.astype(jnp.float32))


@functools.partial(
    jax.jit, static_argnames=("downsampling", "out_dtype", "num_warps", "interpret", "form")
)
def conv_elu_pool2_pair_gpu(
    fixed: jax.Array,
    moving: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    downsampling: str,
    out_dtype=jnp.float32,
    num_warps: int = WARPS,
    interpret: bool = False,
    form: str = FORM,
) -> jax.Array:
    """`conv_elu_pool2_gpu` of the pair stacked on channels, reading the two images as they
    are: no stacked copy is written (at 256², batch 512 on an H200 XLA's took 124 µs of a
    2.7 ms call, run 7). The window-matrix forms only (`DOT_FORMS`).

    Args:
      fixed, moving: [B, H, W, C] each; kernel: [3, 3, 2·C, Cout] (fixed's channels first,
        as `layers.stack_channels`); the rest as `conv_elu_pool2_gpu`.

    Returns:
      [B, H/2, W/2, Cout].
    """
    if form not in DOT_FORMS:
        raise ValueError(f"conv_elu_pool2_pair_gpu takes the forms {DOT_FORMS}, not {form!r}")
    if fixed.shape != moving.shape or kernel.shape[2] != 2 * fixed.shape[-1]:
        raise ValueError(f"a pair {fixed.shape}, {moving.shape} for a kernel {kernel.shape}")
    if not pair_applies(fixed.shape, kernel.shape[-1], downsampling, form):
        raise ValueError(
            f"conv_elu_pool2_pair_gpu does not take {fixed.shape} → {kernel.shape[-1]}"
        )
    batch, h, w, c = fixed.shape
    cout = kernel.shape[-1]
    kernel = kernel.astype(jnp.float32)
    weights = [
        *tf32_split(wide_weights(kernel[:, :, :c])),
        *tf32_split(wide_weights(kernel[:, :, c:])),
    ]
    body = functools.partial(FORMS[form], images=2, rows=h // 2, th=1, tw=w // 2, cin=c,
                             cout=cout, pool=downsampling, expm1=EXPM1S[EXPM1],
                             interpret=interpret)  # fmt: skip
    out = jax.ShapeDtypeStruct((batch, h // 2, w // 2, cout), out_dtype)
    images = (fixed.astype(jnp.float32), moving.astype(jnp.float32))
    return _pooled_call(body, out, batch * h // 2, num_warps, interpret, *images, *weights, bias)
