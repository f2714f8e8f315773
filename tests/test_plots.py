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


def test_deformed_grid_is_x_plus_u_on_the_grid_lines(rng):
    u = rng.normal(size=(10, 13, 2))
    rows, cols = plots.deformed_grid(u, 4)
    assert rows.shape == (4, 13, 2) and cols.shape == (4, 10, 2)  # rows 0 4 8 9, cols 0 4 8 12
    for k, r in enumerate([0, 4, 8, 9]):
        np.testing.assert_array_equal(
            rows[k], np.stack([r + u[r, :, 0], np.arange(13) + u[r, :, 1]], -1)
        )
    for k, c in enumerate([0, 4, 8, 12]):
        np.testing.assert_array_equal(
            cols[k], np.stack([np.arange(10) + u[:, c, 0], c + u[:, c, 1]], -1)
        )
    rows, cols = plots.deformed_grid(np.full((10, 13, 2), (1.5, -2.0)), 4)  # a shift
    assert np.all(rows[..., 0] == np.array([0, 4, 8, 9])[:, None] + 1.5)
    assert np.all(cols[..., 1] == np.array([0, 4, 8, 12])[:, None] - 2.0)


def test_registration_figure_draws_what_it_says(rng, tmp_path):
    fixed, moving, warped = rng.random((3, 12, 12))
    u = rng.normal(scale=2.0, size=(12, 12, 2))
    det = rng.normal(loc=1.0, size=(12, 12))
    labels = (moving > 0.5).astype(int) * 2
    fig = plots.registration_figure(fixed, moving, warped, u, det, grid_step=4, title="t",
                                    labels=labels, warped_labels=labels)  # fmt: skip
    panels = [ax for ax in fig.axes if ax.get_title()]  # the colour bars have none
    titles = [ax.get_title() for ax in panels]
    assert titles[:6] == ["fixed", "moving", "warped", "moving, fixed grid carried",
                          "|moving − fixed|", "|warped − fixed|"]  # fmt: skip
    assert titles[6] == f"Jacobian det. ({(det <= 0).mean():.2%} ≤ 0)"
    rows, cols = plots.deformed_grid(u, 4)
    drawn = [np.stack([line.get_ydata(), line.get_xdata()], -1) for line in panels[3].lines]
    assert len(drawn) == len(rows) + len(cols)
    for got, want in zip(drawn, [*rows, *cols], strict=True):
        np.testing.assert_array_equal(got, want)
    folded = panels[6].images[1].get_array()  # black where the determinant is ≤ 0
    np.testing.assert_array_equal(np.ma.getmaskarray(folded), det > 0)
    np.testing.assert_array_equal(panels[5].images[0].get_array(), np.abs(warped - fixed))
    assert all(len(panels[k].collections) == 1 for k in (0, 1))  # the labels' outlines
    plots.save(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
