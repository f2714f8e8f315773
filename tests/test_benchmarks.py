"""The profiling tool: a real trace of a small call, parsed into per-operation times."""

import jax
import numpy as np
import pytest

from benchmarks import core, profile
from dirnet_jax import DIRNetConfig, init_variables
from dirnet_jax.models import register


def test_profile_names_the_compiled_operations(capsys):
    profile.main(["--size=28", "--batch=2", "--calls=2", "--top=50"])
    out = capsys.readouterr().out
    assert "register baseline 28², batch 2, 2 calls on" in out
    assert "µs per call" in out
    times = [line.split(maxsplit=1) for line in out.splitlines() if "fusion" in line]
    assert times and all(float(us) >= 0 for us, _ in times)


@pytest.mark.parametrize("arg", ["--bad=1", "--what=infer", "--size"])
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
