"""Faults around the bot that nobody had tried (issue 25, item 7): a slow client on the warm
lmbot's socket, the disk filling while a chart is saved, PostgreSQL stopped mid-quiz and
started again, the metrics port taken. Each is answered in words and the bot runs on.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import socket
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import bot.render
from bot.app import App
from bot.commands import Image, Reply, command
from bot.config import parse_config
from bot.frontends import ask
from bot.frontends.console import Console
from bot.hookspecs import hookimpl
from bot.inference.metrics import ServiceMetrics
from tests import study_fixtures
from tests.conftest import make_config
from tests.postgres import PostgresServer, postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.test_scores import guild_context

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 4096


async def until(check: Callable[[], object]) -> None:
    while not check():  # noqa: ASYNC110 - polling what another task or thread shows
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- the warm lmbot's socket


class EchoApp:
    """An app that answers every line at once (what the warm lmbot serves is not the point here)."""

    inference = type("NoPreload", (), {})()
    registry = type("NoPlugins", (), {"environment": set()})()  # no plugin declares a variable

    async def execute_line(self, line: str) -> Reply:
        return Reply(text=f"answered {line}")

    async def close(self) -> None:
        pass


async def test_a_slow_client_with_a_partial_line_holds_up_no_ask_and_not_the_idle_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(ask, "_LINE_WAIT_S", 0.5)
    config = parse_config({"inference": {"cache_dir": str(tmp_path / "cache")}})
    paths = ask.warm_paths(config)
    assert paths is not None
    server = ask.WarmServer(config, "stamp", keep_alive=1.0, paths=paths)
    running = asyncio.create_task(server.run(EchoApp(), []))  # type: ignore[arg-type]
    await until(paths.socket.exists)
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(paths.socket))
    slow.sendall(b'{"op": "ask", "line": "/he')  # and never the rest, nor the end of the line
    try:
        request = ask.AskRequest("/help", as_json=False, out_dir=str(tmp_path), colour=False)
        answer = await asyncio.to_thread(ask.ask_warm, config, request, paths, "stamp")
        assert answer is not None and answer.stdout.startswith("answered /help")
        # The slow client is cut off, and the warm lmbot still stops once idle, with it connected.
        await asyncio.wait_for(running, 60)
        assert slow.recv(1) == b""  # closed by the server
    finally:
        slow.close()
        running.cancel()


# --------------------------------------------------------------------------- the disk fills


@command("picture", "Answers with a chart")
async def picture(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return Reply("the chart shows it", images=[Image("chart.png", PNG)])


@hookimpl
def register_commands(register):  # type: ignore[no-untyped-def]
    register(picture)


PICTURE_PLUGIN = types.SimpleNamespace(register_commands=register_commands)


class FullDisk(io.RawIOBase):
    """A file on a full disk: it opens, and the first write fails with ENOSPC."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_full_disk_while_a_chart_is_saved_answers_without_it_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_open = open

    def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "x" in mode:
            real_open(path, mode, *args, **kwargs).close()  # the file is made, as on a real full disk
            return FullDisk()
        return real_open(path, mode, *args, **kwargs)

    app = App(
        make_config(tmp_path / "cache"), builtins=False, entry_points=False, extra_plugins=[(PICTURE_PLUGIN, "pic")]
    )
    out = tmp_path / "out"
    app.config = app.config.model_copy(update={"bot": app.config.bot.model_copy(update={"output_dir": str(out)})})
    try:
        monkeypatch.setattr(bot.render, "open", full_open, raising=False)
        await Console(app).answer("/picture")
    finally:
        await app.close()
    printed = capsys.readouterr()
    assert "the chart shows it" in printed.out
    assert printed.err.strip() == f"lmbot: could not save the chart in {out}: No space left on device"
    assert list(out.iterdir()) == []  # no truncated chart left behind


# --------------------------------------------------------------------------- PostgreSQL restarted


@pytest.fixture
async def quiz_app(cache_dir: Path, postgres_url: str) -> AsyncIterator[App]:  # noqa: F811
    app = App(
        make_config(cache_dir, plugin_options={"study": {"quiz_db": postgres_url}}),
        extra_plugins=[(study_fixtures, "study-fixtures")],
    )
    yield app
    await app.close()


async def answer_once(app: App) -> Reply:
    ctx = guild_context(app)
    asked = await app.execute("quiz", {"topic": study_fixtures.MULTI}, ctx)
    assert not asked.error and asked.buttons
    return await app.execute("quiz", {"answer": asked.buttons[0].value}, ctx)


async def test_postgresql_stopped_mid_quiz_then_started_again(
    quiz_app: App,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    assert (await answer_once(quiz_app)).data["saved"] is True
    postgres_server.stop("fast")  # as an operator restarting PostgreSQL does (committed data kept)
    try:
        down = await answer_once(quiz_app)
        # The verdict still comes, with one line in words saying the score was not kept.
        assert not down.error and down.data["saved"] is False
        assert down.text.splitlines()[-1].startswith("Your answer was not saved: the score database is")
    finally:
        assert postgres_server.resume() is None
    # The server is back: the next answers are saved again, with no restart of the bot.
    assert (await answer_once(quiz_app)).data["saved"] is True


# --------------------------------------------------------------------------- the metrics port


def test_a_taken_metrics_port_is_one_log_line_and_the_service_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert ServiceMetrics().serve(port) is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [f"metrics are off: cannot listen on 127.0.0.1:{port} (Address already in use)"]
