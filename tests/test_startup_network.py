"""`lmbot run` / `lmbot sync` when Discord cannot be reached: one line per try, backoff, exit 75.

The real discord.py client is pointed at a closed port on 127.0.0.1, at a server that
drops every connection, and at one that drops the first ones and then is Discord
.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import discord
import pytest
import yarl

from bot.app import App
from bot.frontends.discord.client import INVITE_SCOPES, LmbotClient, invite_url
from bot.frontends.discord.runner import EXIT_UNREACHABLE, run_bot, sync_now
from tests.conftest import make_config
from tests.fake_discord import APP_ID, LoopbackOnlyResolver


def loopback_client(app: App) -> LmbotClient:
    return LmbotClient(app, connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()), guild_ready_timeout=0.05)


def no_wait() -> Iterator[float]:
    while True:
        yield 0.0


class Dropper:
    """A TCP server on 127.0.0.1 that closes the first ``drops`` connections, then forwards to ``target``."""

    def __init__(self, drops: int, target: int | None = None) -> None:
        self.drops, self.target = drops, target
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Dropper:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections <= self.drops or self.target is None:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def api_at(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def point(port: int) -> None:
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")

    return point


@pytest.fixture
async def app(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[App]:
    app = App(make_config(cache_dir, {"causal_lm": tiny_gpt2}))
    yield app
    await app.close()


def lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


async def test_a_closed_port_is_one_line_per_try_then_exit_75(app: App, api_at, capsys, held_port) -> None:  # type: ignore[no-untyped-def]
    api_at(held_port())
    assert await run_bot(app, "abc.def.ghi", attempts=3, delays=no_wait(), new_client=loopback_client) == 75
    err = lines(capsys.readouterr().err)
    assert len(err) == 3, err
    assert all(line.startswith("lmbot: cannot reach Discord") for line in err)
    assert "Connect" in err[0] and "trying again in 0 s" in err[0]
    assert err[-1].endswith(f"gave up after 3 tries (exit {EXIT_UNREACHABLE})")


async def test_a_server_that_drops_connections_is_retried(app: App, api_at, capsys) -> None:  # type: ignore[no-untyped-def]
    async with Dropper(drops=10**6) as dropper:
        api_at(dropper.port)
        assert await run_bot(app, "abc.def.ghi", attempts=4, delays=no_wait(), new_client=loopback_client) == 75
    err = lines(capsys.readouterr().err)
    assert len(err) == 4 and "Traceback" not in "\n".join(err), err
    assert any(why in err[0] for why in ("ServerDisconnectedError", "Connection reset by peer")), err[0]
    assert dropper.connections >= 4  # each try really went out


async def test_lmbot_sync_retries_and_gives_up_in_one_line(app: App, api_at, capsys) -> None:  # type: ignore[no-untyped-def]
    async with Dropper(drops=10**6) as dropper:
        api_at(dropper.port)
        assert await sync_now(app, "abc.def.ghi", 123, attempts=2, delays=no_wait()) == 75
    err = lines(capsys.readouterr().err)
    assert len(err) == 2 and "to upload the commands" in err[0] and "gave up after 2 tries" in err[1]


def test_the_invite_link_asks_for_the_bot_and_its_commands() -> None:
    url = yarl.URL(invite_url(APP_ID))
    assert url.host == "discord.com" and url.query["client_id"] == str(APP_ID)
    assert set(url.query["scope"].split()) == set(INVITE_SCOPES) == {"bot", "applications.commands"}
    assert url.query["permissions"] == "0"  # interaction answers need no channel permission


def cli(args: list[str], cwd: Path, port: int) -> subprocess.CompletedProcess[str]:
    """The real `lmbot`, its discord.py pointed at 127.0.0.1:port (tests/discord_process.py)."""
    env = dict(os.environ, LMBOT_DISCORD_TOKEN="abc.def.ghi", PYTHONIOENCODING="utf-8")
    api, gateway = f"http://127.0.0.1:{port}/api/v10", f"ws://127.0.0.1:{port}/gateway"
    return subprocess.run(
        [sys.executable, "-m", "tests.discord_process", api, gateway, *args],
        cwd=cwd,
        env=dict(env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_lmbot_run_and_sync_without_discord_say_so_in_one_line(
    tmp_path: Path, cache_dir: Path, held_port: Callable[[], int]
) -> None:
    port = held_port()
    done = cli(["run", "--attempts", "1"], tmp_path, port)
    assert done.returncode == 75, done.stderr[-3000:]
    err = [line for line in lines(done.stderr) if line.startswith("lmbot: ")]  # the rest are INFO log lines
    assert "Traceback" not in done.stderr
    summary, warning, gave_up = err  # the start-up summary, the defaults warning, the one network line
    assert summary.startswith("lmbot: lmbot ") and "no config.toml: defaults" in summary and "plugins loaded" in summary
    assert warning.startswith("lmbot: warning: no config.toml in ")
    assert (
        gave_up.startswith("lmbot: cannot reach Discord (ClientConnectorError") and "gave up after 1 tries" in gave_up
    )
    (tmp_path / "config.toml").write_text(f'[inference]\ncache_dir = "{cache_dir}"\n', encoding="utf-8")
    done = cli(["sync", "--guild", "123", "--attempts", "1"], tmp_path, port)
    assert done.returncode == 75 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert [line for line in lines(done.stderr) if line.startswith("lmbot: ")] == [lines(done.stderr)[-1]]


async def test_an_outage_at_start_up_that_ends_logs_in_and_answers(  # type: ignore[no-untyped-def]
    app: App, api_at, monkeypatch, capsys, held_port
) -> None:
    """Discord unreachable (a closed port), then dropping connections, then up: the bot logs in and answers.

    The tries move on when the bot asks for its next pause (``delays``), not by the clock; every
    wait is bounded.
    """
    import discord.gateway

    from tests.fake_discord import FakeDiscord

    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    async with Dropper(drops=10**6) as dropper:
        api_at(held_port())  # the first try: nothing listens
        phases = iter([dropper.port, fake.port])  # then a server that drops connections, then Discord

        def delays() -> Iterator[float]:
            for port in phases:
                api_at(port)
                yield 0.0
            raise AssertionError("a third failed try: Discord was up")

        bot = asyncio.create_task(run_bot(app, "abc.def.ghi", delays=delays(), new_client=loopback_client))
        ready = asyncio.create_task(fake.ready.wait())
        try:
            done, _ = await asyncio.wait({bot, ready}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
            assert ready in done, f"the bot never identified: {bot.result() if bot.done() else 'still trying'}"
            token = await fake.interact("help")
            await fake.wait_for(lambda calls: any(token in c.path and "webhooks" in c.path for c in calls), timeout=60)
            answer = [c for c in fake.calls if token in c.path and "webhooks" in c.path][-1]
            assert "/nexttoken" in str(answer.body)
        finally:
            ready.cancel()
            bot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(bot, 60)
            await fake.stop()
    assert dropper.connections >= 1  # the second try really met the dropping server
    err = lines(capsys.readouterr().err)
    tries = [line for line in err if line.startswith("lmbot: cannot reach Discord")]
    assert len(tries) == 2 and "Connect" in tries[0] and "trying again in 0 s" in tries[1], err
    assert any(why in tries[1] for why in ("ServerDisconnectedError", "Connection reset by peer")), tries[1]
    assert "Traceback" not in "\n".join(err)
