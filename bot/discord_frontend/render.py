"""A Reply as Discord messages, within Discord's limits, with no way to ping anyone.

Limits (Discord's documentation): content 2,000 characters; embed title 256,
description 4,096, 25 fields of 1,024, 6,000 characters across an embed.
What does not fit is attached as ``reply.txt`` rather than cut silently.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import discord

from bot.commands import Reply
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


@dataclass
class Rendered:
    content: str | None = None
    embed: discord.Embed | None = None
    files: list[discord.File] = field(default_factory=list)
    ephemeral: bool = False

    def kwargs(self) -> dict:
        out: dict = {"allowed_mentions": discord.AllowedMentions.none(), "ephemeral": self.ephemeral}
        if self.content:
            out["content"] = self.content
        if self.embed is not None:
            out["embed"] = self.embed
        if self.files:
            out["files"] = self.files
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
    return Rendered(embed=embed, files=files, ephemeral=reply.ephemeral)
