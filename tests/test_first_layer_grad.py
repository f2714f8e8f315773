"""Training's first layer as GPU kernels (`first_layer_grad`, float32's on CUDA): the batch
statistics' sums, the backward pass's sums and the kernel gradient, in Pallas'
interpreter off a GPU (compiled on one), against XLA's convolution at full precision and
autodiff of `layers.pool2` and `elu`; then `layers.first_layer_train` with them against
autodiff of the layer computed layer by layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirnet_jax import first_layer_grad, layers
from dirnet_jax.elu import elu
from tests.references import conv_same

pytestmark = pytest.mark.usefixtures("unoptimized_compiles")  # conftest: -O0 on a CPU
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def inputs(rng, shape, features):
    """Images with a zero block (equal conv values there: ties for max pooling), a kernel,
    BatchNorm's multiplier and shift, a pooled gradient."""
    x = rng.normal(size=shape)
    x[:, : shape[1] // 2, : shape[2] // 2] = 0.0
    kernel = rng.normal(size=(3, 3, shape[-1], features)) * 0.4
    mul_shift = np.stack([rng.uniform(0.5, 2.0, features), rng.normal(size=features) * 0.5])
    g = rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, features))
    return [jnp.asarray(a, jnp.float32) for a in (x, kernel, mul_shift, g)]


def grad_y(z, mul, shift, g, downsampling):
    """The gradient of Σ g · pool2(elu(z·mul + shift)) with respect to y = z·mul + shift."""
    reduce = jnp.mean if downsampling == "avg" else jnp.max
    y = z * mul + shift
    return jax.vjp(lambda y: layers.pool2(elu(y), reduce), y)[1](g)[0]


SHAPES = [((2, 8, 32, 2), 16), ((1, 6, 32, 3), 4)]


# passes 0: float32 multiply-adds; 1, 3: TF32 products of the window matrix (two channels:
# its 32 columns), one or three (in the interpreter both at full precision).
CASES = [(*SHAPES[0], 0), (*SHAPES[1], 0), (*SHAPES[0], 3), (*SHAPES[0], 1)]


@pytest.mark.parametrize("downsampling", ["avg", "max"])
@pytest.mark.parametrize("shape,features,passes", CASES)
def test_kernels_are_the_sums_they_stand_for(rng, shape, features, passes, downsampling):
    x, kernel, mul_shift, g = inputs(rng, shape, features)
    z = conv_same(x, kernel)
    axes = (0, 1, 2)
    one_tf32 = ON_GPU and passes == 1  # ~3e-4 of the largest term
    close = functools.partial(np.testing.assert_allclose, rtol=2e-3 if one_tf32 else 2e-5)

    def scaled(expected):  # sums over every pixel: absolute error grows with their size
        return dict(atol=(1e-3 if one_tf32 else 1e-6) * float(jnp.abs(expected).sum() + 1))

    stats = first_layer_grad.stats_gpu(x, kernel, INTERPRET, passes)
    want = jnp.stack([z.sum(axes), (z * z).sum(axes)])
    close(stats, want, **scaled(want))

    g_y = grad_y(z, mul_shift[0], mul_shift[1], g, downsampling)
    if downsampling == "max":  # the first pooled row's windows in the zero block: 4 ties
        window = g_y[:, 0:2, 2:4]  # pooled pixel (0, 1), whose conv reads zeros only
        np.testing.assert_allclose(window, jnp.broadcast_to(window[:, :1, :1], window.shape))
        assert float(jnp.abs(window).max()) > 0
    sums = first_layer_grad.backward_sums_gpu(
        x, kernel, mul_shift, g, downsampling, INTERPRET, passes
    )
    want = jnp.stack([g_y.sum(axes), (z * g_y).sum(axes)])
    close(sums, want, **scaled(want))

    c0, c1 = (jnp.asarray(rng.normal(size=features) * s, jnp.float32) for s in (0.1, 0.05))
    coefficients = jnp.concatenate([mul_shift, c0[None], c1[None]])
    g_z = mul_shift[0] * g_y + c0 + c1 * z
    want = jax.vjp(functools.partial(conv_same, x), kernel)[1](g_z)[0]
    # The default shape (`GRAD_SHAPES`; with passes 0 one program per pooled row), loops:
    # 2 or 3 rows per program (their gcd with H/2), 8 or 16 pooled columns a step; with
    # products also one program per pooled row. The loops do not depend on the pooling:
    # under avg only (each shape costs the interpreter a compile of ~3 s).
    loops = [(2, 16 if passes else 8, 4), (3, 16, 2)] + [(1, 0, 4)] * bool(passes)
    shapes = [()] + loops * (downsampling == "avg")
    for grad_shape in shapes:
        shape = dict(zip(("rows", "block", "warps"), grad_shape, strict=False))
        got = first_layer_grad.kernel_grad_gpu(
            x, kernel, coefficients, g, downsampling, INTERPRET, passes=passes, **shape
        )
        assert got.shape == kernel.shape and got.dtype == jnp.float32
        close(got, want, **scaled(want))


def test_kernels_refuse_shapes_they_do_not_take():
    x, kernel = jnp.ones((1, 8, 28, 2)), jnp.ones((3, 3, 2, 16))  # half width 14
    assert not first_layer_grad.applies(x.shape, 16, "avg")
    assert first_layer_grad.applies((1, 8, 32, 2), 16, "max")
    assert not first_layer_grad.applies((1, 8, 32, 2), 16, "strided")
    assert first_layer_grad.applies((1, 8, 32, 3), 16, "avg")  # float32 sums: any channels
    assert not first_layer_grad.applies((1, 8, 32, 3), 16, "avg", passes=3)
    with pytest.raises(ValueError, match="does not take"):
        first_layer_grad.stats_gpu(x, kernel, interpret=True)
    x3, kernel3 = jnp.ones((1, 8, 32, 3)), jnp.ones((3, 3, 3, 16))
    with pytest.raises(ValueError, match="power of two of channels"):
        first_layer_grad.stats_gpu(x3, kernel3, interpret=True, passes=3)
    with pytest.raises(ValueError, match="passes is 0, 1 or 3"):
        first_layer_grad.stats_gpu(x3, kernel3, interpret=True, passes=2)
    g, coefficients = jnp.ones((1, 4, 16, 16)), jnp.ones((4, 16))
    with pytest.raises(ValueError, match="at least 16 pooled columns"):
        first_layer_grad.kernel_grad_gpu(
            jnp.ones((1, 8, 32, 2)), kernel, coefficients, g, "avg", True, 1, 8, 4, 3
        )
