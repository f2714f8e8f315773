"""A synthetic cine-MRI cohort: short-axis slices through a beating left ventricle.

Written for this project (no phantom package offered cine short-axis images with myocardium
masks at ED and ES; ``mrphantom`` renders a slime-like 3D+t object through a C++ backend).
Everything is NumPy and deterministic from ``(seed, patient)``.

Per patient: a left ventricle whose cavity, wall thickness, shape (low-order Fourier
harmonics of the radius), position and twist are drawn at random, tapering from base to
apex; per slice 20 phases of one cardiac cycle, with end-diastole (ED) at phase 0 and
end-systole (ES) at the phase of greatest contraction. From ED to ES the cavity shrinks
(ejection fraction ~50–65 %, counting 15–22 % longitudinal shortening), the epicardium
moves in by 5–12 % so the wall thickens, the shape changes non-rigidly and the ventricle
rotates by 2–7° (opposite at base and apex) and shifts a little. Around it: papillary
muscles, a right-ventricular crescent, a torso with subcutaneous fat, lungs, spine and
aorta that only breathe (±1.5 mm). Blood is bright and myocardium dark (bSSFP-like); edges
carry partial-volume blending, a smooth multiplicative bias field multiplies the image, and
Rician noise is added. Distances are in mm; images are 256×256 at 1.28 mm by default,
stored as uint16 (×1000).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    num_patients: int = 45
    slices: int = 8
    phases: int = 20
    size: int = 256
    spacing_mm: float = 1.28
    seed: int = 0

    @property
    def name(self) -> str:
        """The dataset config name: "default" for the paper cohort, else the settings."""
        if self == CohortSpec():
            return "default"
        return f"p{self.num_patients}_s{self.slices}_t{self.phases}_{self.size}_seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Heart:
    """One patient's anatomy and motion (mm and radians)."""

    centre: np.ndarray  # [2] LV centre (row, col), mm from the image centre
    r_endo: float  # ED endocardial radius at the base
    wall: float  # ED wall thickness at the base
    contraction: float  # ES/ED endocardial radius ratio (in-slice)
    epi_contraction: float  # ES/ED epicardial radius ratio
    harmonics_ed: np.ndarray  # [K, 2] (amplitude, phase) of radius harmonics k = 2 …
    harmonics_es: np.ndarray
    twist: float  # ES rotation at the base (apex: opposite sign)
    shift_es: np.ndarray  # [2] ES translation, mm
    t_es: float  # ES as a fraction of the cycle
    papillary: np.ndarray  # [2] angles of the papillary muscles
    rv_angle: float  # direction of the right ventricle
    rv_size: float  # RV cavity half-width, mm
    body: np.ndarray  # [2] torso semi-axes, mm
    breathing: float  # breathing amplitude, mm
    intensities: dict
    noise: float  # Rician sigma, relative to blood
    bias: np.ndarray  # [3] bias-field coefficients
    ejection_fraction: float


def draw_heart(rng: np.random.Generator) -> Heart:
    ef = rng.uniform(0.50, 0.65)
    longitudinal = rng.uniform(0.78, 0.85)  # ES/ED long-axis length
    harmonics_ed = np.stack([rng.uniform(0.015, 0.04, 2), rng.uniform(0, 2 * np.pi, 2)], -1)
    harmonics_es = harmonics_ed.copy()
    harmonics_es[:, 0] = harmonics_ed[:, 0] * rng.uniform(0.7, 1.4, 2)
    harmonics_es[:, 1] = harmonics_ed[:, 1] + rng.normal(0, 0.3, 2)
    return Heart(
        centre=rng.uniform(-12, 12, 2),
        r_endo=rng.uniform(21, 27),
        wall=rng.uniform(7, 10),
        contraction=float(np.sqrt((1 - ef) / longitudinal)),
        epi_contraction=rng.uniform(0.88, 0.95),
        harmonics_ed=harmonics_ed,
        harmonics_es=harmonics_es,
        twist=np.deg2rad(rng.uniform(2, 7)) * rng.choice([-1, 1]),
        shift_es=rng.uniform(-2.0, 2.0, 2),
        t_es=rng.uniform(0.30, 0.40),
        papillary=np.deg2rad(np.array([40.0, 140.0]) + rng.uniform(-15, 15, 2)),
        rv_angle=np.pi + rng.uniform(-0.3, 0.3),  # image left
        rv_size=rng.uniform(28, 38),
        body=np.array([rng.uniform(110, 125), rng.uniform(140, 158)]),
        breathing=rng.uniform(0.5, 1.5),
        intensities={
            "blood": rng.uniform(0.85, 1.0),
            "myocardium": rng.uniform(0.22, 0.32),
            "muscle": rng.uniform(0.28, 0.38),
            "fat": rng.uniform(0.75, 0.9),
            "lung": rng.uniform(0.02, 0.06),
            "liver": rng.uniform(0.38, 0.48),
            "bone": rng.uniform(0.15, 0.25),
        },
        noise=rng.uniform(0.02, 0.04),
        bias=rng.uniform(-0.25, 0.25, 3),
        ejection_fraction=ef,
    )


def contraction_curve(t: float, t_es: float) -> float:
    """0 at ED (t = 0), 1 at ES (t = t_es), back to 0 at the end of the cycle."""
    if t <= t_es:
        return 0.5 * (1 - np.cos(np.pi * t / t_es))
    return 0.5 * (1 + np.cos(np.pi * (t - t_es) / (1 - t_es)))


def _soft(distance_inside: np.ndarray, pixel: float) -> np.ndarray:
    """Partial-volume coverage from a signed distance (mm, > 0 inside)."""
    return np.clip(0.5 + distance_inside / pixel, 0.0, 1.0)


def render(
    heart: Heart, z: float, t: float, size: int, spacing: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One slice at height z (0 base … 1 apex) and cycle time t.

    Returns (image [size, size] float, myocardium coverage [size, size] in [0, 1]).
    """
    f = contraction_curve(t, heart.t_es)
    axis = (np.arange(size) - (size - 1) / 2) * spacing
    rows, cols = np.meshgrid(axis, axis, indexing="ij")
    breath = heart.breathing * np.sin(2 * np.pi * t)
    rows_b = rows - breath  # surroundings move with breathing only

    taper = 1 - 0.55 * z**1.5
    r_endo_ed = heart.r_endo * taper
    wall_ed = heart.wall * (1 - 0.2 * z)
    r_endo = r_endo_ed * (1 + f * (heart.contraction - 1))
    wall = (r_endo_ed + wall_ed) * (1 + f * (heart.epi_contraction - 1)) - r_endo
    centre = heart.centre + f * heart.shift_es + np.array([breath, 0.0])
    twist = f * heart.twist * (1 - 2 * z)
    harmonics = (1 - f) * heart.harmonics_ed + f * heart.harmonics_es

    dr, dc = rows - centre[0], cols - centre[1]
    r = np.hypot(dr, dc)
    theta = np.arctan2(dr, dc) - twist
    shape = 1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(harmonics))
    endo, epi = r_endo * shape, (r_endo + wall) * shape
    ink = heart.intensities

    # Surroundings: torso with subcutaneous fat, lungs, liver, spine and aorta.
    image = np.zeros((size, size))

    def paint(coverage, value):
        nonlocal image
        image = image * (1 - coverage) + value * coverage

    def ellipse(cr, cc, ar, ac):
        d = np.hypot((rows_b - cr) / ar, (cols - cc) / ac)
        return _soft((1 - d) * min(ar, ac), spacing)

    a_r, a_c = heart.body
    paint(ellipse(0, 0, a_r, a_c), ink["fat"])
    paint(ellipse(0, 0, a_r - 9, a_c - 9), ink["muscle"])
    paint(ellipse(-10, -70, 65, 42), ink["lung"])
    paint(ellipse(-10, 72, 60, 40), ink["lung"])
    paint(ellipse(55, 55, 45, 55), ink["liver"])
    paint(ellipse(85, 0, 16, 18), ink["bone"])
    paint(ellipse(60, 22, 11, 11), ink["blood"])  # descending aorta

    # Heart: pericardial fat, RV crescent, LV wall, cavity, papillary muscles.
    paint(_soft(epi + 4 - r, spacing), ink["fat"])
    rv_centre = centre + (r_endo_ed + heart.wall) * 0.9 * np.array(
        [np.sin(heart.rv_angle), np.cos(heart.rv_angle)]
    )
    rv_scale = 1 - 0.25 * f
    d_rv = np.hypot(
        (rows - rv_centre[0]) / (heart.rv_size * 1.25 * rv_scale * taper),
        (cols - rv_centre[1]) / (heart.rv_size * 0.75 * rv_scale * taper),
    )
    rv_wall = _soft((1 - d_rv) * heart.rv_size * 0.75 * taper + 3, spacing)
    paint(rv_wall, ink["myocardium"])
    paint(_soft((1 - d_rv) * heart.rv_size * 0.75 * taper, spacing) * (r > epi + 2), ink["blood"])
    myocardium = _soft(epi - r, spacing) * _soft(r - endo, spacing)
    paint(_soft(epi - r, spacing), ink["myocardium"])
    paint(_soft(endo - r, spacing), ink["blood"])
    for angle in heart.papillary:
        pos = centre + 0.72 * np.array([np.sin(angle + twist), np.cos(angle + twist)]) * endo.mean()
        pap = _soft((3.0 + 1.0 * f) * taper - np.hypot(rows - pos[0], cols - pos[1]), spacing)
        paint(pap * _soft(endo - r, spacing), ink["myocardium"])

    # Acquisition: smooth bias field, Rician noise.
    u, v = rows / axis[-1], cols / axis[-1]
    bias = np.exp(heart.bias[0] * u + heart.bias[1] * v + heart.bias[2] * (u**2 + v**2))
    image = image * bias
    sigma = heart.noise * ink["blood"]
    noisy = np.hypot(
        image + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape)
    )
    return noisy, myocardium


def es_phase(heart: Heart, phases: int) -> int:
    return int(np.argmax([contraction_curve(p / phases, heart.t_es) for p in range(phases)]))


def generate_patient(spec: CohortSpec, patient: int) -> dict[str, np.ndarray]:
    """Every slice of one patient.

    Returns images [S, T, H, W] uint16, ed_mask / es_mask [S, H, W] uint8 (myocardium),
    ed_phase / es_phase ints and the patient's drawn ejection fraction.
    """
    rng = np.random.default_rng([spec.seed, patient])
    heart = draw_heart(rng)
    es = es_phase(heart, spec.phases)
    images = np.zeros((spec.slices, spec.phases, spec.size, spec.size), np.uint16)
    masks = np.zeros((2, spec.slices, spec.size, spec.size), np.uint8)
    # Physical slice spacing ~10 mm: slices cover the LV from base (z = 0.05) to near apex.
    zs = np.linspace(0.05, 0.85, spec.slices)
    for s, z in enumerate(zs):
        for p in range(spec.phases):
            image, myo = render(heart, z, p / spec.phases, spec.size, spec.spacing_mm, rng)
            images[s, p] = np.clip(np.rint(image * 1000), 0, 4095).astype(np.uint16)
            if p in (0, es):
                masks[int(p == es), s] = myo >= 0.5
    return {
        "images": images,
        "ed_mask": masks[0],
        "es_mask": masks[1],
        "ed_phase": 0,
        "es_phase": es,
        "ejection_fraction": heart.ejection_fraction,
    }


def split_patients(num_patients: int) -> dict[str, range]:
    """Patients of each split: the last two thirds are validation and test, a third each."""
    third = num_patients // 3
    return {
        "train": range(0, num_patients - 2 * third),
        "validation": range(num_patients - 2 * third, num_patients - third),
        "test": range(num_patients - third, num_patients),
    }


def slice_examples(spec: CohortSpec, patient: int) -> Iterator[tuple[str, dict]]:
    """(key, example) per slice of one patient, in the cardiac datasets' feature layout."""
    data = generate_patient(spec, patient)
    for s in range(spec.slices):
        yield (
            f"{patient:03d}_{s:02d}",
            {
                "images": data["images"][s],
                "ed_mask": data["ed_mask"][s],
                "es_mask": data["es_mask"][s],
                "ed_phase": np.int32(data["ed_phase"]),
                "es_phase": np.int32(data["es_phase"]),
                "annotated": np.bool_(True),
                "patient": np.int32(patient),
                "slice": np.int32(s),
                "spacing": np.full(2, spec.spacing_mm, np.float32),
            },
        )


def _patient_examples(spec: CohortSpec, patient: int) -> list[dict]:
    return [example for _, example in slice_examples(spec, patient)]


def load_split(spec: CohortSpec, split: str, workers: int | None = None) -> dict[str, np.ndarray]:
    """A split generated in memory, stacked like ``cardiac.load`` returns it from TFDS:
    images [S, T, H, W] uint16, masks [S, H, W] uint8, per-slice scalars [S], spacing [S, 2].

    Patients are drawn in `workers` processes (default: one per CPU); for machines without
    tensorflow-datasets, at the cost of generating the cohort on every run (~1.7 s per
    patient and core at 256²).
    """
    patients = split_patients(spec.num_patients)[split]
    if workers == 1 or len(patients) <= 1:
        per_patient = [_patient_examples(spec, p) for p in patients]
    else:
        # spawn, not fork: the caller may already run JAX's threads.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            per_patient = list(pool.map(_patient_examples, [spec] * len(patients), patients))
    items = [example for examples in per_patient for example in examples]
    if not items:
        return {}
    return {key: np.stack([item[key] for item in items]) for key in items[0]}
