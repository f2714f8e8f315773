"""Resampler: warp images with a dense displacement field.

Conventions as in :mod:`dirnet_jax.bspline`: images ``[B, *spatial, C]``, displacements
``[B, *spatial, ndim]`` in pixels with components in axis order, pixel centres at integer
coordinates, and ``warped(x) = moving(x + u(x))``.

Boundary modes, for sample points outside the image:

* ``"edge"`` (default): the image continues with its border values. Equal to
  ``scipy.ndimage.map_coordinates(mode="nearest")``. Registration prefers it: a shift
  does not drag a dark frame into the image.
* ``"zeros"``: the image continues with zeros, and linear interpolation blends towards them
  over the last pixel. Equal to ``map_coordinates(mode="grid-constant", cval=0)``.

``order=1`` is (multi)linear interpolation for intensities; ``order=0`` is nearest neighbour
for label masks (labels stay labels).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

MODES = ("edge", "zeros")


def identity_grid(spatial_shape: tuple[int, ...]) -> jax.Array:
    """[*spatial, ndim] float32 pixel coordinates of every pixel centre."""
    axes = [jnp.arange(s, dtype=jnp.float32) for s in spatial_shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def sample(image: jax.Array, coords: jax.Array, *, order: int = 1, mode: str = "edge") -> jax.Array:
    """Sample `image` at arbitrary points.

    Args:
      image: [B, *spatial, C] images.
      coords: [B, *out_spatial, ndim] sample points in pixel coordinates of `image`.
      order: 1 for linear interpolation, 0 for nearest neighbour.
      mode: boundary mode, "edge" or "zeros" (see module docstring).

    Returns:
      [B, *out_spatial, C] sampled values, in `image`'s dtype for order 0, float otherwise.
    """
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; choose one of {MODES}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    spatial = image.shape[1:-1]
    ndim = len(spatial)
    if coords.shape[-1] != ndim or coords.shape[0] != image.shape[0]:
        raise ValueError(
            f"coords {coords.shape} do not fit images {image.shape}: "
            f"need [B={image.shape[0]}, ..., {ndim}]"
        )
    batch, channels = image.shape[0], image.shape[-1]
    out_shape = coords.shape[1:-1]
    flat_image = image.reshape(batch, -1, channels)
    coords = coords.reshape(batch, -1, ndim)
    sizes = jnp.array(spatial, dtype=jnp.int32)
    strides = jnp.array([math.prod(spatial[d + 1 :]) for d in range(ndim)], dtype=jnp.int32)
    gather = jax.vmap(lambda values, idx: values[idx])  # [N, C], [P] -> [P, C]

    def corner_values(idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Values at integer points idx [B, P, ndim], and whether they lie inside."""
        inside = jnp.all((idx >= 0) & (idx < sizes), axis=-1)
        clipped = jnp.clip(idx, 0, sizes - 1)
        return gather(flat_image, (clipped * strides).sum(-1)), inside

    if order == 0:
        values, inside = corner_values(jnp.floor(coords + 0.5).astype(jnp.int32))
        if mode == "zeros":
            values = jnp.where(inside[..., None], values, jnp.zeros_like(values))
        return values.reshape(batch, *out_shape, channels)

    lower = jnp.floor(coords)
    frac = coords - lower
    lower = lower.astype(jnp.int32)
    out = jnp.zeros((batch, coords.shape[1], channels), jnp.result_type(image, jnp.float32))
    for corner in itertools.product((0, 1), repeat=ndim):
        offset = jnp.array(corner, dtype=jnp.int32)
        weight = jnp.prod(jnp.where(offset == 1, frac, 1.0 - frac), axis=-1)  # [B, P]
        values, inside = corner_values(lower + offset)
        if mode == "zeros":
            weight = jnp.where(inside, weight, 0.0)
        out = out + weight[..., None] * values
    return out.reshape(batch, *out_shape, channels)


def warp(
    image: jax.Array, displacement: jax.Array, *, order: int = 1, mode: str = "edge"
) -> jax.Array:
    """Warp images with a dense displacement field.

    Args:
      image: [B, *spatial, C] moving images.
      displacement: [B, *spatial, ndim] field in pixels: output pixel x samples x + u(x).
      order: 1 for linear interpolation (images), 0 for nearest neighbour (label masks).
      mode: boundary mode, "edge" or "zeros".

    Returns:
      [B, *spatial, C] warped images.
    """
    spatial = image.shape[1:-1]
    if displacement.shape != (image.shape[0], *spatial, len(spatial)):
        raise ValueError(
            f"displacement {displacement.shape} does not fit images {image.shape}: "
            f"need {(image.shape[0], *spatial, len(spatial))}"
        )
    return sample(image, identity_grid(spatial) + displacement, order=order, mode=mode)
