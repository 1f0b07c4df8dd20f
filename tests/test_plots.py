"""dtrain.plots: line charts and stacked panels drawn with Pillow, and the eval charts built on them."""
import numpy as np
import pytest
from PIL import Image

from dtrain.plots import COLORS, GREY, Panel, line_chart, panels

LINE = {"a": [(1.0, 2.0), (2.0, 3.0), (4.0, 1.0)]}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def rows_of(img: np.ndarray, color) -> np.ndarray:
    """The image rows where `color` appears."""
    return np.nonzero((img == color).all(axis=-1).any(axis=1))[0]


def dashed(img: np.ndarray) -> bool:
    """Whether a row holds a long dashed grey line (not just grey edges of antialiased text)."""
    return bool(((img == GREY).all(axis=-1).sum(axis=1) > 100).any())


def test_line_chart_is_a_png_of_the_requested_size_showing_its_series(tmp_path):
    path = line_chart(tmp_path / "sub" / "c.png", LINE, title="t", xlabel="x", ylabel="y", size=(500, 300))
    assert path == tmp_path / "sub" / "c.png" and Image.open(path).format == "PNG"
    img = pixels(path)
    assert img.shape == (300, 500, 3) and len(rows_of(img, COLORS[0])) > 20
    higher = pixels(line_chart(tmp_path / "h.png", {"a": [(x, y + 10) for x, y in LINE["a"]]}, title="t",
                               xlabel="x", size=(500, 300)))
    assert (higher != img).any()
    assert rows_of(higher, COLORS[0]).mean() < rows_of(img, COLORS[0]).mean()  # larger y, drawn higher up


def test_log_axes_reference_lines_and_steps(tmp_path):
    kw = dict(title="t", xlabel="x", xlog=True, ylog=True, xticks=[1, 2, 4])
    plain = pixels(line_chart(tmp_path / "a.png", LINE, **kw))
    floor = pixels(line_chart(tmp_path / "b.png", LINE, hlines={"floor": 0.5}, **kw))
    assert dashed(floor) and not dashed(plain)
    stepped = pixels(line_chart(tmp_path / "c.png", LINE, step={"a"}, **kw))
    assert stepped.shape == plain.shape and (stepped != plain).any()


def test_panels_share_the_x_axis_and_give_each_series_its_own_colour(tmp_path):
    stack = [Panel("concurrency", {"clients": [(0, 1), (5, 8), (10, 4)]}, "clients"),
             Panel("replicas", {"replicas": [(0, 1), (4, 2), (10, 2)]}, "count", step={"replicas"}),
             Panel("p95", {"p95": [(t, 50 + t) for t in range(11)]}, "ms", ylog=True, hlines={"SLO": 80})]
    img = pixels(panels(tmp_path / "p.png", stack, xlabel="time (s)", size=(600, 500)))
    assert img.shape == (500, 600, 3)
    top, middle, bottom = (rows_of(img, c) for c in COLORS[:3])
    assert len(top) and len(middle) and len(bottom) and top.max() < middle.min() and middle.max() < bottom.min()
    two = pixels(panels(tmp_path / "two.png", stack[:2], xlabel="time (s)", size=(600, 500)))
    assert two.shape == img.shape and (two != img).any()


@pytest.mark.parametrize("call, message", [
    (lambda p: line_chart(p, {}, title="t", xlabel="x"), "no series"),
    (lambda p: panels(p, [], xlabel="x"), "no panels"),
    (lambda p: line_chart(p, {"a": []}, title="t", xlabel="x"), "no points"),
    (lambda p: line_chart(p, {"a": [(1, 1), (2, 0)]}, title="t", xlabel="x", ylog=True), "'a' has y = 0 on a log y"),
    (lambda p: line_chart(p, {"a": [(-1, 1), (2, 3)]}, title="t", xlabel="x", xlog=True), "'a' has x = -1 on a log x"),
    (lambda p: line_chart(p, LINE, title="t", xlabel="x", ylog=True, hlines={"floor": 0}), "'floor' has y = 0"),
    (lambda p: line_chart(p, LINE, title="t", xlabel="x", xlog=True, xticks=[0, 1]), "x tick 0 on a log x"),
    (lambda p: line_chart(p, LINE, title="t", xlabel="x", step={"b"}), "step names no series ['b']"),
])
def test_bad_input_is_named(tmp_path, call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_eval_charts_draw_their_series_and_the_noise_floor(tmp_path):
    from dtrain.eval.digits import plot_fd_vs_nfe
    from dtrain.eval.mixture import plot_velocity_error

    rows = [{"sampler": "euler", "nfe": n, "fd": fd} for n, fd in ((2, 80.0), (4, 30.0), (8, 9.0))]
    rows += [{"sampler": "heun", "nfe": 6, "fd": 0.0}]  # an FD estimate of zero still has a place on the log axis
    result = {"rows": rows, "noise_floor_fd": 0.7, "feature_net": "f", "guidance": 2.0, "n_samples": 10}
    img = pixels(plot_fd_vs_nfe(result, tmp_path / "fd.png"))
    assert img.shape == (420, 640, 3) and len(rows_of(img, COLORS[0])) and len(rows_of(img, COLORS[1])) and dashed(img)
    verr = {"velocity_error": [{"t": t, "relative_uncond": 1.0, "relative_cond": 0.5} for t in (0.1, 0.5, 0.9)]}
    img = pixels(plot_velocity_error(verr, tmp_path / "v.png"))
    assert img.shape == (380, 640, 3) and rows_of(img, COLORS[0]).mean() < rows_of(img, COLORS[1]).mean()
