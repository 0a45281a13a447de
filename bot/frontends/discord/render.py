"""A Reply as Discord messages, within Discord's limits, with no way to ping anyone.

Limits (Discord's documentation): content 2,000 characters; embed title 256,
description 4,096, 25 fields of 1,024, 6,000 characters across an embed.
What does not fit is attached as ``reply.txt`` rather than cut silently.

Echoed text is inert. Plugins mix user text into their own formatting, so the
renderer cannot tell the two apart; instead it reads the finished text the way
Discord's markdown does and neutralises what would be live: outside code spans
every markdown character is backslash-escaped (Discord shows ``\\[`` as ``[``,
so the reply shows what was typed but no masked link, heading, quote, spoiler or
emphasis can form); inside fenced blocks no two backticks touch, so no run can
close the fence; bidirectional controls are shown as ``⟨U+202E⟩`` everywhere
instead of reordering the text around them.
"""

from __future__ import annotations

import bisect
import io
import re
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.commands import Button, Reply, Table, utf16_length
from bot.render import render_code, render_table, render_text

CONTENT, TITLE, DESCRIPTION, FIELDS, FIELD_NAME, FIELD_VALUE, EMBED_TOTAL = 2000, 256, 4096, 25, 256, 1024, 6000
# Discord's ```ansi blocks know the eight basic foreground colours only.
DISCORD_ANSI = {"gray": 30, "red": 31, "green": 32, "yellow": 33, "blue": 34, "pink": 35, "cyan": 36, "white": 37}

# Embeddings, isolates, overrides and the implicit marks: each can reorder the text around it.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# @everyone, @here and every user / role id form (Discord's own helper only knows 17-20 digit ids).
MENTION = re.compile(r"@(everyone|here|[!&]?[0-9]+)")
# Markdown that Discord renders in message content, embed titles, descriptions and fields.
# Bullets ("- ") and numbered lines stay live: the reply's own lists, harmless from a user.
MARKDOWN_CHARS = frozenset("\\*_~|`[]<>#")
# A backslash before any ASCII punctuation is Discord's escape: the pair shows the character
# (so an escaped backtick in the text opens no code span).
ESCAPABLE = re.compile(r"\\[!-/:-@\[-`{-~]")
# What Discord links as a bare URL: kept verbatim (an escape inside would change the link).
# It stops at brackets and backticks, which are escaped like any others (a link may break, never form).
URL = re.compile(r"https?://[^\s<\[\]`]+[^<.,:;\"')\[\]`\s]")
# Discord's code rules: a fenced block (optional language line), and an inline span, which is
# /^(`+)([\s\S]*?[^`])\1(?!`)/ (matched by _inline_code_end in linear time: that regex backtracks).
CODE_BLOCK = re.compile(r"```(?:[a-z0-9_+\-.#]+?\n)?\n*[^\n][\s\S]*?\n*```")
BACKTICKS = re.compile("`+")


class _Runs:
    """Where each maximal run of backticks starts, by its length."""

    def __init__(self, text: str) -> None:
        self.starts: dict[int, list[int]] = {}
        for run in BACKTICKS.finditer(text):
            self.starts.setdefault(len(run.group()), []).append(run.start())

    def inline_code_end(self, i: int, opening: int) -> int | None:
        """The end of the inline span opened by ``opening`` backticks at ``i``, or None.

        As Discord's greedy ``(`+)`` backtracks: the longest delimiter d <= opening for
        which a later run of exactly d backticks exists; the span ends with the first one.
        """
        for d in range(opening, 0, -1):
            starts = self.starts.get(d, [])
            k = bisect.bisect_left(starts, i + opening)  # runs after the opening one
            if k < len(starts):
                return starts[k] + d
        return None


def show_bidi(text: str) -> str:
    """Bidirectional controls as visible, inert ``⟨U+202E⟩`` marks."""
    return BIDI_CONTROLS.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)


def escape_mentions(text: str) -> str:
    """No @everyone, @here, role or user mention can form, even if echoed."""
    return MENTION.sub("@\u200b\\1", text)


def _escape_plain(text: str) -> str:
    """Markdown outside code made literal, backslashes included (so the reader sees what was typed).

    Bare URLs are kept as they are, as discord.py's ``escape_markdown`` keeps them:
    Discord links them whole, and an escape inside would change the link.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if url := URL.match(text, i):
            out.append(url.group())
            i = url.end()
        else:
            out.append("\\" + text[i] if text[i] in MARKDOWN_CHARS else text[i])
            i += 1
    return "".join(out)


def escape(text: str) -> str:
    """Text for a rendered field (content, title, description, field): inert, with code spans kept.

    The text is split as Discord splits it: fenced blocks and inline code spans
    stay as written (nothing renders inside them); everything else, including
    any backtick that did not form a span, is escaped. A span therefore means
    the same to Discord as it did here, however the user's text was mixed in.
    """
    text = show_bidi(escape_mentions(text))
    runs = _Runs(text)
    out: list[str] = []
    plain_from = i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and ESCAPABLE.match(text, i):
            i += 2  # an escape pair is plain text, and an escaped backtick opens nothing
            continue
        if char == "`":
            run_end = BACKTICKS.match(text, i).end()  # type: ignore[union-attr]
            block = CODE_BLOCK.match(text, i)
            end = block.end() if block else runs.inline_code_end(i, run_end - i)
            if end is not None:
                out.append(_escape_plain(text[plain_from:i]))
                out.append(text[i:end])
                plain_from = i = end
                continue
            i = run_end  # a run that opens no span: escaped as plain text
            continue
        i += 1
    out.append(_escape_plain(text[plain_from:]))
    return "".join(out)


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…" if limit > 0 else ""


def fit(text: str, limit: int) -> str:
    """``escape(text)`` within ``limit`` characters, cut before escaping so that no span is cut open."""
    escaped = escape(text)
    if len(escaped) <= limit:
        return escaped
    # The longest prefix whose escaped form (with "…") fits; escaping never shortens text.
    low, high = 0, min(len(text), limit)
    while low < high:
        middle = (low + high + 1) // 2
        if len(escape(text[:middle] + "…")) <= limit:
            low = middle
        else:
            high = middle - 1
    return escape(text[:low] + "…") if limit > 0 else ""


def literal(text: str) -> str:
    """Text Discord shows without markdown (button labels, alt text): mentions and bidi made inert."""
    return show_bidi(escape_mentions(text))


def _block(text: str, language: str = "") -> str:
    # No two backticks touch, so no run of them (``` or ````…) can close the fence early.
    safe = re.sub(r"`(?=`)", "`\u200b", literal(text))
    return f"```{language}\n{safe}\n```"


BUTTON_PREFIX = "lmbot"
MAX_BUTTONS, BUTTON_LABEL, CUSTOM_ID = 25, 80, 100


class MalformedButton(ValueError):
    """A custom_id with the bot's prefix that does not say which command to run."""


def button_id(button: Button) -> str:
    """A button's custom_id: the command it runs, with one option, in Discord's 100 characters.

    A button that asks for text (``Button.text_option``) says which option the text fills in
    its prefix, ``lmbot:guess|...``; the form it opens has the plain id, ``lmbot|...``.
    """
    prefix = f"{BUTTON_PREFIX}:{button.text_option}" if button.text_option else BUTTON_PREFIX
    custom_id = f"{prefix}|{button.command}|{button.option}|{button.value}"
    if utf16_length(custom_id) > CUSTOM_ID:  # Button.fits keeps this from happening
        raise ValueError(f"button id over {CUSTOM_ID} characters: {custom_id[:40]}…")
    return custom_id


def parse_button_id(custom_id: str) -> tuple[str, dict[str, str]] | None:
    """The command and option text a button runs; None for an id that is not the bot's.

    Raises :class:`MalformedButton` for an id with the bot's prefix that names no
    command and option (``lmbot|help``): it is the bot's, so it must be answered.
    """
    parts = custom_id.split("|", 3)
    if parts[0] != BUTTON_PREFIX and not parts[0].startswith(BUTTON_PREFIX + ":"):
        return None
    if len(parts) != 4 or not parts[1] or not parts[2]:
        raise MalformedButton(custom_id)
    return parts[1], {parts[2]: parts[3]}


def asked_text_option(custom_id: str) -> str:
    """The option a button's form fills with the presser's text ("" for an ordinary button)."""
    prefix = custom_id.split("|", 1)[0]
    return prefix.removeprefix(BUTTON_PREFIX + ":") if prefix.startswith(BUTTON_PREFIX + ":") else ""


def form_id(custom_id: str) -> str:
    """The id of the form a text-asking button opens: its own, without the text option."""
    return BUTTON_PREFIX + "|" + custom_id.split("|", 1)[1]


def form_values(components: list[dict]) -> dict[str, str]:
    """The text boxes of a submitted form, by custom_id (rows and labels are looked into)."""
    values: dict[str, str] = {}
    for component in components:
        if component.get("type") == 4 and isinstance(component.get("value"), str):
            values[str(component.get("custom_id"))] = component["value"]
        children = list(component.get("components") or [])
        if isinstance(component.get("component"), dict):  # a Label wraps one component
            children.append(component["component"])
        values.update(form_values(children))
    return values


def text_form(custom_id: str, title: str, label: str, max_length: int) -> discord.ui.Modal:
    """The form a text-asking button opens: one required text box, for the option the id names."""
    modal = discord.ui.Modal(title=clip(literal(title), 45), custom_id=form_id(custom_id), timeout=None)
    box: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label=clip(literal(label), 45),
        custom_id=asked_text_option(custom_id),
        max_length=max(1, min(max_length, 4000)),
        required=True,
    )
    modal.add_item(box)
    return modal


def button_view(buttons: list[Button]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    seen: set[str] = set()
    for button in buttons:
        # A value with bidi controls is left out rather than run with them changed.
        if not button.fits or BIDI_CONTROLS.search(button.value) or len(seen) == MAX_BUTTONS:
            continue
        custom_id = button_id(button)
        if custom_id in seen:
            # Discord rejects a message whose ids repeat; a repeat would run the same command anyway.
            continue
        seen.add(custom_id)
        label = clip(literal(button.label), BUTTON_LABEL)
        view.add_item(discord.ui.Button(label=label, custom_id=custom_id, style=discord.ButtonStyle.secondary))
    return view


@dataclass
class Rendered:
    content: str | None = None
    embed: discord.Embed | None = None
    files: list[discord.File] = field(default_factory=list)
    view: discord.ui.View | None = None
    ephemeral: bool = False

    def kwargs(self) -> dict:
        out: dict = {"allowed_mentions": discord.AllowedMentions.none(), "ephemeral": self.ephemeral}
        if self.content:
            out["content"] = self.content
        if self.embed is not None:
            out["embed"] = self.embed
        if self.files:
            out["files"] = self.files
        if self.view is not None:
            out["view"] = self.view
        return out

    def edit_kwargs(self) -> dict:
        """The same message as :meth:`kwargs`, as an edit of the "thinking…" message (which cannot be private)."""
        out = self.kwargs()
        del out["ephemeral"]
        if "files" in out:
            out["attachments"] = out.pop("files")
        return out


def render_reply(reply: Reply) -> Rendered:
    if reply.error:
        return Rendered(content=fit(reply.text, CONTENT), ephemeral=reply.ephemeral)
    parts = [escape(reply.text)] if reply.text else []
    if reply.table is not None:
        # Marks for bidi controls before the columns are measured, so that they stay aligned.
        table = reply.table
        shown = Table(
            [literal(h) for h in table.headers], [[literal(str(c)) for c in r] for r in table.rows], table.align
        )
        parts.append(_block(render_table(shown)))
    if reply.code is not None:
        parts.append(_block(render_code(reply.code, True, DISCORD_ANSI), "ansi"))
    description = "\n".join(parts)
    title = fit(reply.title or "", TITLE)
    fields = [(fit(f.name, FIELD_NAME), fit(f.value, FIELD_VALUE), f.inline) for f in reply.fields]
    size = len(title) + len(description) + sum(len(n) + len(v) for n, v, _ in fields)
    files = [
        discord.File(io.BytesIO(i.data), filename=i.filename, description=clip(literal(i.description), 1024))
        for i in reply.images
    ]
    if len(description) > DESCRIPTION or len(fields) > FIELDS or size > EMBED_TOTAL:
        # The whole reply, as the console shows it, goes in a file; the embed keeps what fits.
        full = show_bidi(render_text(reply, [i.filename for i in reply.images]))
        files.append(discord.File(io.BytesIO(full.encode()), filename="reply.txt"))
        description = fit(reply.text, 1500) + "\n(the full reply is attached as reply.txt)"
        budget = EMBED_TOTAL - len(title) - len(description)
        kept = []
        for name, value, inline in fields[:FIELDS]:
            budget -= len(name) + len(value)
            if budget < 0:
                break
            kept.append((name, value, inline))
        fields = kept
    embed = discord.Embed(title=title or None, description=description or None, colour=discord.Colour.blurple())
    for name, value, inline in fields:
        embed.add_field(name=name, value=value, inline=inline)
    if reply.images:
        embed.set_image(url=f"attachment://{reply.images[0].filename}")
    view = button_view(reply.buttons) if reply.buttons else None
    return Rendered(embed=embed, files=files, view=view, ephemeral=reply.ephemeral)
