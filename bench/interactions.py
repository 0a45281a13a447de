"""Benchmark: 200 interactions at once through a fake Discord while inference is saturated.

The real discord.py client runs against tests/fake_discord.py on 127.0.0.1 with
the offline causal LM. 200 students send /nexttoken at the same moment; the queue
holds fewer than that, so some must be told "busy". Prints the time from each
INTERACTION_CREATE to its first answer (defer or immediate reply), whether every
interaction was answered, and any "heartbeat blocked" warning from discord.py.
With ``--block-s S`` a careless plugin's command that blocks its event loop for
S seconds (``time.sleep`` in an async handler) is sent first: acknowledgements
must not wait behind it. Last line: one JSON object with every figure.

    python bench/interactions.py [--interactions 200] [--max-queue 50] [--block-s 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def blocking_plugin(seconds: float) -> object:
    """A plugin whose one command blocks the loop it runs on, as a careless plugin would."""
    import types

    from bot import Reply, command, hookimpl

    @command("block", "Blocks its event loop")
    async def block(ctx: object) -> Reply:
        time.sleep(seconds)  # noqa: ASYNC251  (the point of the benchmark)
        return Reply("done")

    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        register(block)

    return types.SimpleNamespace(register_commands=register_commands)


async def main(count: int, max_queue: int, block_s: float = 0.0) -> dict:
    import aiohttp
    import discord
    import yarl

    from bot.app import App
    from bot.config import parse_config
    from bot.discord_frontend.client import LmbotClient
    from bot.discord_frontend.runner import run_bot
    from tests.fake_discord import FakeDiscord, LoopbackOnlyResolver

    fake = FakeDiscord()
    await fake.start()
    discord.http.Route.BASE = fake.api
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    warnings = Warnings()
    logging.getLogger("discord").addHandler(warnings)

    config = parse_config(
        {
            "bot": {"log_level": "WARNING"},
            "inference": {"offline": "always", "max_queue": max_queue, "preload": ["causal_lm"]},
            "discord": {"cooldown_s": 0.0},
        }
    )
    config = config.model_copy(
        update={"inference": config.inference.model_copy(update={"cache_dir": str(Path.home() / ".cache/lmbot")})}
    )
    app = App(config, extra_plugins=[(blocking_plugin(block_s), "careless")] if block_s else ())
    client = LmbotClient(app, connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()), guild_ready_timeout=0.05)
    bot = asyncio.create_task(run_bot(app, "fake-token", client))
    await asyncio.wait_for(fake.ready.wait(), 60)
    # The model is preloaded: measure serving, not loading. The inference client lives on the
    # command loop (where handlers run), so it is asked there.
    await client.command_loop.run(app.inference.wait_ready(300))

    if block_s:
        blocker = await fake.interact("block", user_id=9_999)
        await fake.wait_for(lambda calls: any(blocker in c.path for c in calls))
        await asyncio.sleep(0.2)  # the handler is blocking its loop now
    started = time.perf_counter()
    tokens = [
        await fake.interact("nexttoken", {"prompt": f"Student {i} asks: the capital of France is"}, user_id=10_000 + i)
        for i in range(count)
    ]

    def first_answer(token: str) -> float | None:
        for call in fake.calls:
            if token in call.path and "callback" in call.path:
                return call.at - fake.sent[token]
        return None

    def final(token: str) -> str | None:
        ours = [c for c in fake.calls if token in c.path]
        if any("callback" in c.path and c.body["type"] == 4 for c in ours):
            return "busy" if "busy" in ours[0].body["data"]["content"] else "refused"
        posts = [c for c in ours if "webhooks" in c.path and c.method == "POST"]
        if posts:
            # Busy can also be found after the defer, when the request reaches the full queue.
            return "busy" if "busy" in (posts[-1].body or {}).get("content", "") else "answered"
        return None

    await fake.wait_for(lambda calls: all(final(t) for t in tokens), timeout=600)
    elapsed = time.perf_counter() - started
    defer = [first_answer(t) for t in tokens]
    outcomes = [final(t) for t in tokens]
    await client.shutdown()
    await bot
    await fake.stop()
    blocked = [m for m in warnings.messages if "heartbeat blocked" in m.lower() or "can't keep up" in m.lower()]
    return {
        "interactions": count,
        "max_queue": max_queue,
        "blocking_handler_s": block_s,
        "seconds_until_all_answered": elapsed,
        "defer_p50_ms": 1000 * percentile([d for d in defer if d is not None], 0.5),
        "defer_p99_ms": 1000 * percentile([d for d in defer if d is not None], 0.99),
        "defer_max_ms": 1000 * max(d for d in defer if d is not None),
        "first_response_missing": sum(d is None for d in defer),
        "answered_with_result": outcomes.count("answered"),
        "answered_busy": outcomes.count("busy"),
        "unanswered": sum(o is None for o in outcomes),
        "heartbeat_warnings": len(blocked),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, default=200)
    parser.add_argument("--max-queue", type=int, default=50)
    parser.add_argument("--block-s", type=float, default=0.0, help="first send a command that blocks for this long")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory():
        figures = asyncio.run(main(args.interactions, args.max_queue, args.block_s))
    blocking = f", while a handler blocks its loop for {args.block_s:g} s" if args.block_s else ""
    print(f"{figures['interactions']} interactions at once, queue limit {figures['max_queue']}{blocking}")
    print(
        f"first response (defer or reply): p50 {figures['defer_p50_ms']:.0f} ms, "
        f"p99 {figures['defer_p99_ms']:.0f} ms, max {figures['defer_max_ms']:.0f} ms"
    )
    print(
        f"answered: {figures['answered_with_result']} with a result, {figures['answered_busy']} busy, "
        f"{figures['unanswered']} unanswered; all done in {figures['seconds_until_all_answered']:.1f} s"
    )
    print(f"heartbeat warnings from discord.py: {figures['heartbeat_warnings']}")
    ok = figures["defer_p99_ms"] <= 250 and figures["unanswered"] == 0 and figures["heartbeat_warnings"] == 0
    print(f"target p99 defer <= 250 ms, every interaction answered, no heartbeat warning: {'met' if ok else 'NOT met'}")
    figures["targets_met"] = ok
    print(json.dumps(figures))
