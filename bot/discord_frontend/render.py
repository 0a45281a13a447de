"""A Reply as Discord messages, within Discord's limits, with no way to ping anyone.

Limits (Discord's documentation): content 2,000 characters; embed title 256,
description 4,096, 25 fields of 1,024, 6,000 characters across an embed.
What does not fit is attached as ``reply.txt`` rather than cut silently.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import discord

from bot.commands import Button, Reply, utf16_length
from bot.render import render_code, render_table, render_text

CONTENT, TITLE, DESCRIPTION, FIELDS, FIELD_NAME, FIELD_VALUE, EMBED_TOTAL = 2000, 256, 4096, 25, 256, 1024, 6000
# Discord's ```ansi blocks know the eight basic foreground colours only.
DISCORD_ANSI = {"gray": 30, "red": 31, "green": 32, "yellow": 33, "blue": 34, "pink": 35, "cyan": 36, "white": 37}


def escape(text: str) -> str:
    """User text made inert: no @everyone, @here, role or user mentions, even if echoed."""
    return discord.utils.escape_mentions(text)


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…" if limit > 0 else ""


def _block(text: str, language: str = "") -> str:
    # A literal ``` inside would end the block early.
    safe = text.replace("```", "`\u200b``")
    return f"```{language}\n{safe}\n```"


BUTTON_PREFIX = "lmbot"
MAX_BUTTONS, BUTTON_LABEL, CUSTOM_ID = 25, 80, 100


def button_id(button: Button) -> str:
    """A button's custom_id: the command it runs, with one option, in Discord's 100 characters."""
    custom_id = f"{BUTTON_PREFIX}|{button.command}|{button.option}|{button.value}"
    if utf16_length(custom_id) > CUSTOM_ID:  # Button.fits keeps this from happening
        raise ValueError(f"button id over {CUSTOM_ID} characters: {custom_id[:40]}…")
    return custom_id


def parse_button_id(custom_id: str) -> tuple[str, dict[str, str]] | None:
    parts = custom_id.split("|", 3)
    if len(parts) != 4 or parts[0] != BUTTON_PREFIX:
        return None
    return parts[1], {parts[2]: parts[3]}


def button_view(buttons: list[Button]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in [b for b in buttons if b.fits][:MAX_BUTTONS]:
        label = clip(escape(button.label), BUTTON_LABEL)
        view.add_item(discord.ui.Button(label=label, custom_id=button_id(button), style=discord.ButtonStyle.secondary))
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


def render_reply(reply: Reply) -> Rendered:
    if reply.error:
        return Rendered(content=clip(escape(reply.text), CONTENT), ephemeral=reply.ephemeral)
    parts = [escape(reply.text)] if reply.text else []
    if reply.table is not None:
        parts.append(_block(escape(render_table(reply.table))))
    if reply.code is not None:
        parts.append(_block(escape(render_code(reply.code, True, DISCORD_ANSI)), "ansi"))
    description = "\n".join(parts)
    title = clip(escape(reply.title or ""), TITLE)
    fields = [(clip(escape(f.name), FIELD_NAME), clip(escape(f.value), FIELD_VALUE), f.inline) for f in reply.fields]
    size = len(title) + len(description) + sum(len(n) + len(v) for n, v, _ in fields)
    files = [
        discord.File(io.BytesIO(i.data), filename=i.filename, description=i.description[:1024]) for i in reply.images
    ]
    if len(description) > DESCRIPTION or len(fields) > FIELDS or size > EMBED_TOTAL:
        # The whole reply, as the console shows it, goes in a file; the embed keeps what fits.
        full = render_text(reply, [i.filename for i in reply.images])
        files.append(discord.File(io.BytesIO(full.encode()), filename="reply.txt"))
        description = clip(escape(reply.text), 1500) + "\n(the full reply is attached as reply.txt)"
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
