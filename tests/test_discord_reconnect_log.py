"""A gateway dropped mid-run is one log line per reconnect, not discord.py's traceback.

The real discord.py client runs against tests/fake_discord.py; the fake goes away mid-run (its
server closes, as an outage does), so discord.py's reconnect fails and it logs ``Attempting a
reconnect …`` (discord.client, or discord.shard for the sharded client) with, left to itself,
the whole traceback of the connection error at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.frontends.discord.runner import OneLineReconnects
from tests.discord_harness import Harness, harness_for


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, []):
        yield h


class _Seen(logging.Handler):
    """Sets ``event`` when a WARNING-or-worse record whose message starts with ``text`` reaches it."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and record.getMessage().startswith(self.text):
            self.event.set()


async def test_a_gateway_dropped_mid_run_is_one_line_and_the_traceback_only_at_debug(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.start()
    seen = _Seen("Attempting a reconnect")
    logging.getLogger("discord").addHandler(seen)  # after the loggers' filters: sees what the log shows
    try:
        runner, harness.fake.runner = harness.fake.runner, None  # down for the rest of the test
        assert runner is not None
        for site in list(runner.sites):
            await site.stop()  # nothing listens any more
        for ws in list(harness.fake.sockets):
            await ws.close()  # and the gateway connection drops
        await runner.cleanup()
        await asyncio.wait_for(seen.event.wait(), 60)
    finally:
        logging.getLogger("discord").removeHandler(seen)
    reconnect, *_ = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.getMessage().startswith("Attempting a reconnect")
    ]
    assert reconnect.exc_info is None
    assert "(ClientConnectorError" in reconnect.getMessage() and "\n" not in reconnect.getMessage()
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert all(r.exc_info is None for r in shown), [r.getMessage() for r in shown if r.exc_info]
    detail, *_ = [r for r in caplog.records if r.name.endswith(".tracebacks")]
    assert detail.levelno == logging.DEBUG and detail.exc_info is not None  # the traceback, for -vv


def test_a_record_about_a_bug_keeps_its_traceback() -> None:
    try:
        raise KeyError("a bug in an event handler")
    except KeyError:
        bug = logging.LogRecord(
            "discord.client", logging.ERROR, __file__, 1, "Ignoring exception in %s", ("on_x",), sys.exc_info()
        )
    assert (
        OneLineReconnects().filter(bug)
        and bug.exc_info is not None
        and bug.getMessage() == "Ignoring exception in on_x"
    )
