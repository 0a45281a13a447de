"""Charts for replies, drawn with matplotlib off the event loop.

Call these through ``await asyncio.to_thread(...)`` (or :func:`render`): a
figure takes tens of milliseconds to draw, which the bot's loop must not wait on.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from bot.commands import Image

log = logging.getLogger(__name__)

# Sized for Discord's inline preview; readable on a phone.
WIDTH, ROW_HEIGHT, DPI = 7.0, 0.42, 110

# Tokens come in any script. matplotlib falls back glyph by glyph along this list,
# so a host with these fonts (the Docker image installs them) draws 東京 or عربي
# instead of boxes; those that are not installed are left out.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans", "Noto Sans Arabic", "Noto Sans Hebrew", "Symbola")


@functools.cache
def font_families() -> tuple[str, ...]:
    """DejaVu Sans (matplotlib's own) first, then the installed fallback fonts."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    if not set(FALLBACK_FONTS) <= installed:
        # matplotlib lists the system's fonts once and caches the list; fonts installed after
        # that (apt-get in a test setup, say) are not in it. Add the files it has not seen.
        known = {font.fname for font in font_manager.fontManager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    font_manager.fontManager.addfont(path)
                except Exception:  # a font file matplotlib cannot read is simply not used
                    log.debug("font %s could not be read", path, exc_info=True)
        installed = {font.name for font in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed))


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    # parse_math off: every string drawn is literal, so "$5 and $6" in a prompt (or a " $$"
    # token a model predicts) is text, never mathtext to parse.
    with (
        matplotlib.rc_context({"font.family": list(font_families()), "text.parse_math": False}),
        warnings.catch_warnings(),
    ):
        # A glyph no installed font has is drawn as a box; the reply's table has the text.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def show_token(token: str) -> str:
    """A token as a label: leading/trailing spaces and newlines made visible."""
    visible = token.replace("\n", "⏎").replace("\t", "⇥")
    core = visible.strip(" ")
    if not core:
        return "␣" * len(visible) if visible else "∅"
    lead = len(visible) - len(visible.lstrip(" "))
    trail = len(visible) - len(visible.rstrip(" "))
    return "␣" * lead + core + "␣" * trail


def show_bytes(raw: bytes) -> str:
    """A token from its bytes: its text as :func:`show_token` shows it, or its bytes in hex
    (⟨E6 9D⟩) when they are not text on their own (part of a character)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "⟨" + " ".join(f"{b:02X}" for b in raw) + "⟩"
    return show_token(text)


def token_label(token: str, raw: bytes = b"") -> str:
    """A model's token as shown everywhere (tables, charts, lists): from its bytes when the
    result carries them (⟨hex⟩ for part of a character), else from its decoded text."""
    return show_bytes(raw) if raw else show_token(token)


def is_partial(raw: bytes) -> bool:
    """Whether a token's bytes are not text on their own (part of a character)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def token_text(token: str, raw: bytes = b"") -> str:
    """A token's exact text for a reply's ``data``, or its ⟨hex⟩ form when its bytes are only
    part of a character (never U+FFFD); put its bytes beside it in hex."""
    if not raw:
        return token
    return show_bytes(raw) if is_partial(raw) else raw.decode("utf-8")


_BREAKS = re.compile(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")


def one_line(text: str, limit: int) -> str:
    """``text`` as one line of at most ``limit`` characters, for a chart title or label.

    Line breaks become a visible ⏎ (a prompt's newline is part of what the model read), tabs a
    space, other invisible format and control characters (bidi overrides, say) are dropped
    (the joiner inside emoji sequences is kept), and a cut is marked with "…".
    """
    text = _BREAKS.sub("⏎", text).replace("\t", " ")
    text = "".join(
        ch for ch in text if ch == "\u200d" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs")
    )
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    xlabel: str,
    filename: str = "chart.png",
    value_format: str = "{:.1%}",
    xmax: float | None = None,
) -> Image:
    """Horizontal bars, largest on top, each labelled with its value."""
    return bar_panels([(title, labels, values)], xlabel=xlabel, filename=filename, value_format=value_format, xmax=xmax)


def bar_panels(
    panels: Sequence[tuple[str, Sequence[str], Sequence[float]]],
    *,
    xlabel: str,
    filename: str = "chart.png",
    value_format: str = "{:.1%}",
    xmax: float | None = None,
) -> Image:
    """One bar chart per panel, stacked vertically (e.g. one per blank in a sentence)."""
    with _style():
        return _bar_panels(panels, xlabel=xlabel, filename=filename, value_format=value_format, xmax=xmax)


def _bar_panels(
    panels: Sequence[tuple[str, Sequence[str], Sequence[float]]],
    *,
    xlabel: str,
    filename: str,
    value_format: str,
    xmax: float | None,
) -> Image:
    from matplotlib.figure import Figure

    rows = sum(len(labels) for _, labels, _ in panels)
    fig = Figure(figsize=(WIDTH, 0.9 * len(panels) + 0.5 + ROW_HEIGHT * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[max(1, len(p[1])) for p in panels])
    for ax, (title, labels, values) in zip(axes[:, 0], panels, strict=True):
        positions = list(range(len(labels)))[::-1]
        bars = ax.barh(positions, values, color="#4C72B0")
        ax.set_yticks(positions, [one_line(label, 28) for label in labels])
        ax.set_title(one_line(title, 80), loc="left", fontsize=11)
        ax.set_xlim(0, xmax if xmax is not None else max([*values, 1e-9]) * 1.18)
        ax.bar_label(bars, labels=[value_format.format(v) for v in values], padding=3, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1, 0].set_xlabel(one_line(xlabel, 90))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(panels[0][0], 100))


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    filename: str = "chart.png",
    log: bool = True,
) -> Image:
    """Lines (label, xs, ys, style) on one axis, log-log by default; ``style`` is a matplotlib format."""
    with _style():
        return _line_chart(series, title=title, xlabel=xlabel, ylabel=ylabel, filename=filename, log=log)


def _line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    filename: str,
    log: bool,
) -> Image:
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MaxNLocator

    fig = Figure(figsize=(WIDTH, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=one_line(label, 60))
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # The default log-axis labels are mathtext, which parse_math=False would show as source code.
        for axis, base in ((ax.xaxis, 2), (ax.yaxis, 10)):
            axis.set_major_formatter(LogFormatter(base=base))
            axis.set_minor_formatter(LogFormatter(base=base, labelOnlyBase=False))
    elif all(float(x).is_integer() for _, xs, _, _ in series for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, counts: no 2.5
    ax.set_xlabel(one_line(xlabel, 90))
    ax.set_ylabel(one_line(ylabel, 60))
    ax.set_title(one_line(title, 80), loc="left", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(title, 100))


def split_bar_chart(
    labels: Sequence[str],
    parts: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    filename: str = "chart.png",
    value_format: str = "{:.0f}",
) -> Image:
    """Horizontal bars split into stacked parts, ``(name, values)`` each, with a legend; the
    second and later parts are hatched, so a part that matters (unknown tokens) stands out."""
    with _style():
        return _split_bar_chart(labels, parts, title=title, xlabel=xlabel, filename=filename, value_format=value_format)


def _split_bar_chart(
    labels: Sequence[str],
    parts: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    filename: str,
    value_format: str,
) -> Image:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, 1.4 + ROW_HEIGHT * len(labels)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(labels)))[::-1]
    left = [0.0] * len(labels)
    styles = [("#4C72B0", ""), ("#C44E52", "///"), ("#DD8452", "xx"), ("#55A868", "..")]
    for n, (name, values) in enumerate(parts):
        colour, hatch = styles[n % len(styles)]
        ax.barh(positions, values, left=left, color=colour, hatch=hatch, edgecolor="white", label=one_line(name, 50))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(positions, [one_line(label, 28) for label in labels])
    ax.set_title(one_line(title, 80), loc="left", fontsize=11)
    ax.set_xlim(0, max([*left, 1e-9]) * 1.3)
    totals = [
        value_format.format(total)
        + "".join(f" ({value_format.format(values[i])} {name})" for name, values in parts[1:] if values[i])
        for i, total in enumerate(left)
    ]
    for position, total, text in zip(positions, left, totals, strict=True):
        ax.annotate(text, (total, position), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlabel(one_line(xlabel, 90))
    ax.legend(fontsize=9, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(title, 100))


# Charts draw in threads of their own. A burst of charted replies is seconds of drawing on a
# small host; in asyncio's shared pool it would queue every other reply's thread work
# (tokenizing, the quiz database) behind it (measured by bench/faults.py's overflow scenario).
_CHART_THREADS = ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1), thread_name_prefix="lmbot-chart")


async def render(draw: Callable[..., Image], *args: Any, **kwargs: Any) -> Image:
    """Draw a chart in the chart threads so the event loop and asyncio's shared pool stay free.

    Never raises: a chart that cannot be drawn is logged and comes back with no data, which
    :class:`~bot.commands.Reply` leaves out, so the reply goes without that chart.
    """
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_CHART_THREADS, functools.partial(draw, *args, **kwargs))
    except Exception:
        filename = str(kwargs.get("filename", "chart.png"))
        name = getattr(draw, "__name__", repr(draw))
        log.exception("chart %s (%s) could not be drawn; the reply goes without it", filename, name)
        return Image(filename, b"", "")


# --------------------------------------------------------------------------- heatmaps, shaded text, grouped bars
# (/attention, /surprise, /sample)


# A heatmap panel: (title, token labels, weights[i][j] = how much token i looks at token j,
# whether to grey out j > i because a causal model never looks ahead).
HeatmapPanel = tuple[str, Sequence[str], Sequence[Sequence[float]], bool]


def heatmap(panels: Sequence[HeatmapPanel], *, colorbar: str, filename: str = "heatmap.png") -> Image:
    """Heatmaps side by side, tokens on both axes, one colour scale (square-root, so small weights show)."""
    with _style():
        return _heatmap(panels, colorbar=colorbar, filename=filename)


def _heatmap(panels: Sequence[HeatmapPanel], *, colorbar: str, filename: str) -> Image:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    size = max(len(labels) for _, labels, _, _ in panels)
    font = max(5.0, min(9.0, 260 / max(size, 1)))
    fig = Figure(figsize=(0.6 + 5.6 * len(panels), 6.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    top = max([w for _, _, weights, _ in panels for row in weights for w in row] + [1e-9])
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=top)
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = None
    for ax, (title, token_labels, weights, hide_future) in zip(axes, panels, strict=True):
        n = len(token_labels)
        grid = np.asarray(weights, dtype=float).reshape(n, n)
        hidden = np.triu(np.ones((n, n), dtype=bool), k=1) if hide_future else np.zeros((n, n), dtype=bool)
        image = ax.imshow(np.ma.masked_array(grid, mask=hidden), cmap=cmap, norm=norm, interpolation="nearest")
        labels = [label[:14] for label in token_labels]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(n), labels, fontsize=font)
        ax.set_xlabel("attended to (key)")
        ax.set_ylabel("attending (query)")
        ax.set_title("\n".join(one_line(line, 90) for line in title.split("\n")), loc="left", fontsize=10)
        if n <= 10:  # few cells: write the weights in them
            for i in range(n):
                for j in range(n):
                    if not hidden[i, j]:
                        light = norm(grid[i, j]) > 0.6
                        colour = "black" if light else "white"
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=colorbar)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(panels[0][0], 100))


# A shaded-text panel: (title, the text cut into pieces (a leading space starts a new word),
# one value per piece).
ShadedPanel = tuple[str, Sequence[str], Sequence[float]]


def shaded_text(
    panels: Sequence[ShadedPanel],
    *,
    colorbar: str,
    filename: str = "shaded.png",
    value_format: str = "{:.1f}",
    vmax: float | None = None,
) -> Image:
    """Each panel's text with every piece shaded by its value (one colour scale), the value under it."""
    with _style():
        return _shaded_text(panels, colorbar=colorbar, filename=filename, value_format=value_format, vmax=vmax)


def _shaded_layout(
    pieces: Sequence[str], width: float, measure: Callable[[str, float], float]
) -> list[tuple[int, float, str]]:
    """(line, x, label) for each piece, in points, wrapped at ``width``."""
    line, x, placed = 0, 0.0, []
    for piece in pieces:
        breaks = piece.count("\n")
        body = piece.replace("\n", "").replace("\t", "⇥")
        gap = 6.0 if body.startswith(" ") else 1.5  # a word starts after a space; subword pieces join
        label = body.strip(" ") or ("␣" * len(body) if body else "⏎" if breaks else "∅")
        if breaks and body.strip(" "):
            label = label + "⏎"
        size = max(measure(label, 11), measure("00.0", 7)) + 4
        if x > 0 and x + gap + size > width:
            line, x = line + 1, 0.0
        x = x + gap if x > 0 else 0.0
        placed.append((line, x, label))
        x += size
        if breaks:
            line, x = line + breaks, 0.0
    return placed


def _shaded_text(
    panels: Sequence[ShadedPanel], *, colorbar: str, filename: str, value_format: str, vmax: float | None
) -> Image:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    measurer = RendererAgg(10, 10, 72)  # 72 dpi: one pixel is one point

    def measure(text: str, size: float) -> float:
        width, _, _ = measurer.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)
        return float(width)

    width_pt, margin, line_h, title_h, bar_h = WIDTH * 72, 14.0, 34.0, 22.0, 64.0
    layouts = [_shaded_layout(pieces, width_pt - 2 * margin, measure) for _, pieces, _ in panels]
    heights = [title_h + line_h * (1 + max((line for line, _, _ in placed), default=0)) for placed in layouts]
    total = sum(heights) + bar_h
    top = vmax if vmax is not None else max([v for _, _, values in panels for v in values] + [1e-9])
    norm, cmap = Normalize(0.0, top), colormaps["YlOrRd"]
    fig = Figure(figsize=(WIDTH, total / 72), dpi=DPI)
    y = total
    for (title, _, values), placed, height in zip(panels, layouts, heights, strict=True):
        y -= height
        ax = fig.add_axes((0, y / total, 1, height / total))
        ax.set_xlim(0, width_pt)
        ax.set_ylim(height, 0)
        ax.axis("off")
        ax.text(margin, 4, one_line(title, 90), fontsize=10, va="top", ha="left")
        for (line, x, label), value in zip(placed, values, strict=True):
            shade = cmap(norm(min(value, top)))
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
            ax.text(
                margin + x + 2,
                title_h + line * line_h + 4,
                label,
                fontsize=11,
                va="top",
                ha="left",
                color="white" if dark else "black",
                bbox={"boxstyle": "square,pad=0.12", "facecolor": shade, "edgecolor": "none"},
            )
            ax.text(
                margin + x + 2,
                title_h + line * line_h + 21,
                value_format.format(value),
                fontsize=7,
                va="top",
                ha="left",
                color="#555555",
            )
    cax = fig.add_axes((0.1, 34 / total, 0.8, 10 / total))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal", label=colorbar)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(panels[0][0], 100))


def grouped_bars(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    notes: Sequence[str] = (),
    filename: str = "chart.png",
) -> Image:
    """Horizontal bars, one group per label (top to bottom), one bar per series; ``notes`` go
    right of each group (e.g. "cut by top-k")."""
    with _style():
        return _grouped_bars(labels, series, title=title, xlabel=xlabel, notes=notes, filename=filename)


def _grouped_bars(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    notes: Sequence[str],
    filename: str,
) -> Image:
    from matplotlib.figure import Figure

    groups, per = len(labels), max(1, len(series))
    fig = Figure(figsize=(WIDTH, 1.3 + 0.2 * per * groups), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / per
    colours = ("#9DA5B4", "#4C72B0", "#DD8452", "#55A868", "#C44E52")
    top = max([v for _, values in series for v in values] + [1e-9])
    for s, (name, values) in enumerate(series):
        positions = [(groups - 1 - g) + 0.4 - height * (s + 0.5) for g in range(groups)]
        bars = ax.barh(positions, values, height=height, color=colours[s % len(colours)], label=name)
        if s == len(series) - 1:
            ax.bar_label(bars, labels=[f"{v:.1%}" if v > 0 else "" for v in values], padding=2, fontsize=8)
    for g, note in enumerate(notes):
        if note:
            ax.text(top * 0.02, groups - 1 - g - 0.38, note, fontsize=7, color="#C44E52", va="bottom")
    ax.set_yticks(range(groups)[::-1], [one_line(label, 24) for label in labels])
    ax.set_xlim(0, top * 1.22)
    ax.set_xlabel(one_line(xlabel, 90))
    ax.set_title(one_line(title, 80), loc="left", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), one_line(title, 100))
