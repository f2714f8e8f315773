"""The first layer's Triton kernel: Pallas' interpreter on any backend, the compiled kernel
on a CUDA GPU, both against XLA's convolution, ELU and pooling; and where models use it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import core
from dirnet_jax import DIRNetConfig, first_layer, init_variables, layers, models
from tests.references import conv_elu_pool, registering

pytestmark = pytest.mark.usefixtures("unoptimized_compiles")  # conftest: -O0 on a CPU
ON_GPU = jax.default_backend() == "gpu"  # else the kernel runs in Pallas' interpreter


def random_layer(rng, shape, cout):
    x = rng.normal(size=shape).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, shape[-1], cout)) * 0.7).astype(np.float32)
    bias = (rng.normal(size=cout) * 0.5).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias)


@pytest.mark.parametrize(
    "shape,cout,downsampling,rows",
    [((2, 32, 32, 2), 16, "avg", 1), ((3, 8, 64, 2), 16, "max", 2), ((1, 16, 32, 1), 8, "avg", 4)],
)
def test_kernel_is_conv_elu_pool(rng, shape, cout, downsampling, rows):
    x, kernel, bias = random_layer(rng, shape, cout)
    expected = conv_elu_pool(x, kernel, bias, downsampling)
    got = first_layer.conv_elu_pool2_gpu(  # the padded pairs' form: rows per program
        x, kernel, bias, downsampling, rows_per_program=rows, interpret=not ON_GPU,
        form="broadcast",
    )  # fmt: skip
    assert got.shape == expected.shape and got.dtype == jnp.float32
    # The edges matter most (the padding): expect both signs of ELU and values > 1 there.
    assert float(jnp.abs(expected[:, 0]).max()) > 1 and float(expected.min()) < -0.2
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The same sums in the same order as XLA's loop: closer to it than to the reference.
    np.testing.assert_allclose(
        got, layers.conv_elu_pool2(x, kernel, bias, downsampling), rtol=3e-6, atol=3e-6
    )


@pytest.mark.parametrize("form", list(first_layer.FORMS))
@pytest.mark.parametrize("expm1", list(first_layer.EXPM1S))
def test_every_form_of_the_kernel_is_conv_elu_pool(rng, form, expm1):
    x, kernel, bias = random_layer(rng, (2, 8, 32, 2), 16)
    one_row = form in ("unpadded", *first_layer.DOT_FORMS)

    def call(rows):
        return first_layer.kernel_call(
            x, kernel, bias, "max", jnp.float32, rows, 4, not ON_GPU, form,
            first_layer.EXPM1S[expm1],
        )  # fmt: skip

    expected = conv_elu_pool(x, kernel, bias, "max")
    assert float(jnp.abs(expected[:, -1]).max()) > 1  # the far edge, zero-padded, matters
    # On a GPU: three TF32 products leave ~3e-6 of the largest value, one ~3e-4.
    tol = 1e-5 * (float(jnp.abs(expected).max()) if ON_GPU else 1.0)
    tol = 1e-3 * float(jnp.abs(expected).max()) if ON_GPU and form == "dot1" else tol
    np.testing.assert_allclose(call(1 if one_row else 2), expected, rtol=1e-5, atol=tol)
    if one_row:
        with pytest.raises(ValueError, match="one pooled row per program"):
            call(2)


@pytest.mark.parametrize("channels,form,downsampling", [(1, "dot1", "avg"), (2, "dot", "max")])
def test_pair_kernel_is_the_layer_of_the_stacked_pair(rng, channels, form, downsampling):
    # The pair read as two images (`conv_elu_pool2_pair_gpu`, the default) against the
    # layer of their stacked copy; fixed's channels first, as `layers.stack_channels`.
    fixed, moving = (jnp.asarray(rng.normal(size=(2, 8, 32, channels)), jnp.float32)
                     for _ in "fm")  # fmt: skip
    _, kernel, bias = random_layer(rng, (2, 8, 32, 2 * channels), 16)
    expected = conv_elu_pool(layers.stack_channels(fixed, moving), kernel, bias, downsampling)
    got = first_layer.conv_elu_pool2_pair_gpu(
        fixed, moving, kernel, bias, downsampling, interpret=not ON_GPU, form=form
    )
    assert got.shape == expected.shape and float(jnp.abs(expected[:, -1]).max()) > 1
    tol = 1e-5 * (float(jnp.abs(expected).max()) if ON_GPU else 1.0)  # as the forms'
    tol = 1e-3 * float(jnp.abs(expected).max()) if ON_GPU and form == "dot1" else tol
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=tol)
    with pytest.raises(ValueError, match="takes the forms"):
        first_layer.conv_elu_pool2_pair_gpu(fixed, moving, kernel, bias, "avg", form="broadcast")
    with pytest.raises(ValueError, match="a pair"):
        first_layer.conv_elu_pool2_pair_gpu(fixed, moving[..., :1, :], kernel, bias, "avg")


def test_pair_kernel_takes_what_its_dispatch_says():
    # `pair_applies` is the one rule for both: layers.fused_first_layer_pair dispatches by it,
    # conv_elu_pool2_pair_gpu refuses what it does not take.
    assert first_layer.pair_applies((2, 8, 32, 1), 16, "avg", "dot1")
    assert first_layer.pair_applies((2, 8, 32, 2), 16, "max", "dot")
    assert not first_layer.pair_applies((2, 8, 32, 1), 16, "avg", "broadcast")
    assert not first_layer.pair_applies((2, 8, 32, 3), 16, "avg", "dot")  # 3 channels
    assert not first_layer.pair_applies((2, 8, 28, 1), 16, "avg", "dot1")  # half width 14
    assert not first_layer.pair_applies((2, 8, 32, 1), 16, "strided", "dot1")
    pair = jnp.zeros((1, 8, 28, 1))
    with pytest.raises(ValueError, match="does not take"):
        first_layer.conv_elu_pool2_pair_gpu(pair, pair, jnp.zeros((3, 3, 2, 16)),
                                            jnp.zeros(16), "avg", form="dot1")  # fmt: skip


def test_register_reading_the_pair_registers_alike():
    # INFER_FIRST_LAYER_PAIR (the default since run 8): the same registration as from the
    # stacked pair, the kernel interpreted off a GPU; lowered for CUDA, still one kernel.
    config = DIRNetConfig(image_shape=(64, 64), num_downsamplings=2)
    variables, pairs = registering(config)
    # register's traces are cached by config: none reused
    with core.swapped("INFER_FIRST_LAYER_PAIR", False), core.fresh_traces():
        stacked = models.register(config, variables, *pairs)
    assert float(jnp.abs(stacked.grid).max()) > 0.5  # the first layer matters to it
    interpreted = functools.partial(layers.fused_first_layer_pair, interpret=not ON_GPU)
    with core.swapped("fused_first_layer_pair", interpreted), core.fresh_traces():
        got = models.register(config, variables, *pairs)
    np.testing.assert_allclose(got.grid, stacked.grid, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.warped, stacked.warped, rtol=1e-5, atol=1e-5)
    with core.fresh_traces():
        cuda = models.register.trace(config, variables, *pairs).lower(lowering_platforms=("cuda",))
    assert cuda.as_text().count("xla.gpu.triton") == 1


def test_window_weights_take_the_window_to_each_pooling_positions_conv(rng):
    """window · window_weights[2a + b] is the conv at pooling position (a, b) of every
    window, by the definition of a SAME 3×3 conv on the 4×4 window's values."""
    x, kernel, _ = random_layer(rng, (1, 4, 4, 3), 5)
    weights = first_layer.window_weights(kernel)  # [4, 48, 5]
    assert weights.shape == (4, 48, 5)
    window = x.reshape(48)  # (4u + v)·cin + ch: row-major [4, 4, cin]
    for a in range(2):
        for bb in range(2):
            conv = jnp.einsum("ijc,ijcf->f", x[0, a : a + 3, bb : bb + 3], kernel)
            np.testing.assert_allclose(window @ weights[2 * a + bb], conv, rtol=1e-5, atol=1e-5)
    # Each weight appears once per position, the rest of the window is zero.
    assert int(jnp.sum(weights != 0)) == 4 * kernel.size


@pytest.mark.parametrize("name,bound", [("exp", 1.2e-7), ("exp2", 2e-7)])
def test_cheap_expm1_is_within_its_bound_on_elus_branch(name, bound):
    y = np.concatenate([-np.geomspace(1e-8, 90, 200_001), [0.0]]).astype(np.float32)
    got = np.asarray(first_layer.EXPM1S[name](jnp.asarray(y)), np.float64)
    err = np.abs(got - np.expm1(y.astype(np.float64)))
    assert err.max() <= bound
    assert err.max() > 1e-9  # not expm1 itself


def test_kernel_writes_bfloat16(rng):
    x, kernel, bias = random_layer(rng, (2, 16, 32, 2), 16)
    got = first_layer.conv_elu_pool2_gpu(
        x, kernel, bias, "avg", out_dtype=jnp.bfloat16, interpret=not ON_GPU
    )
    assert got.dtype == jnp.bfloat16
    expected = conv_elu_pool(x, kernel, bias, "avg")
    np.testing.assert_allclose(got.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


def test_applies_only_to_shapes_triton_takes(monkeypatch):
    assert first_layer.applies((4, 256, 256, 2), 16, "avg")
    assert first_layer.applies((1, 6, 32, 2), 16, "max")
    assert not first_layer.applies((4, 28, 28, 2), 16, "avg")  # half width 14
    assert not first_layer.applies((4, 256, 24, 2), 16, "avg")  # half width 12
    assert not first_layer.applies((4, 64, 64, 2), 12, "avg")  # 12 features
    assert not first_layer.applies((4, 64, 64, 2), 16, "strided")
    assert not first_layer.applies((4, 16, 16, 16, 2), 16, "avg")  # 3-D
    assert not first_layer.applies((4, 6, 64, 2), 16, "avg", rows_per_program=2)
    assert first_layer.applies((4, 64, 64, 3), 16, "avg", form="broadcast")  # any channels,
    assert not first_layer.applies((4, 64, 64, 3), 16, "avg", form="dot")  # not the window
    assert not first_layer.applies((4, 64, 64, 3), 16, "avg", form="dot1")  # matrix's 16·Cin
    # The default form takes a power of two of channels, the broadcast form the others.
    assert first_layer.default_form(2) == (first_layer.FORM, first_layer.WARPS)
    assert first_layer.default_form(6) == (first_layer.OTHER_FORM, first_layer.OTHER_WARPS)
    assert first_layer.applies((4, 64, 64, 6), 16, "avg", form=first_layer.default_form(6)[0])
    with pytest.raises(ValueError, match="power of two of channels, not 3"):
        first_layer.conv_elu_pool2_gpu(jnp.ones((1, 8, 32, 3)), jnp.ones((3, 3, 3, 16)),
                                       jnp.ones(16), "avg", interpret=True, form="dot")  # fmt: skip
    monkeypatch.setenv("DIRNET_FIRST_LAYER", "xla")
    assert not first_layer.applies((4, 256, 256, 2), 16, "avg")
    with pytest.raises(ValueError, match="does not take"):
        first_layer.conv_elu_pool2_gpu(
            jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 16)), jnp.ones(16), "avg", interpret=True
        )


@pytest.mark.parametrize("size,uses", [(32, True), (28, False)])
def test_register_lowers_the_kernel_for_cuda_only(size, uses):
    # Lowering for CUDA runs the whole Pallas → Triton lowering (block shapes, ops) here.
    config = DIRNetConfig(image_shape=(size, size), num_downsamplings=2)
    variables = init_variables(config, jax.random.key(0))
    pair = jnp.zeros((2, size, size, 1), jnp.float32)
    traced = models.register.trace(config, variables, pair, pair)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert ("xla.gpu.triton" in cuda) == uses
    assert "xla.gpu.triton" not in traced.lower(lowering_platforms=("cpu",)).as_text()
