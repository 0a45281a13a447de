"""The real discord.py client against a fake Discord on 127.0.0.1, end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot import Reply, Text, command, hookimpl
from bot.app import App
from bot.commands import Button, Field
from bot.frontends.discord.client import LmbotClient
from bot.frontends.discord.render import render_reply
from bot.frontends.discord.runner import run_bot, sync_now
from tests.conftest import make_config
from tests.discord_harness import Harness, harness_for
from tests.fake_discord import APP_ID, GUILD_ID, OWNER_ID, LoopbackOnlyResolver
from tests.fake_tasks import Slow, logged, until

EPHEMERAL = 64


@command("boom", "Raises inside its handler")
async def boom(ctx) -> Reply:  # type: ignore[no-untyped-def]
    raise RuntimeError("internal detail that must not reach Discord")


@command("slow", "Takes a while in the model worker", options=[Text("text", "Anything")])
async def slow(ctx, text: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(await ctx.inference.submit(Slow(text, seconds=1.0)))


@command(
    "pick", "Has a long choice list", options=[Text("word", "A word", choices=[f"word{i:02d}" for i in range(40)])]
)
async def pick(ctx, word: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(word)


@hookimpl
def register_commands(register):  # type: ignore[no-untyped-def]
    register(boom)
    register(slow)
    register(pick)


TEST_PLUGIN = types.SimpleNamespace(register_commands=register_commands)


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, [(TEST_PLUGIN, "testing")]):
        yield h


async def test_commands_are_synced_once_and_again_only_when_changed(harness: Harness) -> None:
    await harness.start(guild_ids=[GUILD_ID])
    puts = harness.fake.calls_to("/commands", "PUT")
    assert [c.path for c in puts] == [
        f"/api/v10/applications/{APP_ID}/commands",
        f"/api/v10/applications/{APP_ID}/guilds/{GUILD_ID}/commands",
    ]
    synced = {c["name"]: c for c in puts[0].body}
    assert {"help", "nexttoken", "tokenize", "mask", "ngram", "compare"} <= set(synced)
    k = next(o for o in synced["nexttoken"]["options"] if o["name"] == "k")
    assert (k["type"], k["min_value"], k["max_value"], k["required"]) == (4, 1, 25, False)
    encoding = next(o for o in synced["tokenize"]["options"] if o["name"] == "encoding")
    assert [c["value"] for c in encoding["choices"]][:2] == ["cl100k_base", "o200k_base"]
    assert next(o for o in synced["pick"]["options"])["autocomplete"] is True  # 40 choices > 25
    assert await harness.stop() == 0

    await harness.start(guild_ids=[GUILD_ID])  # same commands: nothing uploaded
    assert len(harness.fake.calls_to("/commands", "PUT")) == 2
    await harness.stop()

    await harness.start(plugins=[], guild_ids=[GUILD_ID])  # one plugin fewer: uploaded again
    assert len(harness.fake.calls_to("/commands", "PUT")) == 4


async def test_slash_command_is_deferred_then_answered_with_embed_and_chart(harness: Harness) -> None:
    await harness.start()
    token = await harness.fake.interact("nexttoken", {"prompt": "The capital of France is", "k": 3})
    calls = await harness.answer(token)
    callback, followup = calls[0], calls[-1]
    assert callback.body == {"type": 5}  # defer: "thinking"
    assert followup.body["allowed_mentions"] == {"parse": []}
    embed = followup.body["embeds"][0]
    assert embed["title"].startswith("Next token (tiny-gpt2 · fp32, ")
    assert "probability" in embed["description"]
    assert embed["image"]["url"] == "attachment://nexttoken.png"
    assert followup.files[0][0] == "nexttoken.png" and followup.files[0][1].startswith(b"\x89PNG")


async def test_mentions_in_user_text_never_ping(harness: Harness) -> None:
    await harness.start()
    token = await harness.fake.interact("maskrecipe", {"sentence": "@everyone meet <@&123> and <@456> @here"})
    followup = (await harness.answer(token))[-1]
    assert followup.body["allowed_mentions"] == {"parse": []}
    text = str(followup.body)
    for raw in ("@everyone", "@here", "<@&123>", "<@456>"):
        assert raw not in text


async def test_cooldown_answers_privately(harness: Harness) -> None:
    await harness.start(cooldown_s=60.0)
    first = await harness.fake.interact("help", {}, user_id=3001)
    await harness.answer(first)
    second = await harness.fake.interact("help", {}, user_id=3001)
    callback = (await harness.answer(second))[0]
    assert callback.body["type"] == 4
    assert callback.body["data"]["flags"] == EPHEMERAL
    assert "Slow down" in callback.body["data"]["content"]
    other_user = await harness.fake.interact("help", {}, user_id=3002)
    assert (await harness.answer(other_user))[0].body == {"type": 5}


async def test_owner_only_command_is_refused_to_others(harness: Harness) -> None:
    await harness.start()
    refused = (await harness.answer(await harness.fake.interact("stats", {}, user_id=4001)))[0]
    assert refused.body["type"] == 4 and refused.body["data"]["flags"] == EPHEMERAL
    assert "owners only" in refused.body["data"]["content"]
    allowed = await harness.answer(await harness.fake.interact("stats", {}, user_id=OWNER_ID))
    assert allowed[0].body == {"type": 5}
    assert allowed[-1].body["embeds"][0]["title"] == "Inference stats"


async def test_owner_sync_command_forces_an_upload(harness: Harness) -> None:
    await harness.start()
    before = len(harness.fake.calls_to("/commands", "PUT"))
    calls = await harness.answer(await harness.fake.interact("sync", {}, user_id=OWNER_ID))
    assert "Published" in calls[-1].body["embeds"][0]["description"]
    assert len(harness.fake.calls_to("/commands", "PUT")) == before + 1


async def test_crashing_plugin_answers_with_an_error_id(harness: Harness) -> None:
    await harness.start()
    calls = await harness.answer(await harness.fake.interact("boom"))
    content = calls[-1].body["content"]
    assert "error id" in content and "internal detail" not in content
    # Other commands still work.
    assert (await harness.answer(await harness.fake.interact("help")))[-1].body["embeds"]


async def test_bad_input_gets_an_ephemeral_answer(harness: Harness) -> None:
    await harness.start()
    token = await harness.fake.interact("nexttoken", {"prompt": "   "})
    # "thinking…" is dropped only once the private answer has arrived (never a silent gap).
    await harness.fake.wait_for(lambda calls: any(token in c.path and c.method == "DELETE" for c in calls))
    calls = [c for c in harness.fake.calls if token in c.path]
    assert [c.method for c in calls] == ["POST", "POST", "DELETE"]  # defer, private answer, drop "thinking"
    assert calls[1].body["flags"] == EPHEMERAL
    assert "`prompt` is empty" in calls[1].body["content"]


async def test_busy_queue_answers_at_once(harness: Harness, tmp_path: Path) -> None:
    client = await harness.start(inference={"max_queue": 1, "max_batch_size": 1})
    log = str(tmp_path / "calls.log")
    # The inference client lives on the command loop: requests reach it there, as handlers' do.
    inference = client.app.inference
    running = [asyncio.create_task(client.command_loop.run(inference.submit(Slow("a", seconds=2.0, log=log))))]
    await until(logged(log, "start a"))  # in the worker
    running.append(asyncio.create_task(client.command_loop.run(inference.submit(Slow("b", seconds=0.1)))))
    await until(lambda: inference.core.waiting == 1)  # queued: the queue is full
    callback = (await harness.answer(await harness.fake.interact("nexttoken", {"prompt": "hi"})))[0]
    assert callback.body["type"] == 4 and callback.body["data"]["flags"] == EPHEMERAL
    assert "busy right now; try again in" in callback.body["data"]["content"]
    await asyncio.gather(*running)


async def test_other_bots_are_ignored(harness: Harness) -> None:
    await harness.start()
    token = await harness.fake.interact("help", bot=True)
    # A person's interaction sent after it: once that one is answered, the bot's would have had its
    # acknowledgement long before (it arrived first and needs none of the command's work).
    await harness.answer(await harness.fake.interact("help", user_id=2100))
    assert not [c for c in harness.fake.calls if token in c.path]


async def test_autocomplete_offers_matching_choices(harness: Harness) -> None:
    await harness.start()
    token = await harness.fake.interact("pick", {"word": "word1"}, kind=4, focused="word")
    await harness.fake.wait_for(lambda calls: any(token in c.path for c in calls))
    callback = next(c for c in harness.fake.calls if token in c.path)
    assert callback.body["type"] == 8
    assert [c["value"] for c in callback.body["data"]["choices"]] == [f"word1{i}" for i in range(10)]


async def test_shutdown_answers_in_flight_interactions_then_exits_zero(harness: Harness) -> None:
    # A generous grace period: on a busy machine the first request also starts the worker.
    await harness.start(shutdown_grace_s=120.0)
    token = await harness.fake.interact("slow", {"text": "still answered"})
    await harness.fake.wait_for(lambda calls: any(token in c.path for c in calls))
    assert await harness.stop() == 0
    calls = [c for c in harness.fake.calls if token in c.path]
    assert calls[-1].body["embeds"][0]["description"] == "done still answered"
    assert harness.client is not None and harness.client.is_closed()


async def test_sigterm_shuts_down_cleanly(harness: Harness) -> None:
    await harness.start()
    os.kill(os.getpid(), signal.SIGTERM)  # run_bot's handler turns this into client.shutdown()
    assert harness.task is not None
    assert await asyncio.wait_for(harness.task, 30) == 0
    assert harness.client is not None and harness.client.is_closed()


async def test_rejected_token_is_one_line_and_exit_2(harness: Harness, capsys) -> None:  # type: ignore[no-untyped-def]
    harness.fake.reject_token = True
    app = App(make_config(harness.cache, harness.models))
    client = LmbotClient(app, connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()))
    assert await run_bot(app, "wrong", client) == 2
    assert capsys.readouterr().err.strip() == "lmbot: Discord rejected the token in $LMBOT_DISCORD_TOKEN."


def test_missing_token_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LMBOT_DISCORD_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lmbot: no Discord token: put the bot's token in the LMBOT_DISCORD_TOKEN")
    assert len(done.stderr.strip().splitlines()) == 1


async def test_lmbot_sync_forces_an_upload_to_one_guild(harness: Harness, capsys) -> None:  # type: ignore[no-untyped-def]
    app = App(make_config(harness.cache, harness.models))
    original = LmbotClient.__init__

    def loopback_only(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()), **kwargs)

    LmbotClient.__init__ = loopback_only  # type: ignore[method-assign]
    try:
        assert await sync_now(app, "fake-token", 777) == 0
        assert await sync_now(app, "fake-token", 777) == 0  # forced: uploads even when unchanged
    finally:
        LmbotClient.__init__ = original  # type: ignore[method-assign]
    puts = harness.fake.calls_to(f"/applications/{APP_ID}/guilds/777/commands", "PUT")
    assert len(puts) == 2
    assert not harness.fake.calls_to(f"/applications/{APP_ID}/commands", "PUT")
    assert "synced" in capsys.readouterr().out


def test_long_replies_fit_discord_and_overflow_goes_to_a_file() -> None:
    reply = Reply(
        title="T" * 400,
        text="x" * 5000,
        fields=[Field(f"f{i}", "v" * 2000) for i in range(30)],
    )
    rendered = render_reply(reply)
    embed = rendered.embed
    assert embed is not None
    assert len(embed.title or "") <= 256 and len(embed.description or "") <= 4096
    assert len(embed.fields) <= 25 and all(len(f.value or "") <= 1024 for f in embed.fields)
    assert len(embed) <= 6000
    assert [f.filename for f in rendered.files] == ["reply.txt"]
    error = render_reply(Reply.failure("@everyone " + "y" * 3000))
    assert error.content is not None and len(error.content) <= 2000 and "@everyone" not in error.content


async def test_quiz_buttons_round_trip(harness: Harness) -> None:
    await harness.start()
    asked = (await harness.answer(await harness.fake.interact("quiz", {"topic": "nsp"})))[-1]
    buttons = [c for row in asked.body["components"] for c in row["components"]]
    assert len(buttons) == 4 and all(b["custom_id"].startswith("lmbot|quiz|answer|nsp.") for b in buttons)
    token = await harness.fake.interact("", {"custom_id": buttons[0]["custom_id"]}, kind=3, user_id=5005)
    calls = await harness.answer(token)
    assert calls[0].body == {"type": 5}
    assert calls[-1].body["embeds"][0]["title"].startswith("student5005: ")
    # The answer offers what to do next; "Scores" carries a true/false option as text.
    after = {c["label"]: c["custom_id"] for row in calls[-1].body["components"] for c in row["components"]}
    assert after["Next question"] == "lmbot|quiz|topic|nsp"
    # Presses share the slash commands' per-user cooldown: another student asks for the scores.
    board = await harness.answer(await harness.fake.interact("", {"custom_id": after["Scores"]}, kind=3, user_id=5006))
    assert board[-1].body["embeds"][0]["title"] == "Quiz leaderboard"


async def test_nexttoken_step_buttons_round_trip(harness: Harness) -> None:
    await harness.start()
    asked = (await harness.answer(await harness.fake.interact("nexttoken", {"prompt": "Hello world", "k": 3})))[-1]
    buttons = [c for row in asked.body["components"] for c in row["components"]]
    assert len(buttons) == 3
    assert all(b["custom_id"].startswith("lmbot|nexttoken|prompt|Hello world") for b in buttons)
    assert all(len(b["custom_id"]) <= 100 and b["label"].startswith("+ ") for b in buttons)
    token = await harness.fake.interact("", {"custom_id": buttons[0]["custom_id"]}, kind=3)
    stepped = (await harness.answer(token))[-1]
    prompt = buttons[0]["custom_id"].split("|", 3)[3]
    assert stepped.body["embeds"][0]["title"].startswith("Next token")
    # The chart's description (its title) names the prompt the button ran: one token longer.
    assert any(prompt[-50:] in a.get("description", "") for a in stepped.body["attachments"])


def test_a_button_whose_command_does_not_fit_is_left_out() -> None:
    fits = Button("+ a", "nexttoken", "prompt", "x" * 60)
    too_long = Button("+ b", "nexttoken", "prompt", "x" * 200)
    view = render_reply(Reply("hi", buttons=[fits, too_long])).view
    assert view is not None
    assert [item.custom_id for item in view.children] == [f"lmbot|nexttoken|prompt|{'x' * 60}"]  # type: ignore[attr-defined]
    # Discord counts UTF-16 units: 40 emoji are 40 Python characters but 80 units.
    assert Button("+", "nexttoken", "prompt", "x" * 70).fits
    assert not Button("+", "nexttoken", "prompt", "🙂" * 40).fits
