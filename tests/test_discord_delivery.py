"""An answer is never dropped while Discord fails (issue 25, item 4), through the real discord.py
client and the fake Discord: follow-ups that meet 5xx storms or dropped connections are tried
again, then the "thinking…" message is edited, and past the interaction token's window the
answer is posted in the channel; the student is never left on "thinking…".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord.webhook.async_
import pytest

from tests.discord_harness import Harness, harness_for
from tests.fake_discord import CHANNEL_ID, Call

EPHEMERAL = 64


BACKOFF_SCALE = 0.01


class ShortBackoff:
    """discord.py's webhook module as it sees ``asyncio``, with its pauses a hundred times shorter.

    discord.py tries a webhook call 5 times on a 5xx, pausing 1, 3, 5, 7 and 9 s: 25 s of
    wall clock per failed try of ours. What these tests prove is which calls are made, in
    what order, and where the answer ends up; the pauses' lengths are discord.py's own.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(delay * BACKOFF_SCALE, result)


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(discord.webhook.async_, "asyncio", ShortBackoff())
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, []):
        yield h


async def start(harness: Harness, window_s: float = 600.0) -> None:
    client = await harness.start(cooldown_s=0.0)
    # Short pauses between tries: the same schedule as in service, at test speed.
    client.retry_pause_s, client.retry_pause_max_s, client.followup_window_s = 0.05, 0.2, window_s


def delivered(calls: list[Call], token: str) -> list[Call]:
    """The webhook calls for ``token`` that carried the /help answer and were not failed on purpose."""
    return [c for c in calls if token in c.path and c.method in ("POST", "PATCH") and (c.body or {}).get("embeds")]


@pytest.mark.parametrize("storm", [[503] * 6, ["drop"] * 3, [503, "drop", 503, 503, "drop", 503, 503]])
async def test_a_followup_that_keeps_failing_is_delivered_in_the_end(harness: Harness, storm: list[int | str]) -> None:
    await start(harness)
    harness.fake.fail_webhooks = list(storm)
    token = await harness.fake.interact("help")
    calls = await harness.fake.wait_for(lambda calls: len(delivered(calls, token)) > len(storm))
    tries = delivered(calls, token)
    assert len(tries) == len(storm) + 1 and not harness.fake.fail_webhooks
    assert tries[-1].body["embeds"][0]["title"] == "Commands"
    # Follow-ups and edits of the "thinking…" message take turns: a storm on one endpoint may spare the other.
    assert {c.method for c in tries} == ({"POST", "PATCH"} if len(storm) > 1 else {"POST"})
    assert not harness.fake.calls_to("/channels/")


async def test_past_the_tokens_window_the_answer_is_posted_in_the_channel(harness: Harness) -> None:
    await start(harness, window_s=1.0)
    harness.fake.fail_webhooks = [503] * 10_000
    token = await harness.fake.interact("help", user_id=2345)
    calls = await harness.fake.wait_for(lambda calls: any("/channels/" in c.path for c in calls))
    posted = next(c for c in calls if "/channels/" in c.path)
    assert posted.path == f"/api/v10/channels/{CHANNEL_ID}/messages"
    assert posted.body["embeds"][0]["title"] == "Commands"
    assert posted.body["content"].startswith("For student2345 (Discord would not take this as a reply)")
    assert posted.body["allowed_mentions"]["parse"] == []  # names the student, pings nobody
    assert len(delivered(calls, token)) >= 2  # tried the interaction's own ways first


async def test_a_channel_that_fails_too_is_tried_again(harness: Harness) -> None:
    await start(harness, window_s=0.5)
    harness.fake.fail_webhooks = [503] * 10_000
    harness.fake.fail_channel = [503, "drop"]
    await harness.fake.interact("help")
    calls = await harness.fake.wait_for(lambda calls: len([c for c in calls if "/channels/" in c.path]) == 3)
    assert [c for c in calls if "/channels/" in c.path][-1].body["embeds"][0]["title"] == "Commands"


async def test_a_private_answer_is_retried_but_never_made_public(harness: Harness) -> None:
    await start(harness)
    harness.fake.fail_webhooks = [503, 503]
    token = await harness.fake.interact("help", {"command": "nosuchcommand"})
    calls = await harness.fake.wait_for(
        lambda calls: (
            any(token in c.path and c.method == "POST" and c.body.get("flags") == EPHEMERAL for c in calls)
            and len([c for c in calls if token in c.path and c.method == "POST" and "webhooks" in c.path]) == 3
        )
    )
    answers = [c for c in calls if token in c.path and "webhooks" in c.path and c.method != "DELETE"]
    assert [c.method for c in answers] == ["POST", "POST", "POST"]  # never an edit of the public message
    assert all(c.body["flags"] == EPHEMERAL and "There is no /nosuchcommand" in c.body["content"] for c in answers)


async def test_the_thinking_message_of_a_private_answer_goes_only_once_the_answer_arrived(harness: Harness) -> None:
    await start(harness)
    harness.fake.fail_webhooks = [503, 503]
    token = await harness.fake.interact("help", {"command": "nosuchcommand"})
    calls = await harness.fake.wait_for(lambda calls: any(token in c.path and c.method == "DELETE" for c in calls))
    ours = [c for c in calls if token in c.path and "webhooks" in c.path]
    assert [(c.method, c.failed) for c in ours] == [("POST", True), ("POST", True), ("POST", False), ("DELETE", False)]


# discord.py itself tries a webhook call 5 times on a 5xx: five 503s fail one try of ours.
@pytest.mark.parametrize("storm", [[503] * 5])
async def test_a_private_answer_past_the_window_leaves_a_public_note_naming_no_detail(
    harness: Harness, storm: list[int | str]
) -> None:
    """No window to retry in: the "thinking…" message says the answer was private and to run it again."""
    await start(harness, window_s=0.0)
    harness.fake.fail_webhooks = list(storm)  # 5: the follow-up fails; 10: the edit that shows the note too
    token = await harness.fake.interact("help", {"command": "nosuchcommand"})
    note = "Your answer to /help is private and Discord would not deliver it; please run /help again."

    def shows_note(c: Call) -> bool:
        return not c.failed and isinstance(c.body, dict) and note in (c.body.get("content") or "")

    calls = await harness.fake.wait_for(lambda calls: any(shows_note(c) for c in calls))
    shown = next(c for c in calls if shows_note(c))
    if len(storm) == 5:
        assert shown.method == "PATCH" and token in shown.path and shown.body["content"] == note
    else:
        assert shown.path == f"/api/v10/channels/{CHANNEL_ID}/messages"
    assert not (shown.body.get("flags") or 0) & EPHEMERAL and not shown.body.get("embeds")
    public = [c for c in calls if c.method == "PATCH" or "/channels/" in c.path]
    assert public and not any("nosuchcommand" in json.dumps(c.body) for c in public)
    assert not [c for c in calls if token in c.path and c.method == "DELETE"]  # the note stays


@pytest.mark.parametrize("storm", [[503] * 5 + [404]])
async def test_an_interaction_gone_mid_storm_is_answered_in_the_channel(harness: Harness, storm: list[int]) -> None:
    """After a failed try, a 404 (the token expired, or someone deleted "thinking…") sends the answer to the channel."""
    await start(harness)
    harness.fake.fail_webhooks = list(storm)
    await harness.fake.interact("help", user_id=2346)
    calls = await harness.fake.wait_for(lambda calls: any("/channels/" in c.path for c in calls))
    posted = next(c for c in calls if "/channels/" in c.path)
    assert posted.body["embeds"][0]["title"] == "Commands"
    assert posted.body["content"].startswith("For student2346 (Discord would not take this as a reply)")
