"""Jacobian determinant against closed forms."""

import numpy as np

from dirnet_jax.metrics import folded_fraction, jacobian_determinant


def grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)


def test_affine_field_has_constant_determinant():
    a = np.array([[0.2, -0.3], [0.1, 0.05]])
    u = (grid((7, 6)) @ a.T)[None]
    np.testing.assert_allclose(jacobian_determinant(u), np.linalg.det(np.eye(2) + a))
    a3 = np.array([[0.1, 0.0, 0.2], [0.0, -0.2, 0.0], [0.3, 0.0, 0.1]])
    u3 = (grid((5, 4, 6)) @ a3.T)[None]
    np.testing.assert_allclose(jacobian_determinant(u3), np.linalg.det(np.eye(3) + a3))


def test_quadratic_field_hand_computed():
    # u = (0.1·r², 0) → J = [[1 + 0.2 r, 0], [0, 1]]: det = 1 + 0.2 r (exact for central
    # differences of a quadratic in the interior).
    x = grid((8, 5))
    u = np.stack([0.1 * x[..., 0] ** 2, 0 * x[..., 0]], -1)[None]
    np.testing.assert_allclose(jacobian_determinant(u)[0, 1:-1], 1 + 0.2 * x[1:-1, :, 0])


def test_folded_fraction():
    u = np.zeros((2, 10, 10, 2))
    u[1, ..., 0] = -2.0 * grid((10, 10))[..., 0]  # x ↦ −x along rows: folded everywhere
    np.testing.assert_allclose(folded_fraction(u), [0.0, 1.0])
