"""Unsupervised training: random fixed/moving pairs, a jitted Adam step, orbax checkpoints.

`fit` runs the loop: pairs are drawn from a pool of images with ``fold_in(key, step)`` so a
resumed run sees the same pairs as an uninterrupted one, checkpoints are saved every
``checkpoint_every`` steps and restored when present, metrics go to ``metrics.jsonl`` (given
validation images, its first record is step 0's: the untrained network), and a
non-finite loss stops training with an error naming the step (never checkpointed). SIGTERM
(a cluster's time limit or preemption) or Ctrl-C stops it after the running call, with a
checkpoint of the step it reached (`Interrupted`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import time
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from tqdm.auto import tqdm

from dirnet_jax import dispatch, hosts, orbax_reports
from dirnet_jax import workdir as wd
from dirnet_jax.config import DIRNetConfig
from dirnet_jax.losses import get_loss, get_regularizer, ncc, objective
from dirnet_jax.models import apply, init_variables

Batch = dict[str, jax.Array]  # {'fixed', 'moving'}: [B, *spatial, C]

# XLA:CPU in jaxlib 0.10 hands the convolutions of a training step to YNNPACK, whose kernel
# gradients of the 256² layers took 86 and 70 ms of a 545 ms step (7 and 34 GFLOP/s);
# XLA's own convolutions make the step 422 ms (28²: unchanged). These are the library
# fusions XLA:CPU picks by default, minus convolutions. Set for jaxlib 0.10 only, where it
# was measured: a jaxlib that does not know an option refuses to compile.
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
TRAIN_COMPILER_OPTIONS = (
    {"xla_cpu_experimental_ynn_fusion_type": YNN_WITHOUT_CONVOLUTIONS}
    if jax.__version__.startswith("0.10.")
    else None
)


class TrainState(train_state.TrainState):
    batch_stats: Any
    config: DIRNetConfig = flax.struct.field(pytree_node=False)


@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimizer object per rate: TrainStates that share it share train_step's trace."""
    return optax.adam(learning_rate)


def create_train_state(config: DIRNetConfig) -> TrainState:
    """Fresh parameters and Adam state, from ``config.seed``; the state keeps
    ``config.network()``."""
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    variables = init_variables(config, init_key)
    state = TrainState.create(
        apply_fn=None,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=adam(config.learning_rate),
        config=config.network(),
    )
    # An int32 array, as after every step: a Python 0 would make the first step trace twice.
    return state.replace(step=jnp.zeros((), jnp.int32))


def data_key(config: DIRNetConfig) -> jax.Array:
    """Root key of the pair sampling (fold in the step number for each batch)."""
    return jax.random.fold_in(jax.random.key(config.seed), 1)


@functools.partial(jax.jit, static_argnames=("batch_size", "grouped"))
def sample_pairs(
    key: jax.Array, images: jax.Array, batch_size: int, grouped: bool = False
) -> Batch:
    """Random (fixed, moving) pairs of two different images from a pool.

    Args:
      key: PRNG key.
      images: [N, *spatial, C] (N ≥ 2), or with `grouped` [G, T, *spatial, C]: pairs then
        come from one group (say the phases of one slice), two different members of it.
      batch_size: pairs to draw.

    Returns:
      {'fixed', 'moving'}: [batch_size, *spatial, C].
    """
    k_group, k_fixed, k_offset = jax.random.split(key, 3)
    if grouped:
        g = jax.random.randint(k_group, (batch_size,), 0, images.shape[0])
        members = images.shape[1]
        i = jax.random.randint(k_fixed, (batch_size,), 0, members)
        j = (i + jax.random.randint(k_offset, (batch_size,), 1, members)) % members  # never i
        return {"fixed": images[g, i], "moving": images[g, j]}
    n = images.shape[0]
    i = jax.random.randint(k_fixed, (batch_size,), 0, n)
    j = (i + jax.random.randint(k_offset, (batch_size,), 1, n)) % n  # never i
    return {"fixed": images[i], "moving": images[j]}


def _loss(params, state: TrainState, batch: Batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    reg, batch_stats = apply(state.config, variables, batch["fixed"], batch["moving"], train=True)
    return objective(state.config, batch["fixed"], reg).mean(), batch_stats


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    (loss, batch_stats), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state, batch)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss}


@functools.partial(jax.jit, donate_argnums=0, compiler_options=TRAIN_COMPILER_OPTIONS)
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a batch of pairs; metrics: {'loss'}."""
    return _train_step(state, batch)


@functools.partial(
    jax.jit,
    static_argnames=("steps", "batch_size", "grouped", "sharding"),
    donate_argnums=0,
    compiler_options=TRAIN_COMPILER_OPTIONS,
)
def train_steps(
    state: TrainState,
    pool: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    batch_size: int,
    grouped: bool,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, jax.Array]:
    """`steps` Adam steps in one dispatch, pairs drawn on the device.

    Step s (counting from 1 over the whole run) trains on
    ``sample_pairs(fold_in(key, s), pool, batch_size, grouped)``, exactly as a loop of
    `train_step` would, so chunks of any length give the same trajectory. `sharding`
    places each batch (data parallelism: split over devices along the batch axis); over
    several devices XLA splits the step, and our kernels run on each device's slice
    (`dispatch.split_over`: XLA's partitioner cannot split their calls).
    On accelerators the steps are a `lax.scan`; on XLA:CPU, which ran a scanned step 3×
    (28×28) to 10× (128×128) slower, they are unrolled into straight-line code, with every
    step's pairs drawn before the first.

    Returns (state, [steps] losses).
    """

    def pairs(step):
        return sample_pairs(jax.random.fold_in(key, step), pool, batch_size, grouped)

    def body(state, batch):
        if sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        state, metrics = _train_step(state, batch)
        return state, metrics["loss"]

    split = sharding is not None and len(sharding.device_set) > 1
    with dispatch.split_over(sharding) if split else contextlib.nullcontext():
        if steps > 1 and jax.default_backend() != "cpu":

            def scanned(state, _):
                return body(state, pairs(state.step + 1))

            return jax.lax.scan(scanned, state, length=steps)
        # Every step's pairs drawn at once, the same values as one draw per step: at 28² on
        # a 2-core CPU the step ran ~7 % faster than with a draw inside it (NOTES.md).
        batches = jax.vmap(pairs)(state.step + 1 + jnp.arange(steps))
        losses = []
        for s in range(steps):
            state, loss = body(state, jax.tree.map(lambda b, s=s: b[s], batches))
            losses.append(loss)
        return state, jnp.stack(losses)


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Inference-mode metrics on a batch of pairs: {'loss', 'ncc_before', 'ncc_after'}, and
    'regularizer' (unweighted) when the config weights one."""
    config = state.config
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    reg, _ = apply(config, variables, batch["fixed"], batch["moving"])
    metrics = {
        "loss": objective(config, batch["fixed"], reg).mean(),
        "ncc_before": ncc(batch["fixed"], batch["moving"]).mean(),
        "ncc_after": ncc(batch["fixed"], reg.warped).mean(),
    }
    if config.regularizer_weight:
        metrics["regularizer"] = get_regularizer(config.regularizer)(reg.displacement).mean()
    return metrics


def as_image_pool(config: DIRNetConfig, images: Any, name: str = "images") -> jax.Array:
    """Array-like pool → float32 with a channel axis, with clear errors.

    [N, *image_shape(, C)] → [N, *image_shape, C]; a grouped pool
    [G, T, *image_shape(, C)] → [G, T, *image_shape, C] (pairs within a group).
    """
    images = np.asarray(images)
    expect = (*config.image_shape, config.channels)
    if config.channels == 1 and images.shape[-config.ndim :] == config.image_shape:
        images = images[..., None]
    lead = images.ndim - len(expect)
    if lead not in (1, 2) or images.shape[lead:] != expect:
        dims = ", ".join(map(str, expect))
        raise ValueError(
            f"{name} have shape {images.shape}; expected [N, {dims}] or [G, T, {dims}]"
        )
    if images.shape[lead - 1] < 2:
        what = "images" if lead == 1 else "members per group"
        raise ValueError(
            f"{name}: need at least 2 {what} to draw pairs, got {images.shape[lead - 1]}"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{name} contain NaN or infinite pixels")
    return jnp.asarray(images, jnp.float32)


def is_grouped(config: DIRNetConfig, pool: jax.Array) -> bool:
    return pool.ndim == config.ndim + 3


def data_parallel(config: DIRNetConfig) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
    """(replicated, batch-split) shardings over every device: data parallelism.

    Parameters and the image pool are replicated; each batch is split along its first
    axis. With one device this is plain single-device training.
    """
    devices = jax.devices()
    if config.batch_size % len(devices):
        raise ValueError(
            f"batch_size {config.batch_size} does not split over the {len(devices)} devices"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    spec = jax.sharding.PartitionSpec
    return (
        jax.sharding.NamedSharding(mesh, spec()),
        jax.sharding.NamedSharding(mesh, spec("data")),
    )


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def _reason(err: BaseException) -> str:
    """The innermost cause's first line: orbax's own words are a TensorStore spec,
    TensorStore's the fault; for an OS error, its name alone."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    text = str(err).strip()
    if code := re.search(r"\[os_error_code='(\d+)'\]", text):
        return os.strerror(int(code[1]))
    return next(iter(text.splitlines()), "")[:200]


class CheckpointNotSaved(OSError):
    """orbax could not write a checkpoint (a full disk, a quota, a folder gone)."""

    def __init__(self, mngr: ocp.CheckpointManager, step: int | None, err: Exception):
        good = mngr.latest_step()
        then = f"resume from step {good}" if good is not None else "start from step 0"
        super().__init__(
            f"the checkpoint of step {step} could not be saved in {mngr.directory} "
            f"({_reason(err)}); once that is fixed, running it again will {then}"
        )


class _CheckpointManager(ocp.CheckpointManager):
    """orbax's, with a failed save raised once as CheckpointNotSaved and the reports of
    its abandoned writes dropped (`orbax_reports`); and without its own questions to JAX's
    preemption sync point: it asks with the step it saves, which would move the counter
    of questions `hosts.stop_requests` keeps (JAX's protocol stops at the question after
    the last one asked anywhere)."""

    _step: int | None = None  # of the last save begun
    _raised: int | None = None  # the step whose failed save was raised
    _saving = False  # within orbax's save, which waits for the last one again

    def reached_preemption(self, step: int) -> bool:
        return False

    def _failed(self, err: Exception) -> None:
        orbax_reports.drop(self.directory / str(self._step))
        if self._raised != self._step:  # orbax raises it again at every wait: once is enough
            self._raised = self._step
            raise CheckpointNotSaved(self, self._step, err) from err

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # the last save's failure, if any, with its own step
        self._step, self._saving = step, True
        orbax_reports.hold(self.directory / str(step))
        try:
            return super().save(step, *args, **kwargs)
        except Exception as err:
            self._failed(err)
            raise
        finally:
            self._saving = False

    def wait_until_finished(self) -> None:
        if self._saving:
            return super().wait_until_finished()
        try:
            super().wait_until_finished()
        except Exception as err:
            self._failed(err)
            return
        if self._step is not None:
            orbax_reports.end(self.directory / str(self._step))


def checkpoint_manager(
    workdir: str | os.PathLike, config: DIRNetConfig, *, read_only: bool = False
) -> ocp.CheckpointManager:
    """The work directory's checkpoints; `read_only` for loading a model (creates nothing)."""
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints, create=True, cleanup_tmp_directories=True
        )
    return _CheckpointManager(
        os.path.abspath(os.path.join(workdir, wd.CHECKPOINTS)), options=options
    )


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


class UnreadableCheckpoint(ValueError):
    """A committed checkpoint whose files cannot be read (damaged, or cut short by a copy)."""

    def __init__(self, mngr: ocp.CheckpointManager, step: int, err: Exception):
        earlier = [s for s in mngr.all_steps() if s < step]
        where = mngr.directory / str(step)
        then = f"to resume from step {max(earlier)}" if earlier else "to start again"
        super().__init__(
            f"the checkpoint of step {step} cannot be read ({_reason(err)}); "
            f"move {where} away {then}"
        )


def restore_latest(mngr: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """`state` with the newest checkpoint's contents, or unchanged when there is none.

    Raises ValueError naming the first model array that the checkpoint holds in another
    shape (or not at all), before orbax tries to restore it; UnreadableCheckpoint where
    orbax cannot read its files.
    """
    step = mngr.latest_step()
    if step is None:
        return state
    target = _checkpoint_tree(state)
    try:
        stored = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "default")
    except Exception as err:  # orbax raises bare Exceptions for what TensorStore reports
        raise UnreadableCheckpoint(mngr, step, err) from err
    # Adam's moments mirror the parameters; its state is keyed differently in the metadata.
    model = ("params", "batch_stats")
    have = _shapes({k: stored[k] for k in model if k in stored})
    want = _shapes({k: target[k] for k in model})
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise ValueError(
                f"checkpoint step {step} holds {key} as {have.get(key, 'nothing')}, "
                f"the config needs {want.get(key, 'nothing')}"
            )
    folder = mngr.directory / str(step)
    orbax_reports.hold(folder)
    try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as err:
        orbax_reports.drop(folder)
        raise UnreadableCheckpoint(mngr, step, err) from err
    orbax_reports.end(folder)
    return state.replace(**restored)


def default_steps_per_dispatch() -> int:
    """Adam steps per jitted call in `fit`: 20 on accelerators (an H100 ran a scan of 20 at
    458 steps/s against 383 for single steps, 256², batch 32); 4 on a CPU, where under
    glibc's malloc each call page-faults its temporaries in afresh (653 MiB, 0.3 s of
    system time per 256² step) and 4 straight-line steps share them: 256² 432 → 311 ms per
    step, 28² 3.6 → 3.3 ms. With tcmalloc preloaded, 1 and 4 are alike at 256²
    (benchmarks/NOTES.md)."""
    return 4 if jax.default_backend() == "cpu" else 20


def fit(
    config: DIRNetConfig,
    workdir: str | os.PathLike,
    train_images: Any,
    val_images: Any | None = None,
    *,
    progress: bool = True,
    steps_per_dispatch: int | None = None,
) -> TrainState:
    """Train a DIRNet on random pairs from `train_images`, resuming from `workdir` if present.

    Data-parallel over every device (`data_parallel`). In a job of several processes
    (`jax.distributed`), every process calls fit with the same arguments; process 0 writes
    config and metrics, all save checkpoints (`hosts`).

    Args:
      config: model and schedule; ``num_steps`` is the total, counting resumed steps.
      workdir: where config.json, metrics.jsonl and checkpoints/ live.
      train_images, val_images: [N, *image_shape(, C)] pools of images, pairs drawn within
        a pool; or [G, T, *image_shape(, C)], pairs drawn within a group (the phases of one
        slice, say). Validation uses ``num_val_pairs`` fixed pairs.
      progress: show a progress bar with ETA.
      steps_per_dispatch: Adam steps per jitted call (`train_steps`; the trajectory is the
        same). Default `default_steps_per_dispatch()`.

    Returns:
      The final TrainState: the stored one, with a warning, if `workdir` already holds more
      than ``num_steps`` steps.

    Raises:
      FloatingPointError: the loss became NaN or infinite (names the step and the last
        good checkpoint).
      Interrupted: SIGTERM or SIGINT (Ctrl-C) arrived; training stopped after the call
        running then, with a checkpoint of the step it reached (`hosts.stop_requests`).
    """
    chunk = default_steps_per_dispatch() if steps_per_dispatch is None else steps_per_dispatch
    if chunk < 1:
        raise ValueError(f"steps_per_dispatch must be at least 1, not {chunk}")
    primary = hosts.is_primary()  # the one process that writes config and metrics
    # The inputs are checked before the work directory is claimed: a call that fails them
    # leaves no config.json that a corrected call would then be refused by.
    get_loss(config.similarity)  # an unknown name fails here, with the names it knows
    get_regularizer(config.regularizer)
    replicated, split = data_parallel(config)
    train_pool = as_image_pool(config, train_images, "training images")
    val_pool = None
    if val_images is not None:
        val_pool = as_image_pool(config, val_images, "validation images")
    # Every process checks the stored config (and fails alike), after process 0 wrote it.
    workdir = hosts.primary_first(lambda: wd.claim(workdir, config), f"claim {workdir}")
    pool = jax.device_put(train_pool, replicated)
    val_batch = None
    if val_pool is not None:
        val_key = jax.random.fold_in(jax.random.key(config.seed), 2)
        val_batch = sample_pairs(
            val_key, val_pool, config.num_val_pairs, grouped=is_grouped(config, val_pool)
        )
        val_batch = jax.device_put(val_batch, replicated)

    with contextlib.ExitStack() as stack:
        # One training process per work directory, taken before orbax's manager, which
        # deletes the unfinished checkpoints it finds.
        if (lock := hosts.on_primary(lambda: wd.take(workdir), f"take {workdir}")) is not None:
            stack.enter_context(lock)
        mngr = stack.enter_context(contextlib.closing(checkpoint_manager(workdir, config)))
        # Restored straight into the replicated placement: with several processes, each
        # reads its own replica (a restored array cannot be moved to another host's devices).
        state = restore_latest(mngr, jax.device_put(create_train_state(config), replicated))
        start = int(state.step)
        if primary:
            # A resumed run logs again what came after its checkpoint; one from step 0
            # starts a fresh log (a killed first attempt's step 0 included).
            wd.truncate_metrics(workdir, start if start else -1)
            if start > config.num_steps:  # a run shortened by hand, not a finished one rerun
                warnings.warn(
                    f"{workdir} holds step {start}, past num_steps={config.num_steps}: "
                    f"nothing to train, and the state returned is step {start}'s",
                    stacklevel=2,
                )
        key = data_key(config)
        grouped = is_grouped(config, pool)
        logged: list[float] = []  # checked losses since the last metrics record
        bar = tqdm(
            total=config.num_steps,
            initial=start,
            unit="step",
            disable=not progress,
            desc=f"training to {workdir}",
            dynamic_ncols=True,
        )
        pending: list[jax.Array] = []  # losses not yet checked on the host
        step = saved = start
        with bar, hosts.stop_requests() as requested:
            if start == 0 and val_batch is not None:  # where the learning curves start
                record = {"step": 0, **_validation(state, val_batch)}
                if primary:
                    wd.append_metrics(workdir, record)
            tick = time.perf_counter()
            while (signum := requested()) is None and step < config.num_steps:
                # Whole chunks up to the next log, checkpoint or end, then single steps:
                # two traces at most.
                boundary = min(
                    config.num_steps,
                    (step // config.log_every + 1) * config.log_every,
                    (step // config.checkpoint_every + 1) * config.checkpoint_every,
                )
                steps = chunk if step + chunk <= boundary else 1
                state, losses = train_steps(
                    state, pool, key, steps=steps, batch_size=config.batch_size,
                    grouped=grouped, sharding=split,
                )  # fmt: skip
                step += steps
                pending.append(losses)
                bar.update(steps)
                log = step % config.log_every == 0 or step == config.num_steps
                save = step % config.checkpoint_every == 0 or step == config.num_steps
                if not (log or save):
                    continue
                logged.extend(_checked(jnp.concatenate(pending), step, mngr))
                pending = []
                if log:
                    now = time.perf_counter()
                    record = {
                        "step": step,
                        "train_loss": float(np.mean(logged)),
                        "steps_per_sec": len(logged) / (now - tick),
                    }
                    if val_batch is not None:
                        record.update(_validation(state, val_batch))
                    if primary:
                        wd.append_metrics(workdir, record)
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}")
                    logged, tick = [], time.perf_counter()
                if save:
                    mngr.save(step, args=ocp.args.StandardSave(_checkpoint_tree(state)))
                    saved = step
            if signum is not None:  # asked to stop: keep what was done, then say so
                if pending:
                    _checked(jnp.concatenate(pending), step, mngr)
                if step != saved:
                    mngr.save(step, args=ocp.args.StandardSave(_checkpoint_tree(state)))
                mngr.wait_until_finished()
                raise Interrupted(signum, step, config.num_steps, mngr.directory)
        mngr.wait_until_finished()
    return state


def _validation(state: TrainState, val_batch: Batch) -> dict[str, float]:
    """`eval_step`'s metrics as a metrics record's ``val_*`` entries."""
    return {f"val_{k}": float(v) for k, v in eval_step(state, val_batch).items()}


class Interrupted(BaseException):
    """`fit` stopped on a signal (SIGTERM, SIGINT) after saving a checkpoint of `step`.

    A BaseException, as KeyboardInterrupt and SystemExit are: a script that catches
    Exception around `fit` (a sweep that logs a failed run and goes on) still stops.
    """

    def __init__(self, signum: int, step: int, num_steps: int, directory: Any):
        self.signum, self.step = signum, step
        kept = f"checkpoint of step {step} in {directory}" if step else "no step taken"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step} of {num_steps}; "
            f"{kept}: run it again to resume"
        )

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by that signal (SIGTERM: 143)."""
        return 128 + self.signum


def _checked(losses: jax.Array, last_step: int, mngr: ocp.CheckpointManager) -> list[float]:
    """Host copies of the losses of steps last_step-len+1 … last_step, all finite, or raise."""
    values = np.asarray(jax.device_get(losses), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        step = last_step - len(values) + 1 + int(bad[0])
        mngr.wait_until_finished()
        good = mngr.latest_step()
        where = f"step {good} in {mngr.directory}" if good is not None else "none saved yet"
        raise FloatingPointError(
            f"training loss became {values[bad[0]]} at step {step}; last good checkpoint: {where}"
        )
    return values.tolist()
