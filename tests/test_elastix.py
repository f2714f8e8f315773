"""The SimpleElastix baseline wrapper."""

import os

import numpy as np
import pytest

pytest.importorskip("SimpleITK")
from dirnet_jax import elastix
from dirnet_jax.losses import ncc
from dirnet_jax.toy import shifted_blobs


def test_parameters_follow_the_protocol():
    p = elastix.bspline_parameters(4, resolutions=2, iterations=100)
    assert p["Transform"] == ("BSplineTransform",)
    assert p["Metric"] == ("AdvancedNormalizedCorrelation",)
    assert float(p["FinalGridSpacingInPhysicalUnits"][0]) == 4.0
    assert p["NumberOfResolutions"] == ("2",)
    assert p["MaximumNumberOfIterations"] == ("100",)
    assert p["FixedImagePyramidSchedule"] == ("2", "2", "1", "1")


def test_register_pair_aligns_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed, moving = shifted_blobs(0, 2, max_shift=3)[..., 0]
    labels = (moving > 0.5).astype(np.uint8)
    result = elastix.register_pair(
        fixed, moving, elastix.bspline_parameters(4), moving_labels=labels
    )
    before = float(ncc(fixed[None, ..., None], moving[None, ..., None])[0])
    after = float(ncc(fixed[None, ..., None], result.warped[None, ..., None])[0])
    assert after > before + 0.05 and after > 0.95
    assert result.labels.dtype == np.uint8 and set(np.unique(result.labels)) <= {0, 1}
    assert result.seconds > 0
    assert os.listdir(tmp_path) == []


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        elastix.register_pair(np.zeros((8, 8)), np.zeros((8, 9)), elastix.bspline_parameters(4))


def test_displacement_is_in_pixels_and_axis_order_as_dirnet_s():
    # Moving = fixed moved down 2 rows: warped(x) = moving(x + u) = fixed(x) needs u = (2, 0)
    # px, whatever the pixel size (transformix gives x-y ordered millimetres).
    fixed = shifted_blobs(0, 1, shape=(32, 32), max_shift=0)[0, ..., 0]
    moving = np.roll(fixed, 2, axis=0)
    for spacing, grid_mm in ((None, 4.0), ((2.0, 0.5), 8.0)):
        result = elastix.register_pair(
            fixed, moving, elastix.bspline_parameters(grid_mm), spacing=spacing
        )
        assert result.displacement.shape == (32, 32, 2)
        blobs = fixed > 0.3
        np.testing.assert_allclose(np.median(result.displacement[blobs], axis=0), [2, 0], atol=0.05)
