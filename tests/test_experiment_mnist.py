"""`python -m experiments.mnist` end to end on a tiny stand-in MNIST (same builder path)."""

import json
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("SimpleITK")
from dirnet_jax import DIRNetConfig, train
from dirnet_jax import workdir as wd
from experiments import common
from experiments import mnist as experiment
from tests.test_mnist_data import write_standin

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    write_standin(root / "mnist.pkl.gz", sizes=(200, 60, 60))
    return root


def args_for(standin, workdir, **overrides):
    values = dict(
        workdir=str(workdir),
        data_dir=str(standin / "tfds"),
        mnist_pickle=str(standin / "mnist.pkl.gz"),
        digits=["3", "7"],
        iterations=20,
        batch_size=8,
        learning_rate=1e-3,
        regularizer="bending",
        regularizer_weight=0.0,
        seed=0,
        elastix_pairs=2,
        log_every=10,
        checkpoint_every=10,
        progress=False,
        compute_dtype="float32",
        steps_per_dispatch=None,
    )
    return types.SimpleNamespace(**(values | overrides))


def test_end_to_end_outputs(standin, tmp_path):
    paths = experiment.run(args_for(standin, tmp_path))
    names = sorted(p.name for p in paths)
    assert names == [
        "fig2_learning_curves.png",
        "fig2_registrations.png",
        "results.json",
        "results.md",
    ]
    for p in paths:
        assert p.stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["image_shape"] == [28, 28]
    assert sorted(results["digits"]) == ["3", "7"]
    for row in results["digits"].values():
        assert row["ncc_before"]["n"] == 5  # six test images: one fixed, five moving
        assert row["ncc_elastix"]["n"] == 2
        for key in ("ncc_before", "ncc_dirnet", "ncc_elastix", "folded_dirnet"):
            assert set(row[key]) == {"mean", "std", "n"} and np.isfinite(row[key]["mean"])
        assert row["folded_dirnet"]["n"] == 5 and 0 <= row["folded_dirnet"]["mean"] <= 1
        for key in ("folded_elastix", "folded_dirnet_elastix_pairs"):  # elastix's 2 pairs
            assert row[key]["n"] == 2 and 0 <= row[key]["mean"] <= 1
    for digit in ("3", "7"):  # Fig 2's fourth row: where the fields fold, over the pairs
        share = np.load(tmp_path / f"digit_{digit}" / "figure.npz")["folded_share"]
        assert share.shape == (28, 28) and share.min() >= 0 and share.max() <= 1
        folded = results["digits"][digit]["folded_dirnet"]["mean"]  # the same pixels
        np.testing.assert_allclose(share.mean(), folded, rtol=1e-6, atol=1e-12)
        assert row["sec_per_pair_dirnet"] > 0 and row["sec_per_pair_elastix"] > 0
        assert row["train_seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Trained on −NCC.\n\n") and "SimpleElastix" in table
    assert "| NCC DIRNet | folded % DIRNet |" in table
    assert "| SimpleElastix | folded % DIRNet, elastix |" in table
    assert table.count("\n") == 6  # the line above, a blank line, the header, two digits
    assert (tmp_path / "digit_3" / "checkpoints").is_dir()

    # A rerun reuses every digit's checkpoint and evaluation: the same numbers.
    experiment.run(args_for(standin, tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_learning_curves_come_from_validation(standin, tmp_path):
    experiment.run(args_for(standin, tmp_path, digits=["1"], elastix_pairs=0))
    records = [json.loads(line) for line in (tmp_path / "digit_1" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 10, 20]  # from the untrained network on
    assert all("val_loss" in r for r in records)
    results = json.loads((tmp_path / "results.json").read_text())
    seconds = 10 / records[1]["steps_per_sec"] + 10 / records[2]["steps_per_sec"]
    assert results["digits"]["1"]["train_seconds"] == pytest.approx(seconds)
    assert results["digits"]["1"]["ncc_elastix"] is None


def test_a_run_past_the_iterations_asked_is_refused(standin, tmp_path, recwarn):
    # Rerunning with fewer --iterations in the same work directory (the default runs/mnist,
    # say) would have evaluated the longer run and labelled it with the shorter.
    experiment.run(args_for(standin, tmp_path, digits=["1"], elastix_pairs=0))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fewer = args_for(standin, tmp_path, digits=["1"], elastix_pairs=0, iterations=10)
    with pytest.raises(ValueError, match="digit_1 holds a run of 20 iterations, more than "
                                         "--iterations=10: use another --workdir"):  # fmt: skip
        experiment.run(fewer)
    assert not [w for w in recwarn if "past num_steps" in str(w.message)]  # said once
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_objective_label_names_what_was_minimised():
    config = DIRNetConfig()
    assert common.objective_label(config.to_dict()) == "−NCC"
    weighted = config.replace(regularizer="diffusion", regularizer_weight=0.25)
    assert common.objective_label(weighted.to_dict()) == "−NCC + 0.25 × diffusion"
    assert common.objective_label({}) == "−NCC"  # a config from before the field


def test_test_pairs_exclude_the_fixed_image():
    fixed, moving = experiment.test_pairs(50, seed=0, digit=4)
    assert fixed not in moving and sorted([fixed, *moving]) == list(range(50))
    assert experiment.test_pairs(50, seed=0, digit=4)[0] == fixed


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--digits=3,12"], "--digits takes a comma-separated list of 0"),
        (
            ["--mnist_pickle=/nonexistent/mnist.pkl.gz"],
            "error: MNIST source /nonexistent/mnist.pkl.gz does not exist",
        ),
        (["--elastix_pairs=-1"], "--elastix_pairs=-1: -1 is not a non-negative integer"),
        (
            ["--distributed", "--coordinator_address=node01", "--num_processes=2"],
            "--coordinator_address takes host:port",
        ),
        (["--learning_rate=nan"], "--learning_rate is finite and ≥ 0"),
        (["--steps_per_dispatch=0"], "--steps_per_dispatch=0: 0 is not a positive integer"),
        (["--regularizer_weight=-1"], "--regularizer_weight is finite and ≥ 0"),
        (["--workdir=README.md"], "--workdir=README.md: is a file, not a folder"),
        (["--data_dir=README.md"], "--data_dir=README.md: is a file, not a folder"),
    ],
)
def test_bad_flags_exit_nonzero_with_one_line(tmp_path, flags, message):
    cmd = [
        sys.executable,
        "-m",
        "experiments.mnist",
        f"--workdir={tmp_path}/w",
        f"--data_dir={tmp_path}/d",
        *flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.rglob("*")) == []  # no file written, no folder left


@pytest.mark.parametrize("command", ["experiments.mnist", "experiments.sunnybrook"])
def test_help_lists_the_shared_run_flags(command):
    # absl lists the flags of the module it runs; the run flags live in experiments.common.
    proc = subprocess.run(
        [sys.executable, "-m", command, "--help"], capture_output=True, text=True, cwd=REPO
    )
    shown = proc.stdout + proc.stderr
    for flag in ("--workdir", "--iterations", "--seed", "--batch_size", "--compilation_cache"):
        assert f"  {flag}:" in shown, shown
    assert "--xla_" not in shown and "--jax_" not in shown  # the library's stay in --helpfull


def test_a_damaged_cached_evaluation_is_named(tmp_path):
    path = tmp_path / "digit_3" / "evaluation.json"
    path.parent.mkdir()
    path.write_text('{"settings": {"config": ')
    with pytest.raises(ValueError, match=f"^{path} cannot be read .*; remove it and run again"):
        common.read_evaluation(path)
    path.write_text('{"settings": {}}')
    assert common.read_evaluation(path) == {"settings": {}}


def wait_for_training(run, procs, timeout=120.0):
    """Block until `run` has a metrics line (training is under way) or a process ended."""
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert all(p.poll() is None for p in procs), "a process ended before training"
        assert time.monotonic() < deadline, "no training within the time limit"
        time.sleep(0.2)


SIGTERM_WHILE_WRITING = """
import os, signal, sys, time
from pathlib import Path
from experiments import common, mnist
from dirnet_jax import workdir as wd
mnist.define_flags()

def run(args):  # an experiment's last step, writing its results, cut short by SIGTERM
    Path(args.workdir).mkdir()
    with wd.atomic_output(Path(args.workdir) / "results.json") as tmp:
        tmp.write_text("half of it")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    return []

common.run_command(run)
"""


def test_sigterm_outside_training_stops_at_once_leaving_no_half_file(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_WRITING, f"--workdir={work}"],
        capture_output=True, text=True, cwd=REPO, timeout=50,
    )  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("stopped by SIGTERM; what was finished")
    assert "Traceback" not in proc.stderr
    assert not work.exists()  # the temporary file removed, then the folder the run made


def test_sigterm_stops_with_a_checkpoint_and_its_exit_code(standin, tmp_path):
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "experiments.mnist", f"--workdir={work}",
           f"--data_dir={standin / 'tfds'}", f"--mnist_pickle={standin / 'mnist.pkl.gz'}",
           "--digits=3", "--iterations=100000", "--batch_size=8", "--log_every=10",
           "--checkpoint_every=100000", "--noprogress", "--steps_per_dispatch=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(work / "digit_3", [proc])
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends at the time limit
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    found = re.search(r"stopped by SIGTERM at step (\d+) of 100000; checkpoint of step \1 in (.+): "
                      r"run it again to resume$", err.strip())  # fmt: skip
    assert found, err[-3000:]
    config = wd.load_config(work / "digit_3")
    assert train.checkpoint_manager(work / "digit_3", config).all_steps() == [int(found[1])]
    assert found[2] == str(work / "digit_3" / "checkpoints")
    assert "wrote:" not in out and not (work / "results.json").exists()
