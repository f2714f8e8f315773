"""The layout of a training work directory, and files written so a kill leaves none half-done.

<workdir>/config.json     the DIRNetConfig, written once
<workdir>/metrics.jsonl   one JSON object per logged step
<workdir>/checkpoints/    orbax CheckpointManager steps
<workdir>/.training.lock  locked while a process trains there (`take`)
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dirnet_jax.config import SCHEDULE_FIELDS, DIRNetConfig

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".training.lock"

# (temporary, final) paths whose renames wait for the innermost `atomic_outputs`.
_pending: contextvars.ContextVar[list[tuple[str, Path]] | None] = contextvars.ContextVar(
    "pending_renames", default=None
)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place, else delete it.

    A kill at any moment leaves either the old file or the new one, never half of one. The
    temporary name ends like `path` (".nii.gz" too), for writers that go by the suffix.
    Inside `atomic_outputs` the rename waits for its end.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a rename would replace /dev/null, say
        raise ValueError(f"{path} exists and is not a regular file: not writing over it")
    suffix = "".join(path.suffixes)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        pending = _pending.get()
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
            tmp = None  # `atomic_outputs` renames or deletes it
    except OSError as err:
        if err.filename is not None and tmp is not None and str(err.filename) != tmp:
            raise
        # A full disk, say, which writers (savefig, np.save) report without a file name;
        # or a fault with the temporary file: name the output instead.
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[None]:
    """The files written by `atomic_output` inside it appear together at its end, or none
    of them: an error inside deletes them all and leaves the old files as they were (one
    pair's warped image and displacement, say). Only a fault between the renames at the
    end, which need no room on the disk, can leave some renamed."""
    pending: list[tuple[str, Path]] = []
    token = _pending.set(pending)
    try:
        yield
        _pending.reset(token)
        token = None
        while pending:
            tmp, path = pending[0]
            try:
                os.replace(tmp, path)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(path)) from err
            pending.pop(0)
    finally:
        if token is not None:
            _pending.reset(token)
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def unused_folders_removed(path: str | os.PathLike) -> Iterator[None]:
    """Remove `path`, and those of its ancestors missing when the block began, if the block
    leaves them empty: a command that stops before writing anything leaves no folders."""
    made, folder = [], Path(path)
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        yield
    finally:
        for folder in made:  # deepest first; one that is not empty keeps those above it
            try:
                folder.rmdir()
            except OSError:
                break


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def claim(workdir: str | os.PathLike, config: DIRNetConfig) -> Path:
    """Create `workdir` for `config`, or check that the run already there used the same one.

    Schedule fields (num_steps, log_every, checkpoint_every) may differ, so a finished run
    can be extended. Returns the work directory as a Path.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG
    mine = config.to_dict()
    if not path.exists():
        atomic_write_text(path, config.to_json() + "\n")
        return workdir
    # A field the stored config lacks is newer than the run, which used its default.
    stored = DIRNetConfig().to_dict() | json.loads(path.read_text())
    diff = {
        k: (stored.get(k), v)
        for k, v in mine.items()
        if k not in SCHEDULE_FIELDS and stored.get(k) != v
    }
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"{workdir} holds a run with another configuration ({shown}); "
            "use a new work directory or the same settings"
        )
    return workdir


def load_config(workdir: str | os.PathLike) -> DIRNetConfig:
    """The DIRNetConfig a work directory was trained with."""
    path = Path(workdir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no {CONFIG}: not a dirnet-jax work directory")
    return DIRNetConfig.from_dict(json.loads(path.read_text()))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every logged metrics record, in order; a last line without its newline, torn by a
    kill or a full disk during its write, is not one. ValueError naming a line that is not
    JSON."""
    path = Path(workdir) / METRICS
    return _records(path, path.read_text()) if path.exists() else []


def _records(path: Path, text: str) -> list[dict[str, Any]]:
    *lines, _torn = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a metrics record ({err})") from None
    return records


def truncate_metrics(workdir: str | os.PathLike, last_step: int) -> None:
    """Drop records after `last_step`, which a resumed run logs again, and a torn last line,
    which the next record would otherwise be appended to."""
    path = Path(workdir) / METRICS
    if not path.exists():
        return
    old = path.read_text()
    text = "".join(json.dumps(r) + "\n" for r in _records(path, old) if r["step"] <= last_step)
    if text != old:
        atomic_write_text(path, text)


def append_metrics(workdir: str | os.PathLike, record: dict[str, Any]) -> None:
    path = Path(workdir) / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk is reported without the file's name
        raise OSError(err.errno, err.strerror, str(path)) from err


def take(workdir: str | os.PathLike) -> IO[str] | None:
    """Lock `workdir` for this process's training: the lock file, open, to close when done
    (the OS also releases it when the process dies); None on a file system without locks.

    Raises:
      ValueError: another process holds it, named by its pid and host.
    """
    lock = open(Path(workdir) / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ValueError(
            f"{workdir} is in use: {holder} is training there; run again when it has "
            "finished, or stop it first"
        ) from None
    except OSError:  # ENOLCK, EOPNOTSUPP: some network file systems
        lock.close()
        return None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock
