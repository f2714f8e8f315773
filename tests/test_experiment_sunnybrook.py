"""`python -m experiments.sunnybrook` end to end on a tiny synthetic cohort and a fake SCD tree."""

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("SimpleITK")
from dirnet_jax.datasets import phantom
from experiments import sunnybrook as experiment
from tests import fake_scd

TINY = experiment.Preset(size=32, num_downsamplings=2, iterations=20)
SPEC = phantom.CohortSpec(num_patients=3, slices=2, phases=6, size=64, spacing_mm=5.0)


def args_for(tmp_path, **overrides):
    # Single steps: one training program per variant to compile, not two (the MNIST
    # experiment's test trains as `fit` does by default).
    values = dict(
        variant="C1", preset="cpu", scd_dir=None, data_dir=str(tmp_path / "tfds"),
        workdir=str(tmp_path / "run"), iterations=None, batch_size=8, learning_rate=1e-3,
        regularizer="bending", regularizer_weight=0.0, seed=0, log_every=10,
        checkpoint_every=10, elastix=True, summarize=False, progress=False, in_memory=False,
        compute_dtype="float32", steps_per_dispatch=1,
    )  # fmt: skip
    return types.SimpleNamespace(**(values | overrides))


def check_row(row, timed):
    for key in ("dice", "hd95_mm", "mad_mm"):
        assert set(row[key]) == {"mean", "std", "n"} and np.isfinite(row[key]["mean"])
    assert ("sec_per_pair" in row) == timed


def test_phantom_end_to_end(tmp_path, capsys):
    paths = experiment.run(args_for(tmp_path), preset=TINY, spec=SPEC)
    assert "Generating" not in capsys.readouterr().err  # TFDS's bars too follow --noprogress
    assert sorted(p.name for p in paths) == [
        "fig3_validation_loss.png", "fig4_example.png", "results.json", "results.md",
    ]  # fmt: skip
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"] == "phantom" and results["preset"] == "custom"
    assert results["pairs"] == 4  # one test patient × two slices × (ED→ES, ES→ED)
    assert list(results["rows"]) == ["before", "elastix", "C1"]
    check_row(results["rows"]["before"], timed=False)
    check_row(results["rows"]["elastix"], timed=True)
    check_row(results["rows"]["C1"], timed=True)
    assert results["rows"]["C1"]["dice"]["n"] == 4
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| Before registration |" in table
    assert "| DIRNet C1 (receptive_field: overlap) |" in table
    # The share of folded pixels (Jacobian determinant ≤ 0) of DIRNet's and elastix's fields.
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    column = lines[0].index("folded %")
    cells = {line[0]: line[column] for line in lines[1:]}
    assert cells["| Before registration"] == "–"
    for name, label in (
        ("C1", "DIRNet C1 (receptive_field: overlap)"),
        ("elastix", "SimpleElastix"),
    ):
        folded = results["rows"][name]["folded"]
        assert folded["n"] == 4 and 0 <= folded["mean"] <= 1
        assert cells[f"| {label}"] == f"{100 * folded['mean']:.2f}"

    # A second variant into the same work directory joins the table; the first is reused.
    experiment.run(args_for(tmp_path, variant="B2", elastix=False), preset=TINY, spec=SPEC)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert list(rows) == ["before", "elastix", "B2", "C1"]
    assert rows["C1"] == results["rows"]["C1"]
    experiment.run(args_for(tmp_path, summarize=True), preset=TINY, spec=SPEC)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"] == rows


def test_sweep_of_seeds_is_summarized_over_runs(tmp_path):
    # A sweep writes one work directory per seed; --summarize on their parent gathers them.
    sweep = tmp_path / "sweep"
    for seed, name, elastix in ((0, "C1", True), (1, "C1", False), (1, "B2", False)):
        args = args_for(tmp_path, workdir=str(sweep / f"seed{seed}"), seed=seed, variant=name,
                        elastix=elastix)  # fmt: skip
        experiment.run(args, preset=TINY, spec=SPEC)
    (sweep / "seed1" / "results.json").unlink()  # rebuilt by the summary
    paths = experiment.run(
        args_for(tmp_path, workdir=str(sweep), summarize=True), preset=TINY, spec=SPEC
    )
    assert sweep / "summary.md" in paths and sweep / "seed1" / "results.json" in paths
    assert not (sweep / "results.json").exists()  # no runs of its own

    per_seed = [json.loads((sweep / f"seed{s}" / "results.json").read_text())["rows"]
                for s in (0, 1)]  # fmt: skip
    assert list(per_seed[1]) == ["before", "B2", "C1"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert list(summary["rows"]) == ["elastix", "B2", "C1"]
    assert summary["rows"]["elastix"]["runs"] == ["seed0"]
    c1 = summary["rows"]["C1"]
    assert c1["runs"] == ["seed0", "seed1"]
    dice = [rows["C1"]["dice"]["mean"] for rows in per_seed]
    assert c1["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert c1["dice"]["std"] == pytest.approx(np.std(dice)) and c1["dice"]["n"] == 2
    folded = [rows["C1"]["folded"]["mean"] for rows in per_seed]
    assert c1["folded"]["mean"] == pytest.approx(np.mean(folded)) and c1["folded"]["n"] == 2
    assert summary["before"] == per_seed[0]["before"]
    table = (sweep / "summary.md").read_text()
    c1_line = next(line for line in table.splitlines() if line.startswith("| DIRNet C1 "))
    assert c1_line.startswith("| DIRNet C1 (receptive_field: overlap) | 2 |")
    percent = f"{100 * np.mean(folded):.2f} ± {100 * np.std(folded):.2f}"
    assert c1_line.endswith(f" | {percent} |")
    assert "| SimpleElastix | 1 |" in table

    # A run evaluated before the folded share was measured: the summary has none for C1.
    path = sweep / "seed1" / "C1" / "evaluation.json"
    stored = json.loads(path.read_text())
    del stored["row"]["folded"]
    path.write_text(json.dumps(stored))
    experiment.run(args_for(tmp_path, workdir=str(sweep), summarize=True), preset=TINY,
                   spec=SPEC)  # fmt: skip
    assert "folded" not in json.loads((sweep / "summary.json").read_text())["rows"]["C1"]
    c1_line = next(line for line in (sweep / "summary.md").read_text().splitlines()
                   if line.startswith("| DIRNet C1 "))  # fmt: skip
    assert c1_line.endswith(" | – |")

    # A run of another setting (here a weighted regularizer) is not averaged in as a seed:
    # one line, and the outputs stay as they were. Its own table names the regularizer.
    shutil.copytree(sweep / "seed1", sweep / "weighted")
    path = sweep / "weighted" / "C1" / "evaluation.json"
    stored = json.loads(path.read_text())
    stored["settings"]["config"] |= {"regularizer": "diffusion", "regularizer_weight": 0.5}
    path.write_text(json.dumps(stored))
    outputs = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    summarize = args_for(tmp_path, workdir=str(sweep), summarize=True)
    message = ("--summarize: the C1 runs seed0 and weighted differ in regularizer, "
               "regularizer_weight, not only in seed")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{message}; summarize each setting's runs"):
        experiment.run(summarize, preset=TINY, spec=SPEC)
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == outputs
    shutil.move(sweep / "weighted", tmp_path / "weighted")
    experiment.run(args_for(tmp_path, workdir=str(tmp_path / "weighted"), summarize=True),
                   preset=TINY, spec=SPEC)  # fmt: skip
    table = (tmp_path / "weighted" / "results.md").read_text()
    assert "| DIRNet C1 (receptive_field: overlap, 0.5 × diffusion) |" in table


def test_summarize_without_runs_is_one_line_and_prepares_nothing(tmp_path):
    args = args_for(tmp_path, workdir=str(tmp_path / "typo"), summarize=True)
    with pytest.raises(ValueError, match=f"--summarize: no evaluated run in {tmp_path}/typo"):
        experiment.run(args, preset=TINY, spec=SPEC)
    assert list(tmp_path.iterdir()) == []  # neither the work directory nor the data


def write_evaluation(folder, text):
    folder.mkdir(parents=True)
    (folder / "evaluation.json").write_text(text)
    np.save(folder / "example.npy", np.zeros((4, 4)))


def test_summarize_of_runs_made_otherwise_is_one_line_and_writes_nothing(tmp_path):
    # Gathering no run would have written a table of the "before" row alone over theirs.
    work = tmp_path / "work"
    row = {"dice": {"mean": 0.8, "std": 0.1, "n": 2}}
    other_preset = {"data": f"phantom:{SPEC.name}", "preset": "cpu", "size": 128}
    write_evaluation(work / "C1", json.dumps({"settings": other_preset, "row": row}))
    (work / "results.md").write_text("their table")
    args = args_for(tmp_path, workdir=str(work), summarize=True)
    with pytest.raises(ValueError, match="evaluated with --preset=cpu, not custom: give that"):
        experiment.run(args, preset=TINY, spec=SPEC)
    assert not (tmp_path / "tfds").exists()  # said before any data is prepared
    other_data = {"data": "scd:256", "preset": "custom", "size": TINY.size}
    (work / "C1" / "evaluation.json").write_text(json.dumps({"settings": other_data, "row": row}))
    with pytest.raises(ValueError, match=f"no run in {work} was evaluated on this data"):
        experiment.run(args, preset=TINY, spec=SPEC)
    (work / "C1" / "evaluation.json").write_text('{"settings": ')  # damaged
    with pytest.raises(ValueError, match=f"{work}/C1/evaluation.json cannot be read"):
        experiment.run(args, preset=TINY, spec=SPEC)
    assert (work / "results.md").read_text() == "their table"
    assert sorted(p.name for p in work.rglob("*")) == [
        "C1", "evaluation.json", "example.npy", "results.md"
    ]  # fmt: skip


def test_in_memory_cohort_is_the_prepared_one(tmp_path):
    key, raw = experiment.data_source(args_for(tmp_path), SPEC, 256)
    key_mem, raw_mem = experiment.data_source(args_for(tmp_path, in_memory=True), SPEC, 256)
    assert key == key_mem == f"phantom:{SPEC.name}"
    for split in ("train", "test"):
        stored, generated = raw(split), raw_mem(split)
        assert stored.keys() == generated.keys()
        for k in stored:
            np.testing.assert_array_equal(stored[k], generated[k], err_msg=k)
            assert stored[k].dtype == generated[k].dtype, k
    with pytest.raises(ValueError, match="--in_memory"):
        experiment.data_source(args_for(tmp_path, in_memory=True, scd_dir="x"), SPEC, 256)


def test_fake_scd_end_to_end(tmp_path):
    fake_scd.write_tree(tmp_path / "scd")
    args = args_for(tmp_path, scd_dir=str(tmp_path / "scd"), variant="baseline", elastix=False)
    tiny = experiment.Preset(size=48, num_downsamplings=2, iterations=10)
    experiment.run(args, preset=tiny, scd_size=fake_scd.SIZE)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"] == "scd"
    assert results["pairs"] == 4  # two test patients × one annotated slice × two directions
    before = results["rows"]["before"]
    # Fake annuli 12–17 px (ED) and 8–13 px (ES) at 1.25 mm: overlap 12–13 px.
    assert before["dice"]["mean"] == pytest.approx(
        2 * (13**2 - 12**2) / (17**2 - 12**2 + 13**2 - 8**2), abs=0.05
    )
    # Surfaces are boundary pixels (just inside each contour): the ED inner and ES outer
    # surfaces coincide (both at ~12.5 px), the others are 4 px apart; weighted by
    # perimeter, (16.5·4 + 8.5·4) / (12.5 + 16.5 + 8.5 + 12.5) = 2 px.
    assert before["mad_mm"]["mean"] == pytest.approx(2.0 * 1.25, abs=0.3)


def test_missing_scd_dir_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "experiments.sunnybrook", f"--scd_dir={tmp_path}/nope",
           f"--data_dir={tmp_path}/tfds", f"--workdir={tmp_path}/w"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1] == f"error: --scd_dir {tmp_path}/nope is not a folder"
    )
    assert list(tmp_path.iterdir()) == []  # the work directory it made is gone again


def test_dirnet_label_names_overrides_and_a_weighted_regularizer():
    assert experiment.dirnet_label("baseline") == "DIRNet baseline"
    assert experiment.dirnet_label("A1") == "DIRNet A1 (downsampling: max)"
    weighted = {"regularizer": "diffusion", "regularizer_weight": 0.25}
    assert experiment.dirnet_label("A1", weighted) == (
        "DIRNet A1 (downsampling: max, 0.25 × diffusion)"
    )
    assert experiment.dirnet_label("baseline", {"regularizer_weight": 100.0}) == (
        "DIRNet baseline (100 × bending)"  # a config from before the regularizer's name
    )
    assert experiment.dirnet_label("baseline", {"regularizer_weight": 0.0}) == "DIRNet baseline"
