"""Speed of the core: training steps and one-pass registration, per variant and image size.

    make bench            # or: python -m benchmarks.core [--quick]

Prints a table (medians over repeats, after warm-up, device work synchronised) and writes it
with the machine description to benchmarks/results/core-<host>.json. Never fails on time.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dirnet_jax import DIRNetConfig, init_variables, machine, variant
from dirnet_jax.models import register
from dirnet_jax.train import create_train_state, train_step


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of `repeats` further calls), seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def bench_config(name: str, config: DIRNetConfig, batch: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    shape = (batch, *config.image_shape, 1)
    fixed = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    moving = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    rows = []

    def add(what: str, fn, count: int, unit: str) -> None:
        first, sec = timed(fn, repeats)
        rows.append(
            dict(variant=name, size=config.image_shape[0], what=what, median_ms=sec * 1e3,
                 per_sec=count / sec, unit=unit, first_call_s=first)
        )  # fmt: skip

    variables = init_variables(config, jax.random.key(0))
    for b in sorted({1, batch}):
        add(f"register, batch {b}", lambda b=b: register(config, variables, fixed[:b], moving[:b]),
            b, "pairs/s")  # fmt: skip

    state = [create_train_state(config)]  # train_step donates its state
    batch_pairs = {"fixed": fixed, "moving": moving}

    def step():
        state[0], metrics = train_step(state[0], batch_pairs)
        return metrics["loss"]

    add(f"train step, batch {batch}", step, 1, "steps/s")
    return rows


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    mnist = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2)
    cases = [
        (name, variant(name, mnist), 32, 5 if quick else 20)
        for name in (["baseline"] if quick else ["baseline", "A1", "A2", "B1", "B2", "C1", "C2"])
    ]
    cases.append(("baseline", DIRNetConfig(), 32, 2 if quick else 5))
    rows = []
    for name, config, batch, repeats in cases:
        rows += bench_config(name, config, batch, repeats)

    header = (
        f"{'variant':9} {'size':>4}  {'measure':22} {'median':>10} {'rate':>16} {'1st call':>9}"
    )
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:9} {r['size']:>4}  {r['what']:22} {r['median_ms']:8.2f}ms "
            f"{r['per_sec']:9.1f} {r['unit']:>7}  {r['first_call_s']:7.2f}s"
        )

    out = Path(__file__).parent / "results" / f"core-{socket.gethostname()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
