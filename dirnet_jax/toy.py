"""Toy registration data: one blob pattern, randomly shifted and stretched per image."""

from __future__ import annotations

import numpy as np


def shifted_blobs(
    seed: int,
    n: int,
    shape: tuple[int, ...] = (28, 28),
    max_shift: float = 3.0,
    sigma: float = 3.0,
) -> np.ndarray:
    """[n, *shape, 1] float32 images in [0, 1]: three Gaussian blobs in a fixed layout.

    Each image moves the whole layout by a random shift of up to `max_shift` pixels per axis
    and each blob by a further third of that, so pairs differ by a smooth, non-rigid motion.
    """
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    size = np.array(shape, dtype=np.float64)
    centres = size * np.array([[0.35] * ndim, [0.65] * ndim, [0.35] + [0.65] * (ndim - 1)])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    images = np.zeros((n, *shape), np.float64)
    for k in range(n):
        shift = rng.uniform(-max_shift, max_shift, ndim)
        for c in centres:
            c = c + shift + rng.uniform(-max_shift, max_shift, ndim) / 3
            images[k] += np.exp(-((grid - c) ** 2).sum(-1) / (2 * sigma**2))
    return (np.clip(images, 0, 1)[..., None]).astype(np.float32)
