"""The conventional baseline: B-spline registration with SimpleElastix, one pair at a time.

Needs the ``SimpleITK`` module of PyPI's ``simpleitk-simpleelastix`` (imported lazily, so the
core package runs where it is absent). Elastix writes into its output directory; every call
gets a fresh temporary one, so nothing lands in the working directory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ImportError(
            "SimpleElastix is missing: install simpleitk-simpleelastix (make install does)"
        ) from None
    if not hasattr(sitk, "ElastixImageFilter"):
        raise ImportError(
            "this SimpleITK has no elastix: install simpleitk-simpleelastix instead of simpleitk"
        )
    return sitk


def bspline_parameters(
    grid_spacing: float, resolutions: int = 2, iterations: int = 100, ndim: int = 2
) -> dict[str, tuple[str, ...]]:
    """Elastix parameters: B-spline with `grid_spacing` px final control-point spacing,
    `resolutions` pyramid levels (each halving the resolution), `iterations` per level,
    normalized correlation, and linear interpolation of the result (as DIRNet's resampler).
    """
    sitk = _sitk()
    params = dict(sitk.GetDefaultParameterMap("bspline", resolutions, float(grid_spacing)))
    params = {k: tuple(v) for k, v in params.items()}
    for key in ("Metric0Weight", "Metric1Weight"):
        params.pop(key, None)
    # Each level halves the resolution of the next: "2 2 1 1" for two levels in 2D.
    schedule = tuple(
        str(2 ** (resolutions - 1 - r)) for r in range(resolutions) for _ in range(ndim)
    )
    params.update(
        Registration=("MultiResolutionRegistration",),
        Metric=("AdvancedNormalizedCorrelation",),
        MaximumNumberOfIterations=(str(iterations),),
        FixedImagePyramidSchedule=schedule,
        MovingImagePyramidSchedule=schedule,
        FinalBSplineInterpolationOrder=("1",),
        WriteResultImage=("false",),
        RandomSeed=("121",),
    )
    return params


@contextlib.contextmanager
def _native_stdout_silenced():
    """Elastix prints "Writing image ..." from C++ whatever its logging settings say."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class ElastixResult(NamedTuple):
    warped: np.ndarray  # [*spatial] float32 moving image in the fixed frame
    labels: np.ndarray | None  # [*spatial] moving labels warped by nearest neighbour
    seconds: float  # wall time of the registration (not of the label warp or the field)
    # [*spatial, ndim] float32: in pixels, components in axis order, warped(x) =
    # moving(x + u(x)), as DIRNet's (transformix's field is x-y ordered, in mm)
    displacement: np.ndarray


def register_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    parameters: dict[str, Any],
    moving_labels: np.ndarray | None = None,
    spacing: tuple[float, ...] | None = None,
) -> ElastixResult:
    """Register one pair of [*spatial] images with elastix.

    `moving_labels` ([*spatial] integer mask), if given, is warped with the same transform
    by nearest neighbour. `spacing` (pixel size, axis order) defaults to 1; grid spacing in
    `parameters` is in the same physical units.
    """
    sitk = _sitk()
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} differ in shape")

    def image(a, dtype=np.float32):
        img = sitk.GetImageFromArray(np.asarray(a, dtype))
        if spacing is not None:
            img.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # ITK order is x, y
        return img

    with tempfile.TemporaryDirectory(prefix="elastix-") as tmp:
        elx = sitk.ElastixImageFilter()
        elx.LogToConsoleOff()
        elx.LogToFileOff()
        elx.SetOutputDirectory(tmp)
        elx.SetFixedImage(image(fixed))
        elx.SetMovingImage(image(moving))
        elx.SetParameterMap(sitk.ParameterMap(parameters))
        start = time.perf_counter()
        with _native_stdout_silenced():
            elx.Execute()
        seconds = time.perf_counter() - start
        warped = sitk.GetArrayFromImage(elx.GetResultImage()).astype(np.float32)
        transform = elx.GetTransformParameterMap()[0]

        def transformix(moving_image, field=False):
            trx = sitk.TransformixImageFilter()
            trx.LogToConsoleOff()
            trx.SetOutputDirectory(tmp)
            trx.SetTransformParameterMap(transform)
            trx.SetMovingImage(moving_image)
            if field:
                trx.ComputeDeformationFieldOn()
            with _native_stdout_silenced():
                trx.Execute()
            return trx

        field = sitk.GetArrayFromImage(transformix(image(moving), True).GetDeformationField())
        pixel = np.ones(fixed.ndim) if spacing is None else np.asarray(spacing, np.float64)
        displacement = (field[..., ::-1] / pixel).astype(np.float32)
        labels = None
        if moving_labels is not None:
            transform["FinalBSplineInterpolationOrder"] = ("0",)
            warped_labels = sitk.GetArrayFromImage(
                transformix(image(moving_labels)).GetResultImage()
            )
            labels = np.rint(warped_labels).astype(np.asarray(moving_labels).dtype)
    return ElastixResult(warped, labels, seconds, displacement)
