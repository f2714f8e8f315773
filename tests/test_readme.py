"""The README's Python examples run as written, with two training steps (fewer than fit's
four a call on a CPU: one small program to compile, not the four steps' unrolled one)."""

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
USE, OWN_IMAGES, EXTEND = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
STEPS = 2


def run(code: str, scope: dict, replace: dict[str, str]) -> None:
    """exec the README's `code` in `scope` after each `replace` (pattern → text, once)."""
    for pattern, text in replace.items():
        code, n = re.subn(pattern, text, code)
        assert n == 1, pattern
    exec(compile(code, str(README), "exec"), scope)


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write runs/… where they run
    return tmp_path


def test_use_it_then_register_a_pair_of_your_own(here):
    scope: dict = {}
    run(USE, scope, {r"num_steps=\d+": f"num_steps={STEPS}"})
    assert int(scope["state"].step) == STEPS and (here / "runs/toy/checkpoints").is_dir()
    assert scope["reg"].displacement.shape == (4, 28, 28, 2)
    # "Register your own images" in Python: the model just trained, [H, W] arrays.
    scope["fixed"], scope["moving"] = scope["pairs"][0, ..., 0], scope["pairs"][4, ..., 0]
    run(OWN_IMAGES, scope, {r"runs/mnist/digit_3": "runs/toy"})
    result = scope["result"]
    assert result.warped.shape == (28, 28) and result.displacement.shape == (28, 28, 2)
    assert 0 <= result.folded_fraction <= 1 and -1 <= result.ncc_after <= 1


def test_extend_it(here):
    scope: dict = {}
    run(EXTEND, scope, {r"num_steps=\d+": f"num_steps={STEPS}"})
    config, reg = scope["config"], scope["reg"]
    assert int(scope["state"].step) == STEPS and config.receptive_field == "overlap"
    assert reg.displacement.shape == (2, 16, 16, 16, 3)
    assert bool(jnp.isfinite(reg.displacement).all())
    # The own loss: zero for a pair of equal images, positive otherwise, one per pair.
    pairs = scope["pairs"]
    loss = scope["gradient_mse"](pairs[:2], jnp.stack([pairs[0], pairs[3]]))
    assert loss.shape == (2,) and float(loss[0]) == 0 and float(loss[1]) > 0
