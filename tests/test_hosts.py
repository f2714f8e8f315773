"""Several processes (hosts) on one machine: `--distributed` end to end, against one process.

Two processes with two virtual CPU devices each form a four-device job over JAX's
coordination service and gloo collectives, as hosts of a cluster would.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dirnet_jax import hosts, train
from dirnet_jax import workdir as wd

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("SimpleITK")
from tests import conftest
from tests.test_experiment_mnist import wait_for_training
from tests.test_mnist_data import write_standin

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(args: list[str], logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Start `python -m experiments.mnist --distributed` as processes 0 and 1 of one job,
    each writing `<logs>/<i>.out` and `.err`."""
    port = free_port()
    env = conftest.virtual_devices(2)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "experiments.mnist", "--distributed",
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={i}", *args]  # fmt: skip
        # Files, not pipes: a process blocked on a full pipe would stall the other one.
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err), logs))
    return procs


def finish(procs: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each of `start_two`'s processes, once they end."""
    results = []
    for i, (proc, logs) in enumerate(procs):
        try:
            code = proc.wait(timeout=600)
        finally:
            proc.kill()
        results.append((code, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()))
    return results


def two_processes(args: list[str], logs: Path) -> list[tuple[int, str, str]]:
    """Run processes 0 and 1 of one job (`start_two`) to the end."""
    return finish(start_two(args, logs))


def test_one_process_needs_no_coordination():
    assert hosts.is_primary()
    assert hosts.on_primary(lambda: 3, "three", share=True) == 3
    assert hosts.primary_first(lambda: "x", "x") == "x"
    tree = {"a": np.ones(2)}
    assert hosts.local_copy(tree) is tree


def test_two_processes_train_resume_and_write_once(tmp_path):
    write_standin(tmp_path / "mnist.pkl.gz", sizes=(200, 60, 60))
    common = [f"--data_dir={tmp_path / 'tfds'}", f"--mnist_pickle={tmp_path / 'mnist.pkl.gz'}",
              "--digits=3", "--batch_size=8", "--elastix_pairs=1", "--log_every=10",
              "--checkpoint_every=10", "--noprogress",
              "--steps_per_dispatch=1"]  # fmt: skip
    two = tmp_path / "two"

    # 10 iterations, then resumed to 20: process 0 prepares the data, evaluates and writes.
    # Single steps: one program to compile, not two (the sigterm test below runs fit's).
    for iterations in (10, 20):
        args = [*common, f"--workdir={two}", f"--iterations={iterations}"]
        (code0, out0, err0), (code1, out1, err1) = two_processes(args, tmp_path / "logs")
        assert code0 == 0, err0[-3000:]
        assert code1 == 0, err1[-3000:]
        assert "wrote:" in out0 and "results.json" in out0
        assert "wrote:" not in out1 and "digit 3" not in out1  # process 1 writes nothing
    assert [r["step"] for r in wd.read_metrics(two / "digit_3")] == [0, 10, 20]

    # The same run in one process on one device: the same training and evaluation.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", *common, f"--workdir={tmp_path / 'one'}",
         "--iterations=20"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [wd.read_metrics(d / "digit_3") for d in (two, tmp_path / "one")]
    for key in ("train_loss", "val_loss"):
        values = [[r[key] for r in run if key in r] for run in runs]  # step 0: no train_loss
        np.testing.assert_allclose(*values, rtol=1e-4)
    digits = [json.loads((d / "results.json").read_text())["digits"]["3"]
              for d in (two, tmp_path / "one")]  # fmt: skip
    for key in ("ncc_before", "ncc_dirnet", "ncc_elastix"):
        np.testing.assert_allclose(digits[0][key]["mean"], digits[1][key]["mean"], atol=1e-5)

    # An error on process 0 (the work directory holds another configuration) stops both
    # processes with its one-line message, at once.
    args = [*common, f"--workdir={two}", "--iterations=20", "--batch_size=4"]
    (code0, _, err0), (code1, _, err1) = two_processes(args, tmp_path / "logs")
    assert code0 == 1 and code1 == 1
    message = "holds a run with another configuration (batch_size: 8 there, 4 now)"
    assert f"error: {two / 'digit_3'} {message}" in err0
    assert f"error: process 0 failed: {two / 'digit_3'} {message}" in err1


def test_cluster_flags_need_distributed():
    cmd = [sys.executable, "-m", "experiments.sunnybrook", "--process_id=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--process_id need --distributed" in proc.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        ([], "error: --distributed: coordinator_address should be defined. (outside a cluster"),
        (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
         "error: --distributed: process_id and num_processes must be nonnegative, with "
         "process_id < num_processes. Got process_id=2, num_processes=2.\n"),
    ],
)  # fmt: skip
def test_distributed_without_a_job_is_one_line(tmp_path, flags, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    cmd = [sys.executable, "-m", "experiments.sunnybrook", "--distributed", *flags,
           f"--workdir={tmp_path}/w"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    write_standin(tmp_path / "mnist.pkl.gz", sizes=(200, 60, 60))
    work = tmp_path / "two"
    args = [f"--data_dir={tmp_path / 'tfds'}", f"--mnist_pickle={tmp_path / 'mnist.pkl.gz'}",
            "--digits=3", "--batch_size=8", "--iterations=100000", "--log_every=10",
            "--checkpoint_every=20", "--noprogress", f"--workdir={work}"]  # fmt: skip
    procs = start_two(args, tmp_path / "logs")
    try:
        wait_for_training(work / "digit_3", [p for p, _ in procs])
        procs[1][0].send_signal(signal.SIGTERM)  # preempted: JAX tells the other process
    finally:
        results = finish(procs)
    steps = set()
    for code, out, err in results:
        assert code == 128 + signal.SIGTERM, err[-3000:]
        found = re.search(r"stopped by SIGTERM at step (\d+) of 100000; checkpoint of step \1",
                          err)  # fmt: skip
        assert found, err[-3000:]
        steps.add(int(found[1]))
        assert "wrote:" not in out
    assert len(steps) == 1  # the same step on both: one whole checkpoint
    config = wd.load_config(work / "digit_3")
    assert train.checkpoint_manager(work / "digit_3", config).latest_step() == steps.pop()


@pytest.mark.parametrize("handler", [signal.default_int_handler, signal.SIG_IGN])
def test_stop_requests_catches_ctrl_c_unless_ignored(handler):
    """Caught where Python would raise KeyboardInterrupt, and Python's handler put back
    for a second one; left ignored where the process ignores it (a background job's)."""
    before = signal.signal(signal.SIGINT, handler)
    try:
        ignored = handler is signal.SIG_IGN
        with hosts.stop_requests() as requested:
            assert (signal.getsignal(signal.SIGINT) is handler) == ignored
            assert requested() is None
            signal.raise_signal(signal.SIGINT)
            assert requested() == (None if ignored else signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is handler  # a second one acts at once
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, before)
