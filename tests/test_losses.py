"""The loss's terms: NCC against numpy's corrcoef, invariances, flat images, MSE; the
regularizers against closed forms and float64 NumPy, their invariants and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dirnet_jax import DIRNetConfig, Registration
from dirnet_jax.losses import (
    bending_energy,
    diffusion,
    get_loss,
    get_regularizer,
    mse_loss,
    ncc,
    ncc_loss,
    objective,
)


@pytest.mark.parametrize("shape", [(4, 9, 8, 1), (4, 9, 8, 3), (4, 5, 6, 7, 2)])
def test_ncc_matches_corrcoef_per_pair(rng, shape):
    # Over all pixels and channels of each pair, in 2-D and 3-D.
    x = rng.normal(size=shape).astype(np.float32) + 2.0
    noise = np.array([0.1, 1, 3, 10]).reshape(4, *[1] * (len(shape) - 1))
    y = (x + rng.normal(size=x.shape) * noise).astype(np.float32)
    ours = np.asarray(ncc(jnp.asarray(x), jnp.asarray(y)))
    ref = [np.corrcoef(x[b].ravel(), y[b].ravel())[0, 1] for b in range(4)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert len(set(np.round(ours, 3))) == 4  # per pair, not pooled over the batch


def test_ncc_invariances(rng):
    x = jnp.asarray(rng.uniform(size=(3, 10, 10, 1)), jnp.float32)
    np.testing.assert_allclose(ncc(x, x), 1.0, atol=1e-5)
    for a, b in [(2.0, 0.5), (0.1, -3.0), (50.0, 7.0)]:
        np.testing.assert_allclose(ncc(x, a * x + b), 1.0, atol=1e-5)
    np.testing.assert_allclose(ncc(x, -2.0 * x + 1.0), -1.0, atol=1e-5)


@pytest.mark.parametrize("side", [8, 28])
@pytest.mark.parametrize("flat", [0.0, 0.7, 0.3333])
def test_ncc_of_a_flat_image_is_zero(rng, flat, side):
    # Exactly, whatever order XLA sums in: a flat 28² image of 0.7 has a float32 mean 5e-6
    # off, which centring by the mean alone turned into NCC(x, x) = 0.003.
    x = jnp.full((2, side, side, 1), flat, jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, side, side, 1)), jnp.float32)
    for a, b in [(x, y), (y, x), (x, x)]:
        np.testing.assert_array_equal(ncc(a, b), 0.0)
        grads = jax.grad(lambda u, v: ncc_loss(u, v).mean(), argnums=(0, 1))(a, b)
        assert all(np.all(np.isfinite(g)) for g in grads)
        if a is x and b is y:  # nothing in y correlates with a flat image
            np.testing.assert_array_equal(grads[1], 0.0)


def test_ncc_gradient_is_the_centred_formulas(rng):
    # Shifting by the first pixel (held constant) leaves the gradient as it was; checked
    # against finite differences in float64 and against the formula without the shift.
    x, y = (jnp.asarray(rng.normal(size=(2, 6, 5, 1)) + 3.0) for _ in "xy")
    with jax.enable_x64():
        x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
        check_grads(jax.jit(ncc), (x64, y64), order=1, modes=("rev",))

    def unshifted(a, b):
        ac, bc = a - a.mean(keepdims=True), b - b.mean(keepdims=True)
        return (ac * bc).mean() / jnp.sqrt(((ac * ac).mean() + 1e-8) * ((bc * bc).mean() + 1e-8))

    for b in range(2):
        got = jax.grad(lambda u, v: ncc(u, v)[0], argnums=(0, 1))(x[b : b + 1], y[b : b + 1])
        want = jax.grad(unshifted, argnums=(0, 1))(x[b : b + 1], y[b : b + 1])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_mse_hand_computed():
    x = jnp.zeros((2, 2, 2, 1))
    y = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]]).reshape(2, 2, 2, 1)
    np.testing.assert_allclose(mse_loss(x, y), [1.0, 1.0])
    a, b = (np.random.default_rng(seed).normal(size=(3, 4, 5, 2)) for seed in (0, 1))
    want = ((a - b) ** 2).reshape(3, -1).mean(axis=1)  # per pair, over pixels and channels
    np.testing.assert_allclose(mse_loss(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-5)


def test_get_loss():
    assert get_loss("ncc") is ncc_loss
    assert get_loss(mse_loss) is mse_loss
    with pytest.raises(ValueError, match="unknown similarity"):
        get_loss("mutual_information")


# Jitted: one compile each, not one per operation (3-D: 3 s a test against 0.5).
BENDING, DIFFUSION = jax.jit(bending_energy), jax.jit(diffusion)


def grid_points(shape):
    """[*shape, ndim] float64 pixel coordinates."""
    return np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(np.float64)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_bending_energy_of_quadratic_fields_is_the_hessians_norm(rng, shape):
    # Component k = ½ xᵀ Q_k x + b_k · x has second derivatives Q_k everywhere, so its
    # bending energy Σ_a Q_aa² + 2 Σ_{a<b} Q_ab² is ‖Q_k‖²: hand-derived, no differences.
    x, n = grid_points(shape), len(shape)
    fields, energies = [], []
    for _ in range(2):  # two pairs, each its own energy
        comps, energy = [], 0.0
        for _ in range(n):
            a = rng.normal(size=(n, n))
            q = (a + a.T) / 2
            comps.append(0.5 * np.einsum("...i,ij,...j", x, q, x) + x @ rng.normal(size=n))
            energy += (q * q).sum()
        fields.append(np.stack(comps, -1))
        energies.append(energy)
    got = BENDING(jnp.asarray(np.stack(fields), jnp.float32))
    np.testing.assert_allclose(got, energies, rtol=2e-4)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_affine_fields_do_not_bend_and_diffuse_by_their_matrix(rng, shape):
    n = len(shape)
    a, t = rng.normal(size=(n, n)) * 0.3, rng.normal(size=n) * 3
    u = jnp.asarray((grid_points(shape) @ a.T + t)[None], jnp.float32)
    np.testing.assert_allclose(BENDING(u), 0.0, atol=1e-9)
    np.testing.assert_allclose(DIFFUSION(u), (a * a).sum(), rtol=1e-5)
    # Zero or a translation: exactly no penalty.
    for field in (jnp.zeros_like(u), jnp.broadcast_to(jnp.asarray(t, jnp.float32), u.shape)):
        assert float(BENDING(field)[0]) == 0.0 and float(DIFFUSION(field)[0]) == 0.0


@pytest.mark.parametrize("shape", [(6, 8), (4, 5, 6)])
def test_regularizers_match_float64_numpy_per_pair(rng, shape):
    n = len(shape)
    u = rng.normal(size=(3, *shape, n)) * np.array([0.1, 1.0, 10.0]).reshape(3, *[1] * (n + 1))
    positions = tuple(range(1, n + 1))

    def mean_square(d):
        return (d * d).mean(axis=positions).sum(axis=-1)

    bend = sum(mean_square(np.diff(u, n=2, axis=a)) for a in positions)
    bend += sum(2 * mean_square(np.diff(np.diff(u, axis=a), axis=b))
                for a in positions for b in positions if b > a)  # fmt: skip
    grad = sum(mean_square(np.diff(u, axis=a)) for a in positions)
    u32 = jnp.asarray(u, jnp.float32)
    np.testing.assert_allclose(BENDING(u32), bend, rtol=1e-5)
    np.testing.assert_allclose(DIFFUSION(u32), grad, rtol=1e-5)


def test_regularizer_gradients():
    u = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 4, 2)))
    with jax.enable_x64():
        for fn in (bending_energy, diffusion):
            check_grads(jax.jit(lambda v, fn=fn: fn(v).sum()), (u.astype(jnp.float64),), order=1)


@pytest.mark.parametrize(
    "fn,shape,message",
    [
        (bending_energy, (1, 2, 5, 2), "at least 3 pixels along each axis, got shape"),
        (diffusion, (1, 1, 5, 2), "at least 2 pixels along each axis, got shape"),
        (diffusion, (1, 5, 5, 3), "\\[B, \\*spatial, ndim\\]"),
    ],
)
def test_regularizers_refuse_what_is_not_a_field(fn, shape, message):
    with pytest.raises(ValueError, match=message) as err:
        fn(jnp.zeros(shape))
    assert "\n" not in str(err.value)


def test_objective_adds_the_weighted_regularizer(rng):
    fixed, warped = (jnp.asarray(rng.uniform(size=(2, 8, 8, 1)), jnp.float32) for _ in "fw")
    field = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
    reg = Registration(warped, field, jnp.zeros((2, 2, 2, 2)))
    config = DIRNetConfig(image_shape=(8, 8), num_downsamplings=2)
    np.testing.assert_array_equal(objective(config, fixed, reg), ncc_loss(fixed, warped))
    weighted = config.replace(regularizer="diffusion", regularizer_weight=0.5)
    np.testing.assert_allclose(
        objective(weighted, fixed, reg), ncc_loss(fixed, warped) + 0.5 * diffusion(field),
        rtol=1e-6,
    )  # fmt: skip
    assert get_regularizer("bending") is bending_energy
    assert get_regularizer(diffusion) is diffusion
    with pytest.raises(ValueError, match="unknown regularizer 'tv'; choose one of"):
        get_regularizer("tv")
