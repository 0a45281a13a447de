"""What no user, input or plugin can do to the Discord front end (issue 16), end to end.

Button presses share the slash commands' limits; every interaction the bot owns
is answered; one message never repeats a button id; a handler that blocks or
raises any exception cannot delay acknowledgements or stop the bot; echoed
text is inert; tokens never reach the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from bot import Reply, Text, command, hookimpl
from bot.commands import Button, Field, Image, Table
from bot.frontends.discord.redact import REDACTED, RedactSecrets
from bot.frontends.discord.render import escape, escape_mentions, fit, render_reply
from tests.conftest import examples
from tests.discord_harness import Harness, harness_for
from tests.fake_discord import OWNER_ID, Call
from tests.fake_tasks import until

EPHEMERAL = 64
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


class Stop(BaseException):
    """Not an Exception: what a careless plugin might raise."""


@command("sleepy", "Blocks its event loop, as a careless plugin would")
async def sleepy(ctx) -> Reply:  # type: ignore[no-untyped-def]
    SLEEPY.blocking.set()
    SLEEPY.gate.wait(120)  # deliberately blocking, until the test lets go: the bot must stay responsive
    return Reply("woke up")


SLEEPY = types.SimpleNamespace(blocking=threading.Event(), gate=threading.Event())


@command("quits", "Raises SystemExit, KeyboardInterrupt or another BaseException", options=[Text("how", "Which")])
async def quits(ctx, how: str) -> Reply:  # type: ignore[no-untyped-def]
    raise {
        "exit": SystemExit(3),
        "interrupt": KeyboardInterrupt(),
        "other": Stop(),
        "generatorexit": GeneratorExit(),
        "cancelled": asyncio.CancelledError(),
    }[how]


@command("forever", "Awaits something that never comes")
async def forever(ctx) -> Reply:  # type: ignore[no-untyped-def]
    await asyncio.Event().wait()
    return Reply("never")


@command("echo", "Echoes text in every part of a reply", options=[Text("text", "Anything")])
async def echo(ctx, text: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(
        title=f"You said {text}",
        text=f"Run `/echo text:{text}` again, or read this: {text}\n- a bullet of the reply's own",
        fields=[Field(text[:200] or "-", text[:1000] or "-")],
        table=Table(["what you said"], [[text]]),
    )


@command("twins", "Two buttons that run the same command")
async def twins(ctx) -> Reply:  # type: ignore[no-untyped-def]
    # Two byte-fragment tokens can display and extend the prompt alike: their ids would repeat.
    return Reply(
        "Pick one",
        buttons=[
            Button("+ ⟨E6⟩", "echo", "text", "caf\u00e9"),
            Button("+ ⟨E7⟩", "echo", "text", "caf\u00e9"),
            Button("+ ok", "echo", "text", "other"),
        ],
    )


@hookimpl
def register_commands(register):  # type: ignore[no-untyped-def]
    for cmd in (sleepy, quits, echo, twins, forever):
        register(cmd)


PLUGIN = types.SimpleNamespace(register_commands=register_commands)


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, [(PLUGIN, "careless")]):
        yield h


def buttons_of(call: Call) -> list[dict]:
    return [c for row in call.body.get("components", []) for c in row["components"]]


# --------------------------------------------------------------------------- buttons


def model_requests(harness: Harness) -> int:
    assert harness.client is not None
    return sum(row["ok"] for row in harness.client.app.inference.metrics.summary()["tasks"].values())


async def test_button_presses_count_against_the_cooldown(harness: Harness) -> None:
    await harness.start(cooldown_s=60.0)
    asked = (await harness.answer(await harness.fake.interact("nexttoken", {"prompt": "Hello world", "k": 3})))[-1]
    per_command = model_requests(harness)
    assert per_command >= 1
    step = buttons_of(asked)[0]["custom_id"]
    presses = [await harness.fake.interact("", {"custom_id": step}, kind=3, user_id=6001) for _ in range(20)]
    answers = [await harness.answer(token) for token in presses]
    deferred = [a for a in answers if a[0].body == {"type": 5}]
    refused = [a for a in answers if a[0].body["type"] == 4]
    assert len(deferred) == 1 and len(refused) == 19
    assert all(a[0].body["data"]["flags"] == EPHEMERAL and "Slow down" in a[0].body["data"]["content"] for a in refused)
    # The typed command's model requests, and as many again for the one press that went through.
    assert model_requests(harness) == 2 * per_command
    # A press also holds back the same student's typed command, as a typed one would.
    typed = (await harness.answer(await harness.fake.interact("nexttoken", {"prompt": "Hi"}, user_id=6001)))[0]
    assert typed.body["type"] == 4 and "Slow down" in typed.body["data"]["content"]


async def test_button_ids_in_one_message_are_unique(harness: Harness) -> None:
    await harness.start()
    calls = await harness.answer(await harness.fake.interact("twins"))
    # The fake rejects a message whose custom_ids repeat, as Discord does (400, Invalid Form Body).
    assert not harness.fake.rejected
    ids = [b["custom_id"] for b in buttons_of(calls[-1])]
    assert ids == ["lmbot|echo|text|caf\u00e9", "lmbot|echo|text|other"]


def test_renderer_never_repeats_an_id() -> None:
    same = [Button(f"+ {i}", "nexttoken", "prompt", "x") for i in range(30)]
    other = [Button(f"+ y{i}", "nexttoken", "prompt", f"y{i}") for i in range(30)]
    view = render_reply(Reply("hi", buttons=same + other)).view
    assert view is not None
    ids = [item.custom_id for item in view.children]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids)) == 25 and ids[0] == "lmbot|nexttoken|prompt|x"


@pytest.mark.parametrize(
    "custom_id", ["lmbot|help", "lmbot|x", "lmbot", "lmbot|", "lmbot||prompt|x", "lmbot|nexttoken||x", "other|1", ""]
)
async def test_every_button_press_is_answered(harness: Harness, custom_id: str) -> None:
    await harness.start()
    callback = (await harness.answer(await harness.fake.interact("", {"custom_id": custom_id}, kind=3)))[0]
    assert callback.body["type"] == 4 and callback.body["data"]["flags"] == EPHEMERAL
    assert "button" in callback.body["data"]["content"] and len(callback.body["data"]["content"]) < 200


async def test_a_button_for_a_command_that_is_gone_or_an_unknown_option_is_answered(harness: Harness) -> None:
    await harness.start()
    gone = (await harness.answer(await harness.fake.interact("", {"custom_id": "lmbot|nosuch|a|b"}, kind=3)))[0]
    assert gone.body["type"] == 4 and "not available" in gone.body["data"]["content"]
    bad = await harness.answer(await harness.fake.interact("", {"custom_id": "lmbot|help|nosuch|b"}, kind=3))
    assert bad[-1].body["flags"] == EPHEMERAL and "has no option" in bad[-1].body["content"]
    modal = (await harness.answer(await harness.fake.interact("", {"custom_id": "lmbot|x"}, kind=5)))[0]
    assert modal.body["type"] == 4 and modal.body["data"]["flags"] == EPHEMERAL


# --------------------------------------------------------------------------- plugins cannot take the bot down


async def test_a_blocking_handler_cannot_delay_acknowledgements(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """While /sleepy blocks its plugin's loop (for as long as the test holds it), every other
    interaction is acknowledged and answered; then the watchdog records the stall's full length."""
    SLEEPY.blocking.clear()
    SLEEPY.gate.clear()
    await harness.start(cooldown_s=0.0)
    try:
        blocker = await harness.fake.interact("sleepy", user_id=7001)
        assert await asyncio.to_thread(SLEEPY.blocking.wait, 120)  # the handler is blocking its loop now
        blocked_at = time.monotonic()
        others = [await harness.fake.interact(name, user_id=7002 + i) for i, name in enumerate(["help", "plugins"])]
        others.append(await harness.fake.interact("", {"custom_id": "lmbot|x"}, kind=3, user_id=7010))
        # Acknowledged and answered while the handler still blocks: the plugin's own loop is blocked,
        # not the gateway's or the loop other commands run on (issue 25). Before, each waited it out.
        answered = [(await asyncio.wait_for(harness.answer(token), 120))[-1] for token in others]
        assert all(any(t in c.path and "callback" in c.path for c in harness.fake.calls) for t in others)
        assert not any(blocker in c.path and "webhooks" in c.path for c in harness.fake.calls)
        # The watchdog names the command and its plugin in the log while the stall goes on.
        await asyncio.wait_for(
            until(lambda: warned(caplog, "/sleepy (plugin careless) has blocked its event loop")), 120
        )
        await asyncio.sleep(2.0)  # makes the stall clearly longer than it was at the warning
    finally:
        SLEEPY.gate.set()
    held_s = time.monotonic() - blocked_at
    blocker_answer = (await harness.answer(blocker))[-1]
    assert blocker_answer.body["embeds"][0]["description"] == "woke up"
    assert all(a.at < blocker_answer.at for a in answered), "an unrelated answer waited for the blocking handler"
    # Once the loop runs again, the stall's full length is recorded, and /plugins shows it.
    await asyncio.wait_for(until(lambda: warned(caplog, "/sleepy (plugin careless) blocked its event loop for")), 120)
    listing = (await harness.answer(await harness.fake.interact("plugins", user_id=OWNER_ID)))[-1]
    shown = listing.body["embeds"][0]["description"] + "".join(data.decode() for _, data in listing.files)
    row = next(line for line in shown.splitlines() if line.startswith("careless"))
    assert "blocked the event loop once" in row and "/sleepy" in row
    seconds = float(re.search(r"longest (\d+\.\d) s", row).group(1))  # type: ignore[union-attr]
    # At least as long as the test held it, less the watchdog's probe interval (0.25 s) and rounding.
    assert seconds >= held_s - 0.35, (seconds, held_s)


def warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("how", ["exit", "interrupt", "other", "generatorexit", "cancelled"])
async def test_a_handler_raising_any_base_exception_is_answered_and_the_bot_keeps_running(
    harness: Harness, how: str
) -> None:
    await harness.start()
    calls = await harness.answer(await harness.fake.interact("quits", {"how": how}))
    assert "error id" in calls[-1].body["content"] and calls[-1].body["flags"] == EPHEMERAL
    assert harness.task is not None and not harness.task.done()
    assert (await harness.answer(await harness.fake.interact("help", user_id=7100)))[-1].body["embeds"]
    assert await harness.stop() == 0


# --------------------------------------------------------------------------- echoed text

MASKED_LINK = re.compile(r"(?<!\\)\[[^\]\n]*\]\(")
FENCE = "```"


def outside_code(text: str) -> str:
    """The parts Discord renders as markdown: fenced blocks and inline spans removed (Discord's own rules)."""
    text = re.sub(r"```(?:[a-z0-9_+\-.#]+?\n)?\n*[^\n][\s\S]*?\n*```", " ", text)
    return re.sub(r"(?<!\\)(`+)([\s\S]*?[^`])\1(?!`)", " ", text)


def assert_inert(text: str) -> None:
    plain = outside_code(text)
    assert not MASKED_LINK.search(plain), plain
    for line in plain.splitlines():
        assert not re.match(r"\s*(#|-#|>)", line), line  # headings, subtext, quotes
    assert not re.search(r"(?<!\\)(\*\*|__|~~|\|\|)", plain), plain  # bold, underline, strike, spoiler
    assert not any(c in text for c in BIDI)


ATTACKS = [
    "[click me](https://evil.example/login)",
    "# Big heading\n## another\n-# small print\n> quoted\n>>> all quoted",
    "**bold** __under__ ~~gone~~ ||secret|| *it* _it_",
    "x````y",
    "` [a](https://evil.example) `",
    "\\[still](https://evil.example)",
    "a\u202eevil\u202c b\u2066c\u2069 d\u200fe",
    "@everyone <@&123> <@456> @here",
    "```\n[a](https://evil.example)\n```",
]


@pytest.mark.parametrize("text", ATTACKS)
async def test_echoed_text_is_inert_in_every_part_of_a_public_reply(harness: Harness, text: str) -> None:
    await harness.start()
    followup = (await harness.answer(await harness.fake.interact("echo", {"text": text})))[-1]
    assert not any(c in json.dumps(followup.body, ensure_ascii=False) for c in BIDI)
    if "embeds" not in followup.body:  # the input was refused (direction overrides are): the refusal is inert too
        assert followup.body["flags"] == EPHEMERAL
        assert_inert(followup.body["content"])
        return
    embed = followup.body["embeds"][0]
    for part in [embed["title"], embed["description"], *(f[k] for f in embed["fields"] for k in ("name", "value"))]:
        assert_inert(part)
    description = embed["description"]
    # The table's block still closes where it should: nothing in it can end the fence early.
    _, block, after = description.rsplit(FENCE, 2)
    assert after == "" and block.startswith("\nwhat you said") and "``" not in block
    # The reply's own formatting still works: its bullet, and its command in backticks.
    assert "\n- a bullet of the reply's own" in description
    if text == ATTACKS[0]:
        assert f"`/echo text:{text}`" in description
    assert "@everyone" not in json.dumps(followup.body) and "<@456>" not in description


def test_bidi_controls_from_any_source_never_reach_discord() -> None:
    # Input checks may refuse them in typed text, but a model can generate them and a plugin can add them.
    odd = "x" + BIDI + "y"
    reply = Reply(
        title=odd,
        text=odd,
        fields=[Field(odd, odd)],
        table=Table(["token", "p"], [[odd, "0.5"], ["plain", "0.5"]]),
        images=[Image("chart.png", b"\x89PNG", description=odd)],
        buttons=[Button(odd, "echo", "text", "safe"), Button("+ z", "echo", "text", odd)],
    )
    rendered = render_reply(reply)
    assert rendered.embed is not None and rendered.view is not None
    shown = json.dumps(rendered.embed.to_dict(), ensure_ascii=False)
    labels = [item.label for item in rendered.view.children]  # type: ignore[attr-defined]
    ids = [item.custom_id for item in rendered.view.children]  # type: ignore[attr-defined]
    for text in [shown, *labels, *(f.description or "" for f in rendered.files)]:
        assert not any(c in text for c in BIDI), text
        assert "⟨U+202E⟩" in text  # shown as a visible mark, not dropped silently
    assert ids == ["lmbot|echo|text|safe"]  # a button that would run with them is left out
    rows = [line for line in rendered.embed.description.split(FENCE)[1].splitlines() if line.endswith("0.5")]  # type: ignore[union-attr]
    assert len(rows) == 2 and len({row.rindex("0.5") for row in rows}) == 1  # the marks keep columns aligned


def test_long_echoes_are_cut_before_escaping_so_no_span_is_cut_open() -> None:
    text = "`[a](https://evil.example)` " * 400
    for limit in (50, 256, 1024, 4096):
        out = fit(text, limit)
        assert len(out) <= limit
        assert_inert(out)
    rendered = render_reply(Reply(title=text, text=text, fields=[Field(text, text)]))
    assert rendered.embed is not None
    assert_inert(rendered.embed.title or "") and len(rendered.embed) <= 6000


def test_escaping_does_not_change_what_a_reader_sees() -> None:
    # Discord shows "\\[" as "[": the reader sees the user's text, only nothing renders.
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").disable(["code", "lheading", "hr", "html_inline", "html_block"])
    text = "Tom's *idea*: [x](https://evil.example) <https://a.b> # not a heading ~~ || _x_ \\ end"
    tokens = md.parseInline(escape(text))[0].children
    assert [t.type for t in tokens] == ["text"]
    assert tokens[0].content == text


# Text a user might type, markdown and all. No backticks or bare URLs: CommonMark, the
# independent reader used here, reads those differently from Discord (tested above by example).
fragments = st.sampled_from([*"abc XY12\n*_~|[]()<>#-!:./\\@", "everyone", "123", *BIDI])
user_text = st.lists(fragments, max_size=40).map("".join)


@hypothesis_settings(max_examples=examples(300), deadline=None)
@given(user_text)
def test_no_markdown_in_escaped_text_renders(text: str) -> None:
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").enable("strikethrough")
    md.disable(["code", "lheading", "hr", "html_inline", "html_block", "list"])
    shown = escape(text)
    assert not any(c in shown for c in BIDI)
    live = {"link_open", "em_open", "strong_open", "s_open", "heading_open", "blockquote_open", "image"}
    tokens = md.parse(shown)
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in (t.children or [])}
    assert not kinds & live, (text, shown, kinds & live)
    # What a reader sees is the text (bidi controls shown as marks, mentions broken by a zero-width space).
    seen = "".join(c.content for t in tokens for c in (t.children or []) if c.type in ("text", "code_inline"))
    expected = escape_mentions(re.sub(f"[{BIDI}]", lambda m: f"⟨U+{ord(m.group()):04X}⟩", text))
    assert re.sub(r"\s", "", seen) == re.sub(r"\s", "", expected)


# --------------------------------------------------------------------------- secrets in the log


async def test_tokens_are_never_logged_at_debug(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.start(bot={"log_level": "DEBUG"})
    token = await harness.fake.interact("help")
    await harness.answer(token)
    await harness.stop()
    logged = caplog.text + "".join(str(r.msg) for r in caplog.records)
    assert "WebSocket Event" in logged and "/callback" in logged  # discord.py did log the events and URLs
    assert token not in logged and "fake-token" not in logged
    assert REDACTED in logged


def test_redaction_covers_urls_payloads_and_bot_tokens() -> None:
    redactor = RedactSecrets()
    redactor.add_secret("my-own-secret")
    record = logging.LogRecord(
        "discord.http",
        logging.DEBUG,
        __file__,
        1,
        "%s %s with %s has returned %s; event %s; %s",
        (
            "POST",
            "https://discord.com/api/v10/interactions/123/aW50ZXJhY3Rpb24tdG9rZW4/callback?with_response=1",
            None,
            200,
            {"t": "INTERACTION_CREATE", "d": {"token": "aW50ZXJhY3Rpb24tdG9rZW4", "id": "1"}},
            "webhooks/1100/abc.def-ghi/messages/@original and my-own-secret and "
            "MTAxMjM0NTY3ODkwMTIzNDU2.GaBcDe.abcdefghijklmnopqrstuvwxyz012345",
        ),
        None,
    )
    assert redactor.filter(record)
    message = record.getMessage()
    for secret in ("aW50ZXJhY3Rpb24tdG9rZW4", "abc.def-ghi", "my-own-secret", "GaBcDe"):
        assert secret not in message
    assert "/interactions/123/<redacted>/callback" in message and "webhooks/1100/<redacted>/messages" in message


async def test_a_handler_that_awaits_forever_gets_the_deadline_answer_on_discord(harness: Harness) -> None:
    await harness.start(bot={"command_timeout_s": 2.0})
    calls = await harness.answer(await harness.fake.interact("forever"))
    assert calls[-1].body["content"] == "/forever took longer than 2 s, so it was stopped. Please try again later."
    assert (await harness.answer(await harness.fake.interact("help", user_id=7100)))[-1].body["embeds"]


@pytest.mark.parametrize("how", ["exit", "interrupt", "other", "generatorexit", "cancelled"])
async def test_any_base_exception_is_contained_for_every_front_end(tmp_path: Path, how: str) -> None:
    # The console and `lmbot ask` run commands through App.execute too.
    from bot.app import App
    from tests.conftest import make_config

    app = App(make_config(tmp_path), builtins=False, entry_points=False, extra_plugins=[(PLUGIN, "careless")])
    reply = await app.execute_line(f"/quits how:{how}")
    assert reply.error and "error id" in reply.text and reply.data["error_kind"] == "PluginError"
    assert not app.running  # nothing is left marked as running


@hypothesis_settings(max_examples=examples(500), deadline=None)
@given(st.text(alphabet="`a\n\\ ", max_size=30))
def test_code_spans_are_found_as_discords_own_rule_finds_them(text: str) -> None:
    # Discord's inline-code rule, as a regex (it backtracks: quadratic on runs of backticks, so the
    # renderer finds spans another way in linear time); both must agree on every span.
    from bot.frontends.discord.render import BACKTICKS, _Runs

    discord_rule = re.compile(r"(`+)([\s\S]*?[^`])\1(?!`)")
    runs = _Runs(text)
    for run in BACKTICKS.finditer(text):
        for start in range(run.start(), run.end()):
            expected = discord_rule.match(text, start)
            assert runs.inline_code_end(start, run.end() - start) == (expected.end() if expected else None)
