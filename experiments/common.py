"""What the experiment commands share: data location, run flags and the entry point."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from dirnet_jax import compile_cache, help_flags, hosts, train
from dirnet_jax import workdir as wd
from dirnet_jax.config import COMPUTE_DTYPES, DIRNetConfig
from dirnet_jax.losses import REGULARIZERS
from dirnet_jax.models import Registration, register, register_batched

REPO_DATA = Path(__file__).resolve().parent.parent / "data" / "tfds"


def define_run_flags(*, workdir: str, iterations: int | None, checkpoint_every: int) -> None:
    """Flags of every training experiment (each module adds its own)."""
    flags.DEFINE_string("workdir", workdir, "Where runs, results and figures go.")
    flags.DEFINE_string("data_dir", str(REPO_DATA), "TFDS data directory for prepared datasets.")
    for name in ("workdir", "data_dir"):  # made when missing; a file there would fail later
        flags.register_validator(
            name, lambda p: not Path(p).exists() or Path(p).is_dir(), "is a file, not a folder"
        )
    flags.DEFINE_integer("iterations", iterations, "Training iterations.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Pairs per training batch.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
    flags.register_validator(  # lower_bound would let nan through
        "learning_rate", lambda r: 0 <= r < math.inf, "--learning_rate is finite and ≥ 0"
    )
    flags.DEFINE_enum(
        "regularizer", "bending", sorted(REGULARIZERS), "Smoothness penalty on the field."
    )
    flags.DEFINE_float(
        "regularizer_weight", 0.0, "Weight of --regularizer in the loss; 0 (the paper's): none."
    )
    flags.register_validator(
        "regularizer_weight", lambda w: 0 <= w < math.inf, "--regularizer_weight is finite and ≥ 0"
    )
    flags.DEFINE_integer("seed", 0, "Seed of initialisation and pair sampling.")
    flags.DEFINE_integer("log_every", 100, "Iterations between validation losses.", lower_bound=1)
    flags.DEFINE_integer(
        "checkpoint_every", checkpoint_every, "Iterations between checkpoints.", lower_bound=1
    )
    flags.DEFINE_enum(
        "compute_dtype", "float32", list(COMPUTE_DTYPES), "Regressor activations (GPU: bfloat16)."
    )
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.DEFINE_integer(
        "steps_per_dispatch",
        None,
        "Adam steps per jitted call; the same training whatever it is. Default: 20 on "
        "accelerators, 4 on a CPU. 1 compiles fastest (a CPU's 4 steps took 8 s more).",
        lower_bound=1,
    )
    compile_cache.define_flag()
    flags.DEFINE_bool(
        "distributed",
        False,
        "Several processes (hosts) train one model: call jax.distributed.initialize() first. "
        "Under SLURM it finds the processes itself; elsewhere give the three flags below.",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "With --distributed: host:port of process 0's service."
    )
    flags.register_validator(  # jax's own check fails with an IndexError on a missing port
        "coordinator_address",
        lambda a: a is None or _is_host_port(a),
        message="--coordinator_address takes host:port (a port 1…65535)",
    )
    flags.DEFINE_integer("num_processes", None, "With --distributed: processes in the job.")
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
    flags.register_multi_flags_validator(
        ["distributed", "coordinator_address", "num_processes", "process_id"],
        lambda f: f["distributed"] or all(f[k] is None for k in f if k != "distributed"),
        message="--coordinator_address, --num_processes and --process_id need --distributed",
    )


def _is_host_port(address: str) -> bool:
    """Whether `address` reads as host:port ("node01:1234", "[::1]:1234")."""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def read_evaluation(path: Path) -> dict:
    """A cached evaluation.json, or a ValueError that names it (a file damaged by hand or
    by a disk: ours are written whole or not at all)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} cannot be read ({err}); remove it and run again to evaluate anew"
        ) from None


def fit(config: DIRNetConfig, run_dir: Path, train_images, val_images, args) -> train.TrainState:
    """`train.fit` as the experiments run it (--progress, --steps_per_dispatch), refusing a
    run directory that already went past --iterations: fit would return that longer run's
    state, and the results would be labelled with the shorter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past num_steps")  # said below, as an error
        state = train.fit(
            config, run_dir, train_images, val_images, progress=args.progress,
            steps_per_dispatch=args.steps_per_dispatch,
        )  # fmt: skip
    if (step := int(state.step)) > config.num_steps:
        raise ValueError(
            f"{run_dir} holds a run of {step} iterations, more than --iterations="
            f"{config.num_steps}: use another --workdir, or --iterations={step} or more"
        )
    return state


def config_overrides(args: flags.FlagValues) -> dict[str, Any]:
    """The DIRNetConfig fields that the run flags set."""
    names = ("batch_size", "learning_rate", "regularizer", "regularizer_weight", "seed",
             "log_every", "checkpoint_every", "compute_dtype")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def regularizer_term(config: dict[str, Any]) -> str | None:
    """A weighted regularizer as it reads in labels, "100 × bending", from a config's
    `to_dict`; None where none is weighted."""
    if weight := config.get("regularizer_weight"):
        return f"{weight:g} × {config.get('regularizer', 'bending')}"
    return None


def objective_label(config: dict[str, Any]) -> str:
    """What a run minimised, from its config's `to_dict`: "−NCC", or "−NCC + 100 × bending"
    where a regularizer is weighted."""
    similarity = config.get("similarity", "ncc")
    label = {"ncc": "−NCC", "mse": "MSE"}.get(similarity, similarity)
    if term := regularizer_term(config):
        label += f" + {term}"
    return label


def tfds_progress(show: bool) -> None:
    """TFDS's own progress bars (preparing a dataset: minutes for the synthetic cohort)
    shown or not, as --progress says: --noprogress logs stay free of carriage returns."""
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(show)


def join_job(args: flags.FlagValues) -> None:
    """`jax.distributed.initialize` with the flags' coordinator, process count and index
    (None: found from the cluster's environment, SLURM's say); ValueError saying which
    flags to give where JAX finds neither."""
    try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as err:
        hint = ""
        if args.coordinator_address is None:
            hint = (" (outside a cluster JAX recognises, give --coordinator_address, "
                    "--num_processes and --process_id)")  # fmt: skip
        raise ValueError(f"--distributed: {err}{hint}") from None


def run_command(run: Callable[[flags.FlagValues], list[Path]]) -> None:
    """absl entry point: run(FLAGS); one-line errors with exit code 1, a run stopped by a
    signal (`train.Interrupted` in training, `hosts.Terminated` elsewhere) with the shell's
    code for it; print the outputs."""
    FLAGS = flags.FLAGS
    help_flags.list_in_help(__name__, compile_cache.__name__)

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        compile_cache.use(FLAGS.compilation_cache)
        try:
            if FLAGS.distributed:
                join_job(FLAGS)
                FLAGS.progress &= hosts.is_primary()  # one progress bar per job
            with wd.unused_folders_removed(FLAGS.workdir), hosts.sigterm_raises():
                paths = run(FLAGS)
        except (
            OSError,  # a work directory that is a file, or not writable; a full disk
            ValueError,
            FloatingPointError,
            ImportError,
            hosts.PrimaryFailed,
        ) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except train.Interrupted as stop:  # SIGTERM or Ctrl-C: a checkpoint to resume from
            print(stop, file=sys.stderr)
            sys.exit(stop.exit_code)
        except hosts.Terminated:  # preparing data, evaluating, writing; or a second SIGTERM
            print(
                "stopped by SIGTERM; what was finished (prepared data, trained runs, "
                "checkpoints, cached evaluations) is kept: run it again to go on",
                file=sys.stderr,
            )
            sys.exit(128 + signal.SIGTERM)
        if hosts.is_primary():  # the others wrote nothing
            print("\n".join(["wrote:", *(f"  {p}" for p in paths)]))

    app.run(main)


def timed_registration(
    config: DIRNetConfig,
    variables: dict[str, Any],
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    batch_size: int,
) -> tuple[Registration, float, float]:
    """Register [P, *spatial, C] pairs in batches, timed after a compiling call.

    Returns (registration, seconds per pair in batches, median seconds of one pair alone
    over 20 calls after a compiling one).
    """
    register_batched(config, variables, fixed, moving, batch_size=batch_size)  # compiles
    start = time.perf_counter()
    reg = register_batched(config, variables, fixed, moving, batch_size=batch_size)
    batched = (time.perf_counter() - start) / len(fixed)
    single = []
    for i in np.arange(21) % len(fixed):  # the first call compiles
        start = time.perf_counter()
        jax.block_until_ready(register(config, variables, fixed[i : i + 1], moving[i : i + 1]))
        single.append(time.perf_counter() - start)
    return reg, batched, float(np.median(single[1:]))
