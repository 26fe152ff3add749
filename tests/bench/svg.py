"""Plots as hand-written SVG (no plotting library to install).

Two kinds: `distributions` (one row per scenario on a log time axis: the
samples as dots, a box from p25 to p75, the median as a bar, whiskers to
min and max) and `lines` (series of (x, y) points, optionally as steps).
"""
import math
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
FONT = "font-family='sans-serif' font-size='12'"


def _svg(width, height, body, title):
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}'>\n<rect width='100%' height='100%' fill='white'/>\n"
            f"<text x='{width / 2}' y='20' text-anchor='middle' {FONT} font-weight='bold'>{escape(title)}</text>\n"
            + "\n".join(body) + "\n</svg>\n")


def _nice_ticks(lo, hi, count=6):
    """Round linear tick values from below `lo` to at or above `hi`."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(v):
    if v >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:g}"


def _percentile(sorted_values, q):
    i = q * (len(sorted_values) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def distributions(rows, title, unit="ms"):
    """rows: [(label, samples)]; a log-scale strip and box plot per row."""
    rows = [(label, sorted(s)) for label, s in rows if s]
    left, right, top, row_h = 380, 30, 40, 34
    width, height = 1080, top + row_h * len(rows) + 50
    lo = min(s[0] for _, s in rows)
    hi = max(s[-1] for _, s in rows)
    e_lo, e_hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if e_hi == e_lo:
        e_hi += 1

    def x(v):
        return left + (math.log10(max(v, 10 ** e_lo)) - e_lo) / (e_hi - e_lo) * (width - left - right)

    body = []
    for e in range(e_lo, e_hi + 1):
        xe = x(10 ** e)
        body.append(f"<line x1='{xe:.1f}' y1='{top}' x2='{xe:.1f}' y2='{height - 40}' stroke='#ddd'/>")
        body.append(f"<text x='{xe:.1f}' y='{height - 25}' text-anchor='middle' {FONT}>{_fmt(10.0 ** e)}</text>")
    body.append(f"<text x='{(left + width - right) / 2}' y='{height - 8}' text-anchor='middle' {FONT}>"
                f"{unit} (log scale)</text>")
    for i, (label, s) in enumerate(rows):
        yc = top + row_h * i + row_h / 2
        color = COLORS[i % len(COLORS)]
        body.append(f"<text x='{left - 8}' y='{yc + 4:.1f}' text-anchor='end' {FONT}>{escape(label)} "
                    f"(n={len(s)})</text>")
        body.append(f"<line x1='{x(s[0]):.1f}' y1='{yc:.1f}' x2='{x(s[-1]):.1f}' y2='{yc:.1f}' stroke='{color}'/>")
        q1, med, q3 = (_percentile(s, q) for q in (0.25, 0.5, 0.75))
        body.append(f"<rect x='{x(q1):.1f}' y='{yc - 9:.1f}' width='{max(1, x(q3) - x(q1)):.1f}' height='18' "
                    f"fill='{color}' fill-opacity='0.25' stroke='{color}'/>")
        body.append(f"<line x1='{x(med):.1f}' y1='{yc - 11:.1f}' x2='{x(med):.1f}' y2='{yc + 11:.1f}' "
                    f"stroke='black' stroke-width='2'/>")
        step = max(1, len(s) // 400)
        for j, v in enumerate(s[::step]):
            jitter = ((j * 7919) % 13 - 6) * 0.9
            body.append(f"<circle cx='{x(v):.1f}' cy='{yc + jitter:.1f}' r='1.6' fill='{color}' fill-opacity='0.6'/>")
    return _svg(width, height, body, title)


def lines(series, title, xlabel, ylabel, steps=False, notes=()):
    """series: [(label, [(x, y), ...])]; linear axes from zero, a legend."""
    series = [(label, pts) for label, pts in series if pts]
    left, right, top, bottom = 70, 180, 40, 55
    width, height = 900, 480
    xs = [p[0] for _, pts in series for p in pts] or [1]
    ys = [p[1] for _, pts in series for p in pts] or [1]
    xt, yt = _nice_ticks(0, max(xs)), _nice_ticks(0, max(ys))

    def px(v):
        return left + v / xt[-1] * (width - left - right)

    def py(v):
        return height - bottom - v / yt[-1] * (height - top - bottom)

    body = []
    for t in xt:
        body.append(f"<line x1='{px(t):.1f}' y1='{top}' x2='{px(t):.1f}' y2='{height - bottom}' stroke='#eee'/>")
        body.append(f"<text x='{px(t):.1f}' y='{height - bottom + 16}' text-anchor='middle' {FONT}>{_fmt(t)}</text>")
    for t in yt:
        body.append(f"<line x1='{left}' y1='{py(t):.1f}' x2='{width - right}' y2='{py(t):.1f}' stroke='#eee'/>")
        body.append(f"<text x='{left - 6}' y='{py(t) + 4:.1f}' text-anchor='end' {FONT}>{_fmt(t)}</text>")
    body.append(f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' "
                f"fill='none' stroke='#888'/>")
    body.append(f"<text x='{(left + width - right) / 2}' y='{height - 12}' text-anchor='middle' {FONT}>"
                f"{escape(xlabel)}</text>")
    body.append(f"<text x='16' y='{(top + height - bottom) / 2}' text-anchor='middle' {FONT} "
                f"transform='rotate(-90 16 {(top + height - bottom) / 2})'>{escape(ylabel)}</text>")
    for i, (label, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        path = []
        for j, (xv, yv) in enumerate(pts):
            if steps and j:
                path.append(f"{px(xv):.1f},{py(pts[j - 1][1]):.1f}")
            path.append(f"{px(xv):.1f},{py(yv):.1f}")
        body.append(f"<polyline points='{' '.join(path)}' fill='none' stroke='{color}' stroke-width='2'/>")
        if not steps:
            for xv, yv in pts:
                body.append(f"<circle cx='{px(xv):.1f}' cy='{py(yv):.1f}' r='3.5' fill='{color}'/>")
        ly = top + 16 + 18 * i
        body.append(f"<line x1='{width - right + 10}' y1='{ly - 4}' x2='{width - right + 30}' y2='{ly - 4}' "
                    f"stroke='{color}' stroke-width='3'/>")
        body.append(f"<text x='{width - right + 36}' y='{ly}' {FONT}>{escape(label)}</text>")
    for i, note in enumerate(notes):
        body.append(f"<text x='{width - right + 10}' y='{top + 18 * (len(series) + 1 + i) + 16}' "
                    f"font-family='sans-serif' font-size='10' fill='#555'>{escape(note)}</text>")
    return _svg(width, height, body, title)
