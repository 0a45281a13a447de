"""A reply's later message (``Reply.followup``, a /round's results) has a deadline, as commands do.

Through the real discord.py client and the fake Discord: a later message that never comes is
replaced, after ``bot.command_timeout_s`` (plus the wait it announced), by a short honest line in
the same conversation; one that raises is a short failure; the first answer stays in place.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import Reply, Text, command, hookimpl
from tests.discord_harness import Harness, harness_for
from tests.fake_discord import Call

ABANDONED = threading.Event()  # set on the plugin's loop when the abandoned later message is cancelled


@command("later", "Answers now and promises a later message", options=[Text("how", "What the later message does")])
async def later(ctx, how: str) -> Reply:  # type: ignore[no-untyped-def]
    async def never() -> Reply:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ABANDONED.set()
            raise
        return Reply("never")

    async def raises() -> Reply:
        raise GeneratorExit

    return Reply("Round started.", followup={"never": never, "raises": raises}[how])


@hookimpl
def register_commands(register):  # type: ignore[no-untyped-def]
    register(later)


PLUGIN = types.SimpleNamespace(register_commands=register_commands)


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, [(PLUGIN, "promises")]):
        yield h


def posted(calls: list[Call], token: str) -> list[Call]:
    return [c for c in calls if token in c.path and c.method == "POST" and "webhooks" in c.path]


async def test_a_later_message_that_never_comes_is_answered_at_its_deadline(harness: Harness) -> None:
    await harness.start(cooldown_s=0.0, bot={"command_timeout_s": 1.0})
    token = await harness.fake.interact("later", {"how": "never"})
    await harness.fake.wait_for(lambda calls: len(posted(calls, token)) == 2, timeout=60)
    first, then = posted(harness.fake.calls, token)
    assert "Round started." in str(first.body)
    said = str(then.body)
    assert "The rest of this /later took longer than 1 s, so it was stopped" in said
    assert not then.body.get("flags")  # said where the results would have been: in the channel
    assert await asyncio.to_thread(ABANDONED.wait, 30)  # and cancelled on its plugin's loop


async def test_a_later_message_that_raises_is_a_short_failure(harness: Harness) -> None:
    await harness.start(cooldown_s=0.0)
    token = await harness.fake.interact("later", {"how": "raises"})
    await harness.fake.wait_for(lambda calls: len(posted(calls, token)) == 2, timeout=60)
    assert "Something went wrong" in str(posted(harness.fake.calls, token)[1].body)
