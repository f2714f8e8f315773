"""orbax's error reports out of band: held while it works on a checkpoint folder, dropped
when that work fails.

orbax 0.12.8 runs a checkpoint's reads and writes as asyncio tasks on TensorStore futures,
and closes its event loop as soon as one fails. What was still in flight then reports on
its own, at any later moment, each with a traceback: TensorStore's callbacks into the
closed loop and orbax's coroutines re-raising the GeneratorExit that collects them
(`sys.unraisablehook`), futures whose errors nobody retrieved (asyncio's log), and orbax's
background threads (its absl log). A damaged checkpoint printed 13 to ~800 such lines, a
full disk ~740, around the one line that says what happened.

While a folder is held, the reports that name it wait, and so do those that cannot name
one: orbax's own error logs, asyncio's, an event loop closed, orbax's coroutines collected
or never awaited. `end` prints them as they were; `drop` discards them and every later one,
for the caller raises the failure in one line. Process-wide by nature: the hooks
(sys.unraisablehook, warnings.showwarning, filters on the absl and asyncio loggers) are
installed once, at the first `hold`, and pass everything else through.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable

_held: dict[str, list[Callable[[], None]]] = {}  # folder → its reports' deferred prints
_failed: set[str] = set()
_lock = threading.RLock()  # reports come from other threads, and from GC within ours


def _key(folder: object) -> str:
    return str(folder).rstrip("/")


def _names(text: str, key: str) -> bool:
    """Whether `text` names the folder `key` or a file in it (…/300, …/300/d, …/300.tmp;
    not …/3000)."""
    return re.search(re.escape(key) + r"(?!\w)", text) is not None


def _caught(text: str, anonymous: bool, emit: Callable[[], None]) -> bool:
    """Drop or hold a report (True), or leave it alone (False). An `anonymous` one cannot
    name its folder: it goes with any."""
    with _lock:
        if any(_names(text, key) for key in _failed) or (anonymous and _failed):
            return True
        for key, held in _held.items():
            if anonymous or _names(text, key):
                held.append(emit)
                return True
    return False


def _in_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


@functools.cache
def _install() -> None:
    previous_hook, previous_show = sys.unraisablehook, warnings.showwarning

    def unraisable(u) -> None:
        closed_loop = (
            u.object is None
            and isinstance(u.exc_value, RuntimeError)
            and str(u.exc_value) == "Event loop is closed"
        )
        # orbax's coroutines collected at exit fail in ways that name no folder either
        orbax_coroutine = inspect.iscoroutine(u.object) and _in_orbax(u.object.cr_code.co_filename)
        emit = functools.partial(previous_hook, u)
        if not _caught(str(u.exc_value), closed_loop or orbax_coroutine, emit):
            emit()

    def log_filter(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or getattr(record, "released", False):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        # orbax's own errors, and asyncio's futures never retrieved, may name no folder
        # ("[Errno 28] No space left on device" from a Python write)
        anonymous = record.name == "asyncio" or _in_orbax(record.pathname)
        logger = logging.getLogger(record.name)

        def emit() -> None:
            record.released = True
            logger.handle(record)

        return not _caught(f"{record.getMessage()} {exc}", anonymous, emit)

    def show(message, category, *args, **kwargs) -> None:
        # the coroutines orbax abandoned before they started, collected
        never_awaited = category is RuntimeWarning and str(message).endswith("never awaited")
        emit = functools.partial(previous_show, message, category, *args, **kwargs)
        if not _caught(str(message), never_awaited, emit):
            emit()

    sys.unraisablehook, warnings.showwarning = unraisable, show
    for name in ("absl", "asyncio"):  # orbax logs through absl
        logging.getLogger(name).addFilter(log_filter)


def hold(folder: object) -> None:
    """Hold the reports that name `folder` (a path) until `end` or `drop`."""
    _install()
    with _lock:
        _held.setdefault(_key(folder), [])


def end(folder: object) -> None:
    """`folder`'s work succeeded: print what it reported, as it was, and stop holding."""
    with _lock:
        held = _held.pop(_key(folder), [])
    for emit in held:
        emit()


def drop(folder: object) -> None:
    """`folder`'s work failed: discard its reports, now and for the rest of the process."""
    with _lock:
        _failed.add(_key(folder))
        _held.pop(_key(folder), None)
