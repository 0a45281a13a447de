"""Rendering a Reply for terminals and for ``--json``.

The Discord front end has its own renderer; this one is for people at a
terminal and for scripts.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import unicodedata
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from bot.commands import Button, CodeBlock, Reply, Table
from bot.parsing import quote

ANSI = {"gray": 90, "red": 31, "green": 32, "yellow": 33, "blue": 34, "pink": 35, "cyan": 36, "white": 37}
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """A count with its noun in the right number: "1 token", "0 tokens", "2,048 tokens"
    (``nouns``: the plural where it is not the noun plus "s", e.g. "1 query", "2 queries")."""
    return f"{count:,} {noun if count == 1 else (nouns or noun + 's')}"


def probability(p: float) -> str:
    """A probability as people read it, never 0 or 100% when it is not: "77.3%", ">99.9%",
    "1 in 6,225", or "1 in 10^12" when tiny (a percentage with 12 zeros reads as 0)."""
    if p >= 1:
        return "100%"
    if p >= 0.001:
        shown = f"{100 * p:.1f}%"
        return ">99.9%" if shown == "100.0%" else shown
    if p >= 1e-6:
        return f"1 in {round(1 / p):,}"
    return f"1 in 10^{round(-math.log10(p))}" if p > 0 else "0"


def decimal_probability(p: float, decimals: int = 4) -> str:
    """A probability as a decimal ("0.4512") where that shows it; one too small for ``decimals``
    places reads as :func:`probability` says ("1 in 35,000", "1 in 10^9"), never as 0.0000, and
    one just below 1 as ">0.9999", never as 1.0000 (certain)."""
    shown = f"{p:.{decimals}f}"
    if 0 < p < 1 and float(shown) == 1:
        return f">0.{'9' * decimals}"
    return shown if p <= 0 or shown.strip("0.") else probability(p)


def significant(x: float, digits: int = 3) -> str:
    """A measured number to ``digits`` significant figures in plain notation, digits grouped and
    trailing zeros dropped as ``g`` drops them: "1,230", "6.63", "5.5", "0.0512" (where ``g``
    would write "1.23e+03" and "5.12e-05")."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    rounded = float(f"{x:.{digits}g}")  # rounding first: 9.996 has 2 places once it is 10.0
    places = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    shown = f"{rounded:,.{places}f}"
    return shown.rstrip("0").rstrip(".") if places else shown


def display_width(text: str) -> int:
    """Terminal columns: wide (CJK, emoji) characters take two, combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _pad(text: str, width: int, align: str) -> str:
    gap = " " * max(0, width - display_width(text))
    return gap + text if align == "r" else text + gap


def render_table(table: Table) -> str:
    cells = [list(table.headers), *[[str(c) for c in row] for row in table.rows]]
    widths = [max(display_width(row[i]) for row in cells if i < len(row)) for i in range(len(table.headers))]
    align = table.align or "l" * len(widths)
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(_pad(cell, widths[i], align[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_code(code: CodeBlock, colour: bool, palette: dict[str, int] = ANSI) -> str:
    if not colour:
        return code.plain
    return "".join(
        f"\x1b[{palette[s.colour]}m{s.text}\x1b[0m" if s.colour in palette else s.text for s in code.segments
    )


def button_line(button: Button) -> str:
    """The command line a button runs, as a person would type it in the console."""
    value = button.value
    if not value or any(c.isspace() or c in "\"':" for c in value):
        value = quote(value)
    line = f"/{button.command} {button.option}:{value}"
    # A button that asks for text: the person types theirs in place of the placeholder.
    return f"{line} {button.text_option}:<your text>" if button.text_option else line


def render_text(reply: Reply, image_paths: list[str], *, colour: bool = False, numbered: bool = False) -> str:
    """The reply as plain text; ``numbered`` puts [1], [2], … before buttons (the console presses them)."""
    parts: list[str] = []
    if reply.title:
        parts.append(f"\x1b[1m{reply.title}\x1b[0m" if colour else reply.title)
    if reply.text:
        parts.append(reply.text)
    run: list[str] = []  # consecutive short inline fields share one block
    for item in reply.fields:
        if item.inline and "\n" not in item.value:
            run.append(f"{item.name}: {item.value}")
            continue
        if run:
            parts.append("\n".join(run))
            run = []
        parts.append(f"{item.name}:\n{item.value}")
    if run:
        parts.append("\n".join(run))
    if reply.table is not None:
        parts.append(render_table(reply.table))
    if reply.code is not None:
        parts.append(render_code(reply.code, colour))
    if reply.buttons:
        width = max(len(b.label) for b in reply.buttons)
        lines = [f"{b.label.ljust(width)}  → {button_line(b)}" for b in reply.buttons]
        if numbered:
            lines = [f"[{n}] {line}" for n, line in enumerate(lines, 1)]
            lines.append("(type a number to press that button)")
        parts.append("\n".join(f"  {line}" for line in lines))
    parts.extend(f"[image] {path}" for path in image_paths)
    return "\n\n".join(parts)


def save_images(reply: Reply, folder: Path, stem: str) -> list[str]:
    """Write the reply's images into ``folder``; return their paths.

    Each file is created exclusively: a name already taken (another reply in the same second,
    another process sharing the folder) gets a counter (``-2``, ``-3``, …), never overwrites.
    An image with no data (a chart that could not be drawn) is not written.
    """
    images = [image for image in reply.images if image.data]
    if not images:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        name = _SLUG.sub("-", f"{stem}-{image.filename}").strip("-") or "image.png"
        path = _create_exclusive(folder, name, image.data)
        paths.append(str(path))
    return paths


def save_reply_images(reply: Reply, folder: Path, command: str) -> tuple[list[str], str]:
    """Save a reply's images as ``COMMAND-YYYYmmdd-HHMMSS-…`` in ``folder`` (console and ``lmbot ask``).

    Returns the paths and, when the folder cannot be written, one line saying so instead
    of raising: the answer still prints.
    """
    stem = f"{command.lstrip('/')}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return save_images(reply, folder, stem), ""
    except OSError as exc:
        return [], f"lmbot: could not save the chart in {folder}: {exc.strerror or exc}"


def _create_exclusive(folder: Path, name: str, data: bytes) -> Path:
    base, dot, suffix = name.rpartition(".")
    if not dot or not base:
        base, suffix = name, ""
    for n in itertools.count(1):
        path = folder / (name if n == 1 else f"{base}-{n}{'.' + suffix if suffix else ''}")
        try:
            with open(path, "xb") as file:  # "x": fails if the file exists, atomically
                try:
                    file.write(data)
                    file.flush()
                except OSError:  # the disk filled (ENOSPC) or the like: leave no truncated chart behind
                    path.unlink(missing_ok=True)
                    raise
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def render_json(reply: Reply, image_paths: list[str]) -> str:
    body = {
        "ok": not reply.error,
        "title": reply.title,
        "text": reply.text,
        "fields": [{"name": f.name, "value": f.value} for f in reply.fields],
        "table": {"headers": list(reply.table.headers), "rows": [list(r) for r in reply.table.rows]}
        if reply.table
        else None,
        "code": reply.code.plain if reply.code else None,
        "images": image_paths,
        "buttons": [{"label": b.label, "command": button_line(b)} for b in reply.buttons],
        "data": reply.data,
    }
    return json.dumps(body, ensure_ascii=False, default=_plain)
