"""One pair through `register` against its A/B twins, interleaved: what the Triton first
layer, the 128² layer's Triton kernel (float32 and bfloat16), the CUDA-graph option and
folding BatchNorm once (`registrar`) buy where single-process rows disagree.

    python -m benchmarks.one_pair                   # 256², 20 rounds of 50 calls each
    python -m benchmarks.one_pair --size=28 --rounds=3 --calls=5 --out=FILE.json

A single 256² pair takes ~0.3 ms on an H200, mostly launches and host work, and the table
of benchmarks.core timed the same call at 0.27 ms in one process and 0.38 ms in another.
Here every implementation is compiled first, then each round calls each one `--calls`
times in turn, so that drift of the machine hits all alike. Prints each one's median over
all calls, the spread of its round medians, and its median over `register`'s.
"""

from __future__ import annotations

import json
import statistics
import sys

import jax
import jax.numpy as jnp

from benchmarks import core
from dirnet_jax import init_variables, layers, machine
from dirnet_jax.models import register, registrar
from dirnet_jax.workdir import atomic_write_text

FLAGS = {"size": "256", "rounds": "20", "calls": "50", "out": ""}


def parse(argv: list[str]) -> dict[str, str]:
    opts = core.parse_options(argv, FLAGS, __doc__)
    if opts["size"] not in ("256", "28") or not all(
        opts[k].isdigit() and int(opts[k]) > 0 for k in ("rounds", "calls")
    ):
        sys.exit("error: --size is 256 or 28; --rounds and --calls are positive integers")
    return opts


def main(argv: list[str]) -> None:
    opts = parse(argv)
    out = core.output_path(opts["out"], "one_pair")
    size, rounds, calls = int(opts["size"]), int(opts["rounds"]), int(opts["calls"])
    base = core.base_config(size)
    fixed, moving = (jnp.asarray(a[:1]) for a in core.timed_pairs(size, 1))
    variables = init_variables(base, jax.random.key(0))
    # Each twin compiles under its swaps (`core.swapped`: name → value), traced anew; the
    # compiled program then keeps what it traced.
    # bfloat16 twice: whether its 128² layer's kernel (the default since run 9, for batch
    # 512) leaves one pair no slower than cuDNN's.
    bf16 = base.replace(compute_dtype="bfloat16")
    twins = {
        "register": (register, {}, base),
        "XLA's first layer": (register, {"fused_first_layer": core.xla_first_layer}, base),
        "cuDNN's 128² layer": (register, {"pooled_conv": layers.xla_pooled_conv}, base),
        "CUDA graphs from 5 kernels": (core.register_default_graphs, {}, base),
        "bfloat16": (register, {}, bf16),
        "bfloat16, cuDNN's 128² layer": (register, {"INFER_POOLED_DTYPES": ("float32",)}, bf16),
    }
    fns = {}
    for name, (fn, swaps, config) in twins.items():
        with core.swapped_all(swaps), core.fresh_traces():
            compiled = fn.lower(config, variables, fixed, moving).compile()
        fns[name] = lambda compiled=compiled: compiled(variables, fixed, moving)
    bound = registrar(base, variables)  # BatchNorm folded once, not per call
    fns["registrar (folded once)"] = lambda: bound(fixed, moving)
    times = core.interleaved(fns, rounds, calls=calls)  # each called once before the rounds
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    print(f"one {size}² pair, {rounds} rounds × {calls} calls each, interleaved, on {device}")
    rows = []
    mine = statistics.median(t for r in times["register"] for t in r)
    for name, per_round in times.items():
        median = statistics.median(t for r in per_round for t in r)
        round_medians = [statistics.median(r) for r in per_round]
        rows.append(dict(impl=name, median_ms=median * 1e3,
                         round_min_ms=min(round_medians) * 1e3,
                         round_max_ms=max(round_medians) * 1e3))  # fmt: skip
        spread = f"{min(round_medians) * 1e3:.3f}–{max(round_medians) * 1e3:.3f}"
        print(f"{name:28} {median * 1e3:7.3f} ms  rounds {spread} ms  {median / mine:5.2f}×")
    print("×: this row's median over register's (above 1: register is faster)")
    record = {"machine": machine.describe(), "size": size, "rounds": rounds, "calls": calls}
    atomic_write_text(out, json.dumps({**record, "rows": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
