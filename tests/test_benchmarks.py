"""The profiling tool: a real trace of a small call, parsed into per-operation times."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import core, flags, layers, one_pair, profile
from dirnet_jax import DIRNetConfig, init_variables, models, variant
from dirnet_jax import layers as dirnet_layers
from dirnet_jax.models import Regressor, register
from dirnet_jax.train import create_train_state, data_key, train_steps


@pytest.mark.parametrize("what", ["register", "train"])
def test_profile_names_the_compiled_operations(tmp_path, capsys, what):
    hlo = tmp_path / "program.txt"
    profile.main([f"--what={what}", "--size=28", "--batch=2", "--calls=2", "--top=50",
                  f"--hlo={hlo}"])  # fmt: skip
    out = capsys.readouterr().out
    assert f"{what} baseline 28², batch 2, 2 calls on" in out
    assert "µs per call" in out
    times = [line.split(maxsplit=1) for line in out.splitlines() if "fusion" in line]
    assert times and all(float(us) >= 0 for us, _ in times)
    # The operations are named as in the compiled program it wrote (some events as
    # "end: <name>").
    program = hlo.read_text()
    assert program.startswith("HloModule")
    assert all(f"%{name.strip().split(': ')[-1]} = " in program for _, name in times)


def test_profile_swaps_a_switch_while_it_profiles(capsys, monkeypatch):
    # A choice swapped as benchmarks.core's A/B rows swap it, then put back; the swap
    # is in force while the call traces.
    seen = []
    transform = models.transform
    pair = lambda: dirnet_layers.INFER_FIRST_LAYER_PAIR  # noqa: E731
    monkeypatch.setattr(models, "transform", lambda *a: seen.append(pair()) or transform(*a))
    profile.main(["--size=28", "--batch=2", "--calls=1", "--top=3",
                  "--swap=INFER_FIRST_LAYER_PAIR=False"])  # fmt: skip
    assert "register baseline with INFER_FIRST_LAYER_PAIR=False 28²" in capsys.readouterr().out
    assert seen and not any(seen) and dirnet_layers.INFER_FIRST_LAYER_PAIR is True


def test_profile_without_calls_runs_the_warm_up_untraced(capsys, monkeypatch):
    # The workload for Nsight Compute (gpu.sh ncu): no JAX trace, whose counters the
    # profiler outside would share.
    traced = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: traced.append(a))
    profile.main(["--size=28", "--batch=2", "--calls=0"])
    assert capsys.readouterr().out == "register baseline 28², batch 2: 3 calls, untraced\n"
    assert not traced


@pytest.mark.parametrize(
    "arg",
    ["--bad=1", "--what=infer", "--size", "--candidates=true", "--swap=NOT_THERE=1",
     "--swap=INFER_FIRST_LAYER_PAIR=yes", "--calls=-1", "--batch=0", "--top=x", "--size=37",
     "--variant=Z"],
)  # fmt: skip
def test_profile_rejects_bad_arguments(arg):
    with pytest.raises(SystemExit, match="error: "):
        profile.main([arg])


def test_unfolded_row_registers_like_register():
    # The GPU comparison of BatchNorm folding is only fair if both compute the same thing.
    config = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2)
    variables = init_variables(config, jax.random.key(0))
    # Statistics that are not the identity, and an output layer that moves pixels (its
    # initial kernel is ~1e-5): grids of a few pixels.
    stats = jax.tree.map(lambda a: a + 0.3 * jax.numpy.abs(a) + 0.1, variables["batch_stats"])
    params = dict(variables["params"])
    kernel = params["output"]["kernel"]
    params["output"] = {"kernel": jax.random.normal(jax.random.key(1), kernel.shape),
                        "bias": params["output"]["bias"]}  # fmt: skip
    variables = {"params": params, "batch_stats": stats}
    fixed, moving = core.timed_pairs(28, 3)
    folded = register(config, variables, fixed, moving)
    unfolded = core.register_unfolded(config, variables, fixed, moving)
    assert 0.5 < float(np.abs(folded.grid).max()) < 20
    np.testing.assert_allclose(unfolded.grid, folded.grid, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unfolded.warped, folded.warped, rtol=1e-5, atol=1e-5)
    table = core.Table()
    core.bench_register(table, "x", config, (fixed, moving), (1, 3), 2, fn=core.register_unfolded)
    assert [r["what"] for r in table.rows] == ["register, batch 1", "register, batch 3"]
    assert all(r["per_sec"] > 0 for r in table.rows)


@pytest.mark.slow  # four processes, each timing its rows: 84 s on a 2-core AVX2 CPU
def test_flags_runs_each_set_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "flags.json"
    flags.main(["--size=28", "--min_seconds=0.05", f"--out={out}",
                "--xla_cpu_enable_fast_math=true", "--xla_no_such_flag=1"])  # fmt: skip
    table = capsys.readouterr().out
    sets = {s["name"]: s for s in json.loads(out.read_text())["sets"]}
    assert list(sets) == ["default", "--xla_cpu_enable_fast_math=true", "--xla_no_such_flag=1",
                          "default, again"]  # fmt: skip
    # Each child saw its own set (XLA reads XLA_FLAGS once per process), and measured.
    assert "fast_math" not in sets["default"]["xla_flags"]
    assert sets["--xla_cpu_enable_fast_math=true"]["xla_flags"].endswith("fast_math=true")
    for name in ("default", "--xla_cpu_enable_fast_math=true", "default, again"):
        whats = [r["what"] for r in sets[name]["rows"]]
        assert whats == ["register, batch 1", "register, batch 32", "train, 4 steps/dispatch"]
        assert all(r["per_sec"] > 0 for r in sets[name]["rows"])
    # A flag XLA does not know ends its own process only, and the table says why.
    assert "Unknown flag" in sets["--xla_no_such_flag=1"]["error"]
    row = next(line for line in table.splitlines() if line.startswith("--xla_cpu_enable_fast"))
    assert row.count("×") == 3 and " ms " in row and "pairs/s" in row
    assert "Unknown flag in XLA_FLAGS: --xla_no_such_flag=1" in table


def test_flags_reports_sets_cut_short_by_the_time_budget(tmp_path, capsys):
    opts, _ = flags.parse(["--size=28"])
    assert "cut short" in flags.run_set("", opts, 0.01)["error"]
    flags.main(["--size=28", "--seconds=0.5", f"--out={tmp_path / 'flags.json'}"])
    table = capsys.readouterr().out
    assert "not run: no time left" in table  # and the table is printed anyway


@pytest.mark.parametrize(
    "arg", ["--size=64", "--bogus=1", "--xla", "--seconds=0", "--seconds=x", "--seconds=nan"]
)
def test_flags_rejects_bad_arguments(arg):
    with pytest.raises(SystemExit, match="error: "):
        flags.main([arg])


@pytest.mark.parametrize("tool", [core, flags, layers, one_pair, profile])
@pytest.mark.parametrize("ask", ["--help", "-h"])
def test_help_prints_the_usage_and_does_no_work(tool, ask, capsys, monkeypatch):
    monkeypatch.setattr(core, "output_path", lambda *a: pytest.fail("started work"))
    with pytest.raises(SystemExit) as stop:
        tool.main(["--size=28", ask])
    assert stop.value.code == 0
    assert capsys.readouterr().out == tool.__doc__.strip() + "\n"


@pytest.mark.parametrize("tool", [core, flags])
def test_out_that_is_not_a_file_is_refused_before_any_work(tool, tmp_path):
    with pytest.raises(SystemExit, match="is not a regular file"):
        tool.main([f"--out={tmp_path}"])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="a folder no one writes in: /proc")
def test_out_in_a_folder_that_takes_no_file_is_refused_before_any_work():
    with pytest.raises(SystemExit, match=r"^error: --out=/proc/bench.json: cannot write in its"):
        core.main(["--out=/proc/bench.json"])


def test_swapped_xla_conv_replaces_conv_taps_by_a_convolution_while_it_lasts():
    config = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2, features=4)
    variables = init_variables(config, jax.random.key(0))
    x = jax.numpy.zeros((2, 28, 28, 1))

    def convolutions():
        def run(v):
            return Regressor(config).apply(v, x, x, train=True, mutable=["batch_stats"])

        return jax.jit(run).lower(variables).as_text().count("stablehlo.convolution")

    taps = convolutions()
    with core.swapped("TapConv", core.xla_conv):
        assert convolutions() == taps + 1
    assert convolutions() == taps


def test_a_swap_goes_to_the_module_that_reads_the_name():
    # The layers' own choices live in dirnet_jax.layers, the regressor's in models; a
    # swap set on the other module would trace as before and time the same program twice.
    assert core.home("pooled_conv") is dirnet_layers
    assert core.home("INFER_POOLED_DTYPES") is dirnet_layers
    assert core.home("TRAIN_CONV_FORM") is models
    with core.swapped("TRAIN_CONV_FORM", "taps"), core.swapped("POOLED_KERNEL_MIN_WIDTH", 0):
        assert (models.TRAIN_CONV_FORM, dirnet_layers.POOLED_KERNEL_MIN_WIDTH) == ("taps", 0)
    assert (models.TRAIN_CONV_FORM, dirnet_layers.POOLED_KERNEL_MIN_WIDTH) == ("pairs", 128)
    with pytest.raises(ValueError, match=r"^'NOT_THERE' to swap is in neither dirnet_jax\.layers"):
        core.home("NOT_THERE")
    with pytest.raises(ValueError, match=r"^'elu' to swap is in dirnet_jax\.layers and dirnet_jax"):
        core.home("elu")  # both import it: a swap of one would not reach the other


def test_an_ab_row_traces_training_again_though_its_state_keeps_no_seed():
    # The A/B rows give each swap a config of its own seed, but a TrainState keeps
    # config.network(): without clearing jit's caches, train_steps reused the trace made
    # before the swap, and every training A/B row timed the baseline.
    config = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2, features=4)
    pool = jax.numpy.zeros((4, 28, 28, 1))

    def steps(seed):
        state = create_train_state(config.replace(seed=seed))
        return train_steps(state, pool, data_key(config), steps=1, batch_size=2, grouped=False)

    def refuse(*args, **kwargs):
        raise RuntimeError("traced with the swap")

    steps(0)
    with pytest.raises(RuntimeError, match="with the swap"):
        core.in_swap({"TapConv": refuse}, steps, 1)
    steps(2)  # the original again


def test_an_environment_variable_is_read_by_a_new_trace(monkeypatch):
    monkeypatch.delenv("DIRNET_BENCH_TEST", raising=False)
    f = jax.jit(lambda x: x + len(os.environ.get("DIRNET_BENCH_TEST", "")))
    assert f(0) == 0
    seen = []
    core.in_env(("DIRNET_BENCH_TEST", "abc"), lambda: seen.append(int(f(0))))
    assert seen == [3] and f(0) == 0


def test_core_keeps_to_its_time_budget_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "core.json"
    core.main(["--quick", "--seconds=0.001", f"--out={out}"])
    printed = capsys.readouterr().out
    assert (
        "not run, the --seconds budget was spent: baseline 256², prototype 256², PyTorch 256², "
        "baseline 28², prototype 28², PyTorch 28², SimpleElastix\n"
    ) in printed
    assert "impl      variant" in printed
    assert json.loads(out.read_text())["rows"] == []
    core.main(["--variants=B1,C2", "--seconds=0.001", f"--out={out}"])
    printed = capsys.readouterr().out
    assert "budget was spent: B1 256², B1 28², C2 256², C2 28²\n" in printed
    core.main(["--variants=B1", "--sizes=28", "--seconds=1e-9", f"--out={out}"])
    assert "budget was spent: B1 28²\n" in capsys.readouterr().out


def test_first_layer_benchmark_times_the_kernel_against_xla(tmp_path, capsys):
    out = tmp_path / "first_layer.json"
    layers.main(["--size=32", "--batch=2", "--min_seconds=0.01", f"--out={out}"])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    default = "triton {} rows={} warps={}".format(*layers.SHAPES[0][:3])
    expm1 = layers.SHAPES[0][3]
    assert {"xla loop", "xla unfused", f"{default} {expm1}", "copy"} <= set(rows)
    # Every real implementation computes the layer; the one without expm1 must not.
    others = ["triton {} rows={} warps={} {}".format(*shape) for shape in layers.CPU_SHAPES[1:]]
    for name in ["xla unfused", f"{default} {expm1}", *others]:
        assert rows[name]["max_abs_diff"] < 1e-5
    assert rows[f"{default} no expm1"]["max_abs_diff"] > 0.1
    assert "first layer, 32² images, batch 2" in capsys.readouterr().out


def test_layers_benchmark_times_the_second_layer_kernel(tmp_path, capsys):
    out = tmp_path / "layers.json"
    layers.main(["--layer=2", "--size=64", "--batch=2", "--min_seconds=0.01", f"--out={out}"])
    record = json.loads(out.read_text())
    rows = {r["impl"]: r for r in record["rows"]}
    kernels = {"triton, 1 TF32 product, warps=4", "triton, 3 TF32 products, warps=4",
               "triton, 1 TF32 product, warps=2"}  # fmt: skip
    assert record["layer"] == "2" and set(rows) == {"xla conv, elu, pool", "copy", *kernels}
    for name in kernels:  # the interpreter: full precision either way
        assert rows[name]["max_abs_diff"] < 1e-5
    assert "second layer (32², 16 channels), 64² images, batch 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --layer"):
        layers.main(["--layer=3"])


def test_layers_benchmark_times_the_training_kernels(tmp_path, capsys):
    out = tmp_path / "layers.json"
    layers.main(["--layer=train", "--size=32", "--batch=2", "--min_seconds=0.01", f"--out={out}"])
    record = json.loads(out.read_text())
    rows = {r["impl"]: r for r in record["rows"]}
    kernels = {f"triton conv and gradients, {p}" for p in ("1 TF32 product", "3 TF32 products")}
    kernels.add("triton pairs conv and gradients, 1 TF32 product")  # at 16²: the taps form
    assert record["batch"] == 2 and set(rows) == {"xla conv and gradients", "copy", *kernels}
    for name in kernels:  # the conv and both gradients, in the interpreter at full precision
        assert 0 < rows[name]["max_abs_diff"] < 1e-4
    assert "conv in training (16², 16 channels), 32² images, batch 2" in capsys.readouterr().out
    assert layers.parse(["--layer=train"])["batch"] == "32"  # training's batch by default
    layers.main(["--layer=train1", "--size=32", "--batch=2", "--min_seconds=0.01", f"--out={out}"])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"taps, xla kernel grad", "xla conv and kernel grad",
                         "taps, triton kernel grad", "copy"}  # fmt: skip
    assert 0 < rows["taps, triton kernel grad"]["max_abs_diff"] < 1e-4
    assert "first conv in training (32², 2 → 16 channels)" in capsys.readouterr().out
    layers.main(["--layer=train1bn", "--size=32", "--batch=2", "--min_seconds=0.01",
                 f"--out={out}"])  # fmt: skip
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    trained = "at once as trained, kernel grad rows=4 block=16 warps=1, 3 TF32 products"
    assert set(rows) == {"layer by layer", "copy", trained}
    # The layer's values, statistics and gradients, with the kernels interpreted here.
    assert 0 < rows[trained]["max_abs_diff"] < 1e-4
    with pytest.raises(SystemExit, match="error: --batch"):
        layers.parse(["--batch=0"])


@pytest.mark.slow  # `make test-all` before a GPU lease: 58 s on a 2-core AVX2 CPU
def test_the_gpu_rows_run(monkeypatch):
    # They run on a GPU only, where a slip in one would cost a lease: here on the CPU at
    # 28² (the swaps in place, XLA's side of each), one row of each kind must add its row:
    # a swap in registration (stackfirst, changed since run 8; bf16cudnn is one of the
    # same kind) and in fit's steps (taps), an environment variable (xlatrain), a swap in
    # the plain step (xlaconv).
    monkeypatch.setattr(core, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(core, "default_steps_per_dispatch", lambda: 2)
    table = core.Table()
    base = core.base_config(28)
    blocks = dict(core.gpu_ab_blocks(table, base, core.timed_pairs(28, 32), (1,), 1))
    assert next(iter(blocks)) == "baseline-stackfirst" and "baseline-bf16cudnn" in blocks
    for name in ["stackfirst", "taps", "xlatrain", "xlaconv"]:
        blocks[f"baseline-{name}"]()
        assert any(row["variant"] == f"baseline-{name}" for row in table.rows)


def test_ab_keeps_the_baseline_and_the_rows_it_names(tmp_path, monkeypatch, capsys):
    # --ab runs on a GPU only: here the backend's name says so, and the time budget is
    # spent before the first block, so the list of blocks not run is the selection.
    monkeypatch.setattr(core.jax, "default_backend", lambda: "gpu")
    args = ["--sizes=28", "--seconds=1e-9", f"--out={tmp_path / 'core.json'}"]
    core.main(["--ab=baseline-bf16,prototype", *args])
    spent = "budget was spent: baseline 28², prototype 28², baseline-bf16 28²\n"
    assert spent in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --ab: no row prototypes; known: "):
        core.main(["--ab=prototypes", *args])


def test_core_reports_a_row_that_fails_and_goes_on(tmp_path, monkeypatch, capsys):
    def fails_at_256(table, name, config, *args):
        if config.image_shape[0] == 256:
            raise RuntimeError("UNIMPLEMENTED: not on this backend\nmore detail")
        table.add("jax", name, 28, "register, batch 1", 0.1, 1e-3, 1, "pairs/s")

    monkeypatch.setattr(core, "bench_jax", fails_at_256)
    monkeypatch.setattr(core, "bench_prototype", lambda *args: None)
    monkeypatch.setattr(core, "bench_torch", lambda *args: None)
    monkeypatch.setattr(core, "bench_elastix", lambda *args, **kwargs: None)
    out = tmp_path / "core.json"
    core.main(["--quick", f"--out={out}"])
    captured = capsys.readouterr()
    line = "failed: baseline 256²: RuntimeError: UNIMPLEMENTED: not on this backend\n"
    assert captured.err == line and captured.out.endswith(line + f"\nwritten to {out}\n")
    assert [r["size"] for r in json.loads(out.read_text())["rows"]] == [28]


def test_core_prints_the_interleaved_rounds_ratios_under_the_table(tmp_path, monkeypatch, capsys):
    what = core.TRAIN_INTERLEAVED
    monkeypatch.setattr(core, "bench_jax", lambda table, name, config, *args: table.add(
        "jax", name, 28, what, float("nan"), 0.02, 4, "steps/s", rounds=2))  # fmt: skip
    monkeypatch.setattr(core, "bench_prototype", lambda table, *args: table.add(
        "prototype", "baseline", 28, what, float("nan"), 0.01, 1, "steps/s", rounds=2,
        round_ratios=[1.5, 2.0]))  # fmt: skip
    monkeypatch.setattr(core, "bench_torch", lambda *args: None)
    out = tmp_path / "core.json"
    core.main(["--quick", "--sizes=28", f"--out={out}"])
    printed = capsys.readouterr().out
    assert re.search(r"prototype baseline   28  train, interleaved .* 2\.0×\n", printed)
    assert (
        "train, interleaved, 28²: ours as `fit` runs it and the prototype's step in 2 "
        "alternating rounds; ours ÷ prototype by round 1.50–2.00×\n"
    ) in printed
    assert json.loads(out.read_text())["rows"][1]["round_ratios"] == [1.5, 2.0]


@pytest.mark.parametrize(
    "arg",
    ["--bad=1", "--quick=1", "--seconds=0", "--min_seconds=x", "--min_seconds=nan",
     "--variants=A1,Z9", "--sizes=64"],
)  # fmt: skip
def test_core_rejects_bad_arguments(arg):
    with pytest.raises(SystemExit, match="error: "):
        core.main([arg])


@pytest.mark.parametrize(
    "arg", ["--layer=3", "--batch=0", "--size=37", "--size=0", "--size=x", "--min_seconds=-1"]
)
def test_layers_rejects_bad_arguments(arg):
    with pytest.raises(SystemExit, match="error: "):
        layers.main([arg])


@pytest.mark.parametrize("name", ["baseline", "A1"])
def test_the_unfused_first_layer_and_default_graphs_register_alike(name):
    # The GPU rows that time what the fused first layer and INFER_COMPILER_OPTIONS buy are
    # only fair if they compute the same registrations.
    config = variant(name, DIRNetConfig(image_shape=(28, 28), num_downsamplings=2))
    variables = init_variables(config, jax.random.key(0))
    params = dict(variables["params"])
    kernel = params["output"]["kernel"]
    params["output"] = {"kernel": jax.random.normal(jax.random.key(1), kernel.shape),
                        "bias": params["output"]["bias"]}  # fmt: skip
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    fixed, moving = core.timed_pairs(28, 3)
    fused = register(config, variables, fixed, moving)
    assert 0.5 < float(np.abs(fused.grid).max()) < 20

    def convolutions(config):
        return (
            register.lower(config, variables, fixed, moving)
            .as_text()
            .count("stablehlo.convolution")
        )

    fused_convolutions = convolutions(config)
    with core.swapped("fused_first_layer", core.unfused_first_layer):
        unfused = register(config.replace(seed=2), variables, fixed, moving)
        assert convolutions(config.replace(seed=3)) == fused_convolutions + 1
    with core.swapped("fused_first_layer", core.xla_first_layer):
        xla_loop = register(config.replace(seed=4), variables, fixed, moving)
    graphs5 = core.register_default_graphs(config, variables, fixed, moving)
    for other in (unfused, xla_loop, graphs5):
        np.testing.assert_allclose(other.grid, fused.grid, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.warped, fused.warped, rtol=1e-5, atol=1e-5)


def test_one_pair_interleaves_register_and_its_twins(tmp_path, capsys):
    out = tmp_path / "one_pair.json"
    one_pair.main(["--size=28", "--rounds=2", "--calls=3", f"--out={out}"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == [
        "register",
        "XLA's first layer",
        "cuDNN's 128² layer",
        "CUDA graphs from 5 kernels",
        "bfloat16",
        "bfloat16, cuDNN's 128² layer",
        "registrar (folded once)",
    ]
    for r in rows:  # the median of all calls lies between the rounds' medians
        assert 0 < r["round_min_ms"] <= r["median_ms"] <= r["round_max_ms"]
    assert "one 28² pair, 2 rounds × 3 calls each" in capsys.readouterr().out
    for arg in ("--size=64", "--rounds=0", "--calls=x", "--bad=1"):
        with pytest.raises(SystemExit, match="error: "):
            one_pair.main([arg])


def test_gpu_sh_names_tests_that_exist():
    # A test id gpu.sh's `tests` names that pytest cannot find fails the whole run it is in,
    # and a lease is minutes: the ids are collected here, as gpu.sh passes them.
    script = Path("benchmarks/gpu.sh").read_text()
    paths = dict(re.findall(r"\b(\w)=(tests/\w+\.py)", script.split("local first=(")[0]))
    ids = []
    for array in ("first", "rest"):
        body = script.split(f"local {array}=(")[1].split("\n  )")[0]
        words = [w for line in body.splitlines() for w in line.split("#")[0].split()]
        ids += [re.sub(r"\$(\w)\b", lambda m: paths[m.group(1)], w) for w in words]
    assert len(ids) > 10 and all(i.startswith("tests/") for i in ids), ids
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
