r"""Section 4.2 of the paper: DIRNets on cardiac cine MRI, ED ↔ ES, against SimpleElastix.

    python -m experiments.sunnybrook --variant=C1 --preset=cpu     # 4–12 min on 2 CPU cores
    python -m experiments.sunnybrook --variant=all                 # paper settings (GPU)
    python -m experiments.sunnybrook --variant=C1 --scd_dir=/data/SCD   # the real SCD

Data: the Sunnybrook Cardiac Data when ``--scd_dir`` points at it, else the embedded
synthetic cohort (dirnet_jax.datasets.phantom); both prepared once into ``--data_dir``.
Training: random pairs of two phases of one slice of one training patient, batch 32, Adam,
validation loss every 100 iterations. Evaluation: every annotated test slice, ED → ES and
ES → ED; the moving myocardium mask is warped (nearest neighbour) and compared with the
fixed one: Dice, 95th percentile and mean of the symmetric surface distance in mm. Rows:
before registration, SimpleElastix (B-spline with the DIRNet's control-point spacing, two
resolutions, 100 iterations each, normalized correlation), and every trained variant.

Presets: ``paper`` (default) is 256×256, four downsamplings (16×16 grid, 16 px = 20.5 mm
spacing) and 10,000 iterations: about 35 min of training per variant on a 2-core CPU,
about a minute on a GPU.
``cpu`` halves the resolution (128×128 at 2.56 mm, three downsamplings: the same 20.5 mm
control-point spacing) and trains 4,000 iterations, so that one variant, the evaluation and
the elastix row finish within 20 minutes on 2 CPU cores.

Writes to --workdir: results.json, results.md (Table 1), fig3_validation_loss.png and
fig4_example.png; <variant>/ and elastix/ hold each run and its cached evaluation. Runs of
several variants (e.g. one cluster job each) into one work directory are gathered into one
table; ``--summarize`` only gathers, and on a directory of such work directories (one per
seed of a sweep) also writes summary.md: every method over the runs, mean ± sd. Runs
summarized together must differ only in seed (`check_summarizable`).
``--regularizer_weight`` adds a smoothness penalty to the loss (none in the paper).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import flags
from tqdm.auto import tqdm

from dirnet_jax import PAPER_VARIANTS, DIRNetConfig, hosts, machine, plots, variant
from dirnet_jax import workdir as wd
from dirnet_jax.datasets import phantom
from dirnet_jax.metrics import folded_fraction, mask_metrics, summarize
from dirnet_jax.preprocess import downsample, downsample_mask, minmax
from dirnet_jax.resample import warp
from experiments import common

VARIANTS = list(PAPER_VARIANTS)


@dataclasses.dataclass(frozen=True)
class Preset:
    size: int  # training and evaluation resolution (pixels per side)
    num_downsamplings: int
    iterations: int


PRESETS = {
    "paper": Preset(size=256, num_downsamplings=4, iterations=10_000),
    "cpu": Preset(size=128, num_downsamplings=3, iterations=4_000),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined on demand: importing this module defines none
    (two experiments share flag names)."""
    common.define_run_flags(workdir="runs/sunnybrook", iterations=None, checkpoint_every=500)
    flags.DEFINE_enum("variant", "baseline", [*VARIANTS, "all"], "Variant to train, or all.")
    flags.DEFINE_enum("preset", "paper", list(PRESETS), "paper settings, or cpu (module doc).")
    flags.DEFINE_string("scd_dir", None, "Sunnybrook Cardiac Data folder; default: synthetic.")
    flags.DEFINE_bool("elastix", True, "Compute the SimpleElastix row.")
    flags.DEFINE_bool("summarize", False, "Only gather the runs in --workdir into the outputs.")
    flags.DEFINE_bool(
        "in_memory",
        False,
        "Generate the synthetic cohort in memory on every run instead of preparing it once "
        "as a TFDS dataset (for machines without tensorflow-datasets).",
    )


@dataclasses.dataclass
class Pairs:
    """Evaluation pairs: [P, H, W] images and masks, [P, 2] spacing in mm."""

    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    spacing: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_split(raw: dict[str, np.ndarray], split: str, size: int) -> dict[str, np.ndarray]:
    """A loaded split brought to `size` pixels: images [S, T, size, size] in [0, 1], masks,
    spacing (mm)."""
    if not raw:
        raise ValueError(f"the {split} split is empty")
    factor = raw["images"].shape[-1] // size
    if factor < 1 or raw["images"].shape[-1] != factor * size:
        raise ValueError(f"data of {raw['images'].shape[-1]} px cannot be brought to {size} px")
    return raw | {
        "images": minmax(downsample(raw["images"].astype(np.float32), factor)),
        "ed_mask": downsample_mask(raw["ed_mask"], factor),
        "es_mask": downsample_mask(raw["es_mask"], factor),
        "spacing": raw["spacing"] * factor,
    }


def data_source(args, spec: phantom.CohortSpec | None, scd_size: int):
    """(data key, split name → raw split): TFDS-prepared, or the cohort generated in memory."""
    if args.in_memory:
        if args.scd_dir:
            raise ValueError("--in_memory generates the synthetic cohort; the SCD needs TFDS")
        spec = spec or phantom.CohortSpec()
        return f"phantom:{spec.name}", lambda split: phantom.load_split(spec, split)
    from dirnet_jax.datasets import cardiac

    common.tfds_progress(args.progress)
    builder = hosts.primary_first(
        lambda: cardiac.builder(args.data_dir, scd_dir=args.scd_dir, spec=spec, size=scd_size),
        "cardiac data prepared",
    )
    data = "scd" if args.scd_dir else "phantom"
    return f"{data}:{builder.builder_config.name}", lambda split: cardiac.load(builder, split)


def evaluation_pairs(test: dict[str, np.ndarray]) -> Pairs:
    """ED → ES and ES → ED for every annotated slice (fixed first)."""
    out = {k: [] for k in ("fixed", "moving", "fixed_mask", "moving_mask", "spacing", "names")}
    for i in np.flatnonzero(test["annotated"]):
        ed, es = int(test["ed_phase"][i]), int(test["es_phase"][i])
        slice_name = f"patient {test['patient'][i]} slice {test['slice'][i]}"
        for fixed, moving, direction in ((es, ed, "ED→ES"), (ed, es, "ES→ED")):
            out["fixed"].append(test["images"][i, fixed])
            out["moving"].append(test["images"][i, moving])
            masks = {ed: test["ed_mask"][i], es: test["es_mask"][i]}
            out["fixed_mask"].append(masks[fixed])
            out["moving_mask"].append(masks[moving])
            out["spacing"].append(test["spacing"][i])
            out["names"].append(f"{slice_name} {direction}")
    if not out["names"]:
        raise ValueError("no annotated test slice to evaluate on")
    return Pairs(**{k: v if k == "names" else np.stack(v) for k, v in out.items()})


def example_index(pairs: Pairs) -> int:
    """A mid-ventricular ED → ES pair of the first test patient, for Fig 4."""
    first = pairs.names[0].split(" slice")[0]
    candidates = [
        i for i, n in enumerate(pairs.names) if n.startswith(first + " ") and "ED→ES" in n
    ]
    return candidates[len(candidates) // 2]


def mask_rows(warped_masks: np.ndarray, pairs: Pairs) -> dict[str, dict]:
    per_pair = [
        mask_metrics(w, f, tuple(s))
        for w, f, s in zip(warped_masks, pairs.fixed_mask, pairs.spacing, strict=True)
    ]
    return {k: summarize([m[k] for m in per_pair]) for k in ("dice", "hd95_mm", "mad_mm")}


@jax.jit
def _warp_masks(masks, displacement):
    return warp(masks, displacement, order=0)


def evaluate_dirnet(
    config: DIRNetConfig, variables: dict[str, Any], pairs: Pairs
) -> tuple[dict[str, Any], np.ndarray]:
    """(Table 1 row with timings, [P, H, W] warped moving images)."""
    reg, batched, single = common.timed_registration(
        config, variables, pairs.fixed[..., None], pairs.moving[..., None], batch_size=32
    )
    warped_masks = np.asarray(
        _warp_masks(pairs.moving_mask[..., None].astype(np.int32), reg.displacement)
    )
    row = mask_rows(warped_masks[..., 0], pairs) | {
        "folded": summarize(folded_fraction(reg.displacement)),
        "sec_per_pair": single,
        "sec_per_pair_batched": batched,
        "timed_on": machine.timed_on(),
    }
    return row, reg.warped[..., 0]


def evaluate_elastix(
    pairs: Pairs, grid_spacing_px: float, progress: bool
) -> tuple[dict[str, Any], np.ndarray]:
    from dirnet_jax import elastix

    warped, masks, seconds, fields = [], [], [], []
    for i in tqdm(range(len(pairs)), desc="SimpleElastix", disable=not progress, leave=False):
        spacing = tuple(float(s) for s in pairs.spacing[i])
        params = elastix.bspline_parameters(
            grid_spacing_px * spacing[0], resolutions=2, iterations=100
        )
        result = elastix.register_pair(
            pairs.fixed[i],
            pairs.moving[i],
            params,
            moving_labels=pairs.moving_mask[i],
            spacing=spacing,
        )
        warped.append(result.warped)
        masks.append(result.labels)
        seconds.append(result.seconds)
        fields.append(result.displacement)
    row = mask_rows(np.stack(masks), pairs) | {
        "folded": summarize(folded_fraction(np.stack(fields))),
        "sec_per_pair": float(np.mean(seconds)),
        "timed_on": machine.host_cpu(),
    }
    return row, np.stack(warped)


def cached_row(folder: Path, settings: dict) -> dict | None:
    """The Table 1 row cached in folder/evaluation.json for these settings, if any."""
    path = folder / "evaluation.json"
    if path.exists() and (folder / "example.npy").exists():
        stored = common.read_evaluation(path)
        if stored.get("settings") == settings:
            return stored["row"]
    return None


def store_row(folder: Path, settings: dict, row: dict, warped_example: np.ndarray) -> dict:
    """Cache a row and its warped example image in folder, the example first, so that a
    cached row always has its example. Returns the row."""
    folder.mkdir(parents=True, exist_ok=True)
    with wd.atomic_output(folder / "example.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, warped_example)
    text = json.dumps({"settings": settings, "row": row}, indent=2) + "\n"
    wd.atomic_write_text(folder / "evaluation.json", text)
    return row


def variant_row(
    config: DIRNetConfig,
    run_dir: Path,
    settings: dict,
    train_data: np.ndarray,
    val_data: np.ndarray,
    pairs: Pairs,
    args,
) -> dict | None:
    """Train (or resume) a DIRNet in run_dir and evaluate it: its Table 1 row, cached.

    Several processes train together; process 0 alone reads, evaluates and writes the cache
    (the others get the row only when it was cached, else None).
    """
    settings = settings | {"config": config.to_dict()}
    name = run_dir.name
    row = hosts.on_primary(
        functools.partial(cached_row, run_dir, settings), f"{name} cached", share=True
    )
    if row is not None:
        return row
    state = common.fit(config, run_dir, train_data, val_data, args)

    def evaluate() -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        row, warped = evaluate_dirnet(config, hosts.local_copy(variables), pairs)
        return store_row(run_dir, settings, row, warped[example_index(pairs)])

    return hosts.on_primary(evaluate, f"{name} evaluated")


def print_row(name: str, row: dict | None) -> None:
    if hosts.is_primary():
        print(f"{name}: Dice {row['dice']['mean']:.3f} ± {row['dice']['std']:.3f}", flush=True)


def base_config(preset: Preset, args) -> DIRNetConfig:
    return DIRNetConfig(
        image_shape=(preset.size, preset.size),
        num_downsamplings=preset.num_downsamplings,
        features=16,
        num_steps=args.iterations or preset.iterations,
        num_val_pairs=64,
        **common.config_overrides(args),
    )


def run(
    args,
    *,
    preset: Preset | None = None,
    spec: phantom.CohortSpec | None = None,
    scd_size: int = 256,
) -> list[Path]:
    """The experiment for parsed flags; the keywords override for tests. Returns outputs."""
    preset_name = args.preset if preset is None else "custom"
    preset = preset or PRESETS[args.preset]
    root = Path(args.workdir)
    evaluations = ("*/evaluation.json", "*/*/evaluation.json")
    if args.summarize:  # before the data
        check_presets(root, evaluations, preset_name)
    root.mkdir(parents=True, exist_ok=True)
    data_key, raw = data_source(args, spec, scd_size)
    data = data_key.split(":")[0]  # phantom | scd
    test = load_split(raw("test"), "test", preset.size)
    pairs = evaluation_pairs(test)
    settings = {"data": data_key, "preset": preset_name, "size": preset.size}

    if not args.summarize:
        names = VARIANTS if args.variant == "all" else [args.variant]
        if (advice := machine.malloc_advice(preset.size)) and hosts.is_primary():
            print(advice, file=sys.stderr, flush=True)
        train_data = load_split(raw("train"), "train", preset.size)["images"]
        val_data = load_split(raw("validation"), "validation", preset.size)["images"]
        for name in names:
            config = variant(name, base_config(preset, args))
            row = variant_row(config, root / name, settings, train_data, val_data, pairs, args)
            print_row(name, row)
        if args.elastix:
            spacing_px = 2**preset.num_downsamplings  # the DIRNet's control-point spacing
            elastix_settings = settings | {"grid_spacing_px": spacing_px}

            def elastix_row() -> dict:
                row = cached_row(root / "elastix", elastix_settings)
                if row is None:
                    row, warped = evaluate_elastix(pairs, spacing_px, args.progress)
                    store_row(root / "elastix", elastix_settings, row, warped[example_index(pairs)])
                return row

            print_row("SimpleElastix", hosts.on_primary(elastix_row, "elastix"))

    def outputs() -> list[Path]:
        # With --summarize, a work directory of runs (seed0/, seed1/, … of a sweep) gets each
        # run's outputs rebuilt and a table over the runs; its own runs, if any, as always.
        subdirs = sorted(d for d in root.iterdir() if d.is_dir()) if args.summarize else []
        runs = {d: found for d in subdirs if (found := gather(d, settings))}
        if args.summarize and not runs and not gather(root, settings):  # a table of nothing
            raise ValueError(
                f"--summarize: no run in {root} was evaluated on this data ({data_key}); "
                "give the --scd_dir (or none) and --data_dir its runs had"
            )
        if not runs:
            return write_outputs(root, pairs, settings, data, preset_name)
        check_summarizable(runs)  # before anything is written
        paths = [p for d in runs for p in write_outputs(d, pairs, settings, data, preset_name)]
        if gather(root, settings):
            paths += write_outputs(root, pairs, settings, data, preset_name)
        return paths + write_summary(root, runs, pairs, settings, data, preset_name)

    return hosts.on_primary(outputs, "outputs") or []


class Evaluated(NamedTuple):
    """A method's evaluation cached in its folder."""

    row: dict  # Table 1's measures
    example: np.ndarray  # the warped example image of Fig 4
    config: dict | None  # the DIRNet's `DIRNetConfig.to_dict`; None for SimpleElastix


def check_presets(root: Path, patterns: tuple[str, ...], preset: str) -> None:
    """For --summarize: a ValueError unless some run under root (`patterns`) was evaluated
    with `preset`, naming the presets there are; gathering none would write a table of
    the "before" row alone over the runs' own."""
    stored = [common.read_evaluation(p)["settings"] for g in patterns for p in sorted(root.glob(g))]
    if not stored:
        raise ValueError(f"--summarize: no evaluated run in {root} (<variant>/evaluation.json, "
                         "there or one folder down)")  # fmt: skip
    presets = sorted({str(s.get("preset")) for s in stored})
    if preset not in presets:
        raise ValueError(
            f"--summarize: the runs in {root} were evaluated with --preset={' or '.join(presets)}"
            f", not {preset}: give that --preset"
        )


def gather(root: Path, settings: dict) -> dict[str, Evaluated]:
    """Every evaluated run under root made from the same data and preset."""
    found = {}
    for name in ["elastix", *VARIANTS]:
        path = root / name / "evaluation.json"
        if path.exists():
            stored = common.read_evaluation(path)
            if all(stored["settings"].get(k) == v for k, v in settings.items()):
                example = np.load(root / name / "example.npy")
                found[name] = Evaluated(stored["row"], example, stored["settings"].get("config"))
    return found


# Config fields in which runs summarized together may differ: none changes what is trained.
SUMMARY_FREE_FIELDS = frozenset({"seed", "log_every", "checkpoint_every", "max_checkpoints",
                                 "num_val_pairs"})  # fmt: skip


def check_summarizable(runs: dict[Path, dict[str, Evaluated]]) -> None:
    """ValueError naming two runs of one variant whose configs differ in more than
    SUMMARY_FREE_FIELDS (a sweep of another setting, a longer run): their mean over runs
    would mix settings."""
    defaults = DIRNetConfig().to_dict()  # for fields newer than a run's config
    for name in VARIANTS:
        configs = [(run.name, defaults | got[name].config) for run, got in runs.items()
                   if name in got and got[name].config is not None]  # fmt: skip
        if len(configs) < 2:
            continue
        first, first_config = configs[0]
        for run, config in configs[1:]:
            differs = sorted(k for k in config if k not in SUMMARY_FREE_FIELDS
                             and config[k] != first_config.get(k))  # fmt: skip
            if differs:
                raise ValueError(
                    f"--summarize: the {name} runs {first} and {run} differ in "
                    f"{', '.join(differs)}, not only in seed; summarize each setting's runs "
                    "in a folder of their own"
                )


def write_outputs(root: Path, pairs: Pairs, settings: dict, data: str, preset: str) -> list[Path]:
    runs = gather(root, settings)
    before = mask_rows(pairs.moving_mask, pairs)
    rows = {"before": before} | {name: run.row for name, run in runs.items()}
    configs = {name: run.config for name, run in runs.items() if run.config is not None}
    results = {
        "data": data,
        "preset": preset,
        "settings": settings,
        "pairs": len(pairs),
        "machine": machine.describe(),
        "rows": rows,
    }
    table, fig3, fig4 = (
        root / "results.md",
        root / "fig3_validation_loss.png",
        root / "fig4_example.png",
    )
    paths = [root / "results.json", table]
    wd.atomic_write_text(paths[0], json.dumps(results, indent=2) + "\n")
    wd.atomic_write_text(table, table_markdown(rows, data, preset, len(pairs), configs))

    curves = {}
    for name in VARIANTS:
        records = (
            [r for r in wd.read_metrics(root / name) if "val_loss" in r] if name in runs else []
        )
        if records:
            curves[name] = ([r["step"] for r in records], [r["val_loss"] for r in records])
    if curves:
        losses = {common.objective_label(configs.get(name, {})) for name in curves}
        loss = losses.pop() if len(losses) == 1 else "each variant's objective"
        plots.learning_curves(
            curves, fig3, ylabel=f"validation loss ({loss})", title="DIRNet variants"
        )
        paths.append(fig3)

    k = example_index(pairs)
    view = heart_window(pairs.fixed_mask[k] | pairs.moving_mask[k])
    fixed, moving = pairs.fixed[k][view], pairs.moving[k][view]
    dirnet_name = next((n for n in ("C1", *VARIANTS) if n in runs), None)
    dirnet = runs[dirnet_name].example[view] if dirnet_name else None
    elx = runs["elastix"].example[view] if "elastix" in runs else None

    def diff(image):
        return None if image is None else np.abs(image - fixed)

    plots.image_table(
        [[fixed, moving, dirnet, elx], [None, diff(moving), diff(dirnet), diff(elx)]],
        fig4,
        row_labels=["image", "|image − fixed|"],
        col_labels=["fixed (ES)", "moving (ED)", f"DIRNet {dirnet_name or ''}", "SimpleElastix"],
        cmap=["gray", "magma"],
        title=f"{pairs.names[k]} (heart region)",
    )
    return [*paths, fig4]


def write_summary(
    root: Path, runs: dict[Path, dict], pairs: Pairs, settings: dict, data: str, preset: str
) -> list[Path]:
    """summary.json and summary.md in root: each method's measures over the runs (work
    directory → `gather` of it; e.g. one per seed), the mean ± sd over runs of each run's
    mean over the pairs."""
    rows = {}
    for name in ["elastix", *VARIANTS]:
        per_run = {run.name: got[name].row for run, got in runs.items() if name in got}
        if per_run:
            # The folded share only where every run has it (rows cached before it lack it).
            keys = ["dice", "hd95_mm", "mad_mm"]
            if all("folded" in row for row in per_run.values()):
                keys.append("folded")
            rows[name] = {
                key: summarize([row[key]["mean"] for row in per_run.values()]) for key in keys
            } | {"runs": sorted(per_run)}
            config = next(got[name].config for got in runs.values() if name in got)
            if config is not None:  # the runs' config (check_summarizable), but the seed
                rows[name]["config"] = {k: v for k, v in config.items() if k != "seed"}
    summary = {
        "data": data,
        "preset": preset,
        "settings": settings,
        "pairs": len(pairs),
        "before": mask_rows(pairs.moving_mask, pairs),
        "rows": rows,
    }
    paths = [root / "summary.json", root / "summary.md"]
    wd.atomic_write_text(paths[0], json.dumps(summary, indent=2) + "\n")
    wd.atomic_write_text(paths[1], summary_markdown(summary))
    return paths


def summary_markdown(summary: dict) -> str:
    def fmt(s, digits=2):
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    before = summary["before"]
    lines = [
        f"Data: {summary['data']}, preset: {summary['preset']}, {summary['pairs']} test pairs. "
        "Each row: mean ± sd over runs of the run's mean over the pairs (before "
        f"registration: Dice {fmt(before['dice'], 3)} over the pairs).",
        "",
        "| | runs | Dice | 95th pct. surface distance (mm) | mean abs. surface distance (mm) "
        "| folded % |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        label = "SimpleElastix" if name == "elastix" else dirnet_label(name, row.get("config"))
        folded = row.get("folded")
        folded = "–" if folded is None else fmt({k: 100 * folded[k] for k in ("mean", "std")})
        lines.append(
            f"| {label} | {len(row['runs'])} | {fmt(row['dice'], 3)} | {fmt(row['hd95_mm'])} | "
            f"{fmt(row['mad_mm'])} | {folded} |"
        )
    return "\n".join(lines) + "\n"


def heart_window(mask: np.ndarray, half: int | None = None) -> tuple[slice, slice]:
    """A square view centred on a mask, a quarter of the image wide (clipped to the image)."""
    size = mask.shape[-1]
    half = half or size // 4
    rows, cols = np.nonzero(mask)
    centre = (int(rows.mean()), int(cols.mean())) if rows.size else (size // 2, size // 2)
    return tuple(
        slice(max(0, min(c - half, n - 2 * half)), max(0, min(c - half, n - 2 * half)) + 2 * half)
        for c, n in zip(centre, mask.shape, strict=True)
    )


def dirnet_label(name: str, config: dict | None = None) -> str:
    """ "DIRNet A1 (downsampling: max)": the variant's overrides of the baseline, and a
    weighted regularizer if its config has one ("DIRNet B1 (transformer: quadratic,
    100 × bending)")."""
    parts = [f"{k}: {v}" for k, v in PAPER_VARIANTS.get(name, {}).items()]
    if config and (term := common.regularizer_term(config)):
        parts.append(term)
    return f"DIRNet {name}" + (f" ({', '.join(parts)})" if parts else "")


def table_markdown(
    rows: dict[str, dict], data: str, preset: str, n_pairs: int, configs: dict[str, dict]
) -> str:
    def fmt(s):
        return f"{s['mean']:.2f} ± {s['std']:.2f}"

    def ms(row, key):
        return f"{1e3 * row[key]:.1f}" if key in row else "–"

    label = {"before": "Before registration", "elastix": "SimpleElastix"}
    lines = [
        f"Data: {data}, preset: {preset}, {n_pairs} test pairs (ED→ES and ES→ED).",
        "",
        "| | Dice | 95th pct. surface distance (mm) | mean abs. surface distance (mm) "
        "| folded % | ms/pair | ms/pair batched | timed on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        # Jacobian determinant ≤ 0 (not in a row cached before the column).
        folded = f"{100 * row['folded']['mean']:.2f}" if "folded" in row else "–"
        times = (
            f"{ms(row, 'sec_per_pair')} | {ms(row, 'sec_per_pair_batched')} | "
            f"{row.get('timed_on', '–')}"
        )
        lines.append(
            f"| {label.get(name) or dirnet_label(name, configs.get(name))} | {fmt(row['dice'])} | "
            f"{fmt(row['hd95_mm'])} | "
            f"{fmt(row['mad_mm'])} | {folded} | {times} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    define_flags()
    common.run_command(run)
