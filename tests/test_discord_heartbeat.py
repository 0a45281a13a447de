"""discord.py's heartbeat latency stays true when the acknowledgement is read before the
keep-alive thread notes its heartbeat as sent (issue 20: false "Can't keep up" warnings in a burst)."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import discord
import pytest

from bot.frontends.discord.client import time_heartbeats_from_their_payload


def keep_alive() -> discord.gateway.KeepAliveHandler:
    heartbeat = discord.gateway.DiscordWebSocket.HEARTBEAT
    ws = SimpleNamespace(thread_id=threading.get_ident(), _max_heartbeat_timeout=60.0, sequence=7, HEARTBEAT=heartbeat)
    return discord.gateway.KeepAliveHandler(ws=ws, interval=41.25, shard_id=0)  # type: ignore[arg-type]


def test_an_acknowledgement_read_before_the_thread_notes_its_heartbeat_measures_the_round_trip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time_heartbeats_from_their_payload()
    time_heartbeats_from_their_payload()  # idempotent: wrapped once
    handler = keep_alive()
    handler._last_send = time.perf_counter() - 41.25  # the previous heartbeat, one interval ago
    # What the keep-alive thread does: make the payload, have the loop send it; the loop reads the
    # acknowledgement before the thread, waiting for the GIL, sets _last_send after the send.
    assert handler.get_payload() == {"op": discord.gateway.DiscordWebSocket.HEARTBEAT, "d": 7}
    with caplog.at_level(logging.WARNING, logger="discord.gateway"):
        handler.ack()
    assert handler.latency < 5.0  # the round trip, not the 41 s since the previous heartbeat
    assert not [r for r in caplog.records if "can't keep up" in r.getMessage().lower()]


def test_a_truly_late_acknowledgement_still_warns(caplog: pytest.LogCaptureFixture) -> None:
    time_heartbeats_from_their_payload()
    handler = keep_alive()
    handler.get_payload()
    handler._last_send -= 12.0  # the acknowledgement comes 12 s after the heartbeat was made
    with caplog.at_level(logging.WARNING, logger="discord.gateway"):
        handler.ack()
    assert handler.latency >= 12.0
    assert [r for r in caplog.records if "can't keep up" in r.getMessage().lower()]
