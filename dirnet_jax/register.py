r"""Register your own images with a trained DIRNet, from the command line or from Python.

    python -m dirnet_jax.register --checkpoint=runs/mnist/digit_3 \
        --fixed=fixed.png --moving=moving.png [--moving_labels=mask.png] --out=registered/
    python -m dirnet_jax.register --checkpoint=WORKDIR --pairs=pairs.csv --out=registered/

(also installed as ``dirnet-register``). ``--checkpoint`` is a work directory written by
training; the newest checkpoint in it is used. Reads PNG, ``.npy``, NIfTI and DICOM (a file
or a series folder). Per pair it writes the warped moving image (in the fixed image's format
and geometry), the displacement field and, if given, the warped label mask (nearest
neighbour), and prints NCC before/after and the fraction of folded pixels (Jacobian
determinant ≤ 0); for one pair also ``figure.png`` (``--figure`` for a CSV's pairs). A CSV of
``fixed,moving[,moving_labels]`` rows (paths relative to the CSV) registers in batches; each
pair gets a folder ``<row>_<moving name>/`` and ``summary.csv`` lists them all.

The network sees each image rescaled to [0, 1] (min–max); the warp applies to the original
intensities. Images of another size than training are padded (edge values, centred) to a
multiple of the downsampling factor and the field is cropped back; the global-head variant
(C2) only takes its training size. A moving image with another pixel spacing or orientation
than the fixed one is registered pixel to pixel, with a note.

From Python: ``model = load_model(workdir)``, then ``register_pair(model, fixed, moving)`` on
arrays, or ``register_files(model, rows)`` on files (each ``Row`` names its output folder).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dirnet_jax import compile_cache, help_flags, hosts, imageio, plots, train
from dirnet_jax import workdir as wd
from dirnet_jax.config import DIRNetConfig
from dirnet_jax.imageio import ImageError, LoadedImage
from dirnet_jax.losses import ncc
from dirnet_jax.metrics import folded_fraction, jacobian_determinant
from dirnet_jax.models import register_batched
from dirnet_jax.preprocess import minmax
from dirnet_jax.resample import warp


class RegistrationError(ValueError):
    """A registration that cannot run as asked; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Model:
    config: DIRNetConfig
    variables: dict[str, Any]
    workdir: Path
    step: int


def load_model(workdir: str | Path) -> Model:
    """The newest checkpoint of a training work directory, ready for registration."""
    workdir = Path(workdir)
    try:
        config = wd.load_config(workdir)
    except (FileNotFoundError, ValueError) as err:
        raise RegistrationError(str(err)) from None
    ckpt_dir = workdir / wd.CHECKPOINTS
    if not ckpt_dir.is_dir():
        raise RegistrationError(f"{workdir} has no checkpoint yet: train first")
    mngr = train.checkpoint_manager(workdir, config, read_only=True)
    try:
        if mngr.latest_step() is None:
            raise RegistrationError(f"{workdir} has no checkpoint yet: train first")
        try:
            state = train.restore_latest(mngr, train.create_train_state(config))
        except train.UnreadableCheckpoint as err:
            raise RegistrationError(str(err)) from None
        except (ValueError, KeyError, TypeError) as err:
            reason = str(err).strip().splitlines()[0][:160]
            raise RegistrationError(
                f"the checkpoint in {workdir} does not fit its config.json (another variant "
                f"or image size?): {reason}"
            ) from None
    finally:
        mngr.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return Model(config, variables, workdir, int(state.step))


@dataclasses.dataclass
class PairResult:
    warped: np.ndarray  # [*spatial] moving image in the fixed frame, original intensities
    displacement: np.ndarray  # [*spatial, ndim] pixels, (row, col) components
    labels: np.ndarray | None  # [*spatial] warped moving labels (nearest neighbour)
    ncc_before: float
    ncc_after: float
    folded_fraction: float
    notes: list[str]


def _as_image(config: DIRNetConfig, array: np.ndarray, name: str) -> np.ndarray:
    """[*spatial] float32 from an image array, or a one-line RegistrationError."""
    array = np.asarray(array)
    shape = tuple(array.shape)
    if array.ndim == config.ndim + 1 and shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == config.ndim + 1 and shape[-1] in (3, 4):
        raise RegistrationError(
            f"{name} is a colour image {shape}; the model takes single-channel images"
        )
    if array.ndim > config.ndim:
        raise RegistrationError(
            f"{name} has {array.ndim} dimensions {shape}; the model registers {config.ndim}D images"
        )
    if array.ndim < config.ndim:
        raise RegistrationError(f"{name} has shape {shape}; the model needs a {config.ndim}D image")
    if array.dtype.kind not in "biuf":
        raise RegistrationError(f"{name} holds {array.dtype} values, not numbers")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise RegistrationError(f"{name} has NaN or infinite pixels")
    return array


@dataclasses.dataclass(frozen=True)
class CheckedPair:
    fixed: np.ndarray  # [*spatial] float32, original intensities
    moving: np.ndarray
    labels: np.ndarray | None  # [*spatial] integer-valued
    notes: list[str]


def check_pair(
    config: DIRNetConfig,
    fixed: np.ndarray,
    moving: np.ndarray,
    labels: np.ndarray | None,
    names: Sequence[str],
) -> CheckedPair:
    """The pair as the network will take it, or a one-line RegistrationError."""
    fixed = _as_image(config, fixed, names[0])
    moving = _as_image(config, moving, names[1])
    if fixed.shape != moving.shape:
        raise RegistrationError(
            f"{names[0]} {fixed.shape} and {names[1]} {moving.shape} differ in shape"
        )
    if config.receptive_field == "global" and fixed.shape != config.image_shape:
        raise RegistrationError(
            f"this DIRNet has a global head (C2) and only takes its training size "
            f"{config.image_shape}, not {fixed.shape}"
        )
    notes = []
    for name, image in zip(names, (fixed, moving), strict=False):
        if image.max() == image.min():
            notes.append(f"{name} is constant: NCC is undefined there (reported as 0)")
    if labels is not None:
        labels = np.asarray(labels)
        labels = (
            labels[..., 0] if labels.ndim == config.ndim + 1 and labels.shape[-1] == 1 else labels
        )
        if labels.shape != moving.shape:
            raise RegistrationError(
                f"{names[2]} {labels.shape} and {names[1]} {moving.shape} differ in shape"
            )
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise RegistrationError(f"{names[2]} is not a label mask (non-integer values)")
    return CheckedPair(fixed, moving, labels, notes)


@dataclasses.dataclass(frozen=True)
class Padding:
    """Centred edge padding of one image size up to a multiple of the downsampling factor."""

    widths: list[tuple[int, int]]
    crop: tuple[slice, ...]  # back from the padded size
    note: str | None

    @classmethod
    def plan(cls, config: DIRNetConfig, shape: tuple[int, ...]) -> Padding:
        factor = config.downsampling_factor
        widths = [((-s) % factor // 2, (-s) % factor - (-s) % factor // 2) for s in shape]
        crop = tuple(slice(a, a + s) for s, (a, _) in zip(shape, widths, strict=True))
        note = None
        if any(w != (0, 0) for w in widths):
            padded = tuple(s + a + b for s, (a, b) in zip(shape, widths, strict=True))
            note = (
                f"padded {shape} to {padded} (a multiple of {factor}, edge values) "
                "and cropped the field back"
            )
        return cls(widths, crop, note)


@jax.jit
def _warp_pair(moving, displacement, labels):
    return warp(moving, displacement), warp(labels, displacement, order=0)


def register_pairs(
    model: Model,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    *,
    names: Sequence[Sequence[str]] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[PairResult]:
    """Register (fixed, moving, moving_labels or None) arrays, batched by shape.

    Arrays are [*spatial] (or [*spatial, 1]). Raises RegistrationError for the first pair
    that cannot be registered; `names` (fixed, moving, labels) label the pairs in messages.
    """
    if names is None:
        names = [
            (f"pair {i} fixed", f"pair {i} moving", f"pair {i} labels") for i in range(len(pairs))
        ]
    checked = [check_pair(model.config, *p, n) for p, n in zip(pairs, names, strict=True)]
    return _register_checked(model, checked, batch_size, progress)


def _register_checked(
    model: Model, checked: list[CheckedPair], batch_size: int, progress: bool
) -> list[PairResult]:
    """Registers pairs of one shape together, in chunks of `batch_size`; input order kept."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(checked):
        by_shape.setdefault(pair.fixed.shape, []).append(i)
    results: dict[int, PairResult] = {}
    with tqdm(total=len(checked), unit="pair", disable=not progress, desc="registering") as bar:
        for shape, ids in by_shape.items():
            padding = Padding.plan(model.config, shape)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                done = _register_chunk(model, [checked[i] for i in chunk], padding, batch_size)
                results.update(zip(chunk, done, strict=True))
                bar.update(len(chunk))
    return [results[i] for i in range(len(checked))]


def _register_chunk(
    model: Model, pairs: list[CheckedPair], padding: Padding, batch_size: int
) -> list[PairResult]:
    """One network call for pairs of one shape; warps the original intensities and labels."""
    ndim = model.config.ndim

    def stack(images, prepare=lambda x: x):
        return np.stack([prepare(x) for x in images])[..., None]

    def network_input(image):
        return np.pad(minmax(image, ndim), padding.widths, mode="edge")

    reg = register_batched(
        model.config,
        model.variables,
        stack([p.fixed for p in pairs], network_input),
        stack([p.moving for p in pairs], network_input),
        batch_size=batch_size,
    )
    displacement = reg.displacement[(slice(None), *padding.crop)]
    fixed, moving = stack([p.fixed for p in pairs]), stack([p.moving for p in pairs])
    labels = stack([p.labels if p.labels is not None else np.zeros(p.moving.shape) for p in pairs])
    warped, warped_labels = jax.device_get(
        _warp_pair(moving, displacement, labels.astype(np.int32))
    )
    before, after = np.asarray(ncc(fixed, moving)), np.asarray(ncc(fixed, warped))
    folded = folded_fraction(displacement)
    return [
        PairResult(
            warped=warped[k, ..., 0],
            displacement=displacement[k],
            labels=None if p.labels is None else warped_labels[k, ..., 0].astype(p.labels.dtype),
            ncc_before=float(before[k]),
            ncc_after=float(after[k]),
            folded_fraction=float(folded[k]),
            notes=p.notes + ([padding.note] if padding.note else []),
        )
        for k, p in enumerate(pairs)
    ]


def register_pair(
    model: Model,
    fixed: np.ndarray,
    moving: np.ndarray,
    moving_labels: np.ndarray | None = None,
) -> PairResult:
    """Register one pair of arrays ([*spatial]); see `register_pairs`."""
    return register_pairs(
        model, [(fixed, moving, moving_labels)], names=[("fixed", "moving", "moving labels")]
    )[0]


@dataclasses.dataclass(frozen=True)
class Row:
    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    out: Path | None = None  # folder for this pair's outputs


def read_pairs_csv(path: str | Path, out: Path) -> tuple[list[Row], list[str]]:
    """Rows of a fixed,moving[,moving_labels] CSV (optional header), and per-row errors.

    Read as UTF-8 whatever the locale, with or without the byte-order mark that
    spreadsheets write (Excel's "CSV UTF-8").
    """
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"{path} does not exist")
    try:
        lines = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as err:
        raise RegistrationError(f"{path} is not a readable CSV: {err}") from None
    rows, errors = [], []
    for number, fields in enumerate(lines, start=1):
        fields = [f.strip() for f in fields]
        if not any(fields) or fields[0].startswith("#"):
            continue
        if number == 1 and fields[0].lower() == "fixed":
            continue
        if len(fields) not in (2, 3) or not all(fields):
            errors.append(
                f"{path} row {number}: expected fixed,moving[,moving_labels], got {fields}"
            )
            continue
        files = [path.parent / f for f in fields]
        rows.append(
            Row(
                *files[:2],
                files[2] if len(files) == 3 else None,
                out / f"{number:04d}_{files[1].name.split('.')[0]}",
            )
        )
    if not rows and not errors:
        raise RegistrationError(f"{path} has no pairs")
    return rows, errors


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with wd.atomic_output(out / ".write-test") as tmp:
            tmp.write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise RegistrationError(f"cannot write to {out}: {err.strerror or err}") from None


# Batches read, registered and written at a time by `register_files`: memory holds one
# group's images and results, whatever the length of the CSV.
GROUP_BATCHES = 8


def register_files(
    model: Model,
    rows: Sequence[Row],
    *,
    batch_size: int = 32,
    progress: bool = False,
    on_group: Callable[[list[dict[str, Any]]], None] | None = None,
    figures: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read, register and write every row; returns (summary records, per-row errors).

    With `figures`, each pair's folder also gets figure.png (`write_figure`; ~0.5 s each;
    none for a 1D model).

    Rows go in groups of GROUP_BATCHES batches, each read, registered and written before
    the next; after each group `on_group` gets the records so far (the command rewrites
    summary.csv there, so a run stopped part way lists what it finished). A row that
    cannot be read or registered is reported and skipped; the others go on.
    """
    records, errors = [], []
    group = batch_size * GROUP_BATCHES
    with tqdm(total=len(rows), unit="pair", disable=not progress, desc="registering") as bar:
        for start in range(0, len(rows), group):
            part = rows[start : start + group]
            done, failed = _register_group(model, part, batch_size, figures)
            records += done
            errors += failed
            bar.update(len(part))
            if on_group is not None:
                on_group(records)
    return records, errors


def geometry_notes(images: Sequence[LoadedImage]) -> list[str]:
    """Notes where the moving image has another spacing or orientation than the fixed one,
    or its labels than it: the network registers pixel to pixel, whatever the geometry.

    `images`: fixed, moving[, moving labels], as read.
    """
    notes = []
    for image, reference in zip(images[1:], images, strict=False):
        if image.geometry is not None and reference.geometry is not None:
            if differ := image.geometry.scale_or_axes_differ(reference.geometry):
                notes.append(
                    f"{image.path} and {reference.path} differ in {' and '.join(differ)}: "
                    "registered pixel to pixel"
                )
    return notes


def files_of(row: Row) -> list[Path]:
    """The row's input files: fixed, moving[, moving labels]."""
    return [p for p in (row.fixed, row.moving, row.moving_labels) if p is not None]


def _register_group(
    model: Model, rows: Sequence[Row], batch_size: int, figures: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """`register_files` for one group of rows."""
    loaded, checked, errors, records = [], [], [], []
    for row in rows:
        files = files_of(row)
        try:
            images = [imageio.read_image(p) for p in files]
            labels = images[2].array if len(images) == 3 else None
            names = [str(p) for p in files] + [""] * (3 - len(files))
            pair = check_pair(model.config, images[0].array, images[1].array, labels, names)
            checked.append(dataclasses.replace(pair, notes=pair.notes + geometry_notes(images)))
            loaded.append((row, images))
        except (ImageError, RegistrationError) as err:
            errors.append(str(err))
    if not loaded:
        return records, errors

    results = _register_checked(model, checked, batch_size, progress=False)
    for (row, images), pair, result in zip(loaded, checked, results, strict=True):
        fixed: LoadedImage = images[0]
        try:
            # A pair's files all new, or all as they were; no folder made for none.
            with wd.unused_folders_removed(row.out), wd.atomic_outputs():
                row.out.mkdir(parents=True, exist_ok=True)
                written = [
                    imageio.write_image(row.out / "warped", result.warped, fixed),
                    imageio.write_displacement(
                        row.out / "displacement", result.displacement, fixed
                    ),
                ]
                if result.labels is not None:
                    like = dataclasses.replace(fixed, array=images[2].array)
                    written.append(imageio.write_image(row.out / "labels", result.labels, like))
                if figures and model.config.ndim >= 2:
                    written.append(write_figure(model, pair, result, row, row.out / "figure.png"))
                inputs = {p.resolve() for p in files_of(row)}
                if clash := [p for p in written if p.resolve() in inputs]:  # still unrenamed
                    raise OSError(errno.EEXIST, f"{clash[0].name} would replace an input file")
        except OSError as err:
            errors.append(f"{row.moving}: cannot write to {row.out}: {err.strerror or err}")
            continue
        records.append(
            {
                "fixed": str(row.fixed),
                "moving": str(row.moving),
                "out": str(row.out),
                "ncc_before": result.ncc_before,
                "ncc_after": result.ncc_after,
                "folded_fraction": result.folded_fraction,
                "notes": "; ".join(result.notes),
                "files": [str(p) for p in written],
            }
        )
    return records, errors


def write_figure(model: Model, pair: CheckedPair, result: PairResult, row: Row, path: Path) -> Path:
    """`plots.registration_figure` of one registered pair, its grid lines at the control
    points' spacing; of a 3D pair, the middle slice across the first axis. Returns `path`."""
    cut = (pair.fixed.shape[0] // 2,) * (pair.fixed.ndim - 2)  # [] for 2D
    where = f", slice {cut[0]} of axis 0" if cut else ""
    fig = plots.registration_figure(
        pair.fixed[cut],
        pair.moving[cut],
        result.warped[cut],
        result.displacement[cut][..., -2:],
        jacobian_determinant(result.displacement[None])[0][cut],
        grid_step=model.config.downsampling_factor,
        title=f"{row.moving.name} → {row.fixed.name}{where}: NCC {result.ncc_before:.3f} → "
        f"{result.ncc_after:.3f}, folded {100 * result.folded_fraction:.2f}%",
        labels=None if pair.labels is None else pair.labels[cut],
        warped_labels=None if result.labels is None else result.labels[cut],
    )
    plots.save(fig, path)
    return path


def write_summary(path: Path, records: list[dict[str, Any]]) -> None:
    fields = ["fixed", "moving", "out", "ncc_before", "ncc_after", "folded_fraction", "notes"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    wd.atomic_write_text(path, buffer.getvalue())


def main(args) -> int:
    """The command for parsed flags (attributes as in `define_flags`); returns the exit code.

    Raises RegistrationError / ImageError for problems that stop everything; per-row
    problems of a CSV are printed and make the exit code 1.
    """
    if args.pairs and (args.fixed or args.moving or args.moving_labels):
        raise RegistrationError("give either --pairs or --fixed/--moving, not both")
    if not args.pairs and not (args.fixed and args.moving):
        raise RegistrationError("give --fixed and --moving, or --pairs")
    out = Path(args.out)
    model = load_model(args.checkpoint)
    with wd.unused_folders_removed(out):
        _check_writable(out)
        return _register_to(model, args, out)


def _register_to(model: Model, args, out: Path) -> int:
    """`main` once the model is loaded and `out` is writable."""
    if args.pairs:
        rows, errors = read_pairs_csv(args.pairs, out)
    else:
        labels = Path(args.moving_labels) if args.moving_labels else None
        rows, errors = [Row(Path(args.fixed), Path(args.moving), labels, out)], []
    summary, finished = out / "summary.csv", []

    def save(records):
        finished[:] = records
        if args.pairs:
            write_summary(summary, records)

    try:
        with hosts.sigterm_raises():
            records, failed = register_files(
                model,
                rows,
                batch_size=args.batch_size,
                progress=args.progress and len(rows) > 1,  # no bar for one pair
                on_group=save,
                figures=not args.pairs if args.figure is None else args.figure,
            )
    except (KeyboardInterrupt, hosts.Terminated) as stop:
        listed = f"; {summary} lists them" if args.pairs and finished else ""
        print(f"interrupted after {len(finished)} of {len(rows)} pairs{listed}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, hosts.Terminated) else signal.SIGINT)
    errors += failed
    for r in records:
        print(
            f"{r['moving']} → {r['fixed']}: NCC {r['ncc_before']:.3f} → {r['ncc_after']:.3f}, "
            f"folded {100 * r['folded_fraction']:.2f}% → {r['out']}"
        )
        if r["notes"]:
            print(f"  note: {r['notes']}")
    if args.pairs:
        if not rows:  # every row was bad, so no group wrote it
            write_summary(summary, records)
        print(f"summary: {summary}")
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return 1 if errors else 0


def define_flags() -> None:
    """The command's flags (defined on demand, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Training work directory (config.json, checkpoints/).")
    flags.DEFINE_string("fixed", None, "Fixed image file (PNG, .npy, NIfTI, DICOM).")
    flags.DEFINE_string("moving", None, "Moving image file, same size as --fixed.")
    flags.DEFINE_string("moving_labels", None, "Label mask of the moving image to warp too.")
    flags.DEFINE_string("pairs", None, "CSV of fixed,moving[,moving_labels] rows.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_integer("batch_size", 32, "Pairs per network call.", lower_bound=1)
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool(
        "figure",
        None,
        "Write figure.png per pair: images, differences, deformed grid, Jacobian "
        "(default: for one pair yes, for --pairs no; ~0.5 s a pair).",
    )
    compile_cache.define_flag()
    flags.mark_flags_as_required(["checkpoint", "out"])


def run_main() -> None:
    """Console-script entry point (``dirnet-register``)."""
    from absl import app, flags, logging

    define_flags()
    help_flags.list_in_help(__name__, compile_cache.__name__)
    if __name__ != "__main__":  # the console script: absl's --help shows __main__'s docstring,
        sys.modules["__main__"].__doc__ = __doc__  # here pip's wrapper's

    def _main(argv):
        logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
        compile_cache.use(flags.FLAGS.compilation_cache)
        try:
            if len(argv) > 1:
                raise RegistrationError(f"unexpected arguments: {' '.join(argv[1:])}")
            code = main(flags.FLAGS)
        except (RegistrationError, ImageError) as err:
            print(f"error: {err}", file=sys.stderr)
            code = 1
        sys.exit(code)

    app.run(_main)


if __name__ == "__main__":
    run_main()
