"""One scheduling suite, run against both real transports.

Each case takes a started :class:`~bot.inference.scheduler.BatchedClient` (the local
worker pool in tests/test_service.py, Ray Serve in tests/ray_suite.py) and checks
a rule of the batching core end to end through real runners. Cases wait on
events (a task's log line, the core's queue, the transport's free slots), never on
the clock. The core's rules themselves are tested in milliseconds in
tests/test_scheduler.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.inference.protocol import DeadlineExceeded
from bot.inference.scheduler import BatchedClient
from tests.fake_tasks import Recorded, Slow, logged, until

ROLE = "causal_lm"  # the role of Slow and Recorded


def text_of(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def saturate(client: BatchedClient, log: str, seconds: float) -> list[asyncio.Task[Any]]:
    """Blockers until the transport can take no more batches of ``ROLE``: what comes next waits in the core."""
    blockers: list[asyncio.Task[Any]] = []
    await client.prepare(ROLE)
    while client.free(ROLE) > 0:
        before = client.free(ROLE)
        blockers.append(asyncio.create_task(client.submit(Slow(f"blocker{len(blockers)}", seconds=seconds, log=log))))
        await until(lambda before=before: client.free(ROLE) < before)  # type: ignore[misc]
    return blockers


async def a_flood_waits_behind_the_others(client: BatchedClient, tmp_path: Path) -> None:
    """Issue 20 item 3: the first batch after the busy runners serves bob and carol beside the hog."""
    client.core.max_batch, client.max_per_user = 4, 8
    log, batches = str(tmp_path / "blockers.log"), tmp_path / "batches.log"
    blockers = await saturate(client, log, seconds=1.5)
    hog = [client.submit(Recorded(f"hog{i}", log=str(batches)), user="hog") for i in range(6)]
    others = [client.submit(Recorded(name, log=str(batches)), user=name) for name in ("bob", "carol")]
    await asyncio.gather(*blockers, *hog, *others)
    lines = [set(line.split()) for line in batches.read_text().splitlines()]
    assert {"bob", "carol"} <= lines[0], lines  # not behind the hog's six
    assert set().union(*lines) == {f"hog{i}" for i in range(6)} | {"bob", "carol"}


async def an_expired_request_is_never_computed(client: BatchedClient, tmp_path: Path) -> None:
    log = str(tmp_path / "calls.log")
    blockers = await saturate(client, log, seconds=1.5)
    with pytest.raises(DeadlineExceeded):
        await client.submit(Slow("expires", log=log), timeout=0.5)
    await asyncio.gather(*blockers)
    assert await client.submit(Slow("after", log=log)) == "done after"
    assert "start after" in text_of(log) and "expires" not in text_of(log)


async def a_cancelled_request_leaves_the_queue(client: BatchedClient, tmp_path: Path) -> None:
    log = str(tmp_path / "calls.log")
    blockers = await saturate(client, log, seconds=1.0)
    doomed = asyncio.create_task(client.submit(Slow("cancelled", log=log)))
    await until(lambda: client.core.waiting == 1)
    assert client.metrics.summary()["queue_depth"] == 1
    doomed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await doomed
    assert client.metrics.summary()["queue_depth"] == 0
    await asyncio.gather(*blockers)
    assert await client.submit(Slow("after", log=log)) == "done after"
    await until(logged(log, "start after"))
    assert "cancelled" not in text_of(log)


CASES: list[Callable[[BatchedClient, Path], Awaitable[None]]] = [
    a_flood_waits_behind_the_others,
    an_expired_request_is_never_computed,
    a_cancelled_request_leaves_the_queue,
]
