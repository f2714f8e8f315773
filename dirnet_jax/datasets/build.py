"""Preparing a TFDS dataset once, when several jobs start together on one data directory."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

LOCK = ".prepare.lock"
# TFDS warnings that say nothing to our users: every builder but the default ones is made
# from a custom config, and asking whether data is prepared warns of a variant folder with
# no dataset_info.json when the data is not there yet (a fresh data directory, or one
# another job is writing: that job waits for the lock, then reads the finished data).
CUSTOM_CONFIG = "Using custom data configuration"
UNFINISHED = "Variant folder"
# TFDS writes a dataset into `incomplete.<random>_<version>` next to its final folder and
# renames it at the end; a preparation killed on the way (SIGTERM, SIGKILL) leaves it.
INCOMPLETE = "incomplete.*"


class LocalInfo(tfds.core.DatasetInfo):
    """`tfds.core.DatasetInfo` for a dataset prepared here, which TFDS's bucket never holds.

    A builder whose data is not prepared yet asks the bucket (gs://tfds-data) for its info,
    and TFDS 4.9.10 first makes a temporary folder that it never removes: every builder made
    on a fresh data directory left an empty /tmp/tmp…tfds behind (hundreds over a sweep).
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to read: our datasets are not on the bucket (and it is offline here)."""


@contextlib.contextmanager
def _without(*starts: str) -> Iterator[None]:
    """Drop the TFDS (absl) log records whose message starts with one of `starts`."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(starts)

    logger, drop = logging.getLogger("absl"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def look(make: Callable[[], Any]) -> tuple[Any, bool]:
    """(the builder `make()` returns, whether its data is prepared), without TFDS's
    warnings about custom configs and data that is not there yet."""
    with _without(CUSTOM_CONFIG, UNFINISHED):
        builder = make()
        return builder, builder.is_prepared()


def build_once(
    make: Callable[[], Any], data_dir: str | os.PathLike, download_config: Any = None
) -> Any:
    """The builder that `make()` returns, its dataset prepared into `data_dir`.

    Preparation holds a lock file in `data_dir`: jobs started together (a SLURM array of
    variants × seeds on a fresh checkout) wait for the first one instead of each building
    the data and all but one failing on TFDS's final rename. A builder made before the
    data was complete does not read it, so the one returned is made afterwards. Folders
    that a killed preparation left are removed first: under the lock, nothing writes them.
    """
    builder, prepared = look(make)
    if not prepared:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(data_dir) / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            builder, prepared = look(make)  # made now: it sees data another job wrote
            if not prepared:
                remove_unfinished(builder.data_dir)
                builder.download_and_prepare(download_config=download_config)
    return builder


def remove_unfinished(data_dir: str | os.PathLike) -> None:
    """Remove the folders that killed preparations of the dataset whose final
    folder is `data_dir` left next to it; call it only while holding the lock."""
    gone = sorted(p for p in Path(data_dir).parent.glob(INCOMPLETE) if p.is_dir())
    for path in gone:
        logging.getLogger(__name__).warning("Removing %s, left by a preparation cut short", path)
        shutil.rmtree(path)
