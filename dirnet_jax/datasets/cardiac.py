"""Cardiac cine MRI as TFDS datasets: the synthetic cohort, and the Sunnybrook Cardiac Data.

Both builders write the same features, one example per short-axis slice: ``images``
[phases, size, size] uint16, ``ed_mask`` / ``es_mask`` [size, size] uint8 (myocardium),
``ed_phase`` / ``es_phase``, ``annotated`` (both masks present), ``patient``, ``slice`` and
``spacing`` (mm, row/col). Splits train / validation / test are by patient.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dirnet_jax.datasets import phantom, scd
from dirnet_jax.datasets.build import LocalInfo, build_once, look

ZLIB = tfds.features.Encoding.ZLIB


def _features(phases: int, size: int) -> tfds.features.FeaturesDict:
    def scalar(dtype):
        return tfds.features.Tensor(shape=(), dtype=dtype)

    return tfds.features.FeaturesDict(
        {
            "images": tfds.features.Tensor(
                shape=(phases, size, size), dtype=np.uint16, encoding=ZLIB
            ),
            "ed_mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=ZLIB),
            "es_mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=ZLIB),
            "ed_phase": scalar(np.int32),
            "es_phase": scalar(np.int32),
            "annotated": scalar(np.bool_),
            "patient": scalar(np.int32),
            "slice": scalar(np.int32),
            "spacing": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }
    )


@dataclasses.dataclass(eq=False)
class PhantomConfig(tfds.core.BuilderConfig):
    spec: phantom.CohortSpec = dataclasses.field(default_factory=phantom.CohortSpec)


class CardiacPhantom(tfds.core.GeneratorBasedBuilder):
    """The synthetic cine-MRI cohort of dirnet_jax.datasets.phantom (45 patients 15/15/15)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [PhantomConfig(name="default", description="45 patients, 8 slices, 256²")]  # noqa: RUF012

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        return LocalInfo(
            builder=self,
            description=phantom.__doc__,
            features=_features(spec.phases, spec.size),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        spec = self.builder_config.spec
        return {
            split: self._generate_examples(patients)
            for split, patients in phantom.split_patients(spec.num_patients).items()
        }

    def _generate_examples(self, patients):
        for p in patients:
            yield from phantom.slice_examples(self.builder_config.spec, p)


@dataclasses.dataclass(eq=False)
class SunnybrookConfig(tfds.core.BuilderConfig):
    size: int = 256
    split_seed: int = 0


class Sunnybrook(tfds.core.GeneratorBasedBuilder):
    """The Sunnybrook Cardiac Data (Radau et al. 2009), read from a manual download."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SunnybrookConfig(name="default", description="256×256, 15/15/15 patients")]  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The Sunnybrook Cardiac Data needs a (free) registration, so it cannot ship. Download the
images (SCD_IMAGES_01 … 05), the expert contours (SCD_ManualContours) and
scd_patientdata.csv from the Cardiac Atlas Project, extract everything into one folder and
pass that folder as --scd_dir (the TFDS manual_dir)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalInfo(
            builder=self,
            description=scd.__doc__,
            features=_features(scd.PHASES, self.builder_config.size),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        patients = scd.read_patients(root / "scd_patientdata.csv")
        splits = scd.split_patients(patients, self.builder_config.split_seed)
        index = {
            p.patient_id: i for i, p in enumerate(sorted(patients, key=lambda p: p.patient_id))
        }
        return {
            split: self._generate_examples(root, [(index[p.patient_id], p) for p in members])
            for split, members in splits.items()
        }

    def _generate_examples(self, root, patients):
        for number, patient in patients:
            for example in scd.read_patient(root, patient, self.builder_config.size):
                yield f"{patient.patient_id}_{example['slice']:02d}", example | {"patient": number}


def builder(
    data_dir: str | os.PathLike,
    *,
    scd_dir: str | os.PathLike | None = None,
    spec: phantom.CohortSpec | None = None,
    size: int = 256,
) -> tfds.core.DatasetBuilder:
    """The SCD builder when `scd_dir` is given, else the phantom's; prepared on first use."""
    data_dir = os.fspath(data_dir)
    if scd_dir is not None:
        config = "default" if size == 256 else SunnybrookConfig(name=f"size{size}", size=size)

        def make() -> Sunnybrook:
            return Sunnybrook(config=config, data_dir=data_dir, file_format="array_record")

        if not look(make)[1]:  # not prepared yet: the folder must hold the download
            if not Path(scd_dir).is_dir():
                raise FileNotFoundError(f"--scd_dir {scd_dir} is not a folder")
            if not any(Path(scd_dir).iterdir()):  # TFDS would raise its AssertionError
                how = " ".join(Sunnybrook.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
                raise FileNotFoundError(f"--scd_dir {scd_dir} is empty. {how}")
        manual = tfds.download.DownloadConfig(manual_dir=os.fspath(scd_dir))
        return build_once(make, data_dir, manual)
    spec = spec or phantom.CohortSpec()
    # The registered config is the default cohort's; a custom one may not reuse its name.
    config = "default" if spec.name == "default" else PhantomConfig(name=spec.name, spec=spec)
    return build_once(
        lambda: CardiacPhantom(config=config, data_dir=data_dir, file_format="array_record"),
        data_dir,
    )


def load(b: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Every example of a split, stacked: images [S, T, H, W] uint16, masks [S, H, W], …"""
    source = b.as_data_source(split=split)
    items = source.__getitems__(range(len(source)))
    if not items:
        return {}
    dtypes = b.info.features.np_dtype  # scalars come back as Python ints and bools
    return {
        key: np.stack([np.asarray(item[key], dtypes[key]) for item in items]) for key in items[0]
    }
