"""Training: toy learning, determinism, checkpoints that resume (also after kill -9, a
stop by signal, a damaged checkpoint and a full disk, each failure in one line), NaN
stop, one training process per work directory."""

import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirnet_jax import DIRNetConfig, train
from dirnet_jax import workdir as wd
from dirnet_jax.losses import bending_energy, mse_loss, ncc_loss
from dirnet_jax.models import register
from dirnet_jax.register import load_model
from dirnet_jax.toy import shifted_blobs

TOY = DIRNetConfig(
    image_shape=(28, 28),
    num_downsamplings=2,
    batch_size=8,
    learning_rate=1e-3,
    num_steps=40,
    log_every=10,
    checkpoint_every=20,
    num_val_pairs=16,
)


@pytest.fixture(scope="module")
def pool():
    return shifted_blobs(0, 16)


def leaves_equal(a, b):
    trees = [(s.params, s.batch_stats, s.opt_state) for s in (a, b)]
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), *trees)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_toy_training_raises_ncc(tmp_path, dtype):
    config = TOY.replace(
        num_steps=300, batch_size=16, log_every=50, checkpoint_every=300, compute_dtype=dtype
    )
    # Single steps: this network's only program (fit's default compiles two).
    train.fit(config, tmp_path, shifted_blobs(0, 64), shifted_blobs(1, 64), progress=False,
              steps_per_dispatch=1)  # fmt: skip
    records = wd.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 50, 100, 150, 200, 250, 300]
    before, first, last = (
        records[0]["val_ncc_before"],
        records[1]["val_ncc_after"],
        records[-1]["val_ncc_after"],
    )
    assert last > before + 0.15, (before, last)  # ~0.76 → ~0.96 on this toy set
    assert last > first
    assert records[-1]["train_loss"] < records[1]["train_loss"]


def test_volume_training_raises_ncc(tmp_path):
    # 3-D (16³, a 4³ grid) through fit, as 2-D above: the kernels are N-dimensional.
    config = TOY.replace(image_shape=(16, 16, 16), num_steps=60, log_every=20,
                         checkpoint_every=60, num_val_pairs=8)  # fmt: skip
    pool, val = (shifted_blobs(seed, 32, (16, 16, 16), max_shift=2.0) for seed in (0, 1))
    train.fit(config, tmp_path, pool, val, progress=False, steps_per_dispatch=1)
    records = wd.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    before, last = records[0]["val_ncc_before"], records[-1]["val_ncc_after"]
    assert last > before + 0.08, (before, last)  # 0.78 → 0.90 here
    assert records[-1]["train_loss"] < records[1]["train_loss"]


def test_same_seed_same_parameters(tmp_path, pool):
    a = train.fit(TOY, tmp_path / "a", pool, progress=False)
    b = train.fit(TOY, tmp_path / "b", pool, progress=False)
    assert leaves_equal(a, b)
    c = train.fit(TOY.replace(seed=1), tmp_path / "c", pool, progress=False)
    assert not leaves_equal(a, c)


def test_resume_continues_from_checkpoint(tmp_path, pool):
    full = train.fit(TOY, tmp_path / "full", pool, progress=False)
    half = train.fit(TOY.replace(num_steps=20), tmp_path / "run", pool, progress=False)
    assert int(half.step) == 20
    resumed = train.fit(TOY, tmp_path / "run", pool, progress=False)
    assert int(resumed.step) == 40
    assert leaves_equal(full, resumed)
    assert [r["step"] for r in wd.read_metrics(tmp_path / "run")] == [10, 20, 30, 40]
    # A finished run restarted does no more work, silently; asked for fewer steps than it
    # holds, it says so (the state returned is the stored one).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train.fit(TOY, tmp_path / "run", pool, progress=False)
    assert leaves_equal(full, again)
    message = f"{tmp_path / 'run'} holds step 40, past num_steps=30: nothing to train"
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}"):
        shorter = train.fit(TOY.replace(num_steps=30), tmp_path / "run", pool, progress=False)
    assert int(shorter.step) == 40 and leaves_equal(full, shorter)
    assert [r["step"] for r in wd.read_metrics(tmp_path / "run")] == [10, 20, 30, 40]


def test_validation_is_logged_from_step_0_once(tmp_path, pool):
    # The untrained network's validation opens the log (where the learning curves start):
    # its displacements are ~1e-5 px, so it registers nothing yet. A resumed run does not
    # log step 0 again; one started afresh (no checkpoint) starts a fresh log.
    run = tmp_path / "run"
    train.fit(TOY.replace(num_steps=20), run, pool, pool, progress=False)
    initial, *trained = wd.read_metrics(run)
    assert initial.keys() == {"step", "val_loss", "val_ncc_before", "val_ncc_after"}
    assert initial["step"] == 0
    assert initial["val_ncc_after"] == pytest.approx(initial["val_ncc_before"], abs=1e-4)
    assert initial["val_loss"] == pytest.approx(-initial["val_ncc_after"], rel=1e-6)
    assert [r["val_ncc_before"] for r in trained] == [initial["val_ncc_before"]] * 2
    assert [r["step"] for r in trained] == [10, 20] and "train_loss" in trained[0]

    train.fit(TOY, run, pool, pool, progress=False)
    assert [r["step"] for r in wd.read_metrics(run)] == [0, 10, 20, 30, 40]
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    train.fit(TOY.replace(num_steps=10), run, pool, pool, progress=False)
    assert [r["step"] for r in wd.read_metrics(run)] == [0, 10]


KILLED_RUN = """
import json, os, signal, sys, time
import numpy as np
from dirnet_jax import train, workdir
from dirnet_jax.toy import shifted_blobs
config = train.DIRNetConfig(**{config})
append = workdir.append_metrics

def append_then_die(path, record):
    if record["step"] < 30:
        return append(path, record)
    # ten steps after the checkpoint at 20: killed halfway through writing the record
    time.sleep(1.0)  # let the asynchronous save of step 20 land
    line = json.dumps(record) + "\\n"
    with open(os.path.join(path, workdir.METRICS), "a") as f:
        f.write(line[: len(line) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

workdir.append_metrics = append_then_die
train.fit(config, sys.argv[1], shifted_blobs(0, 16), progress=False, steps_per_dispatch=1)
"""


def test_kill_minus_nine_mid_record_then_rerun_resumes(tmp_path, pool):
    script = KILLED_RUN.replace("{config}", repr(TOY.to_dict()))
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert train.checkpoint_manager(run, TOY).latest_step() == 20
    assert (run / wd.METRICS).read_text().count("\n") == 2  # and half of step 30's record
    assert [r["step"] for r in wd.read_metrics(run)] == [10, 20]

    # The same command again, and one never killed: single steps as the script's (bit for
    # bit only with the same programs).
    resumed = train.fit(TOY, run, pool, progress=False, steps_per_dispatch=1)
    assert [r["step"] for r in wd.read_metrics(run)] == [10, 20, 30, 40]
    uninterrupted = train.fit(
        TOY, tmp_path / "uninterrupted", pool, progress=False, steps_per_dispatch=1
    )
    assert leaves_equal(resumed, uninterrupted)


DAMAGED_RUN = """
import gc, sys, time
from dirnet_jax import register, train
from dirnet_jax.toy import shifted_blobs
config = train.DIRNetConfig(**{config})
for attempt in (lambda: train.fit(config, sys.argv[1], shifted_blobs(0, 16), progress=False,
                                  steps_per_dispatch=1),
                lambda: register.load_model(sys.argv[1])):
    try:
        attempt()
    except (train.UnreadableCheckpoint, register.RegistrationError) as err:
        print(type(err).__name__, err)
time.sleep(0.2)  # the reads orbax left in flight finish, their coroutines are collected
gc.collect()

class Unrelated:
    def __del__(self):
        raise RuntimeError("an unrelated error still reaches stderr")

Unrelated()
"""


def test_damaged_checkpoint_is_one_line_and_the_one_before_resumes(tmp_path, pool):
    first = train.fit(TOY, tmp_path, pool, progress=False)  # checkpoints of 20 and 40
    data = (tmp_path / "checkpoints" / "40" / "default" / "ocdbt.process_0" / "d").iterdir()
    largest = max(data, key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])  # a copy cut short, a bad disk
    # In a process of its own: orbax's reads still in flight when one failed end in
    # coroutines nobody awaits, which would surface in a later test.
    script = DAMAGED_RUN.replace("{config}", repr(TOY.replace(num_steps=60).to_dict()))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing of orbax's abandoned reads (tracebacks of TensorStore callbacks into a closed
    # event loop, of collected coroutines, of futures never retrieved) on stderr:
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert "RuntimeError: an unrelated error still reaches stderr" in proc.stderr
    message = (
        r"the checkpoint of step 40 cannot be read \(OUT_OF_RANGE: .*\); "
        f"move {tmp_path / 'checkpoints' / '40'} away to resume from step 20"
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert re.fullmatch(f"UnreadableCheckpoint {message}", lines[0])
    assert re.fullmatch(f"RegistrationError {message}", lines[1])
    assert (tmp_path / "checkpoints" / "40").is_dir()  # nothing removed

    (tmp_path / "checkpoints" / "40").rename(tmp_path / "damaged-40")  # as the message says
    again = train.fit(TOY, tmp_path, pool, progress=False)
    assert leaves_equal(again, first)  # steps 21–40 once more, from step 20
    assert [r["step"] for r in wd.read_metrics(tmp_path)] == [10, 20, 30, 40]


FULL_DISK_RUN = """
import resource, signal, sys
from dirnet_jax import train
from dirnet_jax.toy import shifted_blobs
config = train.DIRNetConfig(**{config})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # a 3×3×16×16 conv: 9 kB
try:
    train.fit(config, sys.argv[1], shifted_blobs(0, 16), progress=False, steps_per_dispatch=1)
except train.CheckpointNotSaved as err:
    print(type(err).__name__, err)

class Unrelated:
    def __del__(self):
        raise RuntimeError("an unrelated error still reaches stderr")

Unrelated()
"""


def test_checkpoint_not_saved_is_one_line_and_training_resumes(tmp_path, pool):
    train.fit(TOY.replace(num_steps=20), tmp_path, pool, progress=False)
    script = FULL_DISK_RUN.replace("{config}", repr(TOY.to_dict()))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing of orbax's abandoned writes (its threads' error logs, TensorStore callbacks
    # into a closed event loop, coroutines collected at exit) on stderr:
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert "RuntimeError: an unrelated error still reaches stderr" in proc.stderr
    assert proc.stdout == (
        f"CheckpointNotSaved the checkpoint of step 40 could not be saved in "
        f"{tmp_path / 'checkpoints'} (File too large); once that is fixed, running it "
        "again will resume from step 20\n"
    )
    resumed = train.fit(TOY, tmp_path, pool, progress=False)  # room again: steps 21–40
    assert [r["step"] for r in wd.read_metrics(tmp_path)] == [10, 20, 30, 40]
    assert leaves_equal(resumed, train.fit(TOY, tmp_path / "uninterrupted", pool, progress=False))


def signal_after_calls(monkeypatch, calls: int, signals: list[int]):
    """Make `fit`'s `calls`-th call of train_steps send itself `signals` when it returns."""
    made = []

    def train_steps(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append(kwargs["steps"])
        if len(made) == calls:
            for signum in signals:
                # To this (the main) thread, so each handler runs before the next signal:
                # os.kill may land on one of XLA's threads, and two signals pending at once
                # are one (a second Ctrl-C seen as the first, under load).
                signal.raise_signal(signum)
        return out

    real = train.train_steps
    monkeypatch.setattr(train, "train_steps", train_steps)
    return made


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler during the test. A shell starts a background job (the
    suite run as ``make test &`` from a script) with SIGINT ignored, which `fit` leaves
    ignored (`hosts.stop_requests`), so these tests would see no SIGINT at all."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.usefixtures("ctrl_c")
def test_signal_stops_at_the_step_with_a_checkpoint(tmp_path, pool, monkeypatch, signum):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run = tmp_path / "stopped"
    # 3 steps per call: calls of 3, 3, 3, 1 up to the log at 10, so the 5th ends at 13.
    made = signal_after_calls(monkeypatch, 5, [signum])
    with pytest.raises(train.Interrupted) as stop:
        train.fit(TOY, run, pool, progress=False, steps_per_dispatch=3)
    assert sum(made) == 13 and len(made) == 5  # no call after the signal
    assert (stop.value.step, stop.value.exit_code) == (13, 128 + signum)
    assert not isinstance(stop.value, Exception)  # `except Exception` does not swallow it
    name = signal.Signals(signum).name
    assert str(stop.value) == (
        f"stopped by {name} at step 13 of 40; checkpoint of step 13 in "
        f"{run / 'checkpoints'}: run it again to resume"
    )
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert train.checkpoint_manager(run, TOY).all_steps() == [13]

    monkeypatch.undo()
    resumed = train.fit(TOY, run, pool, progress=False, steps_per_dispatch=3)
    assert [r["step"] for r in wd.read_metrics(run)] == [10, 20, 30, 40]
    again = train.fit(TOY, tmp_path / "again", pool, progress=False, steps_per_dispatch=3)
    assert leaves_equal(resumed, again)


def test_signal_during_the_step_0_validation_stops_before_any_step(tmp_path, pool, monkeypatch):
    # A time limit that lands while the untrained network is evaluated: no step is taken,
    # no checkpoint written, and the rerun starts a fresh log (one step 0, not two).
    real = train.eval_step

    def eval_step(*args):
        signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(train, "eval_step", eval_step)
    monkeypatch.setattr(train, "train_steps", lambda *a, **k: pytest.fail("a step was taken"))
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted) as stop:
        train.fit(TOY, run, pool, pool, progress=False)
    assert (stop.value.step, stop.value.exit_code) == (0, 128 + signal.SIGTERM)
    assert str(stop.value).endswith("at step 0 of 40; no step taken: run it again to resume")
    assert train.checkpoint_manager(run, TOY).all_steps() == []
    assert [r["step"] for r in wd.read_metrics(run)] == [0]

    monkeypatch.undo()
    train.fit(TOY.replace(num_steps=10), run, pool, pool, progress=False)
    assert [r["step"] for r in wd.read_metrics(run)] == [0, 10]


@pytest.mark.usefixtures("ctrl_c")
def test_second_signal_acts_at_once(tmp_path, pool, monkeypatch):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    made = signal_after_calls(monkeypatch, 9, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train.fit(TOY, tmp_path, pool, progress=False, steps_per_dispatch=3)
    assert len(made) == 9  # step 23
    assert train.checkpoint_manager(tmp_path, TOY).all_steps() == [20]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


PREEMPTED_RUN = """
import os, signal, socket, sys, time
import jax
from dirnet_jax import train
from dirnet_jax.toy import shifted_blobs
with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
jax.distributed.initialize(f"localhost:{port}", 1, 0)  # JAX's preemption service
config = train.DIRNetConfig(**{config})
pool = shifted_blobs(0, 16)
train.fit(config, sys.argv[1], pool, progress=False, steps_per_dispatch=1)  # 40 steps
os.kill(os.getpid(), signal.SIGTERM)  # between two runs: JAX's service catches it
time.sleep(2)
try:
    train.fit(config.replace(num_steps=60), sys.argv[1], pool, progress=False, steps_per_dispatch=1)
except train.Interrupted as stop:
    print(stop)
    sys.exit(stop.exit_code)
"""


def test_sigterm_in_a_distributed_job_stops_the_next_run(tmp_path):
    script = PREEMPTED_RUN.replace("{config}", repr(TOY.to_dict()))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert out.startswith("stopped by SIGTERM at step 40 of 60; checkpoint of step 40"), out
    assert train.checkpoint_manager(tmp_path, TOY).latest_step() == 40


def poisoned_mse(fixed, warped):
    """MSE, but NaN for every pair whose fixed image is the poisoned (constant 7) one."""
    poisoned = jnp.all(fixed == 7.0, axis=(1, 2, 3))
    return jnp.where(poisoned, jnp.nan, mse_loss(fixed, warped))


@pytest.mark.parametrize("steps_per_dispatch", [1, 3])
def test_non_finite_loss_stops_with_the_step(tmp_path, steps_per_dispatch):
    images = shifted_blobs(0, 64)
    config = TOY.replace(
        similarity=poisoned_mse, batch_size=4, num_steps=200, checkpoint_every=5, log_every=5
    )
    key = train.data_key(config)
    fixed_ids = [
        np.asarray(train.sample_pairs(jax.random.fold_in(key, s), jnp.arange(64.0), 4)["fixed"])
        for s in range(1, 201)
    ]

    def first_as_fixed(i):
        return next((s for s, ids in enumerate(fixed_ids, 1) if i in ids), 0)

    # Poison an image that first appears as a fixed image after a few checkpoints.
    poisoned = next(i for i in range(64) if 12 < first_as_fixed(i) < 100)
    first_bad = first_as_fixed(poisoned)
    images[poisoned] = 7.0
    with pytest.raises(FloatingPointError, match=f"became nan at step {first_bad};") as err:
        train.fit(config, tmp_path, images, progress=False, steps_per_dispatch=steps_per_dispatch)
    good = (first_bad - 1) // 5 * 5
    assert f"last good checkpoint: step {good} in " in str(err.value)
    assert train.checkpoint_manager(tmp_path, config).latest_step() == good  # NaN never saved


def test_training_convolutions_are_xla_own_on_cpu():
    # TRAIN_COMPILER_OPTIONS keeps YNNPACK off the convolutions (slower kernel gradients).
    if train.TRAIN_COMPILER_OPTIONS is None:
        pytest.skip("the options are set for jaxlib 0.10 only")
    config = DIRNetConfig()  # 256², batch 32: XLA:CPU picks YNNPACK for large convolutions
    state, pool = train.create_train_state(config), jnp.zeros((32, 256, 256, 1))
    args = (state, pool, train.data_key(config))
    kwargs = dict(steps=1, batch_size=32, grouped=False)  # compiled, never run

    def library_convolutions(jitted):
        hlo = jitted.lower(*args, **kwargs).compile().as_text()
        return re.findall(r'%ynn_fusion[.\d]* = [^\n]*op_name="[^"]*/conv_general_dilated"', hlo)

    static = ("steps", "batch_size", "grouped", "sharding")
    default = jax.jit(train.train_steps.__wrapped__, static_argnames=static)
    assert library_convolutions(default)  # what XLA:CPU would do without the options
    assert not library_convolutions(train.train_steps)


def test_each_jitted_function_traces_once(tmp_path, pool):
    config = TOY.replace(num_steps=30, features=8)

    def traces():
        return train.train_steps._cache_size(), train.eval_step._cache_size()

    before = traces()
    train.fit(config, tmp_path / "a", pool, pool, progress=False)
    after = traces()
    # Chunks of steps_per_dispatch up to each log step, single steps after: two traces.
    chunked = train.default_steps_per_dispatch() > 1
    assert after == (before[0] + 1 + chunked, before[1] + 1)
    # Another run of the same config (say the next MNIST digit) reuses the trace; so does
    # one with another seed and schedule (`DIRNetConfig.network`: a sweep in one process).
    train.fit(config, tmp_path / "b", pool[::-1], pool, progress=False)
    assert traces() == after
    other = config.replace(seed=5, num_steps=50, log_every=25, checkpoint_every=25,
                           max_checkpoints=1)  # fmt: skip
    train.fit(other, tmp_path / "c", pool, pool, progress=False)
    assert traces() == after
    assert train.create_train_state(other).config == config.network() != config


def test_fused_steps_follow_the_single_step_loop(pool):
    config = TOY.replace(num_steps=6)
    images = jnp.asarray(pool)
    key = train.data_key(config)
    loop = train.create_train_state(config)
    losses = []
    for step in range(1, 7):
        batch = train.sample_pairs(jax.random.fold_in(key, step), images, config.batch_size)
        loop, metrics = train.train_step(loop, batch)
        losses.append(float(metrics["loss"]))
    fused = train.create_train_state(config)
    fused, first = train.train_steps(fused, images, key, steps=2, batch_size=8, grouped=False)
    fused, rest = train.train_steps(fused, images, key, steps=4, batch_size=8, grouped=False)
    np.testing.assert_allclose(np.concatenate([first, rest]), losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(loop.params), jax.tree.leaves(fused.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_several_steps_per_dispatch_train_the_same(tmp_path, pool):
    config = TOY.replace(num_steps=37, log_every=10, checkpoint_every=15)
    single = train.fit(config, tmp_path / "single", pool, pool, progress=False)
    before = train.train_steps._cache_size()
    chunked = train.fit(
        config, tmp_path / "chunked", pool, pool, progress=False, steps_per_dispatch=4
    )
    assert train.train_steps._cache_size() <= before + 1  # chunks of 4; single steps reused
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(chunked.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    steps = [[r["step"] for r in wd.read_metrics(tmp_path / d)] for d in ("single", "chunked")]
    assert steps[0] == steps[1] == [0, 10, 20, 30, 37]
    saved = train.checkpoint_manager(tmp_path / "chunked", config).all_steps()
    assert saved == [30, 37]  # the last two are kept
    with pytest.raises(ValueError, match="steps_per_dispatch"):
        train.fit(config, tmp_path / "bad", pool, progress=False, steps_per_dispatch=0)
    assert not (tmp_path / "bad").exists()


def test_workdir_with_another_config_refuses(tmp_path, pool):
    train.fit(TOY.replace(num_steps=10), tmp_path, pool, progress=False)
    with pytest.raises(
        ValueError, match=r"another configuration .*transformer: 'cubic' there, 'tps' now"
    ):
        train.fit(TOY.replace(transformer="tps"), tmp_path, pool, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["transformer"] == "cubic"


def test_workdir_from_before_a_config_field_existed_is_reused(tmp_path):
    # A run made before compute_dtype existed stored no such field: it used the default.
    wd.claim(tmp_path, TOY)
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    del stored["compute_dtype"]
    path.write_text(json.dumps(stored))
    assert wd.claim(tmp_path, TOY) == tmp_path
    with pytest.raises(ValueError, match="compute_dtype: 'float32' there, 'bfloat16' now"):
        wd.claim(tmp_path, TOY.replace(compute_dtype="bfloat16"))


def test_custom_similarity_and_regularizer_plug_in(tmp_path, pool):
    # Its own programs: single steps.
    config = TOY.replace(
        similarity=mse_loss, regularizer=smoothness, regularizer_weight=0.1, num_steps=5
    )
    state = train.fit(config, tmp_path, pool, progress=False, steps_per_dispatch=1)
    assert int(state.step) == 5
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["similarity"].endswith("mse_loss")
    assert stored["regularizer"] == f"{__name__}.smoothness"
    # Recorded by name: the same function resumes, another is refused (README, Extend it),
    # and the register command loads the run (it needs no loss).
    state = train.fit(config.replace(num_steps=6), tmp_path, pool, progress=False,
                      steps_per_dispatch=1)  # fmt: skip
    assert int(state.step) == 6
    with pytest.raises(ValueError, match=r"similarity: '.*mse_loss' there, '.*ncc_loss' now"):
        train.fit(config.replace(similarity=ncc_loss), tmp_path, pool, progress=False)
    with pytest.raises(ValueError, match=r"regularizer_weight: 0\.1 there, 0\.2 now"):
        train.fit(config.replace(regularizer_weight=0.2), tmp_path, pool, progress=False)
    assert load_model(tmp_path).config.similarity.endswith("mse_loss")


def smoothness(displacement):
    """[B, H, W, 2] → [B]: a regularizer of our own, as a user would write one."""
    return jnp.mean(jnp.diff(displacement, axis=1) ** 2, axis=(1, 2, 3))


def test_a_weighted_regularizer_smooths_the_fields(tmp_path):
    # The same toy run without and with a bending penalty: the penalised fields bend ~20×
    # less (0.0034 against 0.00015 here) and NCC still rises; the validation loss is the
    # weighted sum of the terms reported.
    pool, val = shifted_blobs(0, 32), shifted_blobs(1, 16)
    bends = []
    for weight in (0.0, 100.0):
        config = TOY.replace(num_steps=60, log_every=20, checkpoint_every=60,
                             regularizer_weight=weight)  # fmt: skip
        state = train.fit(config, tmp_path / str(weight), pool, val, progress=False,
                          steps_per_dispatch=1)  # fmt: skip
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        reg = register(config, variables, val[:8], val[8:])
        bends.append(float(bending_energy(reg.displacement).mean()))
        records = wd.read_metrics(tmp_path / str(weight))
        first, last = records[0], records[-1]
        assert last["val_ncc_after"] > first["val_ncc_before"] + 0.02, (first, last)
        assert ("val_regularizer" in last) == bool(weight)
    assert last["val_loss"] == pytest.approx(
        -last["val_ncc_after"] + 100.0 * last["val_regularizer"], rel=1e-5
    )
    assert bends[1] < 0.1 * bends[0], bends
    stored = json.loads((tmp_path / "100.0" / "config.json").read_text())
    assert (stored["regularizer"], stored["regularizer_weight"]) == ("bending", 100.0)


def test_sample_pairs_distinct_and_reproducible():
    images = jnp.arange(5.0).reshape(5, 1, 1, 1) * jnp.ones((5, 4, 4, 1))
    key = jax.random.key(3)
    a = train.sample_pairs(key, images, 64)
    b = train.sample_pairs(key, images, 64)
    assert np.array_equal(a["fixed"], b["fixed"]) and np.array_equal(a["moving"], b["moving"])
    ids_f, ids_m = np.asarray(a["fixed"][:, 0, 0, 0]), np.asarray(a["moving"][:, 0, 0, 0])
    assert np.all(ids_f != ids_m)
    assert set(ids_f) == set(range(5))


def test_grouped_pairs_stay_within_a_group():
    # Pool [G=3, T=4]: value = 10·group + member.
    values = 10 * np.arange(3)[:, None] + np.arange(4)[None, :]
    pool = jnp.asarray(values, jnp.float32)[:, :, None, None, None] * jnp.ones((1, 1, 4, 4, 1))
    batch = train.sample_pairs(jax.random.key(0), pool, 256, grouped=True)
    f, m = np.asarray(batch["fixed"][:, 0, 0, 0]), np.asarray(batch["moving"][:, 0, 0, 0])
    assert np.all(f // 10 == m // 10) and np.all(f != m)
    assert set(f.astype(int)) == set(values.ravel())


def test_fit_on_grouped_pool(tmp_path):
    pool = shifted_blobs(0, 12).reshape(3, 4, 28, 28, 1)  # 3 "slices" × 4 "phases"
    config = TOY.replace(num_steps=10)  # grouped: its own programs, so single steps
    state = train.fit(config, tmp_path, pool, pool, progress=False, steps_per_dispatch=1)
    assert int(state.step) == 10
    assert "val_loss" in wd.read_metrics(tmp_path)[-1]


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((4, 28, 24)), "expected \\[N, 28, 28, 1\\]"),
        (np.zeros((1, 28, 28)), "at least 2 images"),
        (np.zeros((3, 1, 28, 28)), "at least 2 members per group"),
        (np.full((3, 28, 28), np.nan), "NaN or infinite"),
    ],
)
def test_bad_training_images(tmp_path, images, message):
    with pytest.raises(ValueError, match=message):
        train.fit(TOY, tmp_path / "w", images, progress=False)
    # Nothing claimed: a corrected call with other settings is not refused for a config.json.
    assert not (tmp_path / "w").exists()


def test_bad_validation_images_or_similarity_claim_nothing(tmp_path, pool):
    with pytest.raises(ValueError, match="validation images have shape"):
        train.fit(TOY, tmp_path / "w", pool, pool[..., :20, :], progress=False)
    with pytest.raises(ValueError, match="unknown similarity 'nc'; choose one of"):
        train.fit(TOY.replace(similarity="nc"), tmp_path / "w", pool, progress=False)
    assert not (tmp_path / "w").exists()


def test_atomic_write_replaces_files_only(tmp_path):
    path = tmp_path / "out.json"
    wd.atomic_write_text(path, "old")
    wd.atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    os.mkfifo(tmp_path / "fifo")  # stands in for /dev/null, which root could rename over
    for target in (tmp_path / "fifo", tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            wd.atomic_write_text(target, "x")
    assert (tmp_path / "fifo").is_fifo()


@pytest.mark.parametrize("named", [None, "temporary"])
def test_atomic_output_names_the_output_in_a_write_error(tmp_path, named):
    path = tmp_path / "fig.png"
    path.write_text("old")
    with pytest.raises(OSError) as caught, wd.atomic_output(path) as tmp:
        # savefig and np.save report a full disk without a file name; others name the file
        # they were writing, here the temporary one
        raise OSError(errno.ENOSPC, "No space left on device", tmp if named else None)
    assert str(caught.value) == f"[Errno 28] No space left on device: '{path}'"
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    with pytest.raises(OSError, match="elsewhere"), wd.atomic_output(path):
        raise OSError(errno.EACCES, "Permission denied", "elsewhere")  # another file: as is


def test_atomic_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(OSError, match=re.escape(f"device: '{b}'")), wd.atomic_outputs():
        wd.atomic_write_text(a, "new a")
        assert a.read_text() == "old a"  # not yet: the set is not whole
        with wd.atomic_output(b):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporaries
    with wd.atomic_outputs():
        wd.atomic_write_text(a, "new a")
        wd.atomic_write_text(b, "new b")
        assert a.read_text() == "old a"
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    wd.atomic_write_text(a, "alone")  # outside one, each file is renamed at once again
    assert a.read_text() == "alone" and len(list(tmp_path.iterdir())) == 2
    # A rename at the end that fails names its output and leaves no temporary behind.
    real = os.replace

    def replace_a_only(src, dst):
        if dst != a:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace_a_only)
    with pytest.raises(OSError, match=re.escape(f"I/O error: '{b}'")), wd.atomic_outputs():
        wd.atomic_write_text(a, "last a")
        wd.atomic_write_text(b, "last b")
    assert (a.read_text(), b.read_text()) == ("last a", "new b")
    assert len(list(tmp_path.iterdir())) == 2


def test_metrics_name_a_line_that_is_not_json(tmp_path):
    (tmp_path / wd.METRICS).write_text('{"step": 10}\n{"step": 2\n{"step": 30}\n')
    with pytest.raises(ValueError, match=rf"{wd.METRICS}, line 2: not a metrics record"):
        wd.read_metrics(tmp_path)


def test_a_full_disk_while_logging_names_the_metrics_file(tmp_path, monkeypatch):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as the OS

    monkeypatch.setattr(wd, "open", lambda *args: FullDisk(), raising=False)
    with pytest.raises(OSError, match=re.escape(f"device: '{tmp_path / wd.METRICS}'")):
        wd.append_metrics(tmp_path, {"step": 10})


def test_one_training_process_per_work_directory(tmp_path, pool):
    config = TOY.replace(num_steps=10)
    held = wd.take(tmp_path)  # another process's lock, as flock sees it
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(ValueError, match=f"{tmp_path} is in use: {me} is training there"):
        train.fit(config, tmp_path, pool, progress=False)
    assert not (tmp_path / wd.CHECKPOINTS).exists()  # orbax's manager never started
    held.close()  # it finished (or died: the OS releases its lock)
    train.fit(config, tmp_path, pool, progress=False)
    wd.take(tmp_path).close()  # fit let go of it
