"""The README's /help transcript is what /help prints, so the docs cannot drift from the commands."""

from __future__ import annotations

from pathlib import Path

from bot.render import render_text

README = Path(__file__).resolve().parent.parent / "README.md"


async def test_readme_help_transcript_matches_help(app_factory) -> None:  # type: ignore[no-untyped-def]
    shown = README.read_text(encoding="utf-8").split('$ lmbot ask "/help"\n', 1)[1].split("\n$ ", 1)[0]
    reply = await app_factory().execute_line("/help")
    assert shown.strip() == render_text(reply, []).strip()
