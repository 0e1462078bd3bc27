"""A tiny line-plot helper drawn with PIL (no plotting library needed): axes, ticks, lines, markers, legend.

    line_plot("fig.png",
              series=[{"label": "style sim", "x": [-4, -2, 0], "y": [0.5, 0.4, 0.2], "color": (31, 119, 180)}],
              hlines=[{"label": "SD3 style sim", "y": 0.3, "color": (31, 119, 180)}],
              title="...", xlabel="mu", ylabel="score")

Series are solid lines with round markers; horizontal reference lines are dashed. The legend
sits to the right of the axes so it never hides data. The PNG is written atomically.
"""
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from ..io.images import save_png

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)   # a scalable font on Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()            # older Pillow: the fixed bitmap font


def nice_ticks(lo, hi, target=8):
    """About `target` round tick values covering [lo, hi], lo < hi (steps of 1, 2 or 5 times a power of ten)."""
    raw = (hi - lo) / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v):
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _dashed(draw, p0, p1, colour, width=2, dash=7, gap=5):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    pos = 0.0
    while pos < length:
        end = min(length, pos + dash)
        a, b = pos / length, end / length
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=colour, width=width)
        pos += dash + gap


def _marker(draw, x, y, colour, r=4):
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))


def _finite(v):
    return v is not None and math.isfinite(v)


@dataclass
class _Frame:
    """The axes box in pixels (ax0, ay0) to (ax1, ay1) and the data range it shows; px and py map data to pixels."""
    ax0: float
    ay0: float
    ax1: float
    ay1: float
    xlo: float
    xhi: float
    ylo: float
    yhi: float

    def px(self, x):
        """Data x to a pixel column."""
        return self.ax0 + (x - self.xlo) / (self.xhi - self.xlo) * (self.ax1 - self.ax0)

    def py(self, y):
        """Data y to a pixel row (rows grow downwards)."""
        return self.ay1 - (y - self.ylo) / (self.yhi - self.ylo) * (self.ay1 - self.ay0)


def _data_range(series, hlines, xticks):
    """(xlo, xhi, ylo, yhi): every finite point and reference line, padded so markers stay inside the box."""
    xs = [x for s in series for x, y in zip(s["x"], s["y"]) if _finite(x) and _finite(y)] + list(xticks or [])
    ys = [y for s in series for y in s["y"] if _finite(y)] + [h["y"] for h in hlines if _finite(h["y"])]
    xs, ys = xs or [0.0, 1.0], ys or [0.0, 1.0]
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    pad = 0.04 * (xhi - xlo)
    ylo, yhi = min(ys), max(ys)
    span = (yhi - ylo) or 1.0
    return xlo - pad, xhi + pad, ylo - 0.08 * span, yhi + 0.08 * span


def _draw_grid(draw, f, xticks, small):
    """Grid lines, tick marks and tick labels on both axes, then the axes' frame."""
    yt = [t for t in nice_ticks(f.ylo, f.yhi) if f.ylo - 1e-12 <= t <= f.yhi + 1e-12]
    xt = list(xticks) if xticks is not None else [t for t in nice_ticks(f.xlo, f.xhi) if f.xlo <= t <= f.xhi]
    for t in yt:
        draw.line([(f.ax0, f.py(t)), (f.ax1, f.py(t))], fill=(232, 232, 232))
        draw.line([(f.ax0 - 4, f.py(t)), (f.ax0, f.py(t))], fill=(0, 0, 0))
        label = _fmt(t)
        w = draw.textlength(label, font=small)
        draw.text((f.ax0 - 7 - w, f.py(t) - 7), label, fill=(0, 0, 0), font=small)
    for t in xt:
        draw.line([(f.px(t), f.ay0), (f.px(t), f.ay1)], fill=(240, 240, 240))
        draw.line([(f.px(t), f.ay1), (f.px(t), f.ay1 + 4)], fill=(0, 0, 0))
        label = _fmt(t)
        w = draw.textlength(label, font=small)
        draw.text((f.px(t) - w / 2, f.ay1 + 6), label, fill=(0, 0, 0), font=small)
    draw.rectangle([f.ax0, f.ay0, f.ax1, f.ay1], outline=(0, 0, 0))


def _draw_data(draw, f, series, hlines):
    """The dashed reference lines, then each series' line and markers; returns the legend entries in order."""
    legend = []
    for i, h in enumerate(hlines):
        colour = tuple(h.get("color", COLOURS[i % len(COLOURS)]))
        if _finite(h["y"]):
            _dashed(draw, (f.ax0, f.py(h["y"])), (f.ax1, f.py(h["y"])), colour)
        legend.append(("hline", h["label"], colour))
    for i, s in enumerate(series):
        colour = tuple(s.get("color", COLOURS[i % len(COLOURS)]))
        pts = [(f.px(x), f.py(y)) for x, y in sorted(zip(s["x"], s["y"])) if _finite(x) and _finite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            _marker(draw, x, y, colour)
        legend.append(("series", s["label"], colour))
    return legend


def _draw_legend(draw, legend, lx, ly, small):
    """One row per entry from (lx, ly) down: a line sample (dashed for reference lines), its marker, its label."""
    for kind, label, colour in legend:
        if kind == "hline":
            _dashed(draw, (lx, ly + 7), (lx + 26, ly + 7), colour)
        else:
            draw.line([(lx, ly + 7), (lx + 26, ly + 7)], fill=colour, width=2)
            _marker(draw, lx + 13, ly + 7, colour)
        draw.text((lx + 32, ly), label, fill=(0, 0, 0), font=small)
        ly += 19


def _draw_titles(img, draw, f, title, xlabel, ylabel, font):
    """The title above the axes, the x label below them and the y label turned up along their left side."""
    if title:
        w = draw.textlength(title, font=font)
        draw.text(((f.ax0 + f.ax1) / 2 - w / 2, 9), title, fill=(0, 0, 0), font=font)
    if xlabel:
        w = draw.textlength(xlabel, font=font)
        draw.text(((f.ax0 + f.ax1) / 2 - w / 2, img.height - 24), xlabel, fill=(0, 0, 0), font=font)
    if ylabel:  # rotated text: draw it on its own strip, then paste it turned by 90 degrees
        w = int(draw.textlength(ylabel, font=font)) + 4
        strip = Image.new("RGB", (w, 18), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 1), ylabel, fill=(0, 0, 0), font=font)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (6, int((f.ay0 + f.ay1) / 2 - strip.height / 2)))


def line_plot(path, series, hlines=(), title="", xlabel="", ylabel="", xticks=None):
    """Draw series (dicts: label, x, y, optional color) and horizontal dashed lines (dicts: label, y, optional
    color) into a 780x440 PNG at `path`. Non-finite points are skipped."""
    width, height = 780, 440
    left, right, top, bottom = 64, 230, 34, 52                    # margins; the legend lives in the right one
    f = _Frame(left, top, width - right, height - bottom, *_data_range(series, hlines, xticks))
    font, small = _font(13), _font(11)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _draw_grid(draw, f, xticks, small)
    legend = _draw_data(draw, f, series, hlines)
    _draw_legend(draw, legend, f.ax1 + 14, f.ay0 + 4, small)
    _draw_titles(img, draw, f, title, xlabel, ylabel, font)
    save_png(img, path)
    return path
