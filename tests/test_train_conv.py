"""Training's convolutions as Triton kernels (float32 training's default on CUDA): the
later layers' convolution, input gradient and kernel gradient, and the first conv's kernel
gradient, in Pallas' interpreter on any backend (compiled on a GPU) against XLA's
convolution and its gradients at full precision; the whole DIRNet's training gradients
with the kernels (the default) and with the first layer at once; their lowering for CUDA."""

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import core
from dirnet_jax import DIRNetConfig, dispatch, layers, models, train_conv
from dirnet_jax.train import _loss, create_train_state
from tests.references import conv_same

pytestmark = pytest.mark.usefixtures("unoptimized_compiles")  # conftest: -O0 on a CPU
ON_GPU = jax.default_backend() == "gpu"  # else the kernels run in Pallas' interpreter
INTERPRET = not ON_GPU
# One TF32 product per tap (the default) on a GPU: ~1e-3 relative; exact in the interpreter.
TF32 = 1e-2 if ON_GPU else 1e-5


def scale_of(expected):
    """What absolute errors scale with on a GPU: the largest value (three TF32 products per
    tap leave ~3e-6 of it on an H200, at any output); 1 in the interpreter (exact)."""
    return float(jnp.abs(expected).max()) if ON_GPU else 1.0


def arrays(rng, shape, cout):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) * 0.25, jnp.float32)
    g = jnp.asarray(rng.normal(size=(*shape[:-1], cout)), jnp.float32)
    return x, kernel, g


# Heights that are and are not a multiple of the kernel gradient's rows per program;
# more output channels than input and fewer.
SHAPES = [((2, 12, 32, 16), 32), ((1, 16, 16, 32), 16), ((3, 5, 64, 16), 16)]


@pytest.mark.parametrize("shape,cout", SHAPES)
def test_kernels_are_the_convolution_and_its_gradients(rng, shape, cout):
    x, kernel, g = arrays(rng, shape, cout)
    expected, vjp = jax.vjp(conv_same, x, kernel)
    expected_dx, expected_dw = vjp(g)
    # Values along the zero-padded edges differ from the inside: the masks are exercised.
    assert float(jnp.abs(expected[:, 0] - expected[:, 1]).max()) > 0.5
    for passes, rtol in ((1, TF32), (3, 1e-5)):
        for form in ("taps", "pairs"):  # pairs: 4, none (width 16: taps) and 1 row a program
            conv = functools.partial(
                train_conv.conv_gpu, passes=passes, interpret=INTERPRET, form=form
            )
            got = conv(x, kernel)
            assert got.shape == expected.shape and got.dtype == jnp.float32
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale_of(expected))
            dx = conv(g, train_conv.flipped(kernel))
            atol = rtol * scale_of(expected_dx)
            np.testing.assert_allclose(dx, expected_dx, rtol=rtol, atol=atol)
        # Rows per program (3: its gcd with H), columns (pairs of columns) per product (16:
        # two per 32-pixel row, one per 16), warps: the default and another; both forms.
        for grad_shape, form in itertools.product([(), (3, 16, 2)], ("taps", "pairs")):
            dw = train_conv.kernel_grad_gpu(x, g, passes, INTERPRET, *grad_shape, form=form)
            assert dw.shape == kernel.shape and dw.dtype == jnp.float32
            # Sums over every pixel of every image: absolute error grows with their number.
            scale = float(jnp.abs(expected_dw).max())
            np.testing.assert_allclose(dw, expected_dw, rtol=rtol, atol=rtol * scale)


def test_bfloat16_inputs_are_read_as_they_are(rng):
    x, kernel, g = (a.astype(jnp.bfloat16) for a in arrays(rng, (2, 8, 16, 16), 16))
    up = [a.astype(jnp.float32) for a in (x, kernel, g)]
    got = train_conv.conv_gpu(x, kernel, interpret=INTERPRET)
    assert got.dtype == jnp.bfloat16  # sums in float32, rounded once
    np.testing.assert_allclose(got.astype(jnp.float32), conv_same(*up[:2]), rtol=1e-2, atol=2e-2)
    dw = train_conv.kernel_grad_gpu(x, g, interpret=INTERPRET)
    expected_dw = jax.vjp(conv_same, *up[:2])[1](up[2])[1]
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-2, atol=1e-2 * float(jnp.abs(dw).max()))


def test_flipped_kernel_convolves_by_the_transpose(rng):
    # ⟨conv(x, k), y⟩ = ⟨x, conv(y, flipped(k))⟩ for SAME zero padding, stride 1.
    x, kernel, y = arrays(rng, (2, 6, 7, 3), 5)
    left = jnp.vdot(conv_same(x, kernel), y)
    right = jnp.vdot(x, conv_same(y, train_conv.flipped(kernel)))
    np.testing.assert_allclose(left, right, rtol=1e-5)
    assert train_conv.flipped(kernel).shape == (3, 3, 5, 3)


@pytest.mark.parametrize("shape,cout", [SHAPES[0], ((2, 6, 8, 16), 16)])  # taken, not taken
def test_conv3x3_gradients_are_the_convolutions(rng, shape, cout):
    x, kernel, g = arrays(rng, shape, cout)
    expected, expected_vjp = jax.vjp(conv_same, x, kernel)
    for form in ("taps", "pairs"):
        conv = functools.partial(train_conv.conv3x3, interpret=INTERPRET, form=form)
        got, vjp = jax.vjp(conv, x, kernel)
        np.testing.assert_allclose(got, expected, rtol=TF32, atol=TF32)
        for a, b in zip(vjp(g), expected_vjp(g), strict=True):
            np.testing.assert_allclose(a, b, rtol=TF32, atol=TF32 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("shape", [(2, 12, 32, 2), (1, 5, 16, 3)])
def test_taps_kernel_gradient_is_the_convolutions(rng, shape):
    # The first conv's (few input channels): by elementwise sums, float32 throughout.
    x, kernel, g = arrays(rng, shape, 16)
    expected = jax.vjp(conv_same, x, kernel)[1](g)
    scale = float(jnp.abs(expected[1]).max())
    for grad_shape in [(), (3, 16, 2)]:  # the default, and 3 rows (gcd 1 with 5), 16 columns
        dw = train_conv.taps_kernel_grad_gpu(x, g, INTERPRET, *grad_shape)
        assert dw.shape == kernel.shape and dw.dtype == jnp.float32
        np.testing.assert_allclose(dw, expected[1], rtol=1e-5, atol=1e-6 * scale)
    # As the first conv's gradients: the input gradient XLA's, the kernel's the kernel's.
    conv = train_conv.with_taps_grad(layers.conv_taps, interpret=INTERPRET)
    y, vjp = jax.vjp(conv, x, kernel)
    np.testing.assert_allclose(y, layers.conv_taps(x, kernel), rtol=0, atol=0)
    for got, want in zip(vjp(g), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    with pytest.raises(ValueError, match="does not take"):
        train_conv.taps_kernel_grad_gpu(jnp.ones((1, 4, 16, 8)), jnp.ones((1, 4, 16, 16)))


def test_taps_kernel_gradient_leaves_no_convolution_on_cuda():
    # Training asks for the kernel's gradient only: on CUDA the Triton kernel and no cuDNN
    # convolution at all (XLA's kernel gradient lives in the other platforms' branch).
    conv = train_conv.with_taps_grad(layers.conv_taps)
    x = jax.ShapeDtypeStruct((2, 64, 64, 2), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 2, 16), jnp.float32)
    traced = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), 1)).trace(x, kernel)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count("xla.gpu.triton") == 1 and "stablehlo.convolution" not in cuda
    assert "stablehlo.convolution" in cpu and "xla.gpu.triton" not in cpu


def test_the_pairs_form_takes_the_rows_that_divide_the_image():
    assert train_conv.PAIRS_PIXELS == 64  # pairs of output columns a program, as below
    assert train_conv.pairs_shape(128, 128) == 1
    assert train_conv.pairs_shape(64, 64) == 2
    assert train_conv.pairs_shape(12, 32) == 4
    assert train_conv.pairs_shape(5, 64) == 1
    assert train_conv.pairs_shape(16, 16) is None  # 8 pairs: the taps form
    with pytest.raises(ValueError, match="form is taps or pairs"):
        train_conv.conv_gpu(jnp.ones((1, 4, 32, 16)), jnp.ones((3, 3, 16, 16)), form="rows")


def test_applies_only_to_shapes_triton_takes(monkeypatch):
    assert train_conv.applies((32, 128, 128, 16), 16)
    assert train_conv.applies((2, 5, 16, 32), 16)  # any height
    assert not train_conv.applies((2, 14, 14, 16), 16)  # width 14
    assert not train_conv.applies((2, 16, 8, 16), 16)  # width 8 < 16
    assert not train_conv.applies((2, 16, 16, 8), 16)  # 8 channels
    assert not train_conv.applies((2, 16, 16, 16), 12)  # 12 features
    assert not train_conv.applies((2, 16, 16, 16, 16), 16)  # 3-D
    one = jnp.ones((1, 4, 16, 16))
    with pytest.raises(ValueError, match="passes is 1 or 3"):
        train_conv.conv_gpu(one, jnp.ones((3, 3, 16, 16)), passes=2, interpret=True)
    with pytest.raises(ValueError, match="do not take"):
        train_conv.kernel_grad_gpu(jnp.ones((1, 4, 8, 16)), jnp.ones((1, 4, 8, 16)), interpret=True)
    assert train_conv.applies_few((32, 256, 256, 2), 16)
    assert not train_conv.applies_few((32, 256, 256, 8), 16)  # 8 channels: the other kernel
    assert not train_conv.applies_few((32, 28, 28, 2), 16)  # width 28
    assert not train_conv.applies_few((32, 16, 16, 2), 12)  # 12 features
    monkeypatch.setenv("DIRNET_TRAIN_CONV", "xla")
    assert not train_conv.applies((32, 128, 128, 16), 16)
    assert not train_conv.applies_few((32, 256, 256, 2), 16)


# 64² with two poolings: the first conv by taps at 64², then 16 → 16 at 32² (a shape the
# kernels take), then 1×1 convs (XLA's).
CONFIG = DIRNetConfig(image_shape=(64, 64), num_downsamplings=2)


@pytest.fixture
def interpreted(monkeypatch):
    """Training's kernels on every backend, interpreted off a GPU (compiled on one); returns
    the first conv's (for `train_first_layer_conv`)."""
    conv3x3 = functools.partial(train_conv.conv3x3, interpret=INTERPRET)
    taps = train_conv.with_taps_grad(layers.conv_taps, INTERPRET)
    monkeypatch.setattr(train_conv, "conv3x3", conv3x3)
    monkeypatch.setattr(layers, "conv_taps_train", taps)
    return taps


def _training(dtype="float32"):
    """(params, state, batch) of a 64² DIRNet, and a function computing its loss and
    gradients in a new jit each call (traced with the environment in force)."""
    pairs = jax.random.uniform(jax.random.key(2), (2, 4, 64, 64, 1))
    batch = {"fixed": pairs[0], "moving": pairs[1]}
    state = create_train_state(CONFIG.replace(compute_dtype=dtype))
    params = dict(state.params)  # a non-trivial output layer: gradients of every scale
    shape = params["output"]["kernel"].shape
    params["output"] = {"kernel": jax.random.normal(jax.random.key(1), shape) * 0.1,
                        "bias": params["output"]["bias"]}  # fmt: skip

    def loss_and_grads():
        return jax.jit(jax.value_and_grad(_loss, has_aux=True))(params, state, batch)

    return params, state, batch, loss_and_grads


@pytest.mark.parametrize("first_layer_at_once,split", [(False, False), (True, False), (True, True)])
def test_dirnet_trains_alike_with_the_kernels(interpreted, monkeypatch, first_layer_at_once, split):
    # Float32 training with the kernels (the default), and with the first layer at once
    # (`baseline-fusedfirst`), against XLA's convolutions (DIRNET_TRAIN_CONV=xla). `split`:
    # every kernel inside a shard_map, as over several devices (`dispatch.split_over`;
    # here over one, so that a GPU compiles and runs them so).
    params, state, batch, loss_and_grads = _training()

    with core.environment("DIRNET_TRAIN_CONV", "xla"):
        (loss, stats), grads = loss_and_grads()
    monkeypatch.setattr(models, "TRAIN_FIRST_LAYER_PLATFORMS", (dispatch.default_platform(),))
    monkeypatch.setattr(
        models, "train_first_layer_conv", interpreted if first_layer_at_once else None
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    over = NamedSharding(mesh, PartitionSpec("data"))
    with dispatch.split_over(over) if split else contextlib.nullcontext():
        (kernel_loss, kernel_stats), kernel_grads = loss_and_grads()
        jaxpr = str(jax.make_jaxpr(jax.value_and_grad(_loss, has_aux=True))(params, state, batch))
    assert ("shard_map[" in jaxpr) == split
    np.testing.assert_allclose(kernel_loss, loss, rtol=TF32)
    for layer in ("Conv_0", "Conv_1"):  # the layers the kernels took: their kernel gradients
        (g,) = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                if f"'{layer}'" in jax.tree_util.keystr(path)]  # fmt: skip
        assert g.shape[:2] == (3, 3) and float(jnp.abs(g).max()) > 0
    want = jax.tree.leaves((grads, stats))
    for a, b in zip(jax.tree.leaves((kernel_grads, kernel_stats)), want, strict=True):
        tol = 2 * TF32 if ON_GPU else 1e-4  # through the whole network
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()) + 1e-9)


def test_bfloat16_training_with_the_kernels_is_as_close_to_float32_as_xlas(interpreted):
    # bfloat16 activations: the kernels read them as they are (sums in float32), as cuDNN
    # does. Both sides round apart by ~5-9 % of each gradient's largest value (8 bits
    # through the whole network), so each is held to float32's gradients: the kernels'
    # error within 1.5 times XLA's own.
    *_, float32 = _training()
    *_, bfloat16 = _training("bfloat16")
    with core.environment("DIRNET_TRAIN_CONV", "xla"):
        (_, reference), (_, xla) = float32(), bfloat16()
    _, kernels = bfloat16()
    for path, want in jax.tree_util.tree_leaves_with_path(reference):
        scale = float(jnp.abs(want).max())
        (a,), (b,) = ([g for p, g in jax.tree_util.tree_leaves_with_path(grads) if p == path]
                      for grads in (xla, kernels))  # fmt: skip
        xla_error, kernel_error = (float(jnp.abs(g - want).max()) / scale for g in (a, b))
        assert kernel_error < 1.5 * xla_error + 1e-2, jax.tree_util.keystr(path)


# The Triton kernels in a training step at 64², lowered for CUDA (none for the CPU), as
# traced on a GPU (TRAIN_FIRST_LAYER_PLATFORMS):
KERNELS = {
    # float32: the first layer at once, its statistics, its forward (inference's kernel,
    # BatchNorm folded in), its backward sums and kernel gradient (first_layer_grad); the
    # 32² layer's conv, input and kernel gradients (pairs form).
    "float32": 4 + 3,
    # The same with float32 multiply-adds in the first layer, and with the taps form.
    "passes0": 4 + 3,
    "taps": 4 + 3,
    # The first layer layer by layer: the first conv's kernel gradient.
    "layerfirst": 1 + 3,
    # bfloat16: the later convs and the first conv's kernel gradient (the first layer
    # layer by layer); and with the kernels turned off.
    "bfloat16": 1 + 3,
    "off": 0,
}


@pytest.mark.parametrize("case", list(KERNELS))
def test_training_lowers_the_kernels_for_cuda_only(case, monkeypatch):
    pair = jnp.zeros((2, 64, 64, 1), jnp.float32)
    batch = {"fixed": pair, "moving": pair}
    dtype = "bfloat16" if case == "bfloat16" else "float32"
    monkeypatch.setattr(models, "TRAIN_FIRST_LAYER_PLATFORMS", (dispatch.default_platform(),))
    swaps = {
        "passes0": {"TRAIN_FIRST_LAYER_PASSES": 0, "TRAIN_FIRST_LAYER_FORWARD": ()},
        "taps": {"TRAIN_CONV_FORM": "taps"},
        "layerfirst": {"train_first_layer_conv": None},
    }.get(case, {})  # fmt: skip
    train_conv_env = "xla" if case == "off" else ""
    with core.swapped_all(swaps), core.environment("DIRNET_TRAIN_CONV", train_conv_env):
        state = create_train_state(CONFIG.replace(seed=9, compute_dtype=dtype))
        traced = jax.jit(jax.grad(_loss, has_aux=True)).trace(state.params, state, batch)
        cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count("xla.gpu.triton") == KERNELS[case] and "xla.gpu.triton" not in cpu
