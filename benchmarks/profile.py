"""Where the time of one DIRNet call goes: its top operations, from a jax.profiler trace.

    python -m benchmarks.profile                                 # register, 256², batch 1
    python -m benchmarks.profile --what=train --size=28 --batch=32
    python -m benchmarks.profile --variant=C1 --calls=50 --top=40
    python -m benchmarks.profile --hlo=register.hlo.txt       # and the compiled program
    python -m benchmarks.profile --what=train --batch=32 --swap=TRAIN_FIRST_LAYER_PASSES=1
    ncu … python -m benchmarks.profile --batch=512 --calls=0   # for Nsight Compute

Runs the call a few times to warm up, traces `--calls` more, and prints, for each process
of the trace (the host; on a GPU also the device), the operations with the largest time
per call: XLA fusions, convolutions and library calls, named as in the compiled HLO
(`--hlo=FILE` writes `jax.jit(...).lower(...).compile().as_text()`, which says what each
fusion holds). `--swap=NAME=VALUE` profiles with the switch NAME (of `dirnet_jax.layers`
or `dirnet_jax.models`) set to the Python literal VALUE (one choice, as benchmarks.core's
A/B rows swap it). On XLA:CPU, convolutions run on a thread pool: their events time the
launch, not the work. `--calls=0` runs the warm-up calls alone, untraced: the workload for
a profiler outside (Nsight Compute, `benchmarks/gpu.sh ncu`), which cannot share the GPU's
counters with JAX's.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import gzip
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import core
from benchmarks.core import base_config
from dirnet_jax import DIRNetConfig, init_variables, variant
from dirnet_jax.models import register
from dirnet_jax.train import create_train_state, data_key, train_steps
from dirnet_jax.workdir import atomic_write_text

WARMUPS = 3
FLAGS = {"what": "register", "size": "256", "batch": "1", "variant": "baseline",
         "calls": "20", "top": "25", "hlo": "", "swap": ""}  # fmt: skip


def parse(argv: list[str]) -> dict[str, str]:
    opts = core.parse_options(argv, FLAGS, __doc__)
    if opts["what"] not in ("register", "train"):
        sys.exit(f"error: --what is register or train, not {opts['what']!r}")
    for key in ("size", "batch", "calls", "top"):
        if not opts[key].isdigit() or (key != "calls" and int(opts[key]) == 0):
            sys.exit(f"error: --{key} is a whole number{'' if key == 'calls' else ' > 0'}, "
                     f"not {opts[key]!r}")  # fmt: skip
    if opts["swap"]:
        swap_of(opts["swap"])  # checked before any work
    return opts


def config_of(opts: dict[str, str]) -> DIRNetConfig:
    """--variant's network at --size and --batch, or a one-line exit (an unknown variant,
    a size the network's poolings do not divide)."""
    try:
        base = base_config(int(opts["size"])).replace(batch_size=int(opts["batch"]))
        return variant(opts["variant"], base)
    except ValueError as err:
        sys.exit(f"error: {err}")


def swap_of(value: str) -> dict:
    """--swap's NAME=VALUE as {NAME: VALUE} for `core.swapped_all`, or a one-line exit."""
    name, _, literal = value.partition("=")
    try:
        core.home(name)
    except ValueError as err:
        sys.exit(f"error: --swap: {err}")
    try:
        return {name: ast.literal_eval(literal)}
    except (ValueError, SyntaxError):
        sys.exit(f"error: --swap: {literal!r} is not a Python literal")


def workload(what: str, config: DIRNetConfig, batch: int):
    """(a no-argument function running one call and waiting for it, one returning the
    call's compiled program as text)."""
    rng = np.random.default_rng(0)
    shape = (batch, *config.image_shape, 1)
    fixed = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    moving = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    if what == "register":
        variables = init_variables(config, jax.random.key(0))
        args = (config, variables, fixed, moving)
        return (
            lambda: jax.block_until_ready(register(*args)),
            lambda: register.lower(*args).compile().as_text(),
        )
    state, key = [create_train_state(config)], data_key(config)
    kwargs = dict(steps=1, batch_size=batch, grouped=False)

    def step():
        state[0], losses = train_steps(state[0], fixed, key, **kwargs)
        return jax.block_until_ready(losses)

    return step, lambda: train_steps.lower(state[0], fixed, key, **kwargs).compile().as_text()


def op_times(trace_dir: Path) -> dict[str, collections.Counter]:
    """{process name: Counter(event name → total µs)} of a perfetto trace."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("$"):  # "$": Python frames
            totals[names.get(e["pid"], str(e["pid"]))][e["name"]] += e.get("dur", 0)
    return totals


def main(argv: list[str]) -> None:
    opts = parse(argv)
    size, batch, calls = int(opts["size"]), int(opts["batch"]), int(opts["calls"])
    config = config_of(opts)
    swap = swap_of(opts["swap"]) if opts["swap"] else {}
    with core.swapped_all(swap), contextlib.ExitStack() as stack:
        if swap:
            stack.enter_context(core.fresh_traces())
        run, program = workload(opts["what"], config, batch)
        for _ in range(WARMUPS):
            run()
        if opts["hlo"]:
            atomic_write_text(Path(opts["hlo"]), program())
        if not calls:
            print(f"{opts['what']} {opts['variant']} {size}², batch {batch}: {WARMUPS} calls, "
                  "untraced")  # fmt: skip
            return
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp, create_perfetto_trace=True)
            for _ in range(calls):
                run()
            jax.profiler.stop_trace()
            totals = op_times(Path(tmp))
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    swapped = "".join(f" with {name}={value!r}" for name, value in swap.items())
    print(f"{opts['what']} {opts['variant']}{swapped} {size}², batch {batch}, {calls} calls on "
          f"{device}")  # fmt: skip
    for process, ops in sorted(totals.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"\n{process}: µs per call")
        for name, us in ops.most_common(int(opts["top"])):
            print(f"{us / calls:10.1f}  {name[:100]}")


if __name__ == "__main__":
    main(sys.argv[1:])
