"""Tiny server-side SVG charts for the dashboard: no JavaScript, no CDN, works offline and in print.

Two charts are enough for a study's first look: a time scatter (latency of each call over time,
one colour per series) and stacked bars (calls per condition, ok vs failed). Every label is
escaped; the output is a self-contained `<svg>` element string.
"""

from __future__ import annotations

from datetime import datetime
from html import escape

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
W, H = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 200, 30, 40


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** len(str(int(value))) / 10
    for mult in (1, 2, 2.5, 5, 10):
        if value <= step * mult:
            return step * mult
    return value


def _legend(names: list[str], colours: dict[str, str]) -> list[str]:
    out = []
    for i, name in enumerate(names[:14]):
        y = TOP + 14 + i * 18
        out.append(f'<rect x="{W - RIGHT + 14}" y="{y - 9}" width="10" height="10" fill="{colours[name]}"/>')
        out.append(f'<text x="{W - RIGHT + 30}" y="{y}" font-size="11">{escape(name[:28])}</text>')
    return out


def _frame(title: str, y_max: float, y_label: str) -> list[str]:
    plot_h = H - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'role="img" aria-label="{escape(title)}" font-family="sans-serif">',
        f"<title>{escape(title)}</title>",
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#444"/>',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#444"/>',
        f'<text x="12" y="{TOP + plot_h / 2}" font-size="11" transform="rotate(-90 12 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = H - BOTTOM - plot_h * i / 4
        parts.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:g}</text>'
        )
    return parts


def time_scatter(series: dict[str, list[tuple[datetime, float]]], *, title: str, y_label: str) -> str:
    """One dot per (time, value); one colour per series name."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    names = sorted(series)
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    t0 = min(t for t, _ in points).timestamp()
    t1 = max(t for t, _ in points).timestamp()
    span = max(t1 - t0, 1.0)
    y_max = _nice_max(max(v for _, v in points))
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    parts = _frame(title, y_max, y_label)
    for name in names:
        for t, v in series[name]:
            x = LEFT + plot_w * (t.timestamp() - t0) / span
            y = H - BOTTOM - plot_h * min(v, y_max) / y_max
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colours[name]}" fill-opacity="0.8">'
                f"<title>{escape(name)}: {v:.0f} at {t.isoformat(timespec='seconds')}</title></circle>"
            )
    first = min(t for t, _ in points)
    last = max(t for t, _ in points)
    parts.append(f'<text x="{LEFT}" y="{H - BOTTOM + 16}" font-size="10">{first:%Y-%m-%d %H:%M:%S}</text>')
    parts.append(
        f'<text x="{W - RIGHT}" y="{H - BOTTOM + 16}" font-size="10" text-anchor="end">'
        f"{last:%Y-%m-%d %H:%M:%S} UTC</text>"
    )
    parts += _legend(names, colours)
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars(
    groups: dict[str, dict[str, int]], *, title: str, y_label: str, stack: tuple[str, ...] = ("ok", "failed")
) -> str:
    """One bar per group, stacked by the keys in `stack` (in that order, bottom first)."""
    if not groups:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    names = list(groups)
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(stack)}
    colours.update({"ok": "#2ca02c", "failed": "#d62728"})
    y_max = _nice_max(max(sum(groups[n].get(s, 0) for s in stack) for n in names))
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    slot = plot_w / len(names)
    bar_w = min(60.0, slot * 0.6)
    parts = _frame(title, y_max, y_label)
    for i, name in enumerate(names):
        x = LEFT + slot * i + (slot - bar_w) / 2
        base = 0
        for s in stack:
            n = groups[name].get(s, 0)
            if n:
                y0 = H - BOTTOM - plot_h * (base + n) / y_max
                parts.append(
                    f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" height="{plot_h * n / y_max:.1f}" '
                    f'fill="{colours[s]}"><title>{escape(name)} {s}: {n}</title></rect>'
                )
                base += n
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{H - BOTTOM + 16}" font-size="11" text-anchor="middle">'
            f"{escape(name[:16])}</text>"
        )
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{H - BOTTOM - plot_h * base / y_max - 4:.1f}" '
            f'font-size="10" text-anchor="middle">{base}</text>'
        )
    parts += _legend(list(stack), colours)
    parts.append("</svg>")
    return "".join(parts)
