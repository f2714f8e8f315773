"""Jacobian determinant against closed forms."""

import numpy as np
import pytest

from dirnet_jax.metrics import (
    dice,
    folded_fraction,
    jacobian_determinant,
    mask_metrics,
    surface_distances,
)


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


def disc(shape, centre, radius):
    g = grid(shape)
    return np.hypot(g[..., 0] - centre[0], g[..., 1] - centre[1]) <= radius


def test_dice_of_known_shapes():
    a = np.zeros((30, 30), bool)
    b = np.zeros((30, 30), bool)
    a[0:10, 0:10] = True
    b[5:15, 0:10] = True  # half of each overlaps: 2·50 / 200
    assert dice(a, b) == 0.5
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_concentric_circles_surface_distance_in_mm():
    # Discs of radius 20 and 26 px at 1.5 mm: the surfaces are 6 px = 9 mm apart
    # (±1 px of rasterisation).
    a, b = disc((80, 80), (40, 40), 20), disc((80, 80), (40, 40), 26)
    m = mask_metrics(a, b, spacing=(1.5, 1.5))
    assert abs(m["mad_mm"] - 9.0) < 1.5 and abs(m["hd95_mm"] - 9.0) < 1.5
    # Anisotropic pixels: a 4-row shift of a disc at 2 mm per row is 8 mm at the poles,
    # the largest surface distance.
    c = disc((80, 80), (44, 40), 20)
    assert surface_distances(a, c, (2.0, 0.5)).max() == pytest.approx(8.0, abs=0.1)
    same = mask_metrics(a, a, spacing=(1.0, 1.0))
    assert same == {"dice": 1.0, "hd95_mm": 0.0, "mad_mm": 0.0}


def test_surface_distance_hand_computed():
    # Two single pixels 3 rows and 4 columns apart at 1 mm: distance 5 both ways.
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1], b[4, 5] = True, True
    np.testing.assert_allclose(surface_distances(a, b, (1.0, 1.0)), [5.0, 5.0])
    np.testing.assert_allclose(surface_distances(a, b, (2.0, 1.0)), [np.hypot(6, 4)] * 2)
    assert np.isnan(mask_metrics(a, np.zeros_like(a), (1.0, 1.0))["hd95_mm"])
