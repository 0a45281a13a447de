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
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    files = [
        discord.File(io.BytesIO(i.data), filename=i.filename, description=i.description[:1024]) for i in reply.images
    ]
    embed = discord.Embed(title=clip(escape(reply.title or ""), TITLE) or None, colour=discord.Colour.blurple())
    budget = EMBED_TOTAL - len(embed.title or "")
    overflow = len(description) > DESCRIPTION
    for item in reply.fields[:FIELDS]:
        name, value = clip(escape(item.name), FIELD_NAME), clip(escape(item.value), FIELD_VALUE)
        budget -= len(name) + len(value)
        embed.add_field(name=name, value=value, inline=item.inline)
    overflow |= len(reply.fields) > FIELDS or budget < min(len(description), DESCRIPTION)
    if overflow:
        # The whole reply, as the console shows it, goes in a file; the embed keeps what fits.
        full = render_text(reply, [i.filename for i in reply.images])
        files.append(discord.File(io.BytesIO(full.encode()), filename="reply.txt"))
        description = clip(escape(reply.text), max(0, min(DESCRIPTION, budget) - 40)) + "\n(full reply attached)"
    embed.description = description or None
    if reply.images:
        embed.set_image(url=f"attachment://{reply.images[0].filename}")
    return Rendered(embed=embed, files=files, ephemeral=reply.ephemeral)
