"""Reading and writing the images people register: PNG, NumPy, NIfTI and DICOM.

Arrays follow the package convention (axis order row, col = ij; channels last). Geometry
(pixel spacing, origin, direction cosines) follows ITK: in (x, y) = (col, row) order. Files
other than ``.npy`` go through SimpleITK (imported lazily). Every failure is a one-line
``ImageError``; every write goes through a temporary file and a rename.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
from pathlib import Path

import numpy as np

from dirnet_jax.workdir import atomic_output

NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm", ".ima")


class ImageError(ValueError):
    """A file that cannot serve as the image asked for; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """ITK physical geometry, (x, y, …) order; None where a format has none (PNG, .npy)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major ndim × ndim

    def scale_or_axes_differ(self, other: Geometry) -> list[str]:
        """What makes the same pixel grid mean another physical grid in `other`: ["spacing
        (1, 1) against (0.5, 0.7)", "direction (0, 1, 1, 0) against (1, 0, 0, 1)"], either
        or neither; origins (a shift) are left out."""
        out = []
        if not np.allclose(self.spacing, other.spacing, rtol=1e-6, atol=0):
            out.append(f"spacing {_fmt(self.spacing)} against {_fmt(other.spacing)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=1e-6):
            out.append(f"direction {_fmt(self.direction)} against {_fmt(other.direction)}")
        return out


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v + 0.0:g}" for v in values) + ")"  # + 0.0: no "-0"


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    array: np.ndarray  # [*spatial] or [*spatial, C], as stored (any dtype)
    geometry: Geometry | None
    path: Path

    @property
    def kind(self) -> str:
        return file_kind(self.path)


def file_kind(path: str | os.PathLike) -> str:
    name = str(path).lower()
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".png"):
        return "png"
    if name.endswith(NIFTI):
        return "nifti"
    if name.endswith(DICOM) or Path(path).is_dir():
        return "dicom"
    return "other"


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file (or a DICOM series folder); singleton axes are dropped."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} does not exist")
    if file_kind(path) == "npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ImageError(f"{path} is not a readable .npy array: {err}") from None
        if array.dtype.kind not in "biuf":
            raise ImageError(f"{path} holds {array.dtype} values, not numbers")
        return LoadedImage(np.squeeze(array), None, path)

    sitk = _sitk()
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise ImageError(f"{path} is a folder without a DICOM series")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].split("ERROR:")[-1].strip()
        raise ImageError(f"cannot read {path} as an image ({reason})") from None

    array = sitk.GetArrayFromImage(image)  # [z,] y, x[, C]
    dim = image.GetDimension()
    keep = [d for d, n in enumerate(image.GetSize()) if n > 1]  # ITK axes (x, y, z)
    if len(keep) < dim and keep:
        drop = tuple(dim - 1 - d for d in range(dim) if d not in keep)  # numpy axes
        array = np.squeeze(array, axis=drop)
    if file_kind(path) == "png":  # PNG stores no geometry: don't invent one
        return LoadedImage(array, None, path)
    direction = np.array(image.GetDirection()).reshape(dim, dim)[np.ix_(keep, keep)]
    geometry = Geometry(
        spacing=tuple(image.GetSpacing()[d] for d in keep),
        origin=tuple(image.GetOrigin()[d] for d in keep),
        direction=tuple(direction.ravel().tolist()),
    )
    return LoadedImage(array, geometry, path)


def _to_sitk(array: np.ndarray, geometry: Geometry | None, vector: bool = False):
    sitk = _sitk()
    image = sitk.GetImageFromArray(array, isVector=vector)
    if geometry is not None:
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    return image


def output_suffix(like: LoadedImage) -> str:
    """Write what resembles the input: PNG → .png, .npy → .npy, NIfTI/DICOM → .nii.gz."""
    return {"png": ".png", "npy": ".npy"}.get(like.kind, ".nii.gz")


def _write_checked(image, tmp: Path) -> None:
    """SimpleITK's WriteImage, its failures as OSError, then a check: on a full disk its
    NIfTI writer cuts the file short and says nothing (a .nii.gz without its end, which ITK
    reads back zero-filled)."""
    sitk = _sitk()
    try:
        sitk.WriteImage(image, str(tmp))
    except RuntimeError as err:  # ITK's: "… Reason: No space left on device"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        last = lines[-1] if lines else "SimpleITK's writer failed"
        reason = next((line[8:] for line in lines if line.startswith("Reason: ")), last)
        raise OSError(errno.EIO, reason[:200], str(tmp)) from None
    try:
        if tmp.name.endswith(".gz"):
            with gzip.open(tmp) as f:
                while f.read(1 << 20):
                    pass
        same = np.array_equal(
            sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp))),
            sitk.GetArrayViewFromImage(image),
            equal_nan=True,
        )
    except (OSError, EOFError, RuntimeError):
        same = False
    if not same:
        raise OSError(errno.EIO, "the file written reads back otherwise (a full disk?)", str(tmp))


def write_image(path: str | os.PathLike, array: np.ndarray, like: LoadedImage) -> Path:
    """Write `array` ([*spatial]) beside `like`'s format and geometry; returns the path.

    The suffix is replaced by `output_suffix(like)`. PNG output is clipped and cast to the
    input's integer type.
    """
    path = Path(path)
    path = path.with_name(path.name.split(".")[0] + output_suffix(like))
    with atomic_output(path) as tmp:
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, array)
        else:
            if path.suffix == ".png":
                info = np.iinfo(like.array.dtype if like.array.dtype.kind in "iu" else np.uint8)
                array = np.clip(np.rint(array), info.min, info.max).astype(info.dtype)
            _write_checked(_to_sitk(array, like.geometry), tmp)
    return path


def write_displacement(
    path: str | os.PathLike, displacement: np.ndarray, like: LoadedImage
) -> Path:
    """Write a [*spatial, ndim] field (pixels, row/col order).

    With geometry (NIfTI, DICOM input) as an ITK displacement field in NIfTI: physical
    units, (x, y) components, usable by ``SimpleITK.DisplacementFieldTransform``. Without
    (PNG, .npy input) as ``.npy`` in pixels, (row, col) components.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    if like.geometry is None:
        return write_image(path, displacement, dataclasses.replace(like, path=Path("x.npy")))
    ndim = displacement.shape[-1]
    index_xy = displacement[..., ::-1]  # (col, row, …) = ITK index order
    direction = np.array(like.geometry.direction).reshape(ndim, ndim)
    physical = (index_xy * np.array(like.geometry.spacing)) @ direction.T
    path = path.with_name(stem + ".nii.gz")
    with atomic_output(path) as tmp:
        image = _to_sitk(physical.astype(np.float64), like.geometry, vector=True)
        _write_checked(image, tmp)
    return path
