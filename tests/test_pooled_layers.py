"""The later layers' Triton kernel (a candidate, not yet the default): Pallas' interpreter
on any backend, the compiled kernel on a GPU, against XLA's convolution at full precision,
ELU and pooling; and the whole DIRNet with it swapped in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import core
from dirnet_jax import DIRNetConfig, init_variables, models, pooled_layers, tf32
from tests.references import conv_elu_pool

ON_GPU = jax.default_backend() == "gpu"  # else the kernel runs in Pallas' interpreter


@pytest.mark.parametrize("form", pooled_layers.FORMS)
@pytest.mark.parametrize(
    "shape,cout,downsampling",  # the rows form: 4, 1 and 2 pooled rows per program
    [((2, 8, 32, 16), 16, "avg"), ((1, 6, 64, 32), 16, "max"), ((3, 4, 32, 16), 32, "avg")],
)
def test_kernel_is_conv_elu_pool(rng, shape, cout, downsampling, form):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) * 0.25, jnp.float32)
    bias = jnp.asarray(rng.normal(size=cout) * 0.3, jnp.float32)
    expected = conv_elu_pool(x, kernel, bias, downsampling)
    layer = functools.partial(pooled_layers.conv_elu_pool2_dense, interpret=not ON_GPU, form=form)
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


def test_the_rows_form_takes_the_pooled_rows_that_divide_the_image(rng):
    assert pooled_layers.program_shape("rows", 128, 128) == (2, pooled_layers.ROWS_WARPS)
    assert pooled_layers.program_shape("rows", 32, 32) == (8, pooled_layers.ROWS_WARPS)
    assert pooled_layers.program_shape("rows", 12, 32) == (2, pooled_layers.ROWS_WARPS)
    assert pooled_layers.program_shape("rows", 16, 512) == (1, pooled_layers.ROWS_WARPS)
    assert pooled_layers.program_shape("taps", 32, 32) == (1, pooled_layers.WARPS)
    x = jnp.asarray(rng.normal(size=(1, 8, 32, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.25, jnp.float32)
    bias = jnp.zeros(16)
    expected = conv_elu_pool(x, kernel, bias, "avg")
    for th in (1, 2):  # fewer rows than its own (4)
        got = pooled_layers.conv_elu_pool2_dense(
            x, kernel, bias, "avg", form="rows", rows_per_program=th, interpret=True
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for form, th in (("rows", 3), ("rows", 8), ("taps", 2)):
        with pytest.raises(ValueError, match="pooled rows per program"):
            pooled_layers.conv_elu_pool2_dense(
                x, kernel, bias, "avg", form=form, rows_per_program=th, interpret=True
            )
    with pytest.raises(ValueError, match="form is one of taps, rows"):
        pooled_layers.conv_elu_pool2_dense(x, kernel, bias, "avg", form="dot", interpret=True)


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


def interpreted_pooled_conv(x, kernel, bias, downsampling, dtype):
    """`core.triton_pooled_conv`'s kernel branch on every backend, interpreted off a GPU."""
    if not pooled_layers.applies(x.shape, kernel.shape[-1], downsampling):
        return core._pooled_conv(x, kernel, bias, downsampling, dtype)
    return pooled_layers.conv_elu_pool2_dense(
        x, kernel, bias, downsampling, out_dtype=dtype, interpret=not ON_GPU
    )


def test_dirnet_with_the_kernel_registers_alike():
    variables = init_variables(CONFIG, jax.random.key(0))
    params = dict(variables["params"])
    shape = params["output"]["kernel"].shape  # a non-trivial output layer: a real grid
    params["output"] = {"kernel": jax.random.normal(jax.random.key(1), shape),
                        "bias": params["output"]["bias"]}  # fmt: skip
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    pairs = jax.random.uniform(jax.random.key(2), (2, 2, 64, 64, 1))
    default = models.register(CONFIG, variables, *pairs)
    with core.swapped("pooled_conv", interpreted_pooled_conv):
        kernel = models.register(CONFIG.replace(seed=7), variables, *pairs)
    assert 0.5 < float(jnp.abs(default.grid).max()) < 30
    np.testing.assert_allclose(kernel.grid, default.grid, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kernel.warped, default.warped, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dispatch", [core.triton_pooled_conv, core.rows_pooled_conv])
def test_the_swapped_in_dispatch_lowers_the_kernels_for_cuda_only(dispatch):
    # 64² with two poolings: the first layer's kernel, then this one at 32² (half width 16).
    variables = init_variables(CONFIG, jax.random.key(0))
    pair = jnp.zeros((2, 64, 64, 1), jnp.float32)
    with core.swapped("pooled_conv", dispatch):
        traced = models.register.trace(CONFIG.replace(seed=8), variables, pair, pair)
        cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count("xla.gpu.triton") == 2 and "xla.gpu.triton" not in cpu
