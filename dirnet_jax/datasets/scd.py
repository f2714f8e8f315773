"""Reader of the Sunnybrook Cardiac Data (SCD) release layout.

The layout (as public loaders describe it; the reader is tested on a fake tree built to it):

* ``scd_patientdata.csv``: PatientID, OriginalID, Gender, Age, Pathology (45 rows), e.g.
  ``SCD0000101 → SC-HF-I-1``.
* Images: ``SCD_IMAGES_0{1..5}/<PatientID>/CINESAX_<n>/IM-<series:04d>-<image:04d>.dcm``;
  some patients have several CINESAX folders.
* Contours: ``SCD_ManualContours/<OriginalID, number zero-padded: SC-HF-I-01>/contours-manual/
  IRCCI-expert/IM-0001-<image:04d>-{i,o}contour-manual.txt``, one ``x y`` pair (pixels,
  x = column) per line; ``i`` endocardium, ``o`` epicardium (sometimes missing).
* Image number n is slice (n − 1) // 20, phase (n − 1) % 20.

Choices of this reader: the image series of a patient is the CINESAX folder and series
number that hold the most contoured image numbers (then the most images); of the contoured
phases of a slice, the one with the larger cavity (inner contour) area is ED and the smaller
one ES; a slice is *annotated* when both carry inner and outer contours, and its myocardium is
the outer polygon minus the inner one (pixel centres inside). Images are centre-cropped or
zero-padded to the requested size.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Polygon

PHASES = 20
CONTOUR = re.compile(r"IM-(\d{4})-(\d{4})-([io])contour-manual\.txt$")
IMAGE = re.compile(r"IM-(\d{4})-(\d{4})\.dcm$", re.IGNORECASE)


class SCDError(ValueError):
    """The folder does not hold the SCD layout; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Patient:
    patient_id: str  # SCD0000101
    original_id: str  # SC-HF-I-1
    pathology: str


def read_patients(csv_path: Path) -> list[Patient]:
    if not csv_path.is_file():
        raise SCDError(f"{csv_path} is missing (the SCD patient table)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [
            Patient(r["PatientID"].strip(), r["OriginalID"].strip(), r["Pathology"].strip())
            for r in rows
        ]
    except KeyError as err:
        raise SCDError(f"{csv_path} has no column {err}") from None


def split_patients(patients: list[Patient], seed: int = 0) -> dict[str, list[Patient]]:
    """Train / validation / test by patient, a third each, stratified by pathology."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Patient]] = {"train": [], "validation": [], "test": []}
    names = list(splits)
    by_group = defaultdict(list)
    for p in sorted(patients, key=lambda p: p.patient_id):
        by_group[p.pathology].append(p)
    offset = 0
    for group in sorted(by_group):
        members = by_group[group]
        for k, i in enumerate(rng.permutation(len(members))):
            splits[names[(k + offset) % 3]].append(members[i])
        offset += len(members)
    return splits


def contour_folder(root: Path, original_id: str) -> Path:
    prefix, number = original_id.rsplit("-", 1)
    return (
        root
        / "SCD_ManualContours"
        / f"{prefix}-{int(number):02d}"
        / "contours-manual"
        / "IRCCI-expert"
    )


def read_contours(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """{image number: {'i' or 'o': [K, 2] (x, y) polygon}}."""
    if not folder.is_dir():
        raise SCDError(f"{folder} is missing (expert contours)")
    contours: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    for path in folder.iterdir():
        match = CONTOUR.match(path.name)
        if match:
            points = np.loadtxt(path, ndmin=2)
            contours[int(match.group(2))][match.group(3)] = points[:, :2]
    return dict(contours)


def find_series(root: Path, patient_id: str, wanted: set[int]) -> dict[int, Path]:
    """{image number: DICOM path} of the patient's series that holds the contoured images."""
    folders = sorted(root.glob(f"SCD_IMAGES_0*/{patient_id}/CINESAX_*"))
    if not folders:
        raise SCDError(f"no CINESAX folder for {patient_id} under {root}/SCD_IMAGES_0*")
    candidates = []
    for folder in folders:
        series: dict[str, dict[int, Path]] = defaultdict(dict)
        for path in folder.iterdir():
            match = IMAGE.match(path.name)
            if match:
                series[match.group(1)][int(match.group(2))] = path
        for files in series.values():
            candidates.append((len(wanted & set(files)), len(files), files))
    if not candidates:
        raise SCDError(f"no IM-*.dcm images for {patient_id}")
    return max(candidates, key=lambda c: c[:2])[2]


def fill(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] bool: pixel centres inside an (x, y) polygon."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inside = Polygon(polygon).contains_points(np.stack([cols.ravel(), rows.ravel()], -1))
    return inside.reshape(shape)


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes to size × size."""
    out = np.zeros((*array.shape[:-2], size, size), array.dtype)
    src, dst = [], []
    for n in array.shape[-2:]:
        if n >= size:
            a = (n - size) // 2
            src.append(slice(a, a + size))
            dst.append(slice(0, size))
        else:
            a = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[(..., *dst)] = array[(..., *src)]
    return out


def read_patient(root: Path, patient: Patient, size: int) -> list[dict]:
    """Every slice of one patient: images [20, size, size] uint16, masks, ED/ES, spacing."""
    import SimpleITK as sitk

    contours = read_contours(contour_folder(root, patient.original_id))
    files = find_series(root, patient.patient_id, set(contours))
    slices = max(files) // PHASES
    examples = []
    for s in range(slices):
        numbers = [s * PHASES + p + 1 for p in range(PHASES)]
        if not all(n in files for n in numbers):
            continue
        frames, spacing = [], None
        for n in numbers:
            try:
                image = sitk.ReadImage(str(files[n]))
            except RuntimeError:
                raise SCDError(f"cannot read {files[n]} as DICOM") from None
            frames.append(np.squeeze(sitk.GetArrayFromImage(image)))
            spacing = image.GetSpacing()[1::-1]  # ITK (x, y) → (row, col)
        images = np.stack(frames)
        shape = images.shape[-2:]
        inner = {n - 1 - s * PHASES: contours[n] for n in numbers if "i" in contours.get(n, {})}
        areas = {p: fill(c["i"], shape).sum() for p, c in inner.items()}
        ed = es = -1
        annotated = False
        masks = np.zeros((2, *shape), np.uint8)
        if len(areas) >= 2:
            ed, es = max(areas, key=areas.get), min(areas, key=areas.get)
            if "o" in inner[ed] and "o" in inner[es]:
                annotated = True
                for k, p in enumerate((ed, es)):
                    masks[k] = fill(inner[p]["o"], shape) & ~fill(inner[p]["i"], shape)
        examples.append(
            {
                "images": _fit(np.clip(images, 0, 65535).astype(np.uint16), size),
                "ed_mask": _fit(masks[0], size),
                "es_mask": _fit(masks[1], size),
                "ed_phase": ed,
                "es_phase": es,
                "annotated": annotated,
                "slice": s,
                "spacing": np.asarray(spacing, np.float32),
            }
        )
    return examples
