"""A whole /round through the real discord.py client against the fake Discord: five players press
Guess, type into the form, the starter ends the round, one results message shows every guess, and
the server's leaderboard has their points."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.discord_harness import Harness, harness_for
from tests.fake_discord import Call

EPHEMERAL = 64
MODAL = 9
STARTER = 2001
PLAYERS = {2001: "Paris", 2002: "the", 2003: "a city", 2004: "@everyone", 2005: "Lyon"}


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, []):
        yield h


def custom_ids(call: Call) -> dict[str, str]:
    """label -> custom_id of a message's buttons."""
    return {c["label"]: c["custom_id"] for row in call.body.get("components", []) for c in row["components"]}


def text_boxes(form: dict[str, Any]) -> list[dict[str, Any]]:
    """The text inputs of a form as discord.py sends it (in action rows or labels)."""
    found = []
    for component in form["components"]:
        wrapped = [component["component"]] if "component" in component else []  # a Label wraps one
        for child in [*component.get("components", []), *wrapped]:
            if child["type"] == 4:
                found.append(child)
    return found


async def guess(harness: Harness, guess_id: str, user: int, text: str) -> Call:
    """Press Guess, fill in the form Discord shows, submit it; the bot's answer to the submit."""
    fake = harness.fake
    press = await fake.interact("", {"custom_id": guess_id}, kind=3, user_id=user)
    await fake.wait_for(lambda calls: any(press in c.path and "callback" in c.path for c in calls))
    (opened,) = [c for c in fake.calls if press in c.path]
    assert opened.body["type"] == MODAL
    form = opened.body["data"]
    (box,) = text_boxes(form)
    assert box["label"] == "Your guess for the next word" and box["required"] is True
    filled = [{"type": 1, "components": [{"type": 4, "custom_id": box["custom_id"], "value": text}]}]
    submit = await fake.interact("", {"custom_id": form["custom_id"], "components": filled}, kind=5, user_id=user)
    return (await harness.answer(submit))[-1]


async def test_five_players_play_a_round_on_discord(harness: Harness) -> None:
    await harness.start(cooldown_s=0.0)
    fake = harness.fake
    start = await fake.interact("round", {"prompt": "The capital of France is", "seconds": 300}, user_id=STARTER)
    posted = (await harness.answer(start))[-1]
    assert "The capital of France is" in posted.body["embeds"][0]["description"]
    buttons = custom_ids(posted)
    assert set(buttons) == {"Guess", "End round"}

    for user, text in PLAYERS.items():
        taken = await guess(harness, buttons["Guess"], user, text)
        assert taken.body["flags"] == EPHEMERAL  # each player sees only their own guess
        assert "is in" in taken.body["embeds"][0]["description"]
    again = await guess(harness, buttons["Guess"], 2002, "Berlin")
    assert again.body["flags"] == EPHEMERAL and "first guess counts" in again.body["content"]
    # Nothing about a guess was posted publicly before the results.
    public = [c for c in fake.calls if start in c.path and c.method == "POST" and "webhooks" in c.path]
    assert len(public) == 1

    not_starter = await fake.interact("", {"custom_id": buttons["End round"]}, kind=3, user_id=2003)
    assert "started this round" in (await harness.answer(not_starter))[-1].body["content"]
    end = await fake.interact("", {"custom_id": buttons["End round"]}, kind=3, user_id=STARTER)
    await harness.answer(end)

    def results_posted(calls: list[Call]) -> bool:
        return len([c for c in calls if start in c.path and c.method == "POST" and "webhooks" in c.path]) == 2

    await fake.wait_for(results_posted)
    results = [c for c in fake.calls if start in c.path and c.method == "POST" and "webhooks" in c.path][-1]
    assert results.body["allowed_mentions"] == {"parse": []} and not results.body.get("flags")
    embed = results.body["embeds"][0]
    assert embed["title"] == "Round over: the results"
    table = embed["description"]
    for user, text in PLAYERS.items():
        assert f"student{user}" in table
        shown = text.replace("@everyone", "@\u200beveryone")
        assert shown in table
    assert "@everyone" not in str(results.body).replace("@\u200beveryone", "")
    assert any(f["name"] == "how points work" for f in embed["fields"])
    assert len(str(embed)) < 6000 and len(table) <= 4096

    board = await fake.interact("leaderboard", {"game": "round", "period": "all"}, user_id=2002)
    shown_board = (await harness.answer(board))[-1].body["embeds"][0]["description"]
    assert all(f"student{user}" in shown_board for user in PLAYERS)
    mine = await fake.interact("leaderboard", {"mine": True}, user_id=2002)
    standing = (await harness.answer(mine))[-1]
    assert standing.body["flags"] == EPHEMERAL and "of 5" in standing.body["embeds"][0]["description"]
