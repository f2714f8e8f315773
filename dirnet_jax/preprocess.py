"""Intensity and resolution preprocessing shared by training, experiments and registration."""

from __future__ import annotations

import numpy as np


def minmax(images: np.ndarray, ndim: int = 2) -> np.ndarray:
    """Rescale each image (the last `ndim` axes) to [0, 1]; constant images become zeros.

    This is what a DIRNet sees, in training and in registration alike.
    """
    images = np.asarray(images, np.float32)
    axes = tuple(range(images.ndim - ndim, images.ndim))
    lo = images.min(axis=axes, keepdims=True)
    span = images.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (images - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def downsample(images: np.ndarray, factor: int, ndim: int = 2) -> np.ndarray:
    """Average `factor`^ndim blocks of the last `ndim` axes (sizes must divide)."""
    if factor == 1:
        return np.asarray(images)
    shape = images.shape[-ndim:]
    if any(s % factor for s in shape):
        raise ValueError(f"image size {shape} is not divisible by {factor}")
    lead = images.shape[:-ndim]
    split = [d for s in shape for d in (s // factor, factor)]
    blocks = np.asarray(images, np.float32).reshape(*lead, *split)
    return blocks.mean(axis=tuple(len(lead) + 2 * k + 1 for k in range(ndim)))


def downsample_mask(masks: np.ndarray, factor: int, ndim: int = 2) -> np.ndarray:
    """A binary mask at 1/factor resolution: blocks at least half inside."""
    return (downsample(np.asarray(masks, np.float32), factor, ndim) >= 0.5).astype(np.uint8)
