"""Inference's B-spline field and warp as one GPU kernel (Pallas, Triton backend): the
control grid to the dense displacement field, and the moving image sampled through it,
one image row a program, the field never read back.

Why: at 256², batch 512 on an H200 (run 7's profile) XLA computes the field by a product
that writes it (149 µs for 268 MB) and warps in a fusion that reads it again with the
image (128 µs): 0.28 ms of the call's 2.7. This kernel writes the field and the
warped images once and reads the control grid and the moving images: ~0.54 GB, about
0.12 ms at the copy bandwidth measured there. Untimed: a candidate
(`models.INFER_SPLINE_WARP`).

How: the field is separable (`bspline.bspline_matrix`, one [size, grid] matrix per axis).
XLA first applies the width's matrix to the control grid at full precision, a small
product ([B, 2, gh, W], 16 MB at batch 512). Each program then takes one row i of one
image: row i of the height's matrix is a band of at most order + 1 consecutive weights
(`band`), so the field's row is that many rows of the product, weighted, in float32
multiply-adds (no tensor-core product: the field must not be rounded to TF32). Then
bilinear sampling as `resample.warp`: floor and fraction per axis, the four corners
gathered from the moving image (its border continued, "edge", or zeros outside, "zeros").
The same sums as XLA's path in another order: within float32 rounding of it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dirnet_jax import bspline
from dirnet_jax.bspline import HIGHEST
from dirnet_jax.first_layer import power_of_two
from dirnet_jax.resample import MODES

# Warps per program (one image row): untimed; sm_90a issue floors at 256², batch 512
# 0.084 ms at 1 warp, 0.092 at 2, 0.116 at 4, 0.144 at 8.
WARPS = 2


def applies(moving_shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> bool:
    """Whether the kernel takes this warp: 2-D images whose width is a power of two (the
    kernel's block, one image row) and a 2-D control grid of as many images.
    ``DIRNET_SPLINE_WARP=xla`` turns it off."""
    if os.environ.get("DIRNET_SPLINE_WARP", "") == "xla" or len(moving_shape) != 4:
        return False
    return (
        len(grid_shape) == 4
        and grid_shape[-1] == 2
        and grid_shape[0] == moving_shape[0]
        and power_of_two(moving_shape[2])
    )


def band(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [size, grid] B-spline matrix as bands: each row's first column [size] int32 and
    its S weights from there [size, S] float32, S the widest row's span (rows whose
    nonzeros start near the end are shifted back: their extra weights are zeros)."""
    nonzero = matrix != 0
    first = np.argmax(nonzero, axis=1)
    last = matrix.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    span = int((last - first).max()) + 1
    starts = np.minimum(first, matrix.shape[1] - span)
    weights = np.stack([matrix[np.arange(len(matrix)), starts + s] for s in range(span)], 1)
    return starts.astype(np.int32), weights.astype(np.float32)


def _kernel(rows_ref, start_ref, wh_ref, m_ref, warp_ref, field_ref, *, height, width, mode):
    """Row i of image b: the field [W] per component, and the warped row [W] per channel.
    rows_ref: [B, 2, gh, W], the control grid with the width's matrix applied."""
    pid = pl.program_id(0)
    b, i = pid // height, pid % height
    first = start_ref[i]
    field = []
    for d in range(2):
        total = None
        for s in range(wh_ref.shape[1]):
            term = wh_ref[i, s] * rows_ref[b, d, first + s, :]
            total = term if total is None else total + term
        field.append(total)
        field_ref[b, i, :, d] = total
    j = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    y, x = i.astype(jnp.float32) + field[0], j.astype(jnp.float32) + field[1]
    y0, x0 = jnp.floor(y), jnp.floor(x)
    fy, fx = y - y0, x - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    corners = []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            weight = wy * wx
            if mode == "zeros":
                inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
                weight = jnp.where(inside, weight, 0.0)
            corners.append((jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1), weight))
    for c in range(m_ref.shape[-1]):
        out = None
        for yi, xi, weight in corners:
            term = weight * m_ref[b, yi, xi, c].astype(jnp.float32)
            out = term if out is None else out + term
        warp_ref[b, i, :, c] = out.astype(warp_ref.dtype)


@functools.partial(jax.jit, static_argnames=("order", "mode", "interpret", "num_warps"))
def field_and_warp_gpu(
    grid: jax.Array,
    moving: jax.Array,
    order: int = 3,
    mode: str = "edge",
    interpret: bool = False,
    num_warps: int = WARPS,
) -> tuple[jax.Array, jax.Array]:
    """`bspline.bspline_field` and `resample.warp` (linear) in one kernel (see `applies`).

    Args:
      grid: [B, gh, gw, 2] control-point displacements, pixels; moving: [B, H, W, C].
      order: the B-spline's, 3 (cubic) or 2 (quadratic); mode: "edge" or "zeros".
      interpret: Pallas' interpreter (any backend: the tests); num_warps: per program.

    Returns:
      (warped [B, H, W, C] in moving's float dtype, displacement [B, H, W, 2] float32).
    """
    if not applies(moving.shape, grid.shape):
        raise ValueError(f"field_and_warp_gpu does not take grid {grid.shape}, {moving.shape}")
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; choose one of {MODES}")
    batch, height, width, channels = moving.shape
    gh, gw = grid.shape[1:3]
    starts, weights = band(bspline.bspline_matrix(height, gh, order))
    mw = jnp.asarray(bspline.bspline_matrix(width, gw, order))
    rows = jnp.einsum("jl,bkld->bdkj", mw, grid.astype(jnp.float32), precision=HIGHEST)
    out_dtype = jnp.result_type(moving, jnp.float32)
    body = functools.partial(_kernel, height=height, width=width, mode=mode)
    warped, field = pl.pallas_call(
        body,
        out_shape=[
            jax.ShapeDtypeStruct((batch, height, width, channels), out_dtype),
            jax.ShapeDtypeStruct((batch, height, width, 2), jnp.float32),
        ],
        grid=(batch * height,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(rows, jnp.asarray(starts), jnp.asarray(weights), moving)
    return warped, field
