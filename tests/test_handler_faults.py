"""What a plugin's handler can do to the bot, in every front end but Discord (issue 25, items 2 and 3):
raise any BaseException, await forever, block its loop. Every command is still answered; a
blocking plugin costs only its own commands and is named in /plugins and /stats. (Discord: the
same handlers in tests/test_discord_safety.py, through the real client and the fake Discord.)
"""

from __future__ import annotations

import _thread
import asyncio
import io
import json
import os
import signal
import threading
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from bot import Reply, Text, command, hookimpl
from bot.frontends.console import Console
from bot.testing import IsolatedApp, make_app


class Release:
    """What a blocked handler waits on; set by the test, never by the clock."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.start = threading.Event()


RELEASE = Release()


@command("raises", "Raises what a careless plugin might", options=[Text("what", "Which exception")])
async def raises(ctx, what: str) -> Reply:  # type: ignore[no-untyped-def]
    kinds: dict[str, BaseException] = {
        "generatorexit": GeneratorExit(),
        "cancelled": asyncio.CancelledError(),
        "exit": SystemExit(1),
        "interrupt": KeyboardInterrupt(),
        "baseexception": BaseException("odd"),
    }
    raise kinds[what]


@command("forever", "Awaits something that never comes")
async def forever(ctx) -> Reply:  # type: ignore[no-untyped-def]
    await asyncio.Event().wait()
    return Reply("never")


@command("blocks", "Blocks its event loop until the test lets it go")
async def blocks(ctx) -> Reply:  # type: ignore[no-untyped-def]
    RELEASE.entered.set()
    RELEASE.gate.wait()  # a blocking wait in an async handler: what time.sleep(12) does, for as long as the test says
    return Reply("let go")


@command("selfsignal", "Sends SIGINT to its own process", options=[Text("how", "Which call")])
async def selfsignal(ctx, how: str) -> Reply:  # type: ignore[no-untyped-def]
    if how == "kill":
        os.kill(os.getpid(), signal.SIGINT)
    elif how == "killpg":
        os.killpg(os.getpgrp(), signal.SIGINT)
    elif how == "to_thread":
        await asyncio.to_thread(os.kill, os.getpid(), signal.SIGINT)
    elif how == "to_thread_wait":  # a handler waiting in to_thread for what never comes
        RELEASE.entered.set()
        await asyncio.to_thread(RELEASE.gate.wait)
    elif how == "raise":
        signal.raise_signal(signal.SIGINT)
    else:
        _thread.interrupt_main()
    return Reply("still here")


@command("waitsthenblocks", "Waits (without blocking) for the test, then blocks its loop")
async def waitsthenblocks(ctx) -> Reply:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(RELEASE.start.wait)
    RELEASE.entered.set()
    RELEASE.gate.wait()
    return Reply("let go")


@command("nested", "Runs /whereis as a card's button does, without a ctx")
async def nested(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return await ctx.app.execute_line("/whereis")


@command("whereis", "Says which loop its model requests would go to")
async def whereis(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return Reply("here", data={"home": id(ctx.home_loop)})


@command("quick", "Answers at once")
async def quick(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return Reply("quick answer")


def _plugin(name: str, *commands: object) -> tuple[types.ModuleType, str]:
    module = types.ModuleType(name)

    def register_commands(register):  # type: ignore[no-untyped-def]
        for cmd in commands:
            register(cmd)

    module.register_commands = hookimpl(register_commands)  # type: ignore[attr-defined]
    return module, name


@pytest.fixture
def release() -> Iterator[Release]:
    RELEASE.gate.clear()
    RELEASE.entered.clear()
    RELEASE.start.clear()
    yield RELEASE
    RELEASE.gate.set()  # never leave a thread blocked after the test


@pytest.fixture
async def app(tmp_path: Path, release: Release) -> AsyncIterator[IsolatedApp]:
    made = make_app(
        _plugin("careless", raises, forever, blocks, selfsignal, waitsthenblocks, nested),
        _plugin("tidy", quick, whereis),
        cache_dir=tmp_path / "cache",
    )
    # A short deadline, so that the abandoned handler's answer comes soon; nothing here times a check.
    made.config = made.config.model_copy(update={"bot": made.config.bot.model_copy(update={"command_timeout_s": 2.0})})
    yield made
    release.gate.set()
    await made.close()


@pytest.mark.parametrize("what", ["generatorexit", "cancelled", "exit", "interrupt", "baseexception"])
async def test_any_base_exception_a_handler_raises_is_answered(app: IsolatedApp, what: str) -> None:
    reply = await app.ask(f"/raises what:{what}")
    assert reply.error and "Something went wrong in /raises (error id" in reply.text
    assert (await app.ask("/quick")).text == "quick answer"  # and the app goes on


async def test_a_handler_that_awaits_forever_gets_the_deadline_answer(app: IsolatedApp) -> None:
    reply = await app.ask("/forever")
    assert reply.error and reply.data["error_kind"] == "CommandTimeout"
    assert reply.text == "/forever took longer than 2 s, so it was stopped. Please try again later."


async def test_a_blocking_handler_costs_only_its_own_plugins_commands(app: IsolatedApp, release: Release) -> None:
    blocked = asyncio.create_task(app.ask("/blocks"))
    await asyncio.to_thread(release.entered.wait)
    # While /blocks holds its plugin's loop, the core's and another plugin's commands answer.
    assert (await app.ask("/quick")).text == "quick answer"
    assert (await app.ask("/help")).title == "Commands"
    # Its own plugin's next command waits behind it, and is answered at its deadline.
    same_plugin = await app.ask("/raises what:exit")
    assert same_plugin.data["error_kind"] == "CommandTimeout"
    # The block was noticed, named, and is shown to the owner while it lasts.
    while "careless" not in app.stalls:  # noqa: ASYNC110 - the watchdog thread records it
        await asyncio.sleep(0.05)
    assert app.stalls["careless"].command == "blocks"  # the command running, not the last one sent
    stats = await app.ask("/stats")
    blocking = next(f for f in stats.fields if f.name == "blocking plugins")
    assert blocking.value.startswith("careless: blocked the event loop once")
    plugins = await app.ask("/plugins")
    assert (
        "stalls" in json.dumps(plugins.data)
        and next(p for p in plugins.data["plugins"] if p["name"] == "careless")["stalls"] == 1
    )
    # An endless block (never released here before the deadline) still answered /blocks itself.
    assert (await blocked).data["error_kind"] == "CommandTimeout"
    release.gate.set()


async def test_the_console_answers_past_a_blocking_handler(app: IsolatedApp, release: Release) -> None:
    console = Console(app)
    out = io.StringIO()
    with redirect_stdout(out):
        blocked = asyncio.create_task(console.answer("/blocks"))
        await asyncio.to_thread(release.entered.wait)
        await console.answer("/quick")
        assert "quick answer" in out.getvalue()
        await blocked
    assert "took longer than 2 s" in out.getvalue()


async def test_a_handler_signalling_its_own_process_is_refused_and_the_bot_runs_on(
    app: IsolatedApp, release: Release
) -> None:
    """os.kill(os.getpid(), SIGINT) in a handler: an error answer, no KeyboardInterrupt in the bot."""
    received: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        for how in ("kill", "killpg", "raise", "interrupt_main", "to_thread"):
            reply = await app.ask(f"/selfsignal how:{how}")
            assert reply.error and "error id" in reply.text, (how, reply.text)
    finally:
        signal.signal(signal.SIGINT, before)
    assert received == []
    assert (await app.ask("/quick")).text == "quick answer"


async def test_a_command_a_handler_runs_keeps_the_front_ends_loop_for_its_model_requests(
    tmp_path: Path, tiny_gpt2: Path
) -> None:
    """A card's "Try it" runs another plugin's command from a plugin's loop: its requests still reach the service."""
    made = make_app("plugins.study", "plugins.nexttoken", cache_dir=tmp_path / "cache", models={"causal_lm": tiny_gpt2})
    try:
        tried = await made.ask("/topic try:language-model")
        direct = await made.ask(made.registry.topics["language-model"].try_command)
        assert not tried.error and not direct.error, (tried.text, direct.text)
        assert tried.data["top"] == direct.data["top"]
    finally:
        await made.close()


async def test_the_stall_names_the_command_running_not_the_last_one_sent(app: IsolatedApp, release: Release) -> None:
    first = asyncio.create_task(app.ask("/waitsthenblocks"))
    assert (await app.ask("/raises what:exit")).data["error_kind"] == "PluginError"  # sent later, ran, done
    release.start.set()  # only now does /waitsthenblocks block the loop
    await asyncio.to_thread(release.entered.wait)
    while "careless" not in app.stalls:  # noqa: ASYNC110 - the watchdog thread records it
        await asyncio.sleep(0.05)
    assert app.stalls["careless"].command == "waitsthenblocks"
    release.gate.set()
    assert (await first).text == "let go"


async def test_a_command_run_without_ctx_from_a_handler_keeps_the_front_ends_loop(app: IsolatedApp) -> None:
    direct = await app.ask("/whereis")
    from_handler = await app.ask("/nested")
    assert direct.data["home"] == from_handler.data["home"] == id(asyncio.get_running_loop())


async def test_a_handler_waiting_in_to_thread_does_not_hold_the_exit(app: IsolatedApp, release: Release) -> None:
    """Its worker is a daemon thread, and close() returns though the call never ends (`lmbot ask` exits)."""
    waiting = asyncio.create_task(app.ask("/selfsignal how:to_thread_wait"))
    await asyncio.to_thread(release.entered.wait)
    workers = [t for t in threading.enumerate() if t.name.startswith("lmbot-plugin-careless-worker")]
    assert workers and all(t.daemon for t in workers)
    await app.close()  # returns while the worker still waits
    assert all(t.is_alive() for t in workers)
    release.gate.set()
    waiting.cancel()
