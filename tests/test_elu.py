"""ELU and its expm1: against float64 NumPy, flax's ELU and its gradients, per backend."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dirnet_jax.elu import _expm1_reduced, elu, elu_unguarded

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, -1e-7, -17.4, -87.5, -88.0, -100.0, 88.8, 1e4]
# elu's expm1 is ours on the CPU (within 1 ulp); other backends keep XLA's
ELU_ULPS = 1.0 if jax.default_backend() == "cpu" else 4.0


def ulps_from_exact(got, x, exact):
    """|got − exact(x)| in units of the float32 spacing at exact(x), exact in float64."""
    want = exact(x.astype(np.float64))
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(np.asarray(got, np.float64) - want) / spacing


def elu64(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def test_expm1_is_within_one_ulp_on_the_negative_axis(rng):
    x = np.concatenate(
        [
            np.linspace(-100, 0, 1_000_001, dtype=np.float32),  # every reduction interval
            -np.logspace(-37, 2, 20_000).astype(np.float32),  # tiny values keep their digits
            rng.normal(0, 5, 10_000).astype(np.float32) * -np.sign(rng.normal(size=10_000)),
            np.float32(SPECIAL),
        ]
    )
    x = np.minimum(x, 0)
    err = ulps_from_exact(jax.jit(_expm1_reduced)(x), x, np.expm1)
    assert err.max() <= 1.0, (err.max(), x[err.argmax()])
    assert _expm1_reduced(np.float32(-1e-30)) == np.float32(-1e-30)
    assert _expm1_reduced(np.float32(-100.0)) == -1.0
    assert _expm1_reduced(np.float32(5.0)) == 0.0  # the documented domain: x ≤ 0


def test_elu_has_flax_elu_values_to_float32_rounding(rng):
    x = np.concatenate([rng.normal(0, 3, 10_000), SPECIAL, [np.inf, -np.inf]]).astype(np.float32)
    got = jax.jit(elu)(x)
    finite = np.isfinite(x)
    assert ulps_from_exact(got[finite], x[finite], elu64).max() <= ELU_ULPS
    assert got[x == np.inf] == np.inf and got[x == -np.inf] == -1.0
    np.testing.assert_allclose(got, nn.elu(x), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(jax.jit(elu_unguarded)(x), got)  # bit for bit, no inf/NaN
    bf16 = elu(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(np.float32), got, rtol=1e-2, atol=1e-2)


def test_elu_has_flax_elu_gradients(rng):
    x = np.concatenate([rng.normal(0, 3, 1000), SPECIAL, [-np.inf]]).astype(np.float32)
    grad = jax.jit(jax.grad(lambda v: elu(v).sum()))(x)
    want = jax.grad(lambda v: nn.elu(v).sum())(x)
    assert np.all(np.isfinite(grad))
    assert grad[x == 0].tolist() == [1.0, 1.0]  # as flax: x = 0 belongs to the linear side
    # exp(x) as expm1(x) + 1, as flax's: both lose digits where exp(x) is small
    exact = np.where(x > 0, 1.0, np.exp(np.minimum(x, 0).astype(np.float64)))
    np.testing.assert_allclose(grad, exact, rtol=0, atol=ELU_ULPS * 2**-23)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=2**-23)
    away_from_zero = rng.normal(0, 2, 50) + np.where(rng.normal(size=50) > 0, 0.5, -0.5)
    check_grads(jax.jit(elu), (away_from_zero,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("platform,has,lacks", [
    ("cpu", "round_nearest_even", "exponential_minus_one"),
    ("cuda", "exponential_minus_one", "round_nearest_even"),
])  # fmt: skip
def test_only_the_cpu_computes_its_own_expm1(platform, has, lacks):
    for fn in (elu, elu_unguarded, jax.grad(lambda v: elu(v).sum())):
        spec = jax.ShapeDtypeStruct((4, 3), jnp.float32)
        text = jax.export.export(jax.jit(fn), platforms=[platform])(spec).mlir_module()
        assert has in text and lacks not in text
