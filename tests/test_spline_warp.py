"""Inference's B-spline field and warp as one Triton kernel (`spline_warp`, a candidate):
Pallas' interpreter off a GPU, compiled on one, against `bspline.bspline_field` and
`resample.warp`; and `register` with it against `register` without."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import core
from dirnet_jax import DIRNetConfig, bspline, models, resample, spline_warp
from tests.references import registering

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


@pytest.mark.parametrize(
    "shape,grid_shape,order,mode",
    [((2, 16, 32, 1), (4, 8), 3, "edge"), ((2, 12, 16, 3), (4, 4), 2, "zeros"),
     ((1, 32, 32, 1), (2, 16), 3, "zeros"), ((1, 24, 32, 1), (3, 5), 3, "edge")],
)  # fmt: skip
def test_kernel_is_the_field_and_the_warp(rng, shape, grid_shape, order, mode):
    # Displacements of several pixels, many sample points outside the image: both
    # boundary modes matter.
    moving = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    grid = jnp.asarray(rng.normal(size=(shape[0], *grid_shape, 2)) * 4, jnp.float32)
    warped, field = spline_warp.field_and_warp_gpu(grid, moving, order, mode, INTERPRET)
    expected_field = bspline.bspline_field(grid, shape[1:3], order)
    expected = resample.warp(moving, expected_field, mode=mode)
    assert field.shape == expected_field.shape and warped.shape == expected.shape
    assert float(jnp.abs(expected_field).max()) > shape[1] / 4  # samples leave the image
    # The same sums in another order: float32 rounding of the largest value.
    largest = float(jnp.abs(expected_field).max())
    np.testing.assert_allclose(field, expected_field, rtol=1e-6, atol=1e-6 * largest)
    # A sample point moved by that much moves the value by at most the image's slope.
    np.testing.assert_allclose(warped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,grid,order", [(256, 16, 3), (256, 16, 2), (28, 7, 3), (16, 16, 3)])
def test_bands_are_the_bspline_matrix(size, grid, order):
    matrix = bspline.bspline_matrix(size, grid, order)
    starts, weights = spline_warp.band(matrix)
    # At most order + 1 control points per pixel (3 where pixels sit on control points).
    assert len(weights) == size and weights.shape[1] <= order + 1
    assert starts.min() >= 0 and starts.max() + weights.shape[1] <= grid
    rebuilt = np.zeros_like(matrix)
    for row, (first, w) in enumerate(zip(starts, weights, strict=True)):
        rebuilt[row, first : first + len(w)] = w
    np.testing.assert_array_equal(rebuilt, matrix)


def test_kernel_refuses_what_it_does_not_take(monkeypatch):
    assert spline_warp.applies((2, 256, 256, 1), (2, 16, 16, 2))
    assert not spline_warp.applies((2, 28, 28, 1), (2, 7, 7, 2))  # width 28
    assert spline_warp.applies((2, 24, 32, 1), (2, 3, 5, 2))  # any height and grid
    assert not spline_warp.applies((2, 8, 8, 8, 1), (2, 2, 2, 2, 3))  # 3-D
    assert not spline_warp.applies((2, 64, 64, 1), (1, 16, 16, 2))  # batches differ
    with pytest.raises(ValueError, match="does not take"):
        spline_warp.field_and_warp_gpu(jnp.zeros((1, 7, 7, 2)), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="unknown boundary mode"):
        spline_warp.field_and_warp_gpu(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 16, 16, 1)),
                                       mode="wrap", interpret=True)  # fmt: skip
    monkeypatch.setenv("DIRNET_SPLINE_WARP", "xla")
    assert not spline_warp.applies((2, 256, 256, 1), (2, 16, 16, 2))


CONFIG = DIRNetConfig(image_shape=(64, 64), num_downsamplings=2)


@pytest.mark.parametrize("transformer", ["cubic", "quadratic"])
def test_register_with_the_kernel_registers_alike(transformer):
    config = CONFIG.replace(transformer=transformer)
    variables, pairs = registering(config)
    with core.fresh_traces():  # register's traces are cached by config: none reused
        default = models.register(config, variables, *pairs)
    interpreted = functools.partial(models.field_and_warp, interpret=INTERPRET)
    swaps = {"INFER_SPLINE_WARP": True, "field_and_warp": interpreted}
    with core.swapped_all(swaps), core.fresh_traces():
        kernel = models.register(config, variables, *pairs)
    with core.swapped("INFER_SPLINE_WARP", True), core.fresh_traces():
        traced = models.register.trace(config, variables, *pairs)
    assert float(jnp.abs(default.grid).max()) > 0.5
    # The same network; XLA may fuse it apart in the two programs: float32 rounding.
    np.testing.assert_allclose(kernel.grid, default.grid, rtol=1e-5, atol=1e-5)
    largest = float(jnp.abs(default.displacement).max())
    np.testing.assert_allclose(kernel.displacement, default.displacement, atol=1e-6 * largest)
    np.testing.assert_allclose(kernel.warped, default.warped, rtol=1e-5, atol=1e-5)
    # Lowered for CUDA with the candidate on: the first layer's kernel, then this one.
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert cuda.count("xla.gpu.triton") == 2
