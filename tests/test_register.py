"""The register command: PNG, NumPy, NIfTI and DICOM pairs, CSV batches, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
from dirnet_jax import DIRNetConfig, compile_cache, imageio, train  # noqa: E402
from dirnet_jax import register as cli  # noqa: E402
from dirnet_jax.losses import ncc  # noqa: E402
from dirnet_jax.toy import shifted_blobs  # noqa: E402

CONFIG = DIRNetConfig(
    image_shape=(28, 28), num_downsamplings=2, features=8, num_steps=150, batch_size=16,
    learning_rate=2e-3, log_every=50, checkpoint_every=150,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("model")
    train.fit(CONFIG, workdir, shifted_blobs(0, 64), progress=False)
    return workdir


@pytest.fixture(scope="module")
def pair():
    fixed, moving = shifted_blobs(5, 2)[..., 0]
    return fixed, moving


def args(checkpoint, out, **kw):
    values = dict(checkpoint=str(checkpoint), out=str(out), fixed=None, moving=None,
                  moving_labels=None, pairs=None, batch_size=4, progress=False,
                  figure=False)  # fmt: skip
    return types.SimpleNamespace(**(values | kw))


def write(path, array, spacing=None, origin=None):
    if str(path).endswith(".npy"):
        np.save(path, array)
        return path
    image = sitk.GetImageFromArray(array)
    if spacing:
        image.SetSpacing(spacing)
    if origin:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_png_pair_with_labels(model_dir, pair, tmp_path, capsys):
    fixed, moving = pair
    f = write(tmp_path / "f.png", (fixed * 200).astype(np.uint8))
    m = write(tmp_path / "m.png", (moving * 200).astype(np.uint8))
    lab = write(tmp_path / "lab.png", (moving > 0.5).astype(np.uint8) * 3)
    out = tmp_path / "out"
    code = cli.main(args(model_dir, out, fixed=str(f), moving=str(m), moving_labels=str(lab)))
    assert code == 0
    assert files_in(out) == ["displacement.npy", "labels.png", "warped.png"]
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.png")))
    assert warped.dtype == np.uint8 and warped.shape == (28, 28)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.png")))
    assert set(np.unique(labels)) <= {0, 3}
    line = capsys.readouterr().out
    before, after = (float(x) for x in line.split("NCC ")[1].split(",")[0].split(" → "))
    assert after > before + 0.2  # the toy model learnt to align blobs
    displacement = np.load(out / "displacement.npy")
    assert displacement.shape == (28, 28, 2)


def test_nifti_keeps_geometry_and_field_works_in_itk(model_dir, pair, tmp_path):
    fixed, moving = pair
    geometry = dict(spacing=(1.5, 2.0), origin=(3.0, -4.0))
    f = write(tmp_path / "f.nii.gz", fixed.astype(np.float32), **geometry)
    m = write(tmp_path / "m.nii.gz", moving.astype(np.float32), **geometry)
    out = tmp_path / "out"
    assert cli.main(args(model_dir, out, fixed=str(f), moving=str(m))) == 0
    assert files_in(out) == ["displacement.nii.gz", "warped.nii.gz"]
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSpacing() == geometry["spacing"] and warped.GetOrigin() == geometry["origin"]

    # Independent check: ITK's own DisplacementFieldTransform with our field reproduces the warp.
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetSpacing() == geometry["spacing"]
    transform = sitk.DisplacementFieldTransform(field)
    moving_img = sitk.ReadImage(str(m))
    itk_warped = sitk.GetArrayFromImage(
        sitk.Resample(moving_img, moving_img, transform, sitk.sitkLinear, 0.0)
    )
    ours = sitk.GetArrayFromImage(warped)
    np.testing.assert_allclose(ours[4:-4, 4:-4], itk_warped[4:-4, 4:-4], atol=1e-4)


def test_another_spacing_or_orientation_is_noted(model_dir, pair, tmp_path, capsys):
    fixed, moving = pair
    f = write(tmp_path / "f.nii.gz", fixed.astype(np.float32), spacing=(1.5, 2.0))
    m = write(tmp_path / "m.nii.gz", moving.astype(np.float32), spacing=(1.5, 2.0), origin=(9, 9))
    turned = sitk.ReadImage(str(m))
    turned.SetDirection((0, 1, 1, 0))
    sitk.WriteImage(turned, str(tmp_path / "turned.nii.gz"))
    mask = write(tmp_path / "mask.nii.gz", (moving > 0.5).astype(np.uint8))  # spacing (1, 1)
    cases = [
        ({"moving": m}, []),  # another origin alone (a shift) is no note
        (
            {"moving": m, "moving_labels": mask},
            ["mask.nii.gz and m.nii.gz differ in spacing (1, 1) against (1.5, 2)"],
        ),
        (
            {"moving": tmp_path / "turned.nii.gz"},
            ["turned.nii.gz and f.nii.gz differ in direction (0, 1, 1, 0) against (1, 0, 0, 1)"],
        ),
    ]
    for i, (files, expected) in enumerate(cases):
        flags = {"fixed": str(f)} | {k: str(v) for k, v in files.items()}
        assert cli.main(args(model_dir, tmp_path / f"out{i}", **flags)) == 0
        out = capsys.readouterr().out.replace(f"{tmp_path}/", "")
        notes = out.split("note: ")[1:]
        assert [n.split(": registered pixel to pixel")[0] for n in notes] == expected, out


def test_an_output_that_itk_cuts_short_is_an_error_not_a_file(model_dir, pair, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    fixed, moving = pair
    f = write(tmp_path / "f.nii.gz", fixed.astype(np.float32))
    m = write(tmp_path / "m.nii.gz", moving.astype(np.float32))
    like = imageio.read_image(write(tmp_path / "f.png", (fixed * 200).astype(np.uint8)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"an earlier run's")
    real = sitk.WriteImage

    def cut_short(image, path, *more):  # what ITK's NIfTI writer does on a full disk: no error
        real(image, path, *more)
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(sitk, "WriteImage", cut_short)
    assert cli.main(args(model_dir, out, fixed=str(f), moving=str(m))) != 0
    written = "the file written reads back otherwise"
    assert f"cannot write to {out}: {written}" in capsys.readouterr().err
    assert files_in(out) == ["warped.nii.gz"]  # the earlier one, whole; no temporary files
    assert (out / "warped.nii.gz").read_bytes() == b"an earlier run's"

    def refuse(image, path, *more):  # what ITK's PNG writer does on a full disk
        raise RuntimeError(f"ITK ERROR PNGImageIO: Error while writing to file: {path}\n"
                           "Reason: No space left on device\n")  # fmt: skip

    monkeypatch.setattr(sitk, "WriteImage", refuse)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'w.png'}'"):
        imageio.write_image(tmp_path / "w", fixed * 200, like)

    # The disk fills between a pair's files: the earlier run's set stays whole, not a new
    # warped image beside an old displacement.
    (out / "displacement.nii.gz").write_bytes(b"an earlier run's field")
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, *more: (
        refuse(image, path) if "displacement" in path else real(image, path, *more)))  # fmt: skip
    assert cli.main(args(model_dir, out, fixed=str(f), moving=str(m))) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert files_in(out) == ["displacement.nii.gz", "warped.nii.gz"]
    assert (out / "warped.nii.gz").read_bytes() == b"an earlier run's"

    # A pair of a CSV that cannot be written leaves no folder of its own, only the summary.
    (tmp_path / "pairs.csv").write_text("f.nii.gz,m.nii.gz\n")
    listed = tmp_path / "listed"
    assert cli.main(args(model_dir, listed, pairs=str(tmp_path / "pairs.csv"))) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in listed.iterdir()] == ["summary.csv"]


@pytest.mark.parametrize("kind", ["npy", "dcm"])
def test_numpy_and_dicom_pairs(model_dir, pair, tmp_path, kind):
    fixed, moving = pair
    if kind == "dcm":
        f = write(tmp_path / "f.dcm", (fixed * 1000).astype(np.int16), spacing=(1.25, 1.25))
        m = write(tmp_path / "m.dcm", (moving * 1000).astype(np.int16), spacing=(1.25, 1.25))
        expected = ["displacement.nii.gz", "warped.nii.gz"]
    else:
        f, m = write(tmp_path / "f.npy", fixed), write(tmp_path / "m.npy", moving)
        expected = ["displacement.npy", "warped.npy"]
    out = tmp_path / "out"
    assert cli.main(args(model_dir, out, fixed=str(f), moving=str(m))) == 0
    assert files_in(out) == expected
    if kind == "dcm":
        assert sitk.ReadImage(str(out / "warped.nii.gz")).GetSpacing() == (1.25, 1.25)


def test_python_api_matches_the_jitted_model(model_dir, pair):
    from dirnet_jax.models import register

    model = cli.load_model(model_dir)
    assert model.step == CONFIG.num_steps
    fixed, moving = pair
    result = cli.register_pair(model, fixed, moving)
    reg = register(CONFIG, model.variables, fixed[None, ..., None], moving[None, ..., None])
    np.testing.assert_allclose(result.displacement, reg.displacement[0], atol=1e-5)
    np.testing.assert_allclose(result.warped, reg.warped[0, ..., 0], atol=1e-5)
    assert result.ncc_after == pytest.approx(
        float(ncc(fixed[None, ..., None], reg.warped)[0]), abs=1e-5
    )


def test_other_sizes_are_padded_and_cropped(model_dir):
    model = cli.load_model(model_dir)
    fixed, moving = shifted_blobs(1, 2, shape=(30, 33))[..., 0]
    result = cli.register_pair(model, fixed, moving)
    assert result.warped.shape == (30, 33) and result.displacement.shape == (30, 33, 2)
    assert any("padded (30, 33) to (32, 36)" in n for n in result.notes)


def test_csv_batch_reports_bad_rows_and_goes_on(model_dir, pair, tmp_path, capsys):
    fixed, moving = pair
    for name, image in (("f", fixed), ("m", moving), ("m2", np.roll(moving, 1, 0))):
        write(tmp_path / f"{name}.npy", image)
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving\nf.npy,m.npy\nf.npy,missing.npy\nf.npy,m2.npy\n"
    )
    out = tmp_path / "out"
    code = cli.main(args(model_dir, out, pairs=str(tmp_path / "pairs.csv")))
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.npy does not exist" in err
    assert files_in(out) == ["displacement.npy"] * 2 + ["summary.csv"] + ["warped.npy"] * 2
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("fixed,moving,out,ncc_before")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0002_m", "0004_m2"]


def test_one_pair_gets_a_figure_by_default_a_csv_when_asked(model_dir, pair, tmp_path):
    fixed, moving = pair
    for name, image in (("f", fixed), ("m", moving)):
        write(tmp_path / f"{name}.npy", image)
    one = dict(fixed=str(tmp_path / "f.npy"), moving=str(tmp_path / "m.npy"))
    assert cli.main(args(model_dir, tmp_path / "one", **one, figure=None)) == 0
    assert files_in(tmp_path / "one") == ["displacement.npy", "figure.png", "warped.npy"]
    (tmp_path / "pairs.csv").write_text("f.npy,m.npy\nm.npy,f.npy\n")
    csv = dict(pairs=str(tmp_path / "pairs.csv"))
    assert cli.main(args(model_dir, tmp_path / "csv", **csv, figure=None)) == 0
    assert "figure.png" not in files_in(tmp_path / "csv")  # ~0.5 s a pair: asked for only
    assert cli.main(args(model_dir, tmp_path / "asked", **csv, figure=True)) == 0
    assert files_in(tmp_path / "asked").count("figure.png") == 2


def test_figure_of_a_3d_pair_is_its_middle_slice(tmp_path):
    config = DIRNetConfig(image_shape=(8, 8, 8), num_downsamplings=1)
    fixed, moving = np.random.default_rng(0).random((2, 8, 8, 8)).astype(np.float32)
    u = np.zeros((8, 8, 8, 3))
    u[4, ..., 1] = 1.0  # only the middle slice moves, along the slice's rows
    pair = cli.CheckedPair(fixed, moving, None, [])
    result = cli.PairResult(moving, u, None, 0.1, 0.2, 0.0, [])
    row = cli.Row(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")
    drawn = {}
    real = cli.plots.registration_figure

    def spy(*a, **kw):
        drawn.update(args=a, kw=kw)
        return real(*a, **kw)

    model = types.SimpleNamespace(config=config)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.plots, "registration_figure", spy)
        cli.write_figure(model, pair, result, row, tmp_path / "figure.png")
    np.testing.assert_array_equal(drawn["args"][0], fixed[4])
    np.testing.assert_array_equal(drawn["args"][3], u[4, ..., 1:])  # the in-slice components
    assert drawn["kw"]["grid_step"] == 2 and "slice 4 of axis 0" in drawn["kw"]["title"]
    assert (tmp_path / "figure.png").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_csv_goes_a_group_at_a_time_and_an_interrupt_keeps_the_summary(
    model_dir, pair, tmp_path, monkeypatch, capsys, signum
):
    fixed, moving = pair
    write(tmp_path / "f.npy", fixed)
    for k in range(5):
        write(tmp_path / f"m{k}.npy", np.roll(moving, k, 0))
    (tmp_path / "pairs.csv").write_text("".join(f"f.npy,m{k}.npy\n" for k in range(5)))
    monkeypatch.setattr(cli, "GROUP_BATCHES", 1)  # groups of batch_size=2 rows: 2, 2, 1
    groups, register_group = [], cli._register_group

    def counted(model, rows, *more):
        groups.append(len(rows))
        if len(groups) == 3:  # Ctrl-C, or a cluster's time limit, during the last group
            if signum == signal.SIGINT:  # what Python's handler raises (a background job,
                raise KeyboardInterrupt  # CI's say, ignores SIGINT itself)
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the command's handler raises here
        return register_group(model, rows, *more)

    monkeypatch.setattr(cli, "_register_group", counted)
    out = tmp_path / "out"
    default = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a job starts, whatever runs us
    try:
        code = cli.main(args(model_dir, out, pairs=str(tmp_path / "pairs.csv"), batch_size=2))
    finally:
        signal.signal(signal.SIGTERM, default)
    assert code == 128 + signum and groups == [2, 2, 1]
    err = capsys.readouterr().err
    assert err == f"interrupted after 4 of 5 pairs; {out / 'summary.csv'} lists them\n"
    summary = (out / "summary.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in summary[1:]] == [
        str(tmp_path / f"m{k}.npy") for k in range(4)
    ]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"{k + 1:04d}_m{k}" for k in range(4)
    ]
    # Uninterrupted, the groups give what one group gives.
    monkeypatch.setattr(cli, "_register_group", register_group)
    assert cli.main(args(model_dir, out, pairs=str(tmp_path / "pairs.csv"), batch_size=2)) == 0
    grouped = np.load(out / "0005_m4" / "displacement.npy")
    monkeypatch.setattr(cli, "GROUP_BATCHES", 8)
    assert cli.main(args(model_dir, out, pairs=str(tmp_path / "pairs.csv"), batch_size=2)) == 0
    np.testing.assert_array_equal(np.load(out / "0005_m4" / "displacement.npy"), grouped)
    assert len((out / "summary.csv").read_text().splitlines()) == 6


def test_constant_image_warns_but_registers(model_dir, pair, tmp_path, capsys):
    f = write(tmp_path / "f.npy", np.full((28, 28), 0.3))
    m = write(tmp_path / "m.npy", pair[1])
    assert cli.main(args(model_dir, tmp_path / "out", fixed=str(f), moving=str(m))) == 0
    stdout = capsys.readouterr().out
    assert "is constant: NCC is undefined" in stdout
    assert np.all(np.isfinite(np.load(tmp_path / "out" / "warped.npy")))


def nan_image(pair):
    image = pair[1].copy()
    image[3, 4] = np.nan
    return image


# case: (extra files {name: content or function of the pair}, flags, expected message)
BAD_INPUTS = {
    "missing file": ({}, dict(moving="nope.png"), "nope.png does not exist"),
    "not an image": ({"t.png": "text"}, dict(moving="t.png"), "cannot read"),
    "corrupt dicom": ({"c.dcm": b"\0" * 300}, dict(moving="c.dcm"), "cannot read"),
    "3D volume": (
        {"v.npy": np.zeros((4, 28, 28))},
        dict(fixed="v.npy", moving="v.npy"),
        "has 3 dimensions (4, 28, 28); the model registers 2D images",
    ),
    "RGB": (
        {"rgb.png": np.zeros((28, 28, 3), np.uint8)},
        dict(fixed="rgb.png", moving="rgb.png"),
        "is a colour image",
    ),
    "shapes differ": ({"s.npy": np.zeros((28, 32))}, dict(moving="s.npy"), "differ in shape"),
    "NaN pixels": ({"n.npy": nan_image}, dict(moving="n.npy"), "NaN or infinite pixels"),
    "labels not a mask": (
        {"l.npy": lambda pair: pair[1]},
        dict(moving_labels="l.npy"),
        "is not a label mask",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_nonzero_nothing_written(model_dir, pair, tmp_path, capsys, case):
    extra_files, flags, message = BAD_INPUTS[case]
    files = {"f.npy": pair[0], "m.npy": pair[1], **extra_files}
    for name, content in files.items():
        content = content(pair) if callable(content) else content
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".png"):
            sitk.WriteImage(sitk.GetImageFromArray(content, isVector=content.ndim == 3), str(path))
        else:
            np.save(path, content)
    flags = {
        k: str(tmp_path / v) for k, v in ({"fixed": "f.npy", "moving": "m.npy"} | flags).items()
    }
    out = tmp_path / "out"
    code = cli.main(args(model_dir, out, **flags))
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # not even the folder the command made for its outputs


def test_an_output_never_replaces_an_input(model_dir, pair, tmp_path, capsys):
    # Registering into the folder the images are in, the fixed one named like an output.
    fixed, moving = pair
    write(tmp_path / "warped.npy", fixed)
    write(tmp_path / "m.npy", moving)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    flags = dict(fixed=str(tmp_path / "warped.npy"), moving=str(tmp_path / "m.npy"))
    assert cli.main(args(model_dir, tmp_path, **flags)) == 1
    assert "warped.npy would replace an input file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_csv_from_a_spreadsheet(tmp_path):
    # Excel's "CSV UTF-8": a byte-order mark before the header, CRLF, non-ASCII names.
    path = tmp_path / "pairs.csv"
    path.write_bytes("fixed,moving\r\nf.png,mé.png\r\n".encode("utf-8-sig"))
    rows, errors = cli.read_pairs_csv(path, tmp_path / "out")
    assert errors == [] and len(rows) == 1
    assert (rows[0].fixed, rows[0].moving) == (tmp_path / "f.png", tmp_path / "mé.png")
    assert rows[0].out == tmp_path / "out" / "0002_mé"
    path.write_bytes("f.png,m\xe9.png\n".encode("cp1252"))  # not UTF-8: one line, no guess
    with pytest.raises(cli.RegistrationError, match="is not a readable CSV"):
        cli.read_pairs_csv(path, tmp_path / "out")


def test_empty_csv(model_dir, tmp_path):
    (tmp_path / "pairs.csv").write_text("fixed,moving\n")
    with pytest.raises(cli.RegistrationError, match="has no pairs"):
        cli.main(args(model_dir, tmp_path / "out", pairs=str(tmp_path / "pairs.csv")))
    assert not (tmp_path / "out").exists()


def test_a_failed_run_removes_only_the_folders_it_made(model_dir, pair, tmp_path, capsys):
    np.save(tmp_path / "f.npy", pair[0])
    bad = dict(fixed=str(tmp_path / "f.npy"), moving=str(tmp_path / "nope.npy"))
    assert cli.main(args(model_dir, tmp_path / "a" / "b" / "out", **bad)) == 1
    assert not (tmp_path / "a").exists()
    there = tmp_path / "there"
    there.mkdir()
    assert cli.main(args(model_dir, there / "out", **bad)) == 1
    assert there.is_dir() and not (there / "out").exists()
    assert capsys.readouterr().err.count("nope.npy does not exist") == 2


def test_bad_work_directories(model_dir, tmp_path):
    with pytest.raises(cli.RegistrationError, match="not a dirnet-jax work directory"):
        cli.load_model(tmp_path)
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(cli.RegistrationError, match="has no checkpoint yet"):
        cli.load_model(tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # loading creates nothing

    other = tmp_path / "other"
    os.symlink(model_dir / "checkpoints", tmp_path / "checkpoints")
    other.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    for change in ({"receptive_field": "global"}, {"features": 16}):
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(cli.RegistrationError, match=r"does not fit its config\.json") as err:
            cli.load_model(tmp_path)
        assert "\n" not in str(err.value)


def test_global_head_needs_its_training_size(tmp_path):
    c2 = CONFIG.replace(receptive_field="global", num_steps=1, dense_features=32)
    train.fit(c2, tmp_path / "c2", shifted_blobs(0, 4), progress=False)
    model = cli.load_model(tmp_path / "c2")
    with pytest.raises(cli.RegistrationError, match=r"only takes its training size \(28, 28\)"):
        cli.register_pair(model, np.zeros((32, 32)), np.zeros((32, 32)))
    assert cli.register_pair(model, *shifted_blobs(1, 2)[..., 0]).warped.shape == (28, 28)


def test_output_folder_not_writable(model_dir, pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    np.save(tmp_path / "f.npy", pair[0])
    with pytest.raises(cli.RegistrationError, match="cannot write to"):
        cli.main(
            args(
                model_dir,
                blocker / "out",
                fixed=str(tmp_path / "f.npy"),
                moving=str(tmp_path / "f.npy"),
            )
        )


def test_command_line_exit_codes(model_dir, pair, tmp_path):
    np.save(tmp_path / "f.npy", pair[0])
    np.save(tmp_path / "m.npy", pair[1])
    base = [
        sys.executable,
        "-m",
        "dirnet_jax.register",
        f"--checkpoint={model_dir}",
        "--progress=false",
    ]
    ok = subprocess.run(
        [*base, f"--fixed={tmp_path}/f.npy", f"--moving={tmp_path}/m.npy", f"--out={tmp_path}/o"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "NCC" in ok.stdout and (tmp_path / "o" / "warped.npy").exists()
    failed = subprocess.run([*base, f"--out={tmp_path}/o2"], capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: give --fixed and --moving, or --pairs"
    script = os.path.join(os.path.dirname(sys.executable), "dirnet-register")
    if os.path.exists(script):  # installed by `make install`
        flags = ["--checkpoint=/nonexistent", f"--out={tmp_path}/o3", "--fixed=a", "--moving=b"]
        proc = subprocess.run([script, *flags], capture_output=True, text=True)
        assert proc.returncode == 1 and "not a dirnet-jax work directory" in proc.stderr


@pytest.mark.parametrize("installed", [False, True])
def test_help_shows_the_usage_and_the_flags(installed):
    script = os.path.join(os.path.dirname(sys.executable), "dirnet-register")
    if installed and not os.path.exists(script):
        pytest.skip("dirnet-register is installed by `make install`")
    cmd = [script] if installed else [sys.executable, "-m", "dirnet_jax.register"]
    proc = subprocess.run([*cmd, "--helpshort"], capture_output=True, text=True)
    assert proc.returncode in (0, 1)  # absl 2.5's help exits 1
    shown = proc.stdout + proc.stderr
    assert cli.__doc__.splitlines()[0] in shown
    for flag in ("--checkpoint", "--pairs", "--figure", "--compilation_cache"):
        assert flag in shown, shown


def test_second_run_loads_compiled_programs(model_dir, pair, tmp_path):
    np.save(tmp_path / "f.npy", pair[0])
    np.save(tmp_path / "m.npy", pair[1])
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "dirnet_jax.register", f"--checkpoint={model_dir}",
           f"--fixed={tmp_path}/f.npy", f"--moving={tmp_path}/m.npy", "--progress=false",
           f"--compilation_cache={cache}"]  # fmt: skip

    def run(out):
        proc = subprocess.run([*cmd, f"--out={out}"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return {p.name: p.read_bytes() for p in cache.iterdir()}

    first = run(tmp_path / "o1")
    programs = {name for name in first if name.endswith("-cache")}
    assert len(programs) > 5  # the network, the warp, NCC, … all compiled once
    second = run(tmp_path / "o2")
    assert {name for name in second if name.endswith("-cache")} == programs  # none compiled
    used = [n for n in second if n.endswith("-atime") and second[n] != first[n]]
    assert len(used) == len(programs)  # every one read back
    np.testing.assert_array_equal(
        np.load(tmp_path / "o1" / "warped.npy"), np.load(tmp_path / "o2" / "warped.npy")
    )
    run_off = subprocess.run(
        [*cmd[:-1], "--compilation_cache=", f"--out={tmp_path}/o3"], env=env, capture_output=True
    )
    assert run_off.returncode == 0 and {p.name for p in cache.iterdir()} == set(second)


def test_compilation_cache_set_by_jax_wins(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    before = jax.config.jax_compilation_cache_dir
    compile_cache.use("/mine")
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    compile_cache.use("")  # off
    assert jax.config.jax_compilation_cache_dir == before
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert compile_cache.default_folder() == "/xdg/dirnet-jax/xla"


def test_compilation_cache_that_cannot_be_made_is_one_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("")
    before = jax.config.jax_compilation_cache_dir
    compile_cache.use(str(tmp_path / "file" / "xla"))  # a file in the way
    assert jax.config.jax_compilation_cache_dir == before  # compiles without a cache
    err = capsys.readouterr().err
    assert err.startswith("warning: no compilation cache ([Errno 20] Not a directory")
    assert err.endswith("every program compiles\n") and err.count("\n") == 1
