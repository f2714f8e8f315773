"""Preparing a TFDS dataset once, when several jobs start together on one data directory."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK = ".prepare.lock"


def build_once(
    make: Callable[[], Any], data_dir: str | os.PathLike, download_config: Any = None
) -> Any:
    """The builder that `make()` returns, its dataset prepared into `data_dir`.

    Preparation holds a lock file in `data_dir`: jobs started together (a SLURM array of
    variants × seeds on a fresh checkout) wait for the first one instead of each building
    the data and all but one failing on TFDS's final rename. A builder made before the
    data was complete does not read it, so the one returned is made afterwards.
    """
    if not make().is_prepared():
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(data_dir) / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            builder = make()
            if not builder.is_prepared():
                builder.download_and_prepare(download_config=download_config)
                return builder
    return make()
