"""Speed: one-pass registration and training per variant, against PyTorch and SimpleElastix.

    make bench                                # python -m benchmarks.core
    python -m benchmarks.core --quick         # baseline only, fewer repeats
    python -m benchmarks.core --out=FILE.json # elsewhere than benchmarks/results/
    python -m benchmarks.core --seconds=280   # start no variant after 280 s; print the table
    python -m benchmarks.core --variants=B2,C1  # these only (no baseline rows, no ratios)
    python -m benchmarks.core --sizes=256     # one image size (default 256,28)
    python -m benchmarks.core --ab=baseline-taps  # GPU: the baseline and these A/B rows

Rows, all on this machine in one run: for each variant at 256×256 (four downsamplings, the
cardiac net) and 28×28 (four convs, two downsamplings, the MNIST net): registration pairs/s
at batch 1 and 32 (and 512 on a GPU), training steps/s at batch 32 (a step on a given batch;
pair sampling and step in one dispatch; and several steps per dispatch as `fit` runs them: 4
straight-line steps on a CPU, a lax.scan of 20 on a GPU), first-call time and memory per
call. Each baseline is followed by the same network as a straightforward JAX prototype
(benchmarks/prototype.py: flax's layers, map_coordinates, one jit per step; the kind of
prototype the issue's targets were set against; its training also against ours as `fit`
runs it in alternating rounds, "train, interleaved", a ratio that a host's changes of speed
leave alone) and in PyTorch eager
(benchmarks/torch_dirnet.py, if torch is installed), as ratios to DIRNet, and on a GPU by
its A/B rows: registration with the first layer reading the stacked pair, by float32
multiply-adds instead of one TF32 product, with the 128² layer by cuDNN instead of the
Triton kernel, the first layer as XLA's loop instead of the Triton kernel, and unfused
(XLA's convolution, then ELU and pooling), with XLA:GPU's
default CUDA-graph threshold (one pair), as plain layers (what folding BatchNorm and the
fused first layer buy), with bfloat16 activations; training with the first layer layer by
layer, with the later convs a product per tap (the taps form), with the training kernels
off (`DIRNET_TRAIN_CONV=xla`), in bfloat16 with and without the later convs' kernels, and
with every 3×3 conv by XLA's convolution (what `conv_taps` and the kernels buy together).
`--ab=NAME,…` runs the baseline and those A/B rows alone (`prototype` and `PyTorch`
name its twins). Then the
other variants, and SimpleElastix per 256×256 pair with the paper's settings. Every 256×256
row times the same synthetic cardiac ED/ES pairs (`timed_pairs`). Medians after warm-up,
device work synchronised. Writes the table and the machine description to
benchmarks/results/core-<host>.json after every variant (an interrupted run keeps its
finished rows). Never fails on time: with `--seconds`, the blocks (a variant at one size)
left when the budget is spent are listed as not run, and the table is printed.
Each measure repeats for at least `--min_seconds` (default 1 on a CPU, 0.5 elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import usage_if_asked
from dirnet_jax import (
    PAPER_VARIANTS,
    DIRNetConfig,
    init_variables,
    layers,
    machine,
    models,
    variant,
)
from dirnet_jax.elu import elu_unguarded
from dirnet_jax.models import Registration, Regressor, register, transform
from dirnet_jax.preprocess import minmax
from dirnet_jax.train import (
    create_train_state,
    data_key,
    data_parallel,
    default_steps_per_dispatch,
    train_step,
    train_steps,
)
from dirnet_jax.workdir import atomic_write_text

MIN_SECONDS = 1.0  # each measure repeats until it has run this long (fast calls: many times)
# The prototype's training and ours as `fit` runs it, timed in alternating rounds (each
# for MIN_SECONDS / 4): their ratio, which the host's changes of speed leave alone.
INTERLEAVED_ROUNDS = 8
TRAIN_INTERLEAVED = "train, interleaved"


def timed(fn, repeats: int, sync=jax.block_until_ready) -> tuple[float, float]:
    """(first call incl. compile, median of at least `repeats` further calls and of as many
    as fit in MIN_SECONDS), seconds."""
    t = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t
    times = []
    while len(times) < repeats or (sum(times) < MIN_SECONDS and len(times) < 1000):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    seconds: float = 0.0,
    calls: int = 1,
    sync=jax.block_until_ready,
) -> dict[str, list[list[float]]]:
    """{name: [each round's seconds per call]}: each round calls every function in turn,
    each at least `calls` times and for at least `seconds`, so that a host whose speed
    changes from one stretch of seconds to the next (`benchmarks/NOTES.md`) slows all of
    them alike. The functions are called once each before the first round."""
    for fn in fns.values():
        sync(fn())
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            round_times, start = [], time.perf_counter()
            while len(round_times) < calls or time.perf_counter() - start < seconds:
                t = time.perf_counter()
                sync(fn())
                round_times.append(time.perf_counter() - t)
            times[name].append(round_times)
    return times


def compiled_mb(jitted, *args, **kwargs) -> float:
    """Device memory one call of a jitted function needs (arguments, outputs and
    temporaries, from XLA's buffer assignment), MiB. Lowering hits the jit cache."""
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if stats is None:
        return float("nan")
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


def output_path(value: str, tool: str) -> Path:
    """--out, checked before any work: `value`, or benchmarks/results/<tool>-<host>.json."""
    out = Path(value or Path(__file__).parent / "results" / f"{tool}-{socket.gethostname()}.json")
    if out.exists() and not out.is_file():
        sys.exit(f"error: --out={out} is not a regular file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        sys.exit(f"error: --out={out}: cannot create its folder ({err.strerror})")
    try:  # as the results will be: a temporary file in that folder
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        sys.exit(f"error: --out={out}: cannot write in its folder ({err.strerror})")
    return out


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, impl, name, size, what, first, sec, count, unit, memory_mb=float("nan"),
            **extra):  # fmt: skip
        self.rows.append(
            dict(impl=impl, variant=name, size=size, what=what, median_ms=sec * 1e3,
                 per_sec=count / sec, unit=unit, first_call_s=first, memory_mb=memory_mb,
                 **extra)
        )  # fmt: skip

    def rate(self, impl, size, what) -> float | None:
        for r in self.rows:
            if (r["impl"], r["variant"], r["size"], r["what"]) == (impl, "baseline", size, what):
                return r["per_sec"]
        return None


def base_config(size: int) -> DIRNetConfig:
    """The paper's two baseline networks at size×size: the MNIST one (four convs, two
    downsamplings) up to 32, the cardiac one (four downsamplings) above."""
    if size <= 32:
        return DIRNetConfig(image_shape=(size, size), num_downsamplings=2, conv_layers=4)
    return DIRNetConfig(image_shape=(size, size), num_downsamplings=4)


def timed_pairs(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n (fixed, moving) pairs, each [n, size, size, 1] float32 in [0, 1]. At 256×256 the
    cardiac pairs that SimpleElastix registers too: end-diastole (fixed) and end-systole
    (moving) of the 8 slices of a synthetic patient, repeated up to n; at 28×28 uniform
    noise (a DIRNet's speed does not depend on what the images show)."""
    if size != 256:
        rng = np.random.default_rng(0)
        return tuple(rng.uniform(size=(n, size, size, 1)).astype(np.float32) for _ in range(2))
    from dirnet_jax.datasets import phantom

    data = phantom.generate_patient(phantom.CohortSpec(slices=8, phases=20), 0)
    ed, es = (minmax(data["images"][:, p])[..., None] for p in (0, data["es_phase"]))
    repeat = -(-n // len(ed))
    return np.tile(ed, (repeat, 1, 1, 1))[:n], np.tile(es, (repeat, 1, 1, 1))[:n]


@functools.partial(jax.jit, static_argnums=0, compiler_options=models.INFER_COMPILER_OPTIONS)
def register_unfolded(config: DIRNetConfig, variables, fixed, moving) -> Registration:
    """`register` with plain layers: BatchNorm as its own per-channel scale and shift
    (running averages), not folded, and the first conv, ELU and pooling as separate ops:
    the other side of the comparison on a GPU."""
    grid = Regressor(config).apply(variables, fixed, moving, train=False)
    return transform(config, grid, moving)


def bench_register(table, name, config, pairs, batches, repeats, fn=register) -> None:
    """Rows 'register, batch b': fn(config, variables, fixed, moving) on b pairs."""
    fixed, moving = (jnp.asarray(a[: max(batches)]) for a in pairs)
    variables = init_variables(config, jax.random.key(0))
    for b in batches:
        f, m = fixed[:b], moving[:b]
        first, sec = timed(lambda f=f, m=m: fn(config, variables, f, m), repeats)
        mb = compiled_mb(fn, config, variables, f, m)
        what = f"register, batch {b}"
        table.add("jax", name, config.image_shape[0], what, first, sec, b, "pairs/s", mb)


@contextlib.contextmanager
def swapped(name: str, value):
    """`<name>` of `dirnet_jax.layers` or `dirnet_jax.models` (`home`) replaced by `value`
    while the context lasts: the other side of a comparison on a GPU. A compiled program
    made before the swap is reused unless the call traces anew: `in_swap`
    (`fresh_traces`), or, in the tests, a config of its own seed for `register`
    (training's traces do not see the seed)."""
    module = home(name)
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def home(name: str):
    """Which of `dirnet_jax.layers` (the layers and their switches) and `dirnet_jax.models`
    (the regressor's own switches) holds `name`, where a swap of it is seen when a program
    is traced; a one-line ValueError for a name that neither or both hold."""
    holders = [module for module in (layers, models) if hasattr(module, name)]
    if len(holders) != 1:
        where = " and ".join(m.__name__ for m in holders) or "neither dirnet_jax.layers nor models"
        raise ValueError(f"{name!r} to swap is in {where}")
    return holders[0]


def xla_conv(features: int, conv=None, **kwargs) -> nn.Module:
    """flax's 3×3 nn.Conv, for `swapped("TapConv", xla_conv)`: training's 3×3 convs (the
    first, and those of `train_conv`) by XLA's convolution and its gradients (cuDNN on
    GPUs): what `conv_taps` and the training kernels buy together. `conv` is ignored."""
    return nn.Conv(features, (3, 3), **kwargs)


def xla_first_layer(x, kernel, bias, downsampling: str, dtype) -> jax.Array:
    """`layers.fused_first_layer` as XLA's loop on every backend, for
    `swapped("fused_first_layer", xla_first_layer)`: what the Triton kernel buys."""
    return layers.conv_elu_pool2(x, kernel, bias, downsampling).astype(dtype)


def unfused_first_layer(x, kernel, bias, downsampling: str, dtype) -> jax.Array:
    """`layers.fused_first_layer` as XLA's convolution, then ELU and pooling, for
    `swapped("fused_first_layer", unfused_first_layer)`: inference's first layer unfused."""
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    y = elu_unguarded(y + bias.astype(jnp.float32))
    return layers.pool2(y, jnp.mean if downsampling == "avg" else jnp.max).astype(dtype)


# `layers.fused_first_layer` with the Triton kernel's "broadcast" form on CUDA (float32
# multiply-adds, the default until run 7), for `swapped("fused_first_layer",
# broadcast_first_layer)`: what the default "dot1" form (one TF32 product) buys.
broadcast_first_layer = functools.partial(layers.fused_first_layer, form="broadcast", num_warps=8)


@contextlib.contextmanager
def environment(name: str, value: str):
    """os.environ[name] = value while the context lasts (read when jit traces)."""
    original = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if original is None:
            del os.environ[name]
        else:
            os.environ[name] = original


# `register` with XLA:GPU's default CUDA-graph threshold: what INFER_COMPILER_OPTIONS buys.
register_default_graphs = jax.jit(
    models.register.__wrapped__, static_argnums=0, static_argnames="chunk",
    compiler_options={"xla_gpu_graph_min_graph_size": 5},
)  # fmt: skip


@contextlib.contextmanager
def swapped_all(swaps: dict):
    """Each `<name>` of `swaps` replaced by its value (`swapped`) while the context lasts."""
    with contextlib.ExitStack() as stack:
        for name, value in swaps.items():
            stack.enter_context(swapped(name, value))
        yield


@contextlib.contextmanager
def fresh_traces():
    """jit's caches cleared on the way in and out, so that what runs inside traces anew and
    what runs after does not reuse its traces. A config of its own seed is not enough: a
    TrainState keeps `config.network()`, without the seed, and training's A/B rows once
    all timed the baseline's trace."""
    jax.clear_caches()
    try:
        yield
    finally:
        jax.clear_caches()


def in_env(variable: tuple[str, str], bench, *args, **kwargs) -> None:
    """bench(*args, **kwargs) with the environment variable (name, value) set, traced
    anew."""
    with environment(*variable), fresh_traces():
        bench(*args, **kwargs)


def in_swap(swaps: dict, bench, *args, **kwargs) -> None:
    """bench(*args, **kwargs) with each `<name>` of `swaps` swapped for its value (`swapped`),
    traced anew."""
    with swapped_all(swaps), fresh_traces():
        bench(*args, **kwargs)


def bench_jax(table: Table, name: str, config: DIRNetConfig, pairs, batches, repeats: int) -> None:
    bench_register(table, name, config, pairs, batches, repeats)
    bench_train(table, name, config, pairs, repeats)


def bench_train(table: Table, name: str, config: DIRNetConfig, pairs, repeats: int) -> None:
    """Rows 'train step, batch 32', 'train, sample+step' and 'train, N steps/dispatch'; with
    several devices also 'train, D devices, batch 32·D'."""
    size = config.image_shape[0]
    fixed, moving = (jnp.asarray(a[:32]) for a in pairs)
    batch = {"fixed": fixed, "moving": moving}
    state = [create_train_state(config)]  # the step functions donate their state

    def step():
        state[0], metrics = train_step(state[0], batch)
        return metrics["loss"]

    first, sec = timed(step, repeats)
    mb = compiled_mb(train_step, state[0], batch)
    table.add("jax", name, size, "train step, batch 32", first, sec, 1, "steps/s", mb)

    for steps in (1, default_steps_per_dispatch()):
        state[0] = bench_train_steps(table, name, config, fixed, steps, repeats, state[0])
    if jax.device_count() > 1:
        bench_train_steps(table, name, config, fixed, default_steps_per_dispatch(), repeats,
                          over_devices=True)  # fmt: skip


def bench_train_dispatch(table: Table, name: str, config: DIRNetConfig, pairs, repeats: int):
    """Row 'train, N steps/dispatch' alone (`fit`'s way; an A/B row's one number)."""
    pool = jnp.asarray(pairs[0][:32])
    bench_train_steps(table, name, config, pool, default_steps_per_dispatch(), repeats)


def bench_train_steps(table, name, config, pool, steps, repeats, state=None, over_devices=False):
    """Row 'train, sample+step' (steps=1) or 'train, N steps/dispatch': `train_steps`
    drawing batches of 32 pairs from `pool` on the device. `over_devices`: row 'train, D
    devices, batch 32·D' instead, `fit`'s data-parallel steps over every device
    (`train.data_parallel`), 32 pairs each, in pairs/s (the scaling, against 32 × the
    one-device steps/s). Returns the trained state."""
    devices = jax.device_count() if over_devices else 1
    batch, split = 32 * devices, None
    state = create_train_state(config) if state is None else state
    if over_devices:
        replicated, split = data_parallel(config.replace(batch_size=batch))
        state, pool = jax.device_put((state, pool), replicated)
    fused, state, memory_mb = steps_call(config, pool, steps, batch, state, split)
    first, sec = timed(fused, repeats if steps == 1 else max(2, repeats // steps))
    mb = memory_mb()
    size = config.image_shape[0]
    if over_devices:
        what = f"train, {devices} devices, batch {batch}"
        table.add("jax", name, size, what, first, sec, steps * batch, "pairs/s", mb)
    else:
        what = "train, sample+step" if steps == 1 else f"train, {steps} steps/dispatch"
        table.add("jax", name, size, what, first, sec, steps, "steps/s", mb)
    return state[0]


def steps_call(config, pool, steps, batch=32, state=None, sharding=None):
    """(a call of `train_steps` as `fit` makes it: `steps` steps on batches of `batch`
    pairs drawn from `pool`, returning the losses; [the state], which each call donates
    and replaces; the call's memory in MiB, `compiled_mb`, as a function)."""
    state, key = [create_train_state(config) if state is None else state], data_key(config)
    options = dict(steps=steps, batch_size=batch, grouped=False, sharding=sharding)

    def fused():
        state[0], losses = train_steps(state[0], pool, key, **options)
        return losses

    return fused, state, lambda: compiled_mb(train_steps, state[0], pool, key, **options)


def bench_torch(table: Table, config: DIRNetConfig, pairs, repeats: int) -> None:
    try:
        import torch

        from benchmarks.torch_dirnet import DIRNet, ncc
    except ImportError:
        print("PyTorch is not installed: no PyTorch rows (pip install torch==2.13.0)")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    size = config.image_shape[0]
    model = DIRNet(size, config.num_downsamplings, config.features, config.conv_layers)
    model = model.to(device)
    fixed, moving = (torch.from_numpy(a[:32]).permute(0, 3, 1, 2).to(device) for a in pairs)

    def peak_mb():  # since the last call, CUDA only
        if device != "cuda":
            return float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return peak

    model.eval()
    peak_mb()
    for b in (1, 32):
        with torch.no_grad():
            first, sec = timed(lambda b=b: model(fixed[:b], moving[:b]), repeats, sync)
        table.add(
            "torch", "baseline", size, f"register, batch {b}", first, sec, b, "pairs/s", peak_mb()
        )
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad()
        warped, _ = model(fixed, moving)
        loss = -ncc(fixed, warped).mean()
        loss.backward()
        optimizer.step()
        return loss

    first, sec = timed(step, repeats, sync)
    table.add(
        "torch", "baseline", size, "train step, batch 32", first, sec, 1, "steps/s", peak_mb()
    )


def bench_prototype(table: Table, config: DIRNetConfig, pairs, batches, repeats: int) -> None:
    """Rows of `benchmarks.prototype` (flax's layers, map_coordinates, one jit per step):
    registration at each batch, one training step at batch 32, as ratios to ours."""
    from benchmarks import prototype

    size = config.image_shape[0]
    variables = prototype.init(config, jax.random.key(config.seed))
    register_fn = prototype.register_fn(config)
    for b in batches:
        fixed, moving = (jnp.asarray(a[:b]) for a in pairs)
        first, sec = timed(lambda f=fixed, m=moving: register_fn(variables, f, m), repeats)
        mb = compiled_mb(register_fn, variables, fixed, moving)
        table.add("prototype", "baseline", size, f"register, batch {b}", first, sec, b,
                  "pairs/s", mb)  # fmt: skip
    tx, step = prototype.train_step(config)
    fixed, moving = (jnp.asarray(a[:32]) for a in pairs)
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

    def train():  # the state is donated by each call
        params, batch_stats, opt_state, loss = step(*state, fixed, moving)
        state[:] = [params, batch_stats, opt_state]
        return loss

    first, sec = timed(train, repeats)
    mb = compiled_mb(step, *state, fixed, moving)
    table.add("prototype", "baseline", size, "train step, batch 32", first, sec, 1, "steps/s", mb)

    # Training against ours as `fit` runs it, in alternating rounds: the two rows above
    # ran seconds apart, and this host's speed changes from one stretch to the next.
    steps = default_steps_per_dispatch()
    ours = steps_call(config, fixed, steps)[0]
    timings = interleaved({"jax": ours, "prototype": train}, INTERLEAVED_ROUNDS, MIN_SECONDS / 4)
    medians = {impl: [statistics.median(r) for r in rounds] for impl, rounds in timings.items()}
    ratios = [p / (j / steps) for j, p in zip(medians["jax"], medians["prototype"], strict=True)]
    for impl, count, extra in (("jax", steps, {}), ("prototype", 1, {"round_ratios": ratios})):
        sec = statistics.median(medians[impl])  # round_ratios: ours ÷ it, round by round
        table.add(impl, "baseline", size, TRAIN_INTERLEAVED, float("nan"), sec, count,
                  "steps/s", rounds=len(ratios), **extra)  # fmt: skip


def bench_elastix(table: Table, pairs, count: int) -> None:
    """SimpleElastix (the paper's settings) on the first `count` of the 256² pairs."""
    try:
        from dirnet_jax import elastix

        params = elastix.bspline_parameters(16 * 1.28, resolutions=2, iterations=100)
    except ImportError as err:
        print(f"no SimpleElastix row: {err}")
        return
    seconds = []
    for fixed, moving in zip(*(a[:count, ..., 0] for a in pairs), strict=True):
        result = elastix.register_pair(fixed, moving, params, spacing=(1.28, 1.28))
        seconds.append(result.seconds)
    sec = statistics.median(seconds)
    table.add("elastix", "baseline", 256, "register, 1 pair", float("nan"), sec, 1, "pairs/s")


def parse_options(argv: list[str], defaults: dict[str, str], doc: str | None) -> dict[str, str]:
    """`--key=value` arguments over `defaults` (the tools' flags); -h or --help prints the
    tool's `doc`; any other argument exits with a one-line error naming the known ones."""
    usage_if_asked(argv, doc)
    opts = dict(defaults)
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in opts or not value:
            sys.exit(f"error: bad argument {arg!r}; known: " + " ".join(f"--{k}=" for k in opts))
        opts[key] = value
    return opts


def parse(argv: list[str]) -> tuple[bool, dict[str, str]]:
    """(--quick given, {'out': path or '', 'seconds': budget, 'min_seconds': per measure,
    'variants': comma-separated names or '', 'sizes': comma-separated 256 and/or 28,
    'ab': comma-separated A/B row names (GPU only: the baseline and these rows alone) or ''})."""
    opts = {
        "out": "", "seconds": "inf", "min_seconds": "", "variants": "", "sizes": "256,28", "ab": ""
    }  # fmt: skip
    usage_if_asked(argv, __doc__)
    quick = False
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if arg == "--quick":
            quick = True
        elif arg.startswith("--") and key in opts and value:
            opts[key] = value
        else:
            known = " ".join(f"--{k}=" for k in opts)
            sys.exit(f"error: bad argument {arg!r}; known: --quick {known}")
    check_seconds(opts, ("seconds", "min_seconds"))
    unknown = set(opts["variants"].split(",")) - set(PAPER_VARIANTS) - {""}
    if unknown:
        sys.exit(f"error: --variants: no variant {', '.join(sorted(unknown))}; "
                 f"known: {','.join(PAPER_VARIANTS)}")  # fmt: skip
    if not opts["sizes"] or set(opts["sizes"].split(",")) - {"256", "28"}:
        sys.exit(f"error: --sizes is 256, 28 or both, not {opts['sizes']!r}")
    return quick, opts


def check_seconds(opts: dict[str, str], keys: tuple[str, ...]) -> None:
    """A one-line exit unless each of these options, where given, is a positive number."""
    for key in keys:
        try:
            if opts[key] and not float(opts[key]) > 0:  # NaN too
                raise ValueError
        except ValueError:
            sys.exit(f"error: --{key} is a positive number of seconds, not {opts[key]!r}")


def gpu_ab_blocks(table: Table, base: DIRNetConfig, p, batches, r) -> list[tuple[str, Callable]]:
    """The baseline's A/B rows on a GPU, (label, run) each: each swaps one choice, traced
    anew (`in_swap`, `in_env`). The rows the last lease did not reach come first (run 8
    timed stackfirst, then broadcastfirst to bf16, now last)."""
    bf16 = base.replace(compute_dtype="bfloat16")
    return [
        # What inference's first layer reading the pair as two images buys: the stacked pair.
        ("baseline-stackfirst", lambda: in_swap(
            {"INFER_FIRST_LAYER_PAIR": False}, bench_register,
            table, "baseline-stackfirst", base, p, batches, r)),
        # bfloat16 registration with cuDNN's 128² layer, the default before run 9 (against
        # `baseline-bf16`'s kernel there).
        ("baseline-bf16cudnn", lambda: in_swap(
            {"INFER_POOLED_DTYPES": ("float32",)}, bench_register,
            table, "baseline-bf16cudnn", bf16, p, batches, r)),
        # bfloat16 training with the later convs' kernels (their sums in float32) against
        # cuDNN's, the first layer layer by layer.
        ("baseline-bf16triton", lambda: in_swap(
            {"TRAIN_CONV_DTYPES": ("float32", "bfloat16"), "train_first_layer_conv": None},
            bench_train_dispatch, table, "baseline-bf16triton", bf16, p, r)),
        # The first layer as XLA's loop instead of the Triton kernel.
        ("baseline-xlaloop", lambda: in_swap(
            {"fused_first_layer": xla_first_layer}, bench_register,
            table, "baseline-xlaloop", base, p, batches, r)),
        # What INFER_COMPILER_OPTIONS buys.
        ("baseline-graphs5", lambda: bench_register(
            table, "baseline-graphs5", base, p, (1,), r, fn=register_default_graphs)),
        # The first layer unfused (BatchNorm still folded).
        ("baseline-xlafirst", lambda: in_swap(
            {"fused_first_layer": unfused_first_layer}, bench_register,
            table, "baseline-xlafirst", base, p, batches, r)),
        # Plain layers: what folding BatchNorm and the fused first layer buy.
        ("baseline-unfolded", lambda: bench_register(
            table, "baseline-unfolded", base, p, batches, r, fn=register_unfolded)),
        # What `conv_taps`, the first layer at once and the training kernels buy: every
        # 3×3 conv by XLA's convolution, layer by layer.
        ("baseline-xlaconv", lambda: in_swap(
            {"TapConv": xla_conv, "train_first_layer_conv": None}, bench_train,
            table, "baseline-xlaconv", base, p, r)),
        # What the first layer by one TF32 product buys: float32 multiply-adds.
        ("baseline-broadcastfirst", lambda: in_swap(
            {"fused_first_layer": broadcast_first_layer}, bench_register,
            table, "baseline-broadcastfirst", base, p, batches, r)),
        # What the pairs form buys: the later convs and their gradients a product per tap.
        ("baseline-taps", lambda: in_swap(
            {"TRAIN_CONV_FORM": "taps"}, bench_train_dispatch,
            table, "baseline-taps", base, p, r)),
        # What the training kernels buy: XLA's convolutions, the first layer apart.
        ("baseline-xlatrain", lambda: in_env(
            ("DIRNET_TRAIN_CONV", "xla"), bench_train_dispatch,
            table, "baseline-xlatrain", base, p, r)),
        # What the 128² layer's kernel buys: cuDNN's convolution, ELU and pooling there.
        ("baseline-xlapool", lambda: in_swap(
            {"pooled_conv": layers.xla_pooled_conv}, bench_register,
            table, "baseline-xlapool", base, p, batches, r)),
        # What training's first layer at once buys: layer by layer (the first conv by
        # `conv_taps`, its kernel gradient by Triton).
        ("baseline-layerfirst", lambda: in_swap(
            {"train_first_layer_conv": None}, bench_train_dispatch,
            table, "baseline-layerfirst", base, p, r)),
        ("baseline-bf16", lambda: bench_jax(table, "baseline-bf16", bf16, p, batches, r)),
    ]  # fmt: skip


def main(argv: list[str]) -> None:
    global MIN_SECONDS
    quick, opts = parse(argv)
    out = output_path(opts["out"], "core")
    on_gpu = jax.default_backend() != "cpu"
    MIN_SECONDS = float(opts["min_seconds"] or (0.5 if on_gpu else 1))
    end = time.monotonic() + float(opts["seconds"])
    names = opts["variants"].split(",") if opts["variants"] else list(PAPER_VARIANTS)
    names = ["baseline"] if quick else names
    table = Table()

    def save():
        atomic_write_text(
            out, json.dumps({"machine": machine.describe(), "rows": table.rows}, indent=2)
        )

    bases = {size: base_config(size) for size in (256, 28) if str(size) in opts["sizes"].split(",")}
    batches = (1, 32, 512) if on_gpu else (1, 32)

    def repeats(size):
        return 30 if on_gpu else (20 if size == 28 else 5) // (2 if quick else 1)

    if opts["ab"]:
        if not on_gpu:
            sys.exit("error: --ab: the A/B rows run on a GPU only")
        some_base = next(iter(bases.values()))
        known = {label for label, _ in gpu_ab_blocks(Table(), some_base, None, batches, 0)}
        known |= {"prototype", "PyTorch"}  # the baseline's twins may be named too
        unknown = set(opts["ab"].split(",")) - known
        if unknown:
            sys.exit(f"error: --ab: no row {', '.join(sorted(unknown))}; "
                     f"known: {','.join(sorted(known))}")  # fmt: skip
        names = ["baseline"]
    pairs = {size: timed_pairs(size, max(batches)) for size in bases}

    def baseline_blocks(size: int) -> list[tuple[str, Callable[[], None]]]:
        """The baseline, PyTorch, then on a GPU the baseline's A/B rows: (label, run) each."""
        base, p, r = bases[size], pairs[size], repeats(size)
        rows = [
            ("baseline", lambda: bench_jax(table, "baseline", base, p, batches, r)),
            ("prototype", lambda: bench_prototype(table, base, p, batches, r)),
            ("PyTorch", lambda: bench_torch(table, base, p, r)),
        ]
        if on_gpu:  # bfloat16 activations are for accelerators (slower on a CPU)
            rows += gpu_ab_blocks(table, base, p, batches, r)
        return [(f"{label} {size}²", run) for label, run in rows]

    # The baselines, their PyTorch twins and A/B rows first, so that a run cut short by a
    # time limit still has every comparison; then the other variants.
    blocks = [block for size in bases if "baseline" in names for block in baseline_blocks(size)]
    if opts["ab"]:  # the baseline and the A/B rows named, nothing else
        keep = set(opts["ab"].split(",")) | {"baseline"}
        blocks = [(label, run) for label, run in blocks if label.rsplit(" ", 1)[0] in keep]
    for name in [n for n in names if n != "baseline"]:
        for size, base in bases.items():
            config = variant(name, base)
            blocks.append((f"{name} {size}²", functools.partial(
                bench_jax, table, name, config, pairs[size], batches, repeats(size))))  # fmt: skip
    if "baseline" in names and 256 in bases:
        blocks.append(
            ("SimpleElastix", lambda: bench_elastix(table, pairs[256], 3 if quick else 8))
        )
    skipped, failed = [], []
    for label, block in blocks:
        if time.monotonic() > end:
            skipped.append(label)
            continue
        try:
            block()
        except Exception as err:  # a row one backend cannot run: say so, and go on
            first_line = next(iter(str(err).splitlines()), "")
            failed.append(f"{label}: {type(err).__name__}: {first_line}")
            print(f"failed: {failed[-1]}", file=sys.stderr, flush=True)
        save()
    if len(skipped) == len(blocks):  # no block ran, so none wrote it
        save()
    order = {"jax": 0, "prototype": 1, "torch": 2, "elastix": 3}
    table.rows.sort(key=lambda r: (-r["size"], order[r["impl"]]))  # stable: variants in order

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    host = f"{machine.host_cpu()}, {machine.cpu_vector() or 'vector extension unknown'}"
    print(f"\n{device}, jax {jax.__version__}, malloc: {machine.malloc()}; host: {host}")
    header = (
        f"{'impl':9} {'variant':8} {'size':>4}  {'measure':24} {'median':>11} "
        f"{'rate':>17} {'1st call':>8} {'MiB':>7} {'vs jax':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in table.rows:
        mine = table.rate("jax", r["size"], r["what"]) if r["impl"] != "jax" else None
        if r["impl"] == "elastix":
            mine = table.rate("jax", 256, "register, batch 1")
        ratio = f"{mine / r['per_sec']:6.1f}×" if mine else ""
        print(
            f"{r['impl']:9} {r['variant']:8} {r['size']:>4}  {r['what']:24} "
            f"{r['median_ms']:9.2f}ms {r['per_sec']:9.1f} {r['unit']:>7} "
            f"{r['first_call_s']:7.2f}s {r['memory_mb']:7.0f} {ratio:>7}"
        )
    print("vs jax: how many times faster the JAX row of the same measure is.")
    for r in table.rows:
        if "round_ratios" in r:
            low, high = min(r["round_ratios"]), max(r["round_ratios"])
            print(f"{TRAIN_INTERLEAVED}, {r['size']}²: ours as `fit` runs it and the "
                  f"prototype's step in {r['rounds']} alternating rounds; ours ÷ prototype "
                  f"by round {low:.2f}–{high:.2f}×")  # fmt: skip
    if skipped:
        print(f"not run, the --seconds budget was spent: {', '.join(skipped)}")
    for line in failed:
        print(f"failed: {line}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
