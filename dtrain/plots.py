"""Line charts as PNG files, drawn with Pillow.

Pillow is already a dependency (image I/O); matplotlib is not, and a handful of report charts (FD
against NFE, velocity error against t, a serving timeline) don't justify a large plotting stack. So
this draws just what they need: panels stacked over one shared x axis, linear or log10 axes, ticks,
labelled dashed reference lines, step lines for counts, a legend per panel, one colour per series name
(the same name in two panels is one series). `line_chart` is one panel.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# matplotlib's tab10: ten series before a colour repeats
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GREY, GRID = (120, 120, 120), (230, 230, 230)
Series = dict[str, list[tuple[float, float]]]  # series name -> its (x, y) points


@dataclass
class Panel:
    """One chart of a stack: its series, and how to draw its own y axis."""
    title: str
    series: Series
    ylabel: str = ""
    ylog: bool = False
    hlines: dict[str, float] | None = None  # label -> y of a dashed horizontal line (a reference, a floor)
    step: set[str] | None = None  # series drawn as steps, each value held until the next point (counts)


def line_chart(path: str | Path, series: Series, *, title: str, xlabel: str, ylabel: str = "", xlog: bool = False,
               ylog: bool = False, xticks: list[float] | None = None, hlines: dict[str, float] | None = None,
               size: tuple[int, int] = (640, 420), step: set[str] | None = None) -> Path:
    """A chart of one panel: see `panels`."""
    return panels(path, [Panel(title, series, ylabel, ylog, hlines, step)], xlabel=xlabel, xlog=xlog,
                  xticks=xticks, size=size)


def panels(path: str | Path, stack: list[Panel], *, xlabel: str, xlog: bool = False,
           xticks: list[float] | None = None, size: tuple[int, int] = (640, 420)) -> Path:
    """Panels stacked top to bottom over one x axis, saved as a PNG of `size` at `path` (returned).

    Log axes are base 10, ticked at powers of ten unless `xticks` are given. The x axis spans the data
    and `xticks`; each y axis is widened to whole ticks, and to zero if linear. Points are dotted where
    they are sparse enough to see. Raises ValueError on nothing to draw or a non-positive value on a log axis."""
    if not stack:
        raise ValueError("no panels to plot")
    for p in stack:
        _check(p, xlog)
    if xlog and xticks and min(xticks) <= 0:
        raise ValueError(f"x tick {min(xticks):g} on a log x axis (only positive values can be placed)")
    (w, h), left, right, bottom, band = size, 70, 20, 46, 26  # band: the title strip over each panel
    ph = (h - bottom - band * len(stack)) / len(stack)
    xt, xfrac = _axis([x for p in stack for pts in p.series.values() for x, _ in pts], xlog, xticks, y=False)
    px = lambda v: left + xfrac(v) * (w - left - right)  # noqa: E731
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    # running on across panels, so every series has its own colour; a name repeated in another panel keeps it
    colors, palette = itertools.cycle(COLORS), {}  # series name -> its colour
    for i, p in enumerate(stack):
        top = band + i * (ph + band)
        base = top + ph
        yt, yfrac = _axis([y for pts in p.series.values() for _, y in pts] + list((p.hlines or {}).values()),
                          p.ylog, None, y=True)
        py = lambda v, base=base, yfrac=yfrac: base - yfrac(v) * ph  # noqa: E731
        for t in xt:
            d.line([px(t), top, px(t), base], fill=GRID)
            if i == len(stack) - 1:  # tick labels under the last panel only
                d.line([px(t), base, px(t), base + 4], fill="black")
                d.text((px(t) - d.textlength(f"{t:g}") / 2, base + 7), f"{t:g}", fill="black")
        for t in yt:
            d.line([left - 4, py(t), w - right, py(t)], fill=GRID)
            d.text((left - 7 - d.textlength(f"{t:g}"), py(t) - 6), f"{t:g}", fill="black")
        d.rectangle([left, top, w - right, base], outline="black")
        d.text((left, top - 18), p.title, fill="black")
        if p.ylabel:  # written upwards along the left edge
            label = Image.new("RGB", (int(d.textlength(p.ylabel)) + 2, 12), "white")
            ImageDraw.Draw(label).text((1, 0), p.ylabel, fill="black")
            img.paste(label := label.rotate(90, expand=True), (4, int(top + (ph - label.height) / 2)))
        for name, y in (p.hlines or {}).items():
            for x in range(left, w - right, 12):
                d.line([x, py(y), min(x + 6, w - right), py(y)], fill=GREY, width=2)
            d.text((w - right - 6 - d.textlength(name), py(y) - 14), name, fill=GREY)
        for j, (name, pts) in enumerate(p.series.items()):
            if name not in palette:
                palette[name] = next(colors)
            color = palette[name]
            xy = [(px(x), py(y)) for x, y in sorted(pts)]
            stepped = name in (p.step or ())
            if len(xy) == 1 or not stepped and (xy[-1][0] - xy[0][0]) / (len(xy) - 1) >= 8:
                for a, b in xy:
                    d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=color)
            if stepped:
                xy = [q for a, b in zip(xy, xy[1:]) for q in (a, (b[0], a[1]))] + xy[-1:]
            if len(xy) > 1:
                d.line(xy, fill=color, width=2, joint="curve")
            d.text((w - right - 6 - d.textlength(name), top + 4 + 14 * j), name, fill=color)  # legend
    d.text(((w - d.textlength(xlabel)) / 2, h - 20), xlabel, fill="black")
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _check(p: Panel, xlog: bool) -> None:
    if not p.series:
        raise ValueError(f"panel {p.title!r}: no series to plot")
    if unknown := set(p.step or ()) - set(p.series):
        raise ValueError(f"panel {p.title!r}: step names no series {sorted(unknown)}")
    if empty := [name for name, pts in p.series.items() if not pts]:
        raise ValueError(f"panel {p.title!r}: series {empty} have no points")
    hlines = [(name, None, y) for name, y in (p.hlines or {}).items()]
    for name, x, y in [(name, x, y) for name, pts in p.series.items() for x, y in pts] + hlines:
        for axis, log, v in (("x", xlog, x), ("y", p.ylog, y)):
            if log and v is not None and v <= 0:
                raise ValueError(f"panel {p.title!r}: {name!r} has {axis} = {v:g} on a log {axis} axis "
                                 "(only positive values can be placed)")


def _axis(values: list[float], log: bool, ticks: list[float] | None, y: bool):
    """An axis's ticks, and its map from a value to [0, 1] along it."""
    f, auto = (math.log10 if log else float), ticks is None
    lo, hi = (min(*values, 0.0), max(*values, 0.0)) if y and not log else (min(values), max(values))
    if auto and log:
        ticks = [10.0 ** e for e in range(math.floor(f(lo)), math.ceil(f(hi)) + 1)]
    elif auto:  # about five ticks, 1, 2 or 5 times a power of ten apart, with a little headroom on y
        top = lo + 1 if hi == lo else hi + (hi - lo) * 0.05 * y
        mag = 10 ** math.floor(math.log10((top - lo) / 5))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag * 5 >= (top - lo) * (1 - 1e-9))
        n0, n1 = math.floor(lo / step + 1e-9), math.ceil(top / step - 1e-9)
        ticks = [float(f"{n * step:.12g}") for n in range(n0, n1 + 1)]  # 0.30000000000000004 -> 0.3
    if auto and not y:  # an x axis spans just the data
        ticks = [t for t in ticks if f(lo) - 1e-9 <= f(t) <= f(hi) + 1e-9]
    lo, hi = f(min([lo, *ticks])), f(max([hi, *ticks]))
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    return ticks, lambda v: (f(v) - lo) / (hi - lo)
