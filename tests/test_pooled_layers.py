"""The later layers' Triton kernel (registration's 128² layer on CUDA): Pallas' interpreter
on any backend, the compiled kernel on a GPU, against XLA's convolution at full precision,
ELU and pooling; and the whole DIRNet with it swapped in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import core
from dirnet_jax import DIRNetConfig, init_variables, layers, models, pooled_layers, tf32
from tests.references import conv_elu_pool, registering

pytestmark = pytest.mark.usefixtures("unoptimized_compiles")  # conftest: -O0 on a CPU
ON_GPU = jax.default_backend() == "gpu"  # else the kernel runs in Pallas' interpreter


@pytest.mark.parametrize(
    "shape,cout,downsampling",
    [((2, 8, 32, 16), 16, "avg"), ((1, 6, 64, 32), 16, "max"), ((3, 4, 32, 16), 32, "avg")],
)
def test_kernel_is_conv_elu_pool(rng, shape, cout, downsampling):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) * 0.25, jnp.float32)
    bias = jnp.asarray(rng.normal(size=cout) * 0.3, jnp.float32)
    expected = conv_elu_pool(x, kernel, bias, downsampling)
    layer = functools.partial(pooled_layers.conv_elu_pool2_dense, interpret=not ON_GPU)
    got = layer(x, kernel, bias, downsampling)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    # Both signs of ELU, and large values along the zero-padded edges.
    assert float(jnp.abs(expected[:, :, 0]).max()) > 1 and float(expected.min()) < -0.2
    # Three TF32 products per tap: ~3e-6 of the largest value on an H200, at any output.
    scale = float(jnp.abs(expected).max()) if ON_GPU else 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    # One TF32 product per tap: ~1e-3 relative on a GPU, exact in the interpreter.
    got1 = layer(x, kernel, bias, downsampling, passes=1)
    np.testing.assert_allclose(
        got1, expected, rtol=1e-2 if ON_GPU else 1e-5, atol=1e-2 if ON_GPU else 1e-5
    )
    got16 = layer(x, kernel, bias, downsampling, out_dtype=jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    # bf16 activations in (the bf16 network's), read as they are: the same layer of them.
    x16 = x.astype(jnp.bfloat16)
    np.testing.assert_allclose(
        layer(x16, kernel, bias, downsampling),
        conv_elu_pool(x16.astype(jnp.float32), kernel, bias, downsampling), rtol=1e-5,
        atol=1e-5 * scale,
    )  # fmt: skip
    np.testing.assert_allclose(got16.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


def test_tf32_split_is_exact(rng):
    x = jnp.asarray(rng.normal(size=1000) * 10.0 ** rng.integers(-30, 30, size=1000), jnp.float32)
    big, small = tf32.tf32_split(x)
    assert bool(jnp.all(big + small == x))  # exact in float32
    bits = jax.lax.bitcast_convert_type(big, jnp.uint32)
    assert not bool(jnp.any(bits & ~jnp.uint32(tf32.TF32_BITS)))  # TF32 as it is
    assert bool(jnp.all(jnp.abs(small) < 2.0**-10 * jnp.abs(x)))
    assert float(jnp.abs(small).max()) > 0  # not all of x is TF32


def test_applies_only_to_shapes_triton_takes(monkeypatch):
    assert pooled_layers.applies((4, 128, 128, 16), 16, "avg")
    assert pooled_layers.applies((4, 6, 32, 32), 16, "max")
    assert not pooled_layers.applies((4, 14, 14, 16), 16, "avg")  # half width 7
    assert not pooled_layers.applies((4, 16, 16, 16), 16, "avg")  # half width 8 < 16
    assert not pooled_layers.applies((4, 64, 64, 8), 16, "avg")  # 8 channels
    assert not pooled_layers.applies((4, 64, 64, 16), 12, "avg")  # 12 features
    assert not pooled_layers.applies((4, 7, 64, 16), 16, "avg")  # odd height
    assert not pooled_layers.applies((4, 64, 64, 16), 16, "strided")
    assert not pooled_layers.applies((4, 32, 32, 32, 16), 16, "avg")  # 3-D
    with pytest.raises(ValueError, match="passes is 1 or 3"):
        pooled_layers.conv_elu_pool2_dense(
            jnp.ones((1, 8, 32, 16)), jnp.ones((3, 3, 16, 16)), jnp.ones(16), "avg", passes=2
        )
    monkeypatch.setenv("DIRNET_POOLED_LAYERS", "xla")
    assert not pooled_layers.applies((4, 128, 128, 16), 16, "avg")
    with pytest.raises(ValueError, match="does not take"):
        pooled_layers.conv_elu_pool2_dense(
            jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16)), jnp.ones(16), "avg", interpret=True
        )


CONFIG = DIRNetConfig(image_shape=(64, 64), num_downsamplings=2)


def test_dirnet_with_the_kernel_registers_alike(monkeypatch):
    variables, pairs = registering(CONFIG)
    with core.swapped("pooled_conv", layers.xla_pooled_conv):
        default = models.register(CONFIG.replace(seed=6), variables, *pairs)
    # `layers.pooled_conv`'s kernel branch on every layer it takes (the 32² one here), on
    # every backend, interpreted off a GPU.
    monkeypatch.setattr(layers, "POOLED_KERNEL_MIN_WIDTH", 0)
    interpreted = functools.partial(layers.pooled_conv, interpret=not ON_GPU)
    with core.swapped("pooled_conv", interpreted):
        kernel = models.register(CONFIG.replace(seed=7), variables, *pairs)
    largest = float(jnp.abs(default.grid).max())
    assert 0.5 < largest < 30
    # On a GPU the kernel's one TF32 product (~3e-4 of the largest value; cuDNN's at XLA's
    # default precision, float32 under the tests' `highest`): run 7 saw 8.7e-4 of a
    # largest 2.0 in the grid, through two more layers.
    tol = 2e-3 if ON_GPU else 1e-4
    np.testing.assert_allclose(kernel.grid, default.grid, rtol=tol, atol=tol * max(largest, 1))
    np.testing.assert_allclose(kernel.warped, default.warped, rtol=tol, atol=tol)


def test_bfloat16_dirnet_with_the_kernel_is_as_close_to_float32_as_xlas(monkeypatch):
    # bfloat16 activations into the kernel (the default since run 9), read as they are,
    # its sums in float32, its output rounded to bfloat16 as XLA's layer is.
    variables, pairs = registering(CONFIG)
    full = models.register(CONFIG, variables, *pairs)
    half = CONFIG.replace(compute_dtype="bfloat16")
    xla = models.register(half, variables, *pairs)
    monkeypatch.setattr(layers, "POOLED_KERNEL_MIN_WIDTH", 0)
    monkeypatch.setattr(layers, "INFER_POOLED_DTYPES", ("float32", "bfloat16"))
    interpreted = functools.partial(layers.pooled_conv, interpret=not ON_GPU)
    with core.swapped("pooled_conv", interpreted):
        kernel = models.register(half.replace(seed=8), variables, *pairs)
    errors = [float(jnp.abs(r.grid - full.grid).max()) for r in (xla, kernel)]
    largest = float(jnp.abs(full.grid).max())
    assert 1e-5 * largest < errors[0] < 0.05 * largest  # bfloat16, and close
    assert errors[1] < 1.5 * errors[0], errors
    np.testing.assert_allclose(kernel.warped, full.warped, atol=0.05)


@pytest.mark.parametrize(
    "min_width,dtypes,compute_dtype,kernels",
    [
        (128, ("float32",), "float32", 1 + 1),
        (0, ("float32",), "float32", 1 + 3),
        (128, ("float32",), "bfloat16", 1),  # cuDNN's 128² layer in bfloat16
        (128, None, "bfloat16", 1 + 1),  # the default: the kernel in bfloat16 too (run 9)
    ],
)
def test_registration_lowers_the_kernel_for_cuda_only(
    monkeypatch, min_width, dtypes, compute_dtype, kernels
):
    # 256² with four poolings: the first layer's kernel, then this one on the 128² layer
    # (inputs at least POOLED_KERNEL_MIN_WIDTH wide), or on the 128², 64² and 32² ones
    # (the 16² layer's half width, 8, is too narrow); in the dtypes INFER_POOLED_DTYPES names.
    monkeypatch.setattr(layers, "POOLED_KERNEL_MIN_WIDTH", min_width)
    if dtypes is not None:
        monkeypatch.setattr(layers, "INFER_POOLED_DTYPES", dtypes)
    config = DIRNetConfig(
        image_shape=(256, 256), num_downsamplings=4, compute_dtype=compute_dtype,
        seed=9000 + min_width + len(dtypes or ()),
    )  # fmt: skip
    variables = init_variables(config, jax.random.key(0))
    pair = jnp.zeros((1, 256, 256, 1), jnp.float32)
    traced = models.register.trace(config, variables, pair, pair)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count("xla.gpu.triton") == kernels and "xla.gpu.triton" not in cpu
