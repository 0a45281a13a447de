"""Charts for replies, drawn with matplotlib off the event loop.

Call these through :func:`render`: it draws in the chart threads, one user's charts taking
turns with everyone else's, so neither the bot's loop nor another student waits on a burst.

Every chart is laid out from its own text: margins, title lines and axis limits come from the
extents of the labels as the Agg renderer draws them, measured before drawing (no constrained
layout, which drew each figure about three times to find them). Labels that do not fit are
wrapped or shortened at word boundaries, values get as many digits as it takes to tell bars
apart, and a character no installed font has is drawn as its name instead of a box.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import math
import re
import struct
import threading
import unicodedata
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from bot.commands import Image

log = logging.getLogger(__name__)

# Sized for Discord's inline preview; readable on a phone.
WIDTH, DPI = 7.0, 110
ROW_HEIGHT = 0.34  # inches per bar
PX = DPI / 72  # pixels per point
WIDTH_PX = WIDTH * DPI
PAD = 10.0  # pixels between the figure's edge and anything drawn
TICKS = 7 * PX  # a tick (3.5 pt) and the gap to its label (3.5 pt)
LINE = 1.25  # line height as a multiple of the font size
TITLE_PT, LABEL_PT, VALUE_PT = 11.0, 10.0, 9.0

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


@functools.cache
def _charmap(family: str) -> frozenset[int]:
    """The code points ``family`` has glyphs for."""
    from matplotlib.font_manager import FontProperties, findfont, get_font

    return frozenset(get_font(findfont(FontProperties(family=family), fallback_to_default=False)).get_charmap())


@functools.cache
def _covered() -> frozenset[int]:
    return frozenset().union(*(_charmap(family) for family in font_families()))


def has_glyph(ch: str) -> bool:
    """Whether an installed chart font draws ``ch`` (otherwise matplotlib would draw a box)."""
    return ord(ch) in _covered()


def drawable(text: str) -> str:
    """``text`` as the chart fonts can draw it: a character none of them has is written as its
    name (⟦melting face⟧) rather than drawn as a box; an invisible joiner, selector or modifier
    none of them has is left out (what it joins or modifies is still drawn)."""
    covered = _covered()
    if all(ord(ch) in covered for ch in text):
        return text
    out = []
    for ch in text:
        if ord(ch) in covered:
            out.append(ch)
        elif unicodedata.category(ch) not in ("Mn", "Me", "Cf", "Cc", "Sk"):
            out.append(f"⟦{unicodedata.name(ch, f'U+{ord(ch):04X}').lower()}⟧")
    return "".join(out)


def _families_for(texts: Iterable[str]) -> list[str]:
    """The fonts a chart needs: DejaVu Sans, then only the fallbacks that draw one of its characters.
    (matplotlib looks every glyph up along the whole list, so a shorter list draws faster.)"""
    families = font_families()
    missing = {ord(ch) for text in texts for ch in text} - _charmap(families[0])
    needed = [families[0]]
    for family in families[1:]:
        if not missing:
            break
        if missing & _charmap(family):
            needed.append(family)
            missing -= _charmap(family)
    return needed


HIDDEN_WARNING = "Glyph .* missing from font"
# matplotlib's rcParams and Python's warning filters are process-wide: two charts drawn at once
# in two threads would change each other's fonts. One chart draws at a time (under the GIL two
# would take as long anyway).
_DRAWING = threading.Lock()


@contextmanager
def _style(texts: Iterable[str] = ()) -> Iterator[None]:
    import matplotlib

    # parse_math off: every string drawn is literal, so "$5 and $6" in a prompt (or a " $$"
    # token a model predicts) is text, never mathtext to parse.
    with (
        _DRAWING,
        matplotlib.rc_context(
            {
                "font.family": _families_for(texts),
                "text.parse_math": False,
                "font.size": LABEL_PT,
                # Unhinted glyphs: laid out in ~60 % of the time FreeType's autohinter takes, and
                # as sharp at this size and resolution (the hinter's horizontal part was off anyway).
                "text.hinting": "none",
            }
        ),
        warnings.catch_warnings(),
    ):
        # drawable() names the characters no font has; a font whose table lists a glyph it
        # cannot draw still gets a box rather than a warning per chart.
        warnings.filterwarnings("ignore", message=HIDDEN_WARNING)
        with _shared_text_metrics():
            yield


_MEASURE = threading.local()


def _measuring_renderer() -> Any:
    """This thread's renderer for measuring text (the charts' renderer at the charts' resolution)."""
    renderer = getattr(_MEASURE, "renderer", None)
    if renderer is None:
        renderer = _MEASURE.renderer = renderer_class()(1, 1, DPI)
    return renderer


@contextmanager
def _shared_text_metrics() -> Iterator[None]:
    """While a chart draws, matplotlib lays its texts out with the measuring renderer's cache.

    matplotlib caches text metrics per renderer, and every figure has a renderer of its own, so
    each chart measured every text afresh (and a heatmap's labels, drawn four times, four times).
    An Agg renderer's metrics depend only on the text, its font properties (the families
    included) and the resolution, so one renderer per thread at the charts' resolution answers
    for all of them: labels that recur (tokens, ticks, axis names) are measured once. Patched
    only under _DRAWING (one chart at a time), and put back after.
    """
    import matplotlib.text as mtext
    from matplotlib.backends.backend_agg import RendererAgg

    name = "_get_text_metrics_function"  # matplotlib 3.10+; with another, texts are measured as it does
    own = getattr(mtext, name, None)
    if own is None:
        yield
        return
    shared = own(_measuring_renderer())

    def metrics_function(renderer: Any) -> Any:
        if type(renderer) in (RendererAgg, renderer_class()) and renderer.dpi == DPI:
            return shared
        return own(renderer)

    setattr(mtext, name, metrics_function)
    try:
        yield
    finally:
        setattr(mtext, name, own)


def text_width(text: str, size: float) -> float:
    """Width in pixels of ``text`` (its widest line) at ``size`` points, in the current chart fonts."""
    from matplotlib.font_manager import FontProperties

    renderer = _measuring_renderer()
    prop = FontProperties(size=size)
    return max(
        (float(renderer.get_text_width_height_descent(line, prop, ismath=False)[0]) for line in text.split("\n")),
        default=0.0,
    )


def text_height(text: str, size: float) -> float:
    """Height in pixels of ``text``'s lines at ``size`` points."""
    return (text.count("\n") + 1) * size * PX * LINE


def fit_lines(text: str, width: float, size: float, max_lines: int = 2) -> str:
    """``text`` in at most ``max_lines`` lines no wider than ``width`` pixels, broken at spaces.

    What does not fit is left out at a word boundary and marked with "…"; only a single word
    wider than a whole line is cut inside (there is no other way to fit it).
    """
    width -= 2  # widths are added up word by word; leave room for kerning across the spaces
    space = text_width("a a", size) - text_width("aa", size)
    ellipsis = text_width("…", size)
    lines: list[tuple[str, float]] = []
    current, used = "", 0.0
    for word in text.split(" "):
        word_width = text_width(word, size)
        if current and used + space + word_width <= width:
            current, used = f"{current} {word}", used + space + word_width
            continue
        if current:
            lines.append((current, used))
        current, used = word, word_width
        while used > width and len(current) > 1:  # a word wider than a line: cut inside it
            cut = _cut_word(current, width, size)
            lines.append((cut, width))
            current = current[len(cut) :]
            used = text_width(current, size)
        if len(lines) > max_lines:
            break
    lines.append((current, used))
    if len(lines) <= max_lines:
        return "\n".join(line for line, _ in lines)
    last, used = lines[max_lines - 1]
    while used + ellipsis > width and " " in last:
        last = last.rsplit(" ", 1)[0]
        used = text_width(last, size)
    if used + ellipsis > width:
        last = _cut_word(last, width - ellipsis, size)
    return "\n".join([*(line for line, _ in lines[: max_lines - 1]), last + "…"])


def _cut_word(word: str, width: float, size: float) -> str:
    """The longest start of ``word`` no wider than ``width`` (at least one character)."""
    low, high = 1, len(word)
    while low < high:
        mid = (low + high + 1) // 2
        if text_width(word[:mid], size) <= width:
            low = mid
        else:
            high = mid - 1
    return word[:low]


_FIXED = re.compile(r"\{:(,?)\.(\d+)([%f])\}")


def value_labels(values: Sequence[float], value_format: str = "{:.1%}") -> list[str]:
    """Each value formatted with ``value_format``, with more decimals where it would hide a
    difference: a value that is not zero never shows as 0, and two values whose bars differ
    visibly (by more than 0.5 % of the largest) never share a label."""
    labels = [value_format.format(v) for v in values]
    fixed = _FIXED.fullmatch(value_format)
    if fixed is None:
        return labels
    grouping, decimals, kind = fixed.groups()
    for more in range(int(decimals), int(decimals) + 9):
        labels = [f"{v:{grouping}.{more}{kind}}" for v in values]
        if _tells_apart(values, labels):
            break
    return labels


def _tells_apart(values: Sequence[float], labels: Sequence[str]) -> bool:
    if any(v != 0 and not any(ch in "123456789" for ch in label) for v, label in zip(values, labels, strict=True)):
        return False
    top = max((abs(v) for v in values), default=0.0)
    ranked = sorted(zip(values, labels, strict=True))
    return all(b - a <= 0.005 * top or la != lb for (a, la), (b, lb) in itertools.pairwise(ranked))


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


# A picture put under a figure's drawing: RGBA pixels (rows from the top) and the pixel position
# of its bottom-left corner, from the figure's bottom left.
Underlay = tuple[Any, float, float]


@functools.cache
def _canvas_class() -> type:
    """A FigureCanvasAgg whose renderer draws each text as one bitmap (see ChartRenderer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    class ChartCanvas(FigureCanvasAgg):
        def get_renderer(self) -> Any:
            w, h = self.get_width_height(physical=True)
            key = w, h, self.figure.dpi
            if getattr(self, "_chart_key", None) != key:
                self.renderer = renderer_class()(w, h, self.figure.dpi)
                self._chart_key = key
            return self.renderer

    return ChartCanvas


# Each text as FreeType lays it out and renders it: (width, height, descent, bitmap left, bitmap
# top, bitmap) in pixels, by (text, font properties, resolution, antialiasing, hinting). Laying a
# string out costs about 0.1 ms however short; a chart measures and draws each text, and labels
# recur (a heatmap's tokens four times, tick values and axis names in every chart).
_TEXTS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
TEXTS_KEPT = 4096  # texts: a few dozen charts' worth
TEXT_BYTES_KEPT = 16 * 2**20  # and at most this much bitmap (a long title's is ~15 kB)
_text_bytes = 0


def _forget_texts() -> None:
    global _text_bytes
    _TEXTS.clear()
    _text_bytes = 0


def clear_text_cache() -> None:
    """Forget every laid-out text and this thread's measured ones, between charts (bench/charts.py
    measures a chart whose texts are all new)."""
    _forget_texts()
    _MEASURE.__dict__.pop("renderer", None)


def _has_text_internals(renderer: type, font: type, manager: Any) -> bool:
    """Whether matplotlib still has what :func:`renderer_class`'s renderer uses."""
    return (
        all(hasattr(renderer, name) for name in ("_prepare_font", "draw_text", "get_text_width_height_descent"))
        and all(
            hasattr(font, name)
            for name in ("set_text", "draw_glyphs_to_bitmap", "get_width_height", "get_bitmap_offset", "get_image")
        )
        and hasattr(manager, "_find_fonts_by_props")
    )


@functools.cache
def renderer_class() -> type:
    """The Agg renderer the charts draw with: matplotlib's, with each text laid out once.

    matplotlib 3.11 lays a text out glyph by glyph in Python and draws each glyph apart (a few
    Python calls and a small matrix product per glyph), and lays it out again to measure it:
    the texts were about a third of a chart's drawing time. Here FreeType lays the whole string
    out and renders it into one bitmap (matplotlib 3.10's way: the same glyphs from the same
    fonts and fallbacks), kept in ``_TEXTS``; measuring and drawing it again reuse that, and Agg
    puts the bitmap down (rotated where the text is) in one call.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import RendererAgg, get_hinting_flag
    from matplotlib.font_manager import fontManager, get_font
    from matplotlib.ft2font import FT2Font

    # It leans on a few of matplotlib's inner parts (present from 3.6 to 3.11); a matplotlib
    # without them draws with its own renderer: the same charts, only slower.
    if not _has_text_internals(RendererAgg, FT2Font, fontManager):
        return RendererAgg

    class ChartRenderer(RendererAgg):
        def _laid_out(self, s: str, prop: Any, antialiased: bool) -> tuple[Any, ...]:
            rc = matplotlib.rcParams
            key = (s, prop, self.dpi, antialiased, rc["text.hinting"], rc["text.hinting_factor"])
            found = _TEXTS.get(key)
            if found is None:
                font = self._prepare_font(prop)
                font.set_text(s, 0, flags=get_hinting_flag())  # unrotated: Agg rotates the bitmap
                font.draw_glyphs_to_bitmap(antialiased=antialiased)
                width, height = font.get_width_height()
                left, top = font.get_bitmap_offset()
                bitmap = font.get_image()
                found = (width / 64, height / 64, font.get_descent() / 64, left / 64, top / 64, bitmap)
                global _text_bytes
                if len(_TEXTS) >= TEXTS_KEPT or _text_bytes + bitmap.nbytes > TEXT_BYTES_KEPT:
                    _forget_texts()  # a chart holds what it looked up: it is only drawn again
                _TEXTS[(s, prop.copy(), *key[2:])] = found
                _text_bytes += bitmap.nbytes
            return found

        def _get_font_height_metrics(self, prop: Any) -> tuple[float | None, float | None, float | None]:
            """A font's line ascent, descent and gap in pixels, as matplotlib 3.11's Text reads
            them from the font's tables for every text it lays out (a hook it asks first): kept
            by font properties, where matplotlib looked the font and two tables up per text."""
            key = (prop, self.dpi, "height")
            found: Any = _TEXTS.get(key)
            if found is None:
                found = (None, None, None)
                font: Any = get_font(fontManager._find_fonts_by_props(prop))
                # As matplotlib scales them (the same floating-point operations, the same pixels).
                scale = 1 / font.get_sfnt_table("head")["unitsPerEm"] * prop.get_size_in_points() * self.dpi / 72
                for table_name, gap, ascent, descent in (
                    ("OS/2", "sTypoLineGap", "sTypoAscender", "sTypoDescender"),
                    ("hhea", "lineGap", "ascent", "descent"),
                ):
                    table = font.get_sfnt_table(table_name)
                    if table is not None:
                        found = (table[ascent] * scale, -table[descent] * scale, table[gap] * scale)
                        break
                _TEXTS[(prop.copy(), self.dpi, "height")] = found
            return found

        def get_text_width_height_descent(self, s: str, prop: Any, ismath: Any) -> tuple[float, float, float]:
            if ismath:  # never, with text.parse_math off; matplotlib's own way if it were
                return super().get_text_width_height_descent(s, prop, ismath)
            width, height, descent, _, _, _ = self._laid_out(s, prop, True)
            return width, height, descent

        def draw_text(
            self, gc: Any, x: float, y: float, s: str, prop: Any, angle: float, ismath: Any = False, mtext: Any = None
        ) -> None:
            if ismath:
                return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
            _, _, descent, left, top, bitmap = self._laid_out(s, prop, bool(gc.get_antialiased()))
            turn = math.radians(angle)
            x = round(x + left + descent * math.sin(turn))
            y = round(y + top + descent * math.cos(turn))
            self._renderer.draw_text_image(bitmap, x, y + 1, angle, gc)

    return ChartRenderer


def _underlay_artist(rgba: Any, x: float, y: float) -> Any:
    """An artist that puts ``rgba``'s pixels on the figure as they are, bottom left at (x, y)
    pixels, before anything else is drawn over them. matplotlib's own images (figimage) resample
    and colour-map on every draw (about a quarter of a two-panel heatmap's time)."""
    from matplotlib.artist import Artist

    class Pixels(Artist):
        def draw(self, renderer: Any) -> None:
            gc = renderer.new_gc()
            renderer.draw_image(gc, round(x), round(y), rgba)
            gc.restore()

    pixels = Pixels()
    pixels.set_zorder(-1)
    return pixels


class _Keep:
    """A file that keeps what is written to it (Agg's pixel buffer, not a copy of it)."""

    data: Any = b""

    def write(self, data: Any) -> None:
        self.data = data

    def seek(self, offset: int, whence: int = 0) -> int:  # matplotlib takes what has one for a file
        return 0


def _png(fig: Any, under: Sequence[Underlay] = ()) -> bytes:
    """``fig`` drawn by :func:`renderer_class`'s renderer, as a PNG (see :func:`encode_png`).

    ``under``: pictures (a heatmap's cells) put on the figure pixel for pixel, under the rest.
    """
    import numpy as np

    for rgba, x, y in under:  # Agg takes an image's rows from the bottom
        fig.add_artist(_underlay_artist(np.ascontiguousarray(rgba[::-1]), x, y))
    canvas = _canvas_class()(fig)
    kept = _Keep()
    fig.savefig(kept, format="rgba")
    width, height = canvas.get_width_height(physical=True)
    return encode_png(np.frombuffer(kept.data, dtype=np.uint8).reshape(height, width, 4))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgba: Any) -> bytes:
    """An opaque picture's (h, w, 4) RGBA pixels as an RGB PNG (the alpha channel left out).

    Every row with PNG's "Up" filter (the difference from the row above: a chart's flat areas,
    bars and cell colours become runs of zeros) and zlib level 1. Pillow chooses a filter per row
    by trying all five, most of its time; this is about half of Pillow's time at level 1, for files
    the same size. Byte for byte the same for the same pixels.
    """
    import numpy as np

    height, width = rgba.shape[0], rgba.shape[1]
    # The alpha channel dropped first: subtracting contiguous rows is about twice as fast.
    rgb = np.ascontiguousarray(rgba[:, :, :3]).reshape(height, 3 * width)
    rows = np.empty((height, 1 + 3 * width), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up (the first row's "row above" is zeros)
    rows[0, 1:] = rgb[0]
    np.subtract(rgb[1:], rgb[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.data, 1)),
            _png_chunk(b"IEND", b""),
        )
    )


def _title(fig: Any, text: str, x: float, y: float, size: float = TITLE_PT) -> None:
    """A title whose first line's top is at (x, y) pixels from the figure's bottom left."""
    width, height = fig.bbox.width, fig.bbox.height
    fig.text(x / width, y / height, text, fontsize=size, ha="left", va="top", gid="title")


def _texts_alike(fig: Any, placed: Sequence[tuple[float, float, str, str]], **style: Any) -> None:
    """Texts that differ only in position, string and colour: (x, y, text, colour) each, in the
    coordinates of ``style``'s transform. All but the first are copies of the first: a text made
    from scratch reads a dozen settings and checks every property (a third of a grid of 155 values'
    time), a copy shares its font properties and style."""
    import copy

    if not placed:
        return
    x, y, s, colour = placed[0]
    first = fig.text(x, y, s, color=colour, **style)
    for x, y, s, colour in placed[1:]:
        text = copy.copy(first)
        text.set_text(s)
        text.set_x(x)
        text.set_y(y)
        text.set_color(colour)
        text.stale_callback = first.stale_callback  # as Figure.text sets them up
        text._remove_method = first._remove_method
        fig.texts.append(text)


def _row_labels(ax: Any, fig: Any, positions: Sequence[float], labels: Sequence[str], size: float = LABEL_PT) -> None:
    """Labels left of the rows at ``positions``: plain texts, not ticks (a tick is four artists
    to make and draw, most of a small chart's drawing time)."""
    from matplotlib.transforms import offset_copy

    ax.set_yticks([])
    left = offset_copy(ax.get_yaxis_transform(), fig=fig, x=-TICKS, y=0, units="dots")
    for position, label in zip(positions, labels, strict=True):
        fig.text(0, position, label, transform=left, ha="right", va="center", fontsize=size, gid="label")


def _value_axis(ax: Any, fig: Any, top: float, percent: bool, label: str, bottom_px: float) -> None:
    """The value axis under bars from 0 to ``top``: a few round values as plain texts under light
    grid lines (as :func:`_row_labels`, no tick artists), and ``label`` centred below them."""
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import offset_copy

    ax.set_xlim(0, top)
    ax.set_xticks([])
    ticks = [float(t) for t in MaxNLocator(nbins=4).tick_values(0, top) if 0 <= t <= top * 1.0001]
    ax.vlines(ticks[1:], 0, 1, transform=ax.get_xaxis_transform(), colors="#dddddd", linewidth=0.8, zorder=0)
    below = offset_copy(ax.get_xaxis_transform(), fig=fig, x=0, y=-4 * PX, units="dots")
    # Each tick's label must read as its value (1.25 % is not "1%"): as many decimals as that takes.
    places = next((d for d in range(6) if all(abs(round(t * 100, d) - t * 100) < 1e-9 for t in ticks)), 6)
    for tick, mark in zip(ticks, value_labels(ticks, f"{{:.{places}%}}" if percent else "{:g}"), strict=True):
        fig.text(tick, 0, mark, transform=below, ha="center", va="top", fontsize=LABEL_PT, gid="tick")
    if label:
        box = ax.get_position()
        y = bottom_px - 4 * PX - LABEL_PT * PX * LINE - 4 * PX
        fig.text(
            (box.x0 + box.x1) / 2, y / fig.bbox.height, label, ha="center", va="top", fontsize=LABEL_PT, gid="xlabel"
        )


def _bars(
    ax: Any, positions: Sequence[float], values: Sequence[float], height: float, colour: str, label: str = ""
) -> None:
    """Horizontal bars from 0 as one collection: drawn in one call, where ``barh`` makes and draws
    a Rectangle per bar (the caller sets the axis limits)."""
    from matplotlib.collections import PolyCollection

    boxes = [
        [(0.0, y - height / 2), (v, y - height / 2), (v, y + height / 2), (0.0, y + height / 2)]
        for y, v in zip(positions, values, strict=True)
    ]
    ax.add_collection(PolyCollection(boxes, facecolors=colour, edgecolors="none", label=label), autolim=False)


def _key(fig: Any, entries: Sequence[tuple[str, str]], right: float, bottom: float, size: float = 8.0) -> None:
    """A legend of (name, colour) entries, one a line, its bottom right corner 6 px inside
    (``right``, ``bottom``) pixels: a swatch collection and plain texts (a matplotlib legend lays
    out and draws a box of packers, a few milliseconds a chart)."""
    from matplotlib.collections import PolyCollection
    from matplotlib.transforms import IdentityTransform

    pixels = IdentityTransform()
    row = size * PX * LINE
    swatch = 2 * size * PX
    names_x = right - 6 - max([text_width(name, size) for name, _ in entries] + [0])
    boxes = []
    for n, (name, _) in enumerate(entries):
        y = bottom + 6 + (len(entries) - 1 - n + 0.5) * row
        x = names_x - 4 * PX - swatch
        boxes.append([(x, y - row * 0.3), (x + swatch, y - row * 0.3), (x + swatch, y + row * 0.3), (x, y + row * 0.3)])
        fig.text(names_x, y, name, transform=pixels, ha="left", va="center", fontsize=size, gid="legend")
    fig.add_artist(PolyCollection(boxes, facecolors=[c for _, c in entries], edgecolors="none", transform=pixels))


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
    from matplotlib.figure import Figure
    from matplotlib.transforms import offset_copy

    shown = [
        (
            drawable(one_line(title, 400)),
            [drawable(one_line(label, 28)) for label in labels],
            [float(v) for v in values],
            value_labels(values, value_format),
        )
        for title, labels, values in panels
    ]
    axis_label = drawable(one_line(xlabel, 400))
    texts = [axis_label, *(t for title, labels, _, marks in shown for t in (title, *labels, *marks))]
    with _style(texts):
        left = PAD + TICKS + max([text_width(label, LABEL_PT) for _, labels, _, _ in shown for label in labels] + [0])
        plot_width = WIDTH_PX - left - PAD
        axis_label = fit_lines(axis_label, plot_width, LABEL_PT)
        titles = [fit_lines(title, WIDTH_PX - 2 * PAD, TITLE_PT) for title, _, _, _ in shown]
        under = TICKS + LABEL_PT * PX * LINE + 2  # x ticks and their labels below each panel
        heights = [
            text_height(title, TITLE_PT) + 4 + ROW_HEIGHT * DPI * max(1, len(labels)) + under
            for title, (_, labels, _, _) in zip(titles, shown, strict=True)
        ]
        total = PAD + sum(heights) + 4 * PX + text_height(axis_label, LABEL_PT) + PAD
        fig = Figure(figsize=(WIDTH, total / DPI), dpi=DPI)
        top = total - PAD
        ax = None
        for n, (title, (_, labels, values, marks), height) in enumerate(zip(titles, shown, heights, strict=True)):
            _title(fig, title, PAD, top)
            plot_height = height - text_height(title, TITLE_PT) - 4 - under
            bottom = top - height + under
            ax = fig.add_axes((left / WIDTH_PX, bottom / total, plot_width / WIDTH_PX, plot_height / total))
            positions = list(range(len(labels)))[::-1]
            _bars(ax, positions, values, 0.72, "#4C72B0")
            _row_labels(ax, fig, positions, labels)
            ax.set_ylim(-0.6, max(1, len(labels)) - 0.4)
            # The axis reaches far enough for the longest value label to fit beside its bar.
            gap = 3 * PX
            reach = [
                v * plot_width / max(1.0, plot_width + PAD - 2 - gap - text_width(mark, VALUE_PT))
                for v, mark in zip(values, marks, strict=True)
            ]
            _value_axis(
                ax,
                fig,
                max([*reach, *(v * 1.05 for v in values), xmax or 0.0, 1e-9]),
                value_format.endswith("%}"),
                axis_label if n == len(shown) - 1 else "",
                bottom,
            )
            beside = offset_copy(ax.transData, fig=fig, x=3, y=0, units="points")
            for position, value, mark in zip(positions, values, marks, strict=True):
                ax.text(value, position, mark, transform=beside, va="center", ha="left", fontsize=VALUE_PT)
            ax.spines[["top", "right"]].set_visible(False)
            top -= height
        return Image(filename, _png(fig), one_line(panels[0][0], 100))


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
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MaxNLocator, NullLocator

    names = [drawable(one_line(label, 60)) for label, _, _, _ in series]
    heading, x_name, y_name = (drawable(one_line(text, 400)) for text in (title, xlabel, ylabel))
    with _style([heading, x_name, y_name, *names]):
        height = 4.2 * DPI
        heading = fit_lines(heading, WIDTH_PX - 2 * PAD, TITLE_PT)
        fig = Figure(figsize=(WIDTH, 4.2), dpi=DPI)
        _title(fig, heading, PAD, height - PAD)
        top = height - PAD - text_height(heading, TITLE_PT) - 6
        x_name = fit_lines(x_name, WIDTH_PX - 2 * PAD, LABEL_PT)
        bottom = PAD + text_height(x_name, LABEL_PT) + 4 * PX + TICKS + LABEL_PT * PX * LINE
        y_name = fit_lines(y_name, top - bottom, LABEL_PT)
        ax = fig.add_axes((0.15, bottom / height, 0.8, (top - bottom) / height))
        for name, (_, xs, ys, style) in zip(names, series, strict=True):
            ax.plot(xs, ys, style, label=name)
        if log:
            xs_all = [float(x) for _, xs, _, _ in series for x in xs if x > 0]
            ys_all = [float(y) for _, _, ys, _ in series for y in ys if y > 0]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # The default log-axis labels are mathtext, which parse_math=False would show as source code.
            for axis, base, values in ((ax.xaxis, 2, xs_all), (ax.yaxis, 10, ys_all)):
                axis.set_major_formatter(LogFormatter(base=base))
                axis.set_minor_formatter(LogFormatter(base=base, labelOnlyBase=False))
                if values and max(values) > 10 * min(values):
                    # Over more than a decade LogFormatter labels no minor tick: leave out their
                    # ~8 unlabelled tick artists per decade (most of a log chart's drawing time).
                    axis.set_minor_locator(NullLocator())
        elif all(float(x).is_integer() for _, xs, _, _ in series for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, counts: no 2.5
        ax.spines[["top", "right"]].set_visible(False)
        # The margins from the tick labels the axes would draw (their height does not depend on the width).
        y_ticks = _tick_marks(ax.yaxis)
        left = (
            PAD
            + text_height(y_name, LABEL_PT)
            + 4 * PX
            + TICKS
            + max([text_width(t, LABEL_PT) for _, t, _ in y_ticks] + [0])
        )
        right = PAD + max([text_width(t, LABEL_PT) / 2 for _, t, _ in _tick_marks(ax.xaxis)] + [0])
        ax.set_position(
            (left / WIDTH_PX, bottom / height, (WIDTH_PX - left - right) / WIDTH_PX, (top - bottom) / height)
        )
        _plain_ticks(ax, fig, ax.xaxis, _tick_marks(ax.xaxis))
        _plain_ticks(ax, fig, ax.yaxis, y_ticks)
        # The axis names beyond the tick labels (plain texts: the axes' own would make no room for them).
        fig.text(
            (left + (WIDTH_PX - left - right) / 2) / WIDTH_PX,
            (bottom - TICKS - LABEL_PT * PX * LINE - 4 * PX) / height,
            x_name,
            ha="center",
            va="top",
            fontsize=LABEL_PT,
            gid="xlabel",
        )
        fig.text(
            PAD / WIDTH_PX,
            (bottom + top) / 2 / height,
            y_name,
            rotation=90,
            ha="left",
            va="center",
            fontsize=LABEL_PT,
            gid="ylabel",
        )
        ax.legend(fontsize=9)
        return Image(filename, _png(fig), one_line(title, 100))


def _tick_marks(axis: Any) -> list[tuple[float, str, bool]]:
    """(value, label, major) of each tick ``axis`` would draw in its view now (a minor tick where
    a major one is left out, as matplotlib does)."""
    low, high = sorted(float(v) for v in axis.get_view_interval())
    slack = (high - low) * 1e-9
    marks: list[tuple[float, str, bool]] = []
    majors: list[float] = []
    for locator, formatter, major in (
        (axis.get_major_locator(), axis.get_major_formatter(), True),
        (axis.get_minor_locator(), axis.get_minor_formatter(), False),
    ):
        values = [float(v) for v in locator() if low - slack <= v <= high + slack]
        if not major:
            values = [v for v in values if not any(math.isclose(v, m, rel_tol=1e-9) for m in majors)]
        else:
            majors = values
        marks += zip(values, formatter.format_ticks(values), itertools.repeat(major), strict=False)
    return marks


def _plain_ticks(ax: Any, fig: Any, axis: Any, marks: Sequence[tuple[float, str, bool]]) -> None:
    """``marks`` (from :func:`_tick_marks`) drawn as tick marks, light grid lines at the major ones
    and plain texts, in place of ``axis``'s own ticks (a tick is four artists to make and draw,
    most of a line chart's time)."""
    from matplotlib.markers import TICKDOWN, TICKLEFT
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import offset_copy

    is_x = axis is ax.xaxis
    axis.set_major_locator(NullLocator())
    axis.set_minor_locator(NullLocator())
    along = ax.get_xaxis_transform() if is_x else ax.get_yaxis_transform()
    majors = [v for v, _, major in marks if major]
    grid = ax.vlines if is_x else ax.hlines
    grid(majors, 0, 1, transform=along, colors="#b0b0b0", alpha=0.3, linewidth=0.8, zorder=0.5)
    for major, length in ((True, 3.5), (False, 2.0)):
        values = [v for v, _, m in marks if m is major]
        at_edge = [0.0] * len(values)
        xs, ys = (values, at_edge) if is_x else (at_edge, values)
        ax.plot(
            xs,
            ys,
            transform=along,
            marker=TICKDOWN if is_x else TICKLEFT,
            markersize=length,
            markeredgewidth=0.8,
            linestyle="",
            color="black",
            clip_on=False,
        )
    shift = {"x": 0, "y": -TICKS} if is_x else {"x": -TICKS, "y": 0}
    place = offset_copy(along, fig=fig, units="dots", **shift)
    for value, label, _ in marks:
        if label:
            ha, va = ("center", "top") if is_x else ("right", "center")
            xy = (value, 0) if is_x else (0, value)
            fig.text(*xy, label, transform=place, ha=ha, va=va, fontsize=LABEL_PT, gid="tick")


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
    from matplotlib.figure import Figure

    rows = [drawable(one_line(label, 28)) for label in labels]
    names = [drawable(one_line(name, 50)) for name, _ in parts]
    totals = [sum(float(values[i]) for _, values in parts) for i in range(len(labels))]
    marks = [
        value_format.format(total)
        + "".join(
            f" ({value_format.format(values[i])} {name})"
            for name, (_, values) in zip(names[1:], parts[1:], strict=True)
            if values[i]
        )
        for i, total in enumerate(totals)
    ]
    heading, axis_label = drawable(one_line(title, 400)), drawable(one_line(xlabel, 400))
    with _style([heading, axis_label, *rows, *names, *marks]):
        left = PAD + TICKS + max([text_width(row, LABEL_PT) for row in rows] + [0])
        plot_width = WIDTH_PX - left - PAD
        heading = fit_lines(heading, WIDTH_PX - 2 * PAD, TITLE_PT)
        axis_label = fit_lines(axis_label, plot_width, LABEL_PT)
        legend_rows = len(parts) * 9 * PX * LINE + 12  # the legend goes below the bars
        legend_units = legend_rows / (ROW_HEIGHT * DPI)
        plot_height = ROW_HEIGHT * DPI * (max(1, len(labels)) + 0.2) + legend_rows
        under = TICKS + LABEL_PT * PX * LINE + 4 * PX + text_height(axis_label, LABEL_PT) + PAD
        total = PAD + text_height(heading, TITLE_PT) + 4 + plot_height + under
        fig = Figure(figsize=(WIDTH, total / DPI), dpi=DPI)
        _title(fig, heading, PAD, total - PAD)
        ax = fig.add_axes((left / WIDTH_PX, under / total, plot_width / WIDTH_PX, plot_height / total))
        positions = [len(labels) - 1 - i + legend_units for i in range(len(labels))]
        starts = [0.0] * len(labels)
        styles = [("#4C72B0", ""), ("#C44E52", "///"), ("#DD8452", "xx"), ("#55A868", "..")]
        for n, (name, (_, values)) in enumerate(zip(names, parts, strict=True)):
            colour, hatch = styles[n % len(styles)]
            widths = [float(v) for v in values]
            ax.barh(positions, widths, left=starts, color=colour, hatch=hatch, edgecolor="white", label=name)
            starts = [a + b for a, b in zip(starts, widths, strict=True)]
        _row_labels(ax, fig, positions, rows)
        ax.set_ylim(-0.6, max(1, len(labels)) - 1 + legend_units + 0.6)
        gap = 3 * PX
        reach = [
            t * plot_width / max(1.0, plot_width + PAD - 2 - gap - text_width(m, VALUE_PT))
            for t, m in zip(totals, marks, strict=True)
        ]
        _value_axis(ax, fig, max([*reach, *(t * 1.05 for t in totals), 1e-9]), "%" in value_format, axis_label, under)
        from matplotlib.transforms import offset_copy

        beside = offset_copy(ax.transData, fig=fig, x=3, y=0, units="points")
        for position, total_value, mark in zip(positions, totals, marks, strict=True):
            ax.text(total_value, position, mark, transform=beside, va="center", ha="left", fontsize=VALUE_PT)
        ax.legend(fontsize=9, loc="lower right")
        ax.spines[["top", "right"]].set_visible(False)
        return Image(filename, _png(fig), one_line(title, 100))


# --------------------------------------------------------------------------- drawing, fairly


# Who a chart is drawn for: the user of the command being handled (bot.commands sets it), so
# that one student's burst of charted replies takes turns with everyone else's.
def _owner() -> str:
    from bot.commands import current_user

    user = current_user.get()
    return user.id if user is not None else ""


_Job = tuple[Future, Callable[[], Image]]


class FairChartQueue:
    """Chart drawing threads that take the waiting charts round-robin by user.

    Charts draw in threads of their own: a burst of charted replies is seconds of drawing on a
    small host, and in asyncio's shared pool it would queue every other reply's thread work
    (tokenizing, the quiz database) behind it (bench/faults.py's overflow scenario). Within
    these threads, first-come order would put one student's flood ahead of the whole class;
    here each user with charts waiting gets one drawn per turn.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._started = 0
        self._idle = 0
        self._count = 0  # charts waiting for a thread
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiting: dict[str, deque[_Job]] = {}
        self._turns: deque[str] = deque()

    def submit(self, owner: str, draw: Callable[[], Image]) -> Future:
        """Queue ``draw`` for ``owner``; the future holds its image (or its exception)."""
        future: Future = Future()
        with self._lock:
            if owner not in self._waiting:
                self._waiting[owner] = deque()
                self._turns.append(owner)
            self._waiting[owner].append((future, draw))
            self._count += 1
            # More charts waiting than threads free to take them (an idle thread counts as free
            # until it wakes: a quick second submit must not leave its chart behind the first).
            if self._count > self._idle and self._started < self._threads:
                self._started += 1
                threading.Thread(target=self._work, name=f"lmbot-chart-{self._started}", daemon=True).start()
            self._ready.notify()
        return future

    def waiting(self) -> int:
        """How many charts wait for a thread."""
        with self._lock:
            return self._count

    def _next(self) -> _Job:
        with self._lock:
            self._idle += 1
            while not self._turns:
                self._ready.wait()
            self._idle -= 1
            self._count -= 1
            owner = self._turns.popleft()
            jobs = self._waiting[owner]
            job = jobs.popleft()
            if jobs:
                self._turns.append(owner)  # the owner's next chart waits for everyone else's turn
            else:
                del self._waiting[owner]
            return job

    def _work(self) -> None:
        while True:
            future, draw = self._next()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(draw())
            except BaseException as exc:  # the awaiting reply logs it
                future.set_exception(exc)


_CHARTS = FairChartQueue(threads=2)  # charts draw one at a time (_DRAWING); a second thread serves other draws


# --------------------------------------------------------------------------- drawing in processes
#
# Drawn in the bot's process, every chart's ~30 ms of matplotlib and PNG encoding holds the GIL
# that the event loop needs to answer Discord: in a burst of 200 charted replies the loop spent
# seconds waiting. A long-running bot (``lmbot run``) therefore draws in processes of its own
# (start_process_pool); the chart threads above still decide the order, one user's turn at a
# time, and each hands its chart to a drawing process and waits without holding the GIL. One-shot
# front ends (the console, ``lmbot ask``) and the tests draw in-process: a process would cost them
# more to start (importing matplotlib) than it saves.

_POOL: Any = None  # a concurrent.futures.ProcessPoolExecutor while drawing in processes
_POOL_LOCK = threading.Lock()


# How much lower a drawing process's CPU priority is than the bot's (a Unix nice increment). The
# bot's event loop (acknowledgements, heartbeats) and the model workers go first: in a class's burst,
# charts drawn at equal priority took the CPU the model's generation needed, so the service measured
# itself slower and told more students "busy" than it could have answered. A chart waits instead.
DRAWING_NICENESS = 10


def _warm_drawing_process() -> None:
    """Lower this drawing process's priority, and load matplotlib and the fonts once, when it starts,
    not in the first reply."""
    import os

    if hasattr(os, "nice"):  # Unix only
        os.nice(DRAWING_NICENESS)
    bar_chart(["a"], [1.0], title="warm", xlabel="p")


def start_process_pool(processes: int = 0) -> None:
    """Draw charts in ``processes`` processes of their own (0: as many as the chart threads).

    Idempotent. The processes start at once with ``spawn`` (the bot has threads; forking them is
    unsafe) and load matplotlib in the background, while the bot logs in.
    """
    global _POOL
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with _POOL_LOCK:
        if _POOL is not None:
            return
        count = processes or _CHARTS._threads
        _POOL = ProcessPoolExecutor(
            count, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_drawing_process
        )
        # Start every process now (the executor starts them on demand): each warms up on its own.
        for _ in range(count):
            _POOL.submit(int)


def stop_process_pool() -> None:
    """Stop the drawing processes; charts draw in-process again."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _draw(draw: Callable[..., Image], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Image:
    """Draw in a drawing process when there is one and the call can travel there, else here."""
    global _POOL
    import pickle
    from concurrent.futures.process import BrokenProcessPool

    pool = _POOL
    if pool is not None:
        try:
            pickle.dumps((draw, args, kwargs), pickle.HIGHEST_PROTOCOL)  # a test's local function cannot
        except (pickle.PicklingError, AttributeError, TypeError):
            pool = None
    if pool is None:
        return draw(*args, **kwargs)
    try:
        return pool.submit(draw, *args, **kwargs).result()
    except BrokenProcessPool:  # a drawing process was killed: draw here, and in fresh processes later
        log.warning("a chart drawing process died; starting new ones")
        with _POOL_LOCK:
            if _POOL is pool:
                _POOL = None
        start_process_pool()
        return draw(*args, **kwargs)


async def render(draw: Callable[..., Image], *args: Any, **kwargs: Any) -> Image:
    """Draw a chart in the chart threads so the event loop and asyncio's shared pool stay free,
    taking turns with other users' charts (:class:`FairChartQueue`), in the drawing processes
    when :func:`start_process_pool` started them.

    Never raises: a chart that cannot be drawn is logged and comes back with no data, which
    :class:`~bot.commands.Reply` leaves out, so the reply goes without that chart.
    """
    try:
        call = functools.partial(contextvars.copy_context().run, functools.partial(_draw, draw, args, kwargs))
        return await asyncio.wrap_future(_CHARTS.submit(_owner(), call))
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
    """Heatmaps side by side, tokens on both axes, one colour scale (square-root, so small weights show).

    The cells and the colour bar are pixels put under the figure's drawing (no Axes: building and
    drawing three of them was most of this chart's time; no figure images either, see _png), with
    every label a plain text.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import IdentityTransform

    size = max(len(labels) for _, labels, _, _ in panels)
    font = max(5.0, min(9.0, 260 / max(size, 1)))
    token_labels = [[drawable(one_line(label, 14)) for label in labels] for _, labels, _, _ in panels]
    headings = ["\n".join(drawable(one_line(line, 400)) for line in title.split("\n")) for title, _, _, _ in panels]
    scale_name = drawable(one_line(colorbar, 200))
    axis_names = ("attended to (key)", "attending (query)")
    with _style([*headings, scale_name, *axis_names, *(t for labels in token_labels for t in labels)]):
        side = 440
        tick_w = max([text_width(t, font) for labels in token_labels for t in labels] + [0])
        left = round(PAD + LABEL_PT * PX * LINE + 4 * PX + TICKS + tick_w)
        bottom = round(PAD + LABEL_PT * PX * LINE + 4 * PX + TICKS + tick_w)
        scale_name = fit_lines(scale_name, side, LABEL_PT)
        scale_w = 16 + 14 + TICKS + text_width("0.000", LABEL_PT) + 4 * PX + text_height(scale_name, LABEL_PT) + PAD
        headings = [
            "\n".join(fit_lines(line, left + side - 2 * PAD, 10.0) for line in heading.split("\n"))
            for heading in headings
        ]
        title_h = max(text_height(h, 10.0) for h in headings)
        width = math.ceil(len(panels) * (left + side) + scale_w)
        height = math.ceil(PAD + title_h + 8 + side + bottom)
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        pixels = IdentityTransform()  # positions below are pixels from the bottom left

        def text(x: float, y: float, s: str, **kwargs: Any) -> None:
            fig.text(x, y, s, transform=pixels, **kwargs)

        def frame(x: float, y: float, w: float, h: float) -> None:
            fig.add_artist(Rectangle((x, y), w, h, fill=False, linewidth=0.8, transform=pixels))

        top = max(max(max(row) for row in weights) if len(weights) else 0.0 for _, _, weights, _ in panels)
        scale_top = max(float(top), 1e-9)
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=scale_top)
        cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
        ticks: list[tuple[tuple[float, float], tuple[float, float]]] = []
        cells: list[Underlay] = []  # the panels' cells and the colour bar, put under the drawing
        for k, ((_, _, weights, hide_future), labels, heading) in enumerate(
            zip(panels, token_labels, headings, strict=True)
        ):
            x0 = k * (left + side)
            text(x0 + PAD, height - PAD, heading, fontsize=10.0, ha="left", va="top", gid="title")
            n = len(labels)
            grid = np.asarray(weights, dtype=float).reshape(n, n)
            hidden = np.triu(np.ones((n, n), dtype=bool), k=1) if hide_future else np.zeros((n, n), dtype=bool)
            if n:
                colours = cmap(norm(np.ma.masked_array(grid, mask=hidden)), bytes=True)
                cell = np.arange(side) * n // side  # the cell each pixel row/column shows
                cells.append((colours[cell][:, cell], x0 + left, bottom))
            frame(x0 + left, bottom, side, side)
            pitch = side / max(n, 1)
            under, beside = [], []
            for j, label in enumerate(labels):
                x = x0 + left + (j + 0.5) * pitch
                y = bottom + side - (j + 0.5) * pitch
                ticks += [((x, bottom), (x, bottom - 3.5 * PX)), ((x0 + left, y), (x0 + left - 3.5 * PX, y))]
                under.append((x, bottom - TICKS, label, "black"))
                beside.append((x0 + left - TICKS, y, label, "black"))
            _texts_alike(fig, under, ha="center", va="top", rotation=90, fontsize=font, gid="label", transform=pixels)
            _texts_alike(fig, beside, ha="right", va="center", fontsize=font, gid="label", transform=pixels)
            # The axis names beyond the token labels.
            text(
                x0 + left + side / 2,
                bottom - TICKS - tick_w - 4 * PX,
                axis_names[0],
                ha="center",
                va="top",
                gid="xlabel",
            )
            text(x0 + PAD, bottom + side / 2, axis_names[1], rotation=90, ha="left", va="center", gid="ylabel")
            if n <= 10:  # few cells: write the weights in them
                weights_written = [
                    (
                        x0 + left + (j + 0.5) * pitch,
                        bottom + side - (i + 0.5) * pitch,
                        f"{grid[i, j]:.2f}",
                        "black" if norm(grid[i, j]) > 0.6 else "white",
                    )
                    for i in range(n)
                    for j in range(n)
                    if not hidden[i, j]
                ]
                _texts_alike(fig, weights_written, ha="center", va="center", fontsize=7, transform=pixels)
        # The colour bar: the scale from 0 (bottom) to the largest weight, square-root spaced as the cells.
        x0 = len(panels) * (left + side) + 16
        shades = cmap(np.linspace(1.0, 0.0, side), bytes=True)[:, np.newaxis, :].repeat(14, axis=1)
        cells.append((np.ascontiguousarray(shades), x0, bottom))
        frame(x0, bottom, 14, side)
        widest = 0.0
        for value in MaxNLocator(nbins=6).tick_values(0.0, scale_top):
            if 0.0 <= value <= scale_top * 1.0001:
                y = bottom + float(norm(value)) * side
                ticks.append(((x0 + 14, y), (x0 + 14 + 3.5 * PX, y)))
                mark = f"{value:.2f}"
                widest = max(widest, text_width(mark, LABEL_PT))
                text(x0 + 14 + TICKS, y, mark, ha="left", va="center", fontsize=LABEL_PT)
        text(
            x0 + 14 + TICKS + widest + 4 * PX,
            bottom + side / 2,
            scale_name,
            rotation=90,
            ha="left",
            va="center",
            fontsize=LABEL_PT,
            gid="colorbar",
        )
        fig.add_artist(LineCollection(ticks, colors="black", linewidths=0.8, transform=pixels))
        return Image(filename, _png(fig, cells), one_line(panels[0][0], 100))


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
    bounds: Sequence[float] = (),
) -> Image:
    """Each panel's text with every piece shaded by its value (one colour scale), the value under it.

    ``bounds`` (e.g. 2, 6, 12) make the scale bands, one shade per band, with the bounds marked
    on the colour bar, so the chart's scale is the one a text key describes.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import BoundaryNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import IdentityTransform

    headings = [drawable(one_line(title, 400)) for title, _, _ in panels]
    pieces = [[drawable(piece) for piece in panel_pieces] for _, panel_pieces, _ in panels]
    marks = [[value_format.format(v) for v in values] for _, _, values in panels]
    scale_name = drawable(one_line(colorbar, 200))
    with _style([*headings, scale_name, *(p for ps in pieces for p in ps), *(m for ms in marks for m in ms)]):
        line_h, text_pt = 34 * PX, 11.0
        usable = WIDTH_PX - 2 * PAD
        headings = [fit_lines(h, usable, 10.0) for h in headings]
        scale_name = fit_lines(scale_name, usable * 0.8, LABEL_PT)
        layouts = [_shaded_layout(ps, usable, text_pt) for ps in pieces]
        heights = [
            text_height(h, 10.0) + 6 + line_h * (1 + max((line for line, _, _, _ in placed), default=0))
            for h, placed in zip(headings, layouts, strict=True)
        ]
        bar_h = 14 + TICKS + LABEL_PT * PX * LINE + 4 * PX + text_height(scale_name, LABEL_PT) + PAD
        total = math.ceil(PAD + sum(heights) + bar_h)
        top_value = vmax if vmax is not None else max([v for _, _, values in panels for v in values] + [1e-9])
        cmap = colormaps["YlOrRd"]
        edges = sorted({0.0, *(b for b in bounds if 0 < b < top_value), float(top_value)})
        norm = BoundaryNorm(edges, cmap.N) if bounds else Normalize(0.0, top_value)
        fig = Figure(figsize=(WIDTH, total / DPI), dpi=DPI)
        # No Axes (building and drawing two was most of this chart's time): every position below
        # is in pixels from the bottom left, the colour bar's strip is pixels put under the drawing.
        pixels = IdentityTransform()

        def text(x: float, y_top: float, s: str, **kwargs: Any) -> None:
            """``s`` at ``x`` pixels from the left, ``y_top`` pixels down from the top."""
            fig.text(x, total - y_top, s, transform=pixels, **kwargs)

        y = PAD
        boxes, shades = [], []
        box_h = text_pt * PX * 1.3
        for heading, placed, values, panel_marks, height in zip(
            headings, layouts, (v for _, _, v in panels), marks, heights, strict=True
        ):
            text(PAD, y, heading, fontsize=10, va="top", ha="left", gid="title")
            first = y + text_height(heading, 10.0) + 6
            for (line, x, w, label), value, mark in zip(placed, values, panel_marks, strict=True):
                shade = cmap(norm(min(value, top_value)))
                dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
                x0, y0 = PAD + x, first + line * line_h
                bottom = total - y0 - box_h
                boxes.append([(x0, bottom), (x0 + w, bottom), (x0 + w, bottom + box_h), (x0, bottom + box_h)])
                shades.append(shade)
                text(x0 + 2, y0 + 2, label, fontsize=text_pt, va="top", ha="left", color="white" if dark else "black")
                text(x0 + 2, y0 + box_h + 2, mark, fontsize=7, va="top", ha="left", color="#555555")
            y += height
        fig.add_artist(PolyCollection(boxes, facecolors=shades, edgecolors="none", transform=pixels, zorder=0))
        # The colour bar: 0 at the left to the largest value, banded where ``bounds`` band the shades.
        bar_x, bar_w, bar_y = 0.1 * WIDTH_PX, round(0.8 * WIDTH_PX), bar_h - 14
        strip = cmap(norm(np.linspace(0.0, top_value, bar_w)), bytes=True)[np.newaxis, :, :].repeat(14, axis=0)
        fig.add_artist(Rectangle((bar_x, bar_y), bar_w, 14, fill=False, linewidth=0.8, transform=pixels))
        values = edges if bounds else [v for v in MaxNLocator(nbins=6).tick_values(0.0, top_value) if v <= top_value]
        ticks = []
        for value in values:
            x = bar_x + bar_w * value / top_value
            ticks.append(((x, bar_y), (x, bar_y - 3.5 * PX)))
            fig.text(
                x, bar_y - TICKS, f"{value:g}", ha="center", va="top", fontsize=LABEL_PT, gid="tick", transform=pixels
            )
        fig.add_artist(LineCollection(ticks, colors="black", linewidths=0.8, transform=pixels))
        fig.text(
            bar_x + bar_w / 2,
            bar_y - TICKS - LABEL_PT * PX * LINE - 4 * PX,
            scale_name,
            ha="center",
            va="top",
            fontsize=LABEL_PT,
            gid="colorbar",
            transform=pixels,
        )
        return Image(filename, _png(fig, [(np.ascontiguousarray(strip), bar_x, bar_y)]), one_line(panels[0][0], 100))


def _shaded_layout(pieces: Sequence[str], width: float, size: float) -> list[tuple[int, float, float, str]]:
    """(line, x, box width, label) for each piece, in pixels, wrapped at ``width``."""
    line, x, placed = 0, 0.0, []
    value_w = text_width("00.0", 7)
    for piece in pieces:
        breaks = piece.count("\n")
        body = piece.replace("\n", "").replace("\t", "⇥")
        gap = 6 * PX if body.startswith(" ") else 1.5 * PX  # a word starts after a space; subword pieces join
        label = body.strip(" ") or ("␣" * len(body) if body else "⏎" if breaks else "∅")
        if breaks and body.strip(" "):
            label = label + "⏎"
        box = min(max(text_width(label, size), value_w) + 4 + 2, width)
        if x > 0 and x + gap + box > width:
            line, x = line + 1, 0.0
        x = x + gap if x > 0 else 0.0
        placed.append((line, x, box, label))
        x += box
        if breaks:
            line, x = line + breaks, 0.0
    return placed


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
    right of each group (e.g. "cut by top-k"). The last series' bars carry their values."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import offset_copy

    rows = [drawable(one_line(label, 24)) for label in labels]
    names = [drawable(one_line(name, 60)) for name, _ in series]
    notes = [drawable(one_line(note, 60)) for note in notes]
    last = [float(v) for v in series[-1][1]] if series else []
    marks = [m if v > 0 else "" for m, v in zip(value_labels(last, "{:.1%}"), last, strict=True)]
    heading, axis_label = drawable(one_line(title, 400)), drawable(one_line(xlabel, 400))
    with _style([heading, axis_label, *rows, *names, *notes, *marks]):
        groups, per = len(labels), max(1, len(series))
        left = PAD + TICKS + max([text_width(row, LABEL_PT) for row in rows] + [0])
        plot_width = WIDTH_PX - left - PAD
        heading = fit_lines(heading, WIDTH_PX - 2 * PAD, TITLE_PT)
        axis_label = fit_lines(axis_label, plot_width, LABEL_PT)
        group_px = 0.2 * per * DPI
        legend_px = per * 8 * PX * LINE + 12  # the legend goes below the bars
        legend_units = legend_px / group_px
        plot_height = group_px * (groups + 0.1) + legend_px
        under = TICKS + LABEL_PT * PX * LINE + 4 * PX + text_height(axis_label, LABEL_PT) + PAD
        total = PAD + text_height(heading, TITLE_PT) + 4 + plot_height + under
        fig = Figure(figsize=(WIDTH, total / DPI), dpi=DPI)
        _title(fig, heading, PAD, total - PAD)
        ax = fig.add_axes((left / WIDTH_PX, under / total, plot_width / WIDTH_PX, plot_height / total))
        height = 0.8 / per
        colours = ("#9DA5B4", "#4C72B0", "#DD8452", "#55A868", "#C44E52")
        top = max([float(v) for _, values in series for v in values] + [1e-9])
        gap = 3 * PX
        reach = [
            v * plot_width / max(1.0, plot_width + PAD - 2 - gap - text_width(m, 8))
            for v, m in zip(last, marks, strict=True)
        ]
        _value_axis(ax, fig, max([*reach, top * 1.05]), True, axis_label, under)
        for s, (name, (_, values)) in enumerate(zip(names, series, strict=True)):
            positions = [(groups - 1 - g) + legend_units + 0.4 - height * (s + 0.5) for g in range(groups)]
            _bars(ax, positions, [float(v) for v in values], height, colours[s % len(colours)], label=name)
            if s == len(series) - 1:
                beside = offset_copy(ax.transData, fig=fig, x=2, y=0, units="points")
                for position, value, mark in zip(positions, last, marks, strict=True):
                    if mark:
                        ax.text(value, position, mark, transform=beside, va="center", ha="left", fontsize=8)
        for g, note in enumerate(notes):
            if note:
                ax.text(
                    top * 0.02, groups - 1 - g + legend_units - 0.38, note, fontsize=7, color="#C44E52", va="bottom"
                )
        _row_labels(ax, fig, [groups - 1 - g + legend_units for g in range(groups)], rows)
        ax.set_ylim(-0.5, groups - 0.4 + legend_units)
        _key(fig, [(name, colours[s % len(colours)]) for s, name in enumerate(names)], left + plot_width, under)
        ax.spines[["top", "right"]].set_visible(False)
        return Image(filename, _png(fig), one_line(title, 100))


# --------------------------------------------------------------------------- a grid of probabilities (/lens)


def cell_percent(p: float) -> str:
    """A probability for a grid cell, short and never 0 when it is not: 77%, 4.2%, 0.42%, <0.01%."""
    if p >= 0.1:
        return f"{p:.0%}"
    if p >= 0.01:
        return f"{p:.1%}"
    if p >= 1e-4:
        return f"{p:.2%}"
    return "0%" if p <= 0 else "<0.01%"


# The luminance above which black text contrasts more than white (WCAG's ratios (L + 0.05) / 0.05
# and 1.05 / (L + 0.05) are equal there), so every cell's number has a contrast ratio of at least 4.58.
LUMINANCE_MIDDLE = math.sqrt(1.05 * 0.05) - 0.05


def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG's relative luminance of an sRGB colour with channels from 0 to 1."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (float(v) for v in rgb)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def probability_grid(
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float]],
    *,
    title: str,
    row_name: str,
    column_name: str,
    filename: str = "grid.png",
) -> Image:
    """A table of probabilities coloured by value: ``values[r][c]`` in the cell of row ``r``
    (top to bottom) and column ``c``, every value written in its cell (black or white, whichever
    reads on that colour), on one fixed scale from 0 to 1 (square-root spaced, so small ones show)
    explained by a colour bar. Cells, bar and frames are drawn in pixels as :func:`heatmap`'s."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.transforms import IdentityTransform

    size = 8.0
    row_labels = [drawable(one_line(r, 14)) for r in rows]
    column_labels = [drawable(one_line(c, 12)) for c in columns]
    grid = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
    marks = [[cell_percent(float(v)) for v in row] for row in grid]
    heading = drawable(one_line(title, 400))
    x_name, y_name = drawable(one_line(column_name, 200)), drawable(one_line(row_name, 200))
    scale_name = "probability (square-root scale)"
    scale_marks = [(v, cell_percent(v)) for v in (0.0, 0.01, 0.1, 0.25, 0.5, 1.0)]
    texts = [heading, x_name, y_name, scale_name, *row_labels, *column_labels, *(m for row in marks for m in row)]
    with _style(texts):
        cell_w = 8 + max([text_width(t, size) for t in [*column_labels, "<0.01%"]])
        # Rows at least a line of text high, and together tall enough for the colour bar's marks.
        cell_h = max(math.ceil(size * PX * LINE + 4), math.ceil(280 / max(len(rows), 1)))
        row_w = max([text_width(t, LABEL_PT) for t in row_labels] + [0])
        left = math.ceil(PAD + text_height(y_name, LABEL_PT) + 4 * PX + TICKS + row_w)
        plot_w = cell_w * len(columns)
        scale_w = 16 + 14 + TICKS + max(text_width(m, LABEL_PT) for _, m in scale_marks) + 4 * PX
        scale_w += LABEL_PT * PX * LINE + PAD
        width = math.ceil(max(WIDTH_PX, left + plot_w + scale_w))
        heading = fit_lines(heading, width - 2 * PAD, TITLE_PT)
        x_name = fit_lines(x_name, max(plot_w, 200.0), LABEL_PT)
        plot_h = cell_h * len(rows)
        y_name = fit_lines(y_name, max(plot_h, 100.0), LABEL_PT, max_lines=1)
        bottom = math.ceil(PAD + text_height(x_name, LABEL_PT) + 4 * PX)
        header = TICKS + size * PX * LINE  # the column labels above the grid
        height = math.ceil(bottom + plot_h + header + 6 + text_height(heading, TITLE_PT) + PAD)
        scale_name = fit_lines(scale_name, max(plot_h, 120.0), LABEL_PT, max_lines=1)
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        pixels = IdentityTransform()

        def text(x: float, y: float, s: str, **kwargs: Any) -> None:
            fig.text(x, y, s, transform=pixels, **kwargs)

        _title(fig, heading, PAD, height - PAD)
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
        cmap = colormaps["viridis"]
        colours = cmap(norm(np.clip(grid, 0.0, 1.0)))
        top = bottom + plot_h
        boxes, faces = [], []
        labels_placed, values_placed = [], []
        for r, label in enumerate(row_labels):
            y = top - (r + 1) * cell_h
            labels_placed.append((left - TICKS, y + cell_h / 2, label, "black"))
            for c in range(len(columns)):
                x = left + c * cell_w
                boxes.append([(x, y), (x + cell_w, y), (x + cell_w, y + cell_h), (x, y + cell_h)])
                faces.append(colours[r, c])
                light = relative_luminance(colours[r, c][:3]) > LUMINANCE_MIDDLE
                values_placed.append((x + cell_w / 2, y + cell_h / 2, marks[r][c], "black" if light else "white"))
        _texts_alike(fig, labels_placed, ha="right", va="center", fontsize=LABEL_PT, gid="label", transform=pixels)
        _texts_alike(fig, values_placed, ha="center", va="center", fontsize=size, gid="value", transform=pixels)
        fig.add_artist(PolyCollection(boxes, facecolors=faces, edgecolors="white", linewidths=0.5, transform=pixels))
        for c, label in enumerate(column_labels):
            text(
                left + (c + 0.5) * cell_w, top + TICKS / 2, label, ha="center", va="bottom", fontsize=size, gid="label"
            )
        text(left + plot_w / 2, bottom - 4 * PX, x_name, ha="center", va="top", fontsize=LABEL_PT, gid="xlabel")
        text(PAD, bottom + plot_h / 2, y_name, rotation=90, ha="left", va="center", fontsize=LABEL_PT, gid="ylabel")
        # The colour bar: 0 at the bottom to 1 at the top, spaced as the cells' colours.
        x0 = math.ceil(left + plot_w + 16)
        shades = cmap(np.linspace(1.0, 0.0, max(int(plot_h), 1)), bytes=True)[:, np.newaxis, :].repeat(14, axis=1)
        under = [(shades, x0, bottom)]
        ticks: list[tuple[tuple[float, float], tuple[float, float]]] = []
        widest = 0.0
        for value, mark in scale_marks:
            at = bottom + float(norm(value)) * plot_h
            ticks.append(((x0 + 14, at), (x0 + 14 + 3.5 * PX, at)))
            widest = max(widest, text_width(mark, LABEL_PT))
            text(x0 + 14 + TICKS, at, mark, ha="left", va="center", fontsize=LABEL_PT, gid="tick")
        scale_at = (x0 + 14 + TICKS + widest + 4 * PX, bottom + plot_h / 2)
        text(*scale_at, scale_name, rotation=90, ha="left", va="center", fontsize=LABEL_PT, gid="colorbar")
        fig.add_artist(LineCollection(ticks, colors="black", linewidths=0.8, transform=pixels))
        return Image(filename, _png(fig, under), one_line(title, 100))
