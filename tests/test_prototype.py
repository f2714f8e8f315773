"""benchmarks.prototype: a plain flax DIRNet that must compute what ours computes, so that
its speed row compares the same model (and ours is checked end to end against it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import core, prototype
from dirnet_jax import PAPER_VARIANTS, DIRNetConfig, init_variables, variant
from dirnet_jax.models import register
from dirnet_jax.train import _loss, create_train_state

MNIST_NET = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2, conv_layers=4)


def relative_error(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(a).max())


@pytest.mark.parametrize("name", list(PAPER_VARIANTS))
def test_prototype_trains_and_registers_as_our_dirnet(rng, name):
    config = variant(name, MNIST_NET)
    variables = init_variables(config, jax.random.key(0))
    plain = prototype.init(config, jax.random.key(0))
    assert jax.tree.map(jnp.shape, plain) == jax.tree.map(jnp.shape, variables)
    # A random output layer: a real displacement field, not the identity of the initial one,
    # of about a pixel whatever the layer's fan-in (C2's dense output sums 1,024 inputs).
    params = dict(variables["params"])
    shape = params["output"]["kernel"].shape
    kernel = 2 / np.sqrt(np.prod(shape[:-1])) * rng.standard_normal(shape)
    params["output"] = {**params["output"], "kernel": kernel}
    fixed, moving = (rng.uniform(size=(8, 28, 28, 1)).astype(np.float32) for _ in range(2))

    state = create_train_state(config).replace(batch_stats=variables["batch_stats"])
    batch = {"fixed": fixed, "moving": moving}
    ours = jax.jit(jax.value_and_grad(_loss, has_aux=True))
    (loss, stats), grads = ours(params, state, batch)
    theirs = jax.jit(jax.value_and_grad(prototype.loss_fn(config), has_aux=True))
    (loss_p, stats_p), grads_p = theirs(params, variables["batch_stats"], fixed, moving)

    assert abs(float(loss) - float(loss_p)) < 1e-6 and abs(float(loss)) > 1e-3
    assert jax.tree.structure(grads) == jax.tree.structure(grads_p)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_p), strict=True):
        assert relative_error(a, b) < 5e-5
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    trained = {"params": params, "batch_stats": stats}
    warped = register(config, trained, fixed, moving).warped
    warped_p = prototype.register_fn(config)(trained, fixed, moving)
    assert float(jnp.abs(warped - moving).max()) > 0.05  # the pairs did move
    np.testing.assert_allclose(warped_p, warped, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"boundary": "zeros"}, "boundary"), ({"compute_dtype": "bfloat16"}, "compute_dtype"),
     ({"similarity": "mse"}, "similarity"), ({"image_shape": (8, 8, 8)}, "image_shape"),
     ({"regularizer_weight": 1.0}, "regularizer_weight")],
)  # fmt: skip
def test_prototype_refuses_what_it_does_not_build(overrides, field):
    config = MNIST_NET.replace(**overrides)
    with pytest.raises(ValueError, match=f"differs in {field}$"):
        prototype.init(config, jax.random.key(0))


def test_prototype_rows_time_registration_and_a_training_step(rng, monkeypatch):
    monkeypatch.setattr(core, "MIN_SECONDS", 0.01)
    monkeypatch.setattr(core, "INTERLEAVED_ROUNDS", 2)
    monkeypatch.setattr(core, "default_steps_per_dispatch", lambda: 1)  # one program less
    pairs = tuple(rng.uniform(size=(32, 28, 28, 1)).astype(np.float32) for _ in range(2))
    table = core.Table()
    core.bench_prototype(table, MNIST_NET, pairs, (1, 4), repeats=2)
    rows = [(r["impl"], r["variant"], r["size"], r["what"], r["unit"]) for r in table.rows]
    assert rows == [
        ("prototype", "baseline", 28, "register, batch 1", "pairs/s"),
        ("prototype", "baseline", 28, "register, batch 4", "pairs/s"),
        ("prototype", "baseline", 28, "train step, batch 32", "steps/s"),
        ("jax", "baseline", 28, "train, interleaved", "steps/s"),
        ("prototype", "baseline", 28, "train, interleaved", "steps/s"),
    ]
    assert all(r["per_sec"] > 0 for r in table.rows)
    assert all(r["memory_mb"] > 0 for r in table.rows[:3])
    assert [r["rounds"] for r in table.rows[3:]] == [2, 2]
    assert len(table.rows[4]["round_ratios"]) == 2 and min(table.rows[4]["round_ratios"]) > 0


def test_interleaved_rows_are_the_rounds_medians_and_their_ratios(monkeypatch):
    """Ours makes 4 steps a call: 40 and 20 ms a call are 10 and 5 ms a step, against the
    prototype's 20 ms: 2× and 4× by round; the rows hold the medians over the rounds."""
    rounds = {"jax": [[0.04], [0.02, 0.02], [0.03]], "prototype": [[0.02], [0.02], [0.03]]}
    monkeypatch.setattr(core, "interleaved", lambda fns, *args: rounds)
    monkeypatch.setattr(core, "default_steps_per_dispatch", lambda: 4)
    monkeypatch.setattr(core, "steps_call", lambda *args: (None, None, None))
    monkeypatch.setattr(core, "timed", lambda *args: (0.0, 0.01))  # no step is run
    monkeypatch.setattr(core, "compiled_mb", lambda *args: 1.0)
    pairs = tuple(np.zeros((32, 28, 28, 1), np.float32) for _ in range(2))
    table = core.Table()
    core.bench_prototype(table, MNIST_NET, pairs, (), repeats=1)
    ours, theirs = table.rows[-2:]
    assert ours["per_sec"] == pytest.approx(4 / 0.03) and theirs["per_sec"] == pytest.approx(50)
    np.testing.assert_allclose(theirs["round_ratios"], [2, 4, 4])
    assert "round_ratios" not in ours and ours["rounds"] == theirs["rounds"] == 3


def test_interleaved_calls_each_function_in_turn_every_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = core.interleaved(fns, rounds=3, sync=lambda x: x)
    assert calls == ["a", "b"] * 4  # once each before the rounds, then once a round
    assert [[len(r) for r in times[name]] for name in "ab"] == [[1, 1, 1]] * 2
    calls.clear()
    times = core.interleaved(fns, rounds=2, calls=3, sync=lambda x: x)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert min(t for name in "ab" for r in times[name] for t in r) >= 0
