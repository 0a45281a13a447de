"""Charts for replies, drawn with matplotlib off the event loop.

Call these through ``await asyncio.to_thread(...)`` (or :func:`render`): a
figure takes tens of milliseconds to draw, which the bot's loop must not wait on.
"""

from __future__ import annotations

import asyncio
import functools
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bot.commands import Image

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
        ax.set_yticks(positions, [label[:28] for label in labels])
        ax.set_title(title[:80], loc="left", fontsize=11)
        ax.set_xlim(0, xmax if xmax is not None else max([*values, 1e-9]) * 1.18)
        ax.bar_label(bars, labels=[value_format.format(v) for v in values], padding=3, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1, 0].set_xlabel(xlabel)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), panels[0][0][:100])


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
        ax.plot(xs, ys, style, label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # The default log-axis labels are mathtext, which parse_math=False would show as source code.
        for axis, base in ((ax.xaxis, 2), (ax.yaxis, 10)):
            axis.set_major_formatter(LogFormatter(base=base))
            axis.set_minor_formatter(LogFormatter(base=base, labelOnlyBase=False))
    elif all(float(x).is_integer() for _, xs, _, _ in series for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, counts: no 2.5
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title[:80], loc="left", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image(filename, buffer.getvalue(), title[:100])


async def render(draw: Callable[..., Image], *args: Any, **kwargs: Any) -> Image:
    """Draw a chart in a thread so the event loop stays free."""
    return await asyncio.to_thread(draw, *args, **kwargs)
