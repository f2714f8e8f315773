"""A tiny Sunnybrook Cardiac Data tree in the release layout, for tests."""

import numpy as np

PATIENTS = [  # PatientID, OriginalID, Gender, Age, Pathology: three groups, two each
    ("SCD0000101", "SC-HF-I-1", "Male", 53, "Heart failure with infarct"),
    ("SCD0000201", "SC-HF-I-2", "Male", 48, "Heart failure with infarct"),
    ("SCD0000501", "SC-HF-NI-3", "Female", 60, "Heart failure without infarct"),
    ("SCD0000601", "SC-HF-NI-4", "Male", 62, "Heart failure without infarct"),
    ("SCD0004001", "SC-N-2", "Female", 40, "Normal"),
    ("SCD0004101", "SC-N-3", "Male", 45, "Normal"),
]
SIZE, SLICES = 48, 2
ED, ES = 7, 13  # contoured phases: ED is not the first frame, so frame order cannot decide


def circle(radius, centre=(SIZE / 2, SIZE / 2), n=64):
    """[n, 2] (x, y) polygon."""
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[1] + radius * np.cos(angle), centre[0] + radius * np.sin(angle)], -1)


def contour_dir(root, original):
    # Written from the release layout, not imported from scd.py: the test checks the reader.
    prefix, number = original.rsplit("-", 1)
    return (
        root
        / "SCD_ManualContours"
        / f"{prefix}-{int(number):02d}"
        / "contours-manual"
        / "IRCCI-expert"
    )


def write_tree(root, frames=None):
    """Write the tree under `root`.

    Slice 0 has inner and outer contours at ED (cavity radius 12) and ES (radius 8); slice
    1 lacks the ES outer contour, so it is not annotated. `frames(patient, n)` gives the
    [SIZE, SIZE] int16 image number n (default: noise).
    """
    import SimpleITK as sitk

    root.mkdir(parents=True, exist_ok=True)
    lines = ["PatientID,OriginalID,Gender,Age,Pathology"]
    lines += [",".join(map(str, p)) for p in PATIENTS]
    (root / "scd_patientdata.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    for k, (pid, original, *_rest) in enumerate(PATIENTS):
        folder = root / f"SCD_IMAGES_0{1 + k % 5}" / pid
        series, decoy = folder / "CINESAX_300", folder / "CINESAX_2"  # decoy: fewer, no contours
        for d in (series, decoy):
            d.mkdir(parents=True)
        for n in range(1, SLICES * 20 + 1):
            frame = frames(k, n) if frames else (rng.random((SIZE, SIZE)) * 1000).astype(np.int16)
            image = sitk.GetImageFromArray(frame)
            image.SetSpacing((1.25, 1.25))
            sitk.WriteImage(image, str(series / f"IM-0004-{n:04d}.dcm"))
        for n in range(1, 6):
            blank = sitk.GetImageFromArray(np.zeros((SIZE, SIZE), np.int16))
            sitk.WriteImage(blank, str(decoy / f"IM-0001-{n:04d}.dcm"))
        contours = contour_dir(root, original)
        contours.mkdir(parents=True)
        for s in range(SLICES):
            for phase, inner in ((ED, 12), (ES, 8)):
                n = s * 20 + phase + 1
                name = f"IM-0001-{n:04d}-{{}}contour-manual.txt"
                np.savetxt(contours / name.format("i"), circle(inner), fmt="%.2f")
                if s == 0 or phase == ED:
                    np.savetxt(contours / name.format("o"), circle(inner + 5), fmt="%.2f")
