"""XLA's persistent compilation cache for the commands: a rerun loads the programs an earlier
run compiled instead of compiling them again (registering one MNIST pair with
`dirnet-register`: 4.5 s → 2.1 s on the 2-core CPU, most of the rest is imports)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax
from absl import flags

MAX_BYTES = 2**30  # least recently used programs go first beyond this


def default_folder() -> str:
    """$XDG_CACHE_HOME/dirnet-jax/xla (~/.cache/dirnet-jax/xla)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "dirnet-jax" / "xla")


def define_flag() -> None:
    flags.DEFINE_string(
        "compilation_cache",
        default_folder(),
        "Folder keeping compiled XLA programs between runs ('' for none; "
        "JAX_COMPILATION_CACHE_DIR, if set, is used instead).",
    )


def use(folder: str | None) -> None:
    """Keep every compiled program in `folder` (ours compile in 0.01–5 s each, and the
    many small ones add up), up to MAX_BYTES (unbounded without the filelock package).
    '' or None: no cache. JAX_COMPILATION_CACHE_DIR, when set, wins: JAX then uses it with
    its own settings. A folder that cannot be made or written is left out with one
    warning line (JAX would warn at every program it compiles)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {folder}")
    except OSError as err:
        print(f"warning: no compilation cache ({err}); every program compiles", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if importlib.util.find_spec("filelock"):  # JAX evicts under its lock (installed with us)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
