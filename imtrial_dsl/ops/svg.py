"""Small inline-SVG charts for the management report.

Hand-written rather than matplotlib: two chart types are needed, the output must be
byte-stable (golden-friendly, no embedded timestamps or random ids), self-contained in one
HTML file, and matplotlib is not a project dependency.
"""
from __future__ import annotations

from datetime import date
from html import escape
from typing import Optional

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _f(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def text_width(text: str, size: float = 11) -> float:
    """A generous estimate of a label's width in a sans-serif face (no font metrics at hand): wide enough
    that labels spaced by it do not touch."""
    return len(text) * size * 0.75


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    # scales down with its container (max-width), never wider than the page
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
            f'style="max-width:100%;height:auto" font-family="sans-serif" font-size="11">'
            f'<title>{escape(title)}</title>'
            f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def empty(title: str, note: str = "no data yet", width: int = 480, height: int = 80) -> str:
    return _frame(width, height, title, [f'<text x="{width / 2:.0f}" y="50" text-anchor="middle" fill="#666">{escape(note)}</text>'])


def step_chart(title: str, series: dict[str, list[tuple[date, int]]], width: int = 640, height: int = 300,
               until: Optional[date] = None) -> str:
    """Cumulative counts over time, one step line per series (e.g. enrolment per site), drawn up to ``until``."""
    pts = [d for s in series.values() for d, _ in s]
    if not pts:
        return empty(title, width=width)
    d0, d1 = min(pts), max(pts + ([until] if until else []))
    span = max((d1 - d0).days, 1)
    ymax = max(max((v for _, v in s), default=0) for s in series.values()) or 1
    left, right, top, bottom = 48, 130, 28, 36
    pw, ph = width - left - right, height - top - bottom

    def x(d: date) -> float:
        return left + pw * (d - d0).days / span

    def y(v: float) -> float:
        return top + ph * (1 - v / ymax)

    body = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>']
    step = max(1, -(-ymax // 5))
    for v in range(0, ymax + 1, step):
        body.append(f'<line x1="{left - 3}" y1="{_f(y(v))}" x2="{left + pw}" y2="{_f(y(v))}" stroke="#ddd"/>'
                    f'<text x="{left - 6}" y="{_f(y(v) + 4)}" text-anchor="end">{v}</text>')
    for d in sorted({d0, d1} | ({date.fromordinal((d0.toordinal() + d1.toordinal()) // 2)} if span > 30 else set())):
        body.append(f'<text x="{_f(x(d))}" y="{top + ph + 16}" text-anchor="middle">{d.isoformat()}</text>')
    for i, (name, s) in enumerate(sorted(series.items())):
        col = PALETTE[i % len(PALETTE)]
        path, prev = [], 0
        for d, v in sorted(s):
            path.append(f"{_f(x(d))},{_f(y(prev))} {_f(x(d))},{_f(y(v))}")
            prev = v
        path.append(f"{_f(x(d1))},{_f(y(prev))}")
        body.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{_f(x(d0))},{_f(y(0))} {" ".join(path)}"/>')
        ly = top + 12 + 16 * i
        body.append(f'<rect x="{left + pw + 12}" y="{ly - 8}" width="10" height="10" fill="{col}"/>'
                    f'<text x="{left + pw + 26}" y="{ly + 1}">{escape(name)} ({prev})</text>')
    return _frame(width, height, title, body)


def bar_chart(title: str, categories: list[str], groups: dict[str, list[Optional[float]]],
              width: int = 640, height: int = 300) -> str:
    """Grouped bars of rates in [0, 1] per category (e.g. adherence and QC pass rate per site); None = no data.

    Category labels that would not fit their slot side by side (long device names, many devices) are
    set vertically, with the chart made taller for them; value labels are left out when the bars are
    narrower than "100%" (each bar's tooltip still gives its value)."""
    if not categories:
        return empty(title, width=width)
    names = list(groups)
    legend_w = max(text_width(g) for g in names) + 40
    left, right, top = 48, max(130, int(legend_w)), 40
    pw = width - left - right
    slot = pw / len(categories)
    longest = max(text_width(c) for c in categories)
    slanted = longest > slot - 6
    bottom = int(longest + 16) if slanted else 48
    height = max(height, top + 150 + bottom)
    ph = height - top - bottom
    body = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>']
    for pct in (0, 25, 50, 75, 100):
        yy = top + ph * (1 - pct / 100)
        body.append(f'<line x1="{left - 3}" y1="{_f(yy)}" x2="{left + pw}" y2="{_f(yy)}" stroke="#ddd"/>'
                    f'<text x="{left - 6}" y="{_f(yy + 4)}" text-anchor="end">{pct}%</text>')
    bw = min(slot * 0.8 / max(len(names), 1), 48.0)
    values_fit = bw - 2 >= text_width("100%", 9)
    for ci, cat in enumerate(categories):
        cx = left + slot * ci + (slot - bw * len(names)) / 2
        for gi, g in enumerate(names):
            v = groups[g][ci]
            bx = cx + gi * bw
            if v is None:
                if values_fit:
                    body.append(f'<text x="{_f(bx + bw / 2)}" y="{top + ph - 4}" text-anchor="middle" fill="#999">n/a</text>')
                continue
            h = ph * max(0.0, min(1.0, v))
            body.append(f'<rect x="{_f(bx)}" y="{_f(top + ph - h)}" width="{_f(bw - 2)}" height="{_f(h)}" '
                        f'fill="{PALETTE[gi % len(PALETTE)]}"><title>{escape(cat)} {escape(g)}: {v:.0%}</title></rect>')
            if values_fit:
                body.append(f'<text x="{_f(bx + bw / 2)}" y="{_f(top + ph - h - 3)}" text-anchor="middle" '
                            f'font-size="9">{v:.0%}</text>')
        x = left + slot * (ci + 0.5)
        if slanted:
            body.append(f'<text x="{_f(x)}" y="{top + ph + 8}" text-anchor="end" dominant-baseline="middle" '
                        f'transform="rotate(-90 {_f(x)} {top + ph + 8})">{escape(cat)}</text>')
        else:
            body.append(f'<text x="{_f(x)}" y="{top + ph + 16}" text-anchor="middle">{escape(cat)}</text>')
    for gi, g in enumerate(names):
        ly = top + 12 + 16 * gi
        body.append(f'<rect x="{left + pw + 12}" y="{ly - 8}" width="10" height="10" fill="{PALETTE[gi % len(PALETTE)]}"/>'
                    f'<text x="{left + pw + 26}" y="{ly + 1}">{escape(g)}</text>')
    return _frame(width, height, title, body)
