import numpy as np
import pytest

from dirnet_jax import plots


def decaying(end: float, steps=range(0, 1001, 100)) -> tuple[list[int], list[float]]:
    """A validation loss from −0.4 at step 0 towards `end`, as training logs it."""
    return list(steps), [end + (-0.4 - end) * np.exp(-s / 60) for s in steps]


def test_a_far_start_gets_a_zoom_on_the_last_half():
    # Two runs 0.01 apart at the end, from an untrained start 0.45 above: one panel would
    # squeeze their difference into 2 % of its height.
    curves = {"A": decaying(-0.85), "B": decaying(-0.86)}
    fig = plots.curves_figure(curves, ylabel="loss", title="t")
    full, zoom = fig.axes
    assert zoom.get_xlim() == (500, 1000)
    lo, hi = zoom.get_ylim()
    pairs = [zip(steps, values, strict=True) for steps, values in curves.values()]
    late = [v for run in pairs for s, v in run if s >= 500]
    assert lo < min(late) < max(late) < hi and hi - lo < 0.02
    assert full.get_ylim()[1] > -0.4  # the whole curve, the start included
    assert [line.get_label() for line in zoom.lines] == ["A", "B"]  # the same colours
    assert [line.get_color() for line in zoom.lines] == [ln.get_color() for ln in full.lines]


@pytest.mark.parametrize(
    "curves",
    [
        {"A": ([0, 500, 1000], [-0.4, -0.6, -0.85])},  # still moving in the last half
        {"A": ([10, 20], [-0.5, -0.6])},  # no step 0, no far start
        {"A": ([0], [-0.4])},  # a single record
    ],
)
def test_one_panel_where_a_zoom_shows_nothing_new(curves):
    assert len(plots.curves_figure(curves, ylabel="loss", title="t").axes) == 1


def test_learning_curves_writes_a_png(tmp_path):
    plots.learning_curves({"A": decaying(-0.85)}, tmp_path / "f.png", ylabel="l", title="t")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left
