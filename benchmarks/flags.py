"""The issue's three speed targets under several sets of XLA flags, one process per set.

    python -m benchmarks.flags                       # the built-in sets for this backend
    python -m benchmarks.flags --size=28 "--xla_gpu_enable_command_buffer=" "--xla_a=1 --xla_b=2"

Measures, baseline network, float32: one pair, a large batch (512 on an accelerator, 32 on
a CPU) and training at batch 32 as `fit` runs it (20 steps per dispatch on an accelerator,
4 on a CPU). XLA reads XLA_FLAGS once per process, so every set runs in a fresh child
process (the set appended to any XLA_FLAGS already given); the default set runs first,
and again last to show how much the machine drifted. Ratios are to the first default. A
set XLA refuses (an unknown flag aborts the process) is reported as such and the others
go on; so is a set cut short by the time budget (`--seconds`, for all sets together: the
table is printed whatever happens).
Writes the sets and their rows to benchmarks/results/flags-<host>.json after each set.
Never fails on time.

Options: --size=256|28 (default 256), --seconds=N for all sets (default 600),
--min_seconds=S each measure repeats for (default 1), --out=FILE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import usage_if_asked

# What might change a launch-bound single pair, a memory-bound batch or a training step on
# a GPU (defaults of jax 0.11's XLA: CUDA graphs for fusions, cuBLAS, cuDNN and custom
# calls, from 5 operations up; no runtime fusion).
# Those not yet measured first (an H200 run's budget ended before them). `register` now
# compiles with graphs from one operation (models.INFER_COMPILER_OPTIONS), so that set is
# for training; benchmarks.core's `baseline-graphs5` row times `register` without it.
GPU_SETS = {
    "CUDA graphs off": "--xla_gpu_enable_command_buffer=",
    "no Triton matrix products": "--xla_gpu_enable_triton_gemm=false",
    "cuDNN runtime fusion (conv + bias + ELU)": "--xla_gpu_use_runtime_fusion=true",
    "CUDA graphs also around loops": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    "CUDA graphs from one operation": "--xla_gpu_graph_min_graph_size=1",
}
CPU_SETS = {"fast math": "--xla_cpu_enable_fast_math=true"}
OPTIONS = {"size": "256", "seconds": "600", "min_seconds": "1", "out": "", "child": ""}
MEASURES = ("one pair", "batch", "train")


def parse(argv: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(options, {name: flags} given on the command line)."""
    usage_if_asked(argv, __doc__)
    opts, sets = dict(OPTIONS), {}
    for arg in argv:
        if arg.startswith("--xla_"):
            sets[arg] = arg
            continue
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in opts or not value:
            known = " ".join(f"--{k}=" for k in OPTIONS if k != "child")
            sys.exit(f"error: bad argument {arg!r}; known: {known} and --xla_… flag sets")
        opts[key] = value
    if opts["size"] not in ("256", "28"):
        sys.exit(f"error: --size is 256 or 28, not {opts['size']!r}")
    for key in ("seconds", "min_seconds"):  # as core.check_seconds, without importing jax here
        try:
            if not float(opts[key]) > 0:  # NaN too
                raise ValueError
        except ValueError:
            sys.exit(f"error: --{key} is a positive number of seconds, not {opts[key]!r}")
    return opts, sets


def measure(size: int, min_seconds: float) -> dict:
    """This process's rows: {'machine', 'xla_flags', 'rows'} (rows as benchmarks.core's)."""
    import jax

    from benchmarks import core
    from dirnet_jax import machine
    from dirnet_jax.train import default_steps_per_dispatch

    core.MIN_SECONDS = min_seconds
    on_accelerator = jax.default_backend() != "cpu"
    big = 512 if on_accelerator else 32
    config = core.base_config(size)
    pairs = core.timed_pairs(size, big)
    table = core.Table()
    core.bench_register(table, "baseline", config, pairs, (1, big), repeats=5)
    pool = jax.numpy.asarray(pairs[0][:32])
    core.bench_train_steps(table, "baseline", config, pool, default_steps_per_dispatch(), 5)
    return {"machine": machine.describe(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "rows": table.rows}  # fmt: skip


def run_set(flags: str, opts: dict[str, str], seconds: float) -> dict:
    """Measure in a child process with `flags` appended to XLA_FLAGS: its rows, or an
    'error' saying why there are none."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks.flags", f"--child={out}",
               f"--size={opts['size']}", f"--min_seconds={opts['min_seconds']}"]  # fmt: skip
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds)
        except subprocess.TimeoutExpired:
            return {"error": f"cut short: the time budget ran out after {seconds:.0f} s"}
        if done.returncode != 0 or not out.exists():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            last = lines[-1].split("] ", 1)[-1] if lines else "no output"  # no glog prefix
            return {"error": f"exit {done.returncode}: {last}"}
        return json.loads(out.read_text())


def cells(result: dict) -> dict[str, tuple[float, str]]:
    """{measure: (value, text)}: one pair in ms, the batch and training in pairs/s."""
    out = {}
    for row in result.get("rows", []):
        what = row["what"]
        if what == "register, batch 1":
            out["one pair"] = (1 / row["median_ms"], f"{row['median_ms']:.3f} ms")
        elif what.startswith("register, batch"):
            out["batch"] = (row["per_sec"], f"{row['per_sec']:,.0f} pairs/s")
        elif what.startswith("train"):
            pairs = row["per_sec"] * 32
            out["train"] = (pairs, f"{pairs:,.0f} pairs/s")
    return out


def report(results: dict[str, dict], sets: dict[str, str]) -> str:
    """The table: one row per set, each measure with its ratio to the default."""
    first = next((r for r in results.values() if "rows" in r), None)
    if first is None:
        heads = MEASURES
    else:
        batch = next(r["what"] for r in first["rows"] if r["what"] != "register, batch 1")
        steps = next(r["what"] for r in first["rows"] if r["what"].startswith("train"))
        heads = ("one pair", batch.removeprefix("register, "), steps.removeprefix("train, "))
    width = max(len(n) for n in results) + 2
    lines = [f"{'XLA flags':{width}}" + "".join(f"{h:>28}" for h in heads)]
    base = cells(results.get("default", {}))
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:{width}}{result['error']}")
            continue
        row = cells(result)
        texts = []
        for m in MEASURES:
            value, text = row.get(m, (float("nan"), "–"))
            if name != "default" and m in base:
                text += f" ({value / base[m][0]:.2f}×)"
            texts.append(f"{text:>28}")
        lines.append(f"{name:{width}}" + "".join(texts))
    lines.append("ratios: how many times faster than the default set, in this run")
    lines += [f"  {name}: {flags}" for name, flags in sets.items() if flags and name != flags]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    opts, given = parse(argv)
    if opts["child"]:
        rows = measure(int(opts["size"]), float(opts["min_seconds"]))
        Path(opts["child"]).write_text(json.dumps(rows))
        return
    from benchmarks.core import output_path
    from dirnet_jax.workdir import atomic_write_text

    out = output_path(opts["out"], "flags")
    sets, results = {"default": ""}, {}
    end = time.monotonic() + float(opts["seconds"])

    def run(name):
        flags, left = sets[name], end - time.monotonic()
        print(f"running {name}" + (f": {flags}" if flags not in ("", name) else ""), flush=True)
        if left > 1:
            results[name] = run_set(flags, opts, left)
        else:
            results[name] = {"error": "not run: no time left"}
        machine = next((r["machine"] for r in results.values() if "machine" in r), None)
        rows = [{"name": n, "flags": sets[n], **r} for n, r in results.items()]
        atomic_write_text(out, json.dumps({"machine": machine, "sets": rows}, indent=2))

    run("default")  # first: the reference, and it says which backend this is
    backend = results["default"].get("machine", {}).get("backend", "cpu")
    sets |= given or (CPU_SETS if backend == "cpu" else GPU_SETS)
    sets["default, again"] = ""  # how far the machine drifted during the run
    for name in list(sets)[1:]:
        run(name)
    print()
    print(report(results, sets))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
