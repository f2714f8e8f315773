"""One job over several processes (hosts, after `jax.distributed.initialize`): who does what.

Training runs on every process alike (`train.fit`: each device computes its slice of
every batch). Everything else an experiment does (preparing data, evaluating, elastix,
writing results) is done once, by process 0, while the others wait for it and learn its
outcome. The waiting goes through JAX's coordination service (a key-value store), not
through device collectives, and lasts as long as process 0 works; an error there is
raised on every process, so the whole job stops with the same one-line message instead
of hanging. With one process (the usual case) every function here is trivial.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

T = TypeVar("T")

# How long the other processes wait for process 0: days, so that a long elastix row or
# evaluation does not end a job (JAX's own shutdown barrier waits only 5 minutes).
WAIT_MS = 7 * 24 * 3600 * 1000


# Times each name was used in this process: every process makes the same calls in the same
# order, so name and count make the same key everywhere, and a name may recur (two runs).
_uses: collections.Counter[str] = collections.Counter()


class PrimaryFailed(RuntimeError):
    """Raised on the other processes when process 0 failed: its message."""


def is_primary() -> bool:
    """Whether this process does the job's single-process work (it is process 0)."""
    return jax.process_index() == 0


def on_primary(fn: Callable[[], T], name: str, *, share: bool = False) -> T | None:
    """Run fn() on process 0 only; every other process waits until it has finished.

    Args:
      fn: the work, called with no arguments.
      name: what is done, e.g. "digit 3 evaluated" (with a count, the key the others
        wait on).
      share: send fn()'s result, which must then be JSON-serialisable, to every process.

    Returns:
      fn()'s result on process 0; on the others that result with `share`, else None.

    Raises:
      Whatever fn raised, on process 0; PrimaryFailed with its message on the others.
    """
    if jax.process_count() == 1:
        return fn()
    client = ocp.multihost.get_jax_distributed_client()
    key = f"dirnet_jax/{name}/{_uses[name]}"
    _uses[name] += 1
    if is_primary():
        try:
            result = fn()
        except Exception as err:
            client.key_value_set(key, json.dumps({"error": str(err)}))
            raise
        client.key_value_set(key, json.dumps({"result": result if share else None}))
        return result
    outcome = json.loads(client.blocking_key_value_get(key, WAIT_MS))
    if "error" in outcome:
        raise PrimaryFailed(f"process 0 failed: {outcome['error']}")
    return outcome["result"]


def primary_first(fn: Callable[[], T], name: str) -> T:
    """fn() on process 0, then on the others: for steps that write once (preparing a
    dataset, claiming a work directory) and that every process then reads."""
    result = on_primary(fn, name)
    return result if is_primary() else fn()


def local_copy(tree: Any) -> Any:
    """Replicated arrays of a multi-process job → copies on this process's first device,
    so that it can run computations alone (evaluation); unchanged with one process."""
    if jax.process_count() == 1:
        return tree
    host = jax.tree.map(np.asarray, tree)  # each process holds a full replica
    return jax.device_put(host, jax.local_devices()[0])


def _distributed() -> bool:
    try:
        ocp.multihost.get_jax_distributed_client()
    except ValueError:
        return False
    return True


# Ids of JAX's preemption sync points: one per `stop_requests` question in this process,
# counting on from loop to loop, so that a SIGTERM that came between two loops (while
# process 0 evaluated, say) stops the next one at its start.
_sync_ids = itertools.count()


class Terminated(BaseException):
    """SIGTERM (a cluster's time limit, scancel) inside `sigterm_raises`."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated inside the block, as SIGINT raises KeyboardInterrupt, so
    that `finally` clauses run (temporary files are removed) and the command can say what
    it kept. Not where Python cannot catch it: outside the main thread, where the process
    ignores SIGTERM, in a `jax.distributed` job (JAX's preemption service has it).
    `stop_requests` inside the block takes it over while training."""

    def stop(signum, frame):
        raise Terminated

    current = signal.getsignal(signal.SIGTERM)
    if (
        threading.current_thread() is not threading.main_thread()
        or current in (None, signal.SIG_IGN)
        or _distributed()
    ):
        yield
        return
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, current)


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], int | None]]:
    """Catch requests to stop while a loop runs; the loop asks before each iteration.

    Yields ``requested()``: the number of the signal that asks to stop, or None. Every
    process must ask as often as the others.

    In a `jax.distributed` job JAX's preemption service catches SIGTERM on any process
    and agrees with the others on a question at which all of them stop (JAX's
    `reached_preemption_sync_point`); SIGINT there ends the processes as usual. With one
    process SIGTERM and SIGINT are caught here (in the main thread), and a second one of
    the same kind acts at once, as it would without this. A signal the process ignores
    stays ignored: a shell starts a background job (``cmd &`` in a script, no job
    control) with SIGINT ignored, so that a Ctrl-C meant for the script spares it.
    """
    if _distributed():
        yield lambda: signal.SIGTERM if ocp.multihost.reached_preemption(next(_sync_ids)) else None
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # Python runs signal handlers in the main thread only
        return

    caught: list[int] = []

    def handler(signum, frame):
        signal.signal(signum, previous[signum])  # a second one acts at once
        caught.append(signum)

    # A handler that C code installed (getsignal: None) cannot be put back: leave it.
    ours = (signal.SIGTERM, signal.SIGINT)
    kinds = [s for s in ours if signal.getsignal(s) not in (None, signal.SIG_IGN)]
    previous = {s: signal.signal(s, handler) for s in kinds}
    try:
        yield lambda: caught[0] if caught else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
