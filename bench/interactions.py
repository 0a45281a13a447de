"""Benchmark: a class pressing one command at once, through a fake Discord, beside the model alone.

The real discord.py client runs against tests/fake_discord.py on 127.0.0.1 with
the offline causal LM. N students send /nexttoken (or /sample, /attention) at the
same moment. Prints the time from each INTERACTION_CREATE to its first answer
(defer or immediate reply), how each was answered (with a result, "busy", the
deadline's "took too long", another failure, or not at all), and any "heartbeat blocked" warning from discord.py
(with the stack of the loop it caught). The fake Discord runs in the bot's own process and event loop
(real Discord is not on the bot's host): its CPU is part of the bot's main thread's figure.

Before the burst, the workers finish building their faster engine (ONNX Runtime, built in the
background after start-up) and one student's command warms the command up: start-up costs, paid once a
term. The burst's CPU seconds are printed by part (the bot's threads, its drawing processes, its model
workers) beside the peer's, with the forward passes the burst took and their mean batch size.

In the same run, on the same warm service, the *model-only peer* submits the same N
requests straight to the inference service (no Discord, no charts, no reply text):
the time until the last of them is answered is the limit the product could reach,
and "all answered after" / model-only is the ratio to read (issue 20's target: ≤ 2.5).

With ``--block-s S`` a careless plugin's command that blocks its event loop for
S seconds (``time.sleep`` in an async handler) is sent first: acknowledgements
must not wait behind it. Last line: one JSON object with every figure (a list
when several class sizes are given).

    python bench/interactions.py [--interactions 30 100 200] [--command nexttoken|sample|attention]
                                 [--max-queue 50] [--block-s 0] [--charts-in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


COMMANDS = ("nexttoken", "sample", "attention")
# The words of the replies that are not a result (bot.errors): each is counted apart.
BUSY_WORDS, DEADLINE_WORDS = "busy", "took too long"


def outcome(content: str, files: list[tuple[str, bytes]]) -> str:
    """What one final reply was: "busy", "deadline" (given up at the request's deadline), "result"
    (the command's answer with its chart) or "failed" (any other error, or a reply without its chart)."""
    text = (content or "").lower()
    if BUSY_WORDS in text:
        return "busy"
    if DEADLINE_WORDS in text:
        return "deadline"
    return "result" if files else "failed"


def student_options(command: str, student: int) -> dict[str, object]:
    """What student ``student`` types: a prompt of their own (and a fixed seed for /sample, so the
    model-only peer samples exactly what the bot did)."""
    if command == "attention":
        return {"text": f"Student {student} asks: the capital of France is"}
    if command == "sample":
        return {"prompt": f"Student {student} asks: the capital of France is", "seed": student}
    return {"prompt": f"Student {student} asks: the capital of France is"}


async def model_only(app: object, command: str, count: int) -> tuple[float, int, int]:
    """Seconds until the service has answered the model requests of ``count`` students' ``command``,
    all submitted at once, as the command's handler submits them (same requests, same users), how
    many of those students the service told "busy" (as it tells the Discord burst), and how many
    failed otherwise (a deadline)."""
    from bot import NoModelForRole
    from bot.errors import Busy, InferenceError
    from bot.inference.protocol import NextToken
    from plugins.attention import Attention, MaskedAttention
    from plugins.sample import Sample

    async def one(student: int) -> str:
        try:
            await ask(student)
        except Busy:
            return "busy"
        except InferenceError:  # a deadline, a worker replaced: counted apart from the results
            return "failed"
        return "result"

    async def ask(student: int) -> None:
        service = app.inference_view(str(10_000 + student), None)  # type: ignore[attr-defined]
        options = student_options(command, student)
        if command == "nexttoken":
            await service.submit(NextToken(str(options["prompt"]), k=10, temperature=1.0))
        elif command == "sample":
            await service.submit(Sample(str(options["prompt"]), 1.0, 50, 0.9, 3, student))
        else:
            await service.submit(Attention(str(options["text"]), None, None))
            with contextlib.suppress(NoModelForRole):  # as the handler: offline, no masked LM
                await service.submit(MaskedAttention(str(options["text"]), None, None))

    started = time.perf_counter()
    answered = await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started, answered.count("busy"), answered.count("failed")


async def engine_built(app: object, timeout: float = 900) -> None:
    """Until every worker answers on its built engine: a preloaded role's faster engine (ONNX
    Runtime) builds in the background after start-up, tens of seconds of the workers' CPU, while
    torch answers. A start-up cost, paid once a term: neither the burst nor the peer may pay it."""
    from bot.inference.protocol import NextToken

    deadline = time.monotonic() + timeout
    while True:
        status = await app.inference.status()  # type: ignore[attr-defined]
        models = [w.get("models") for w in status.get("workers", [])]
        if all(isinstance(m, dict) and not any(r.get("engine_pending") for r in m.values()) for m in models):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers never finished building their engine: {models}")
        # The engine switches between batches: a request lets a worker take up a finished build.
        await app.inference.submit(NextToken("warming up", k=1))  # type: ignore[attr-defined]
        await asyncio.sleep(1.0)


class CpuSeconds:
    """CPU seconds spent by part of the machine's work between two readings: the bot process (its
    threads by name), its drawing processes and its model workers."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.start = self.read()

    def read(self) -> dict[str, float]:
        import threading

        from bot import charts

        # Threads of one kind (lmbot-chart-1, lmbot-chart-2) are counted together. The main thread
        # runs the discord.py client and, in this benchmark only, the fake Discord too.
        names = {t.native_id: t.name.rstrip("0123456789_-") for t in threading.enumerate()}
        seen: dict[str, float] = {}
        for thread in self.me.threads():
            name = "bot thread " + names.get(thread.id, "other")
            seen[name] = seen.get(name, 0.0) + thread.user_time + thread.system_time
        drawing = set(getattr(charts._POOL, "_processes", None) or ())
        for child in self.me.children(recursive=True):
            with contextlib.suppress(Exception):
                times = child.cpu_times()
                part = "drawing processes" if child.pid in drawing else "model workers (and helpers)"
                seen[part] = seen.get(part, 0.0) + times.user + times.system
        return seen

    def since_start(self) -> dict[str, float]:
        now = self.read()
        spent = {part: seconds - self.start.get(part, 0.0) for part, seconds in sorted(now.items())}
        return {part: round(seconds, 2) for part, seconds in spent.items() if seconds > 0.005}


def forward_passes(app: object) -> tuple[float, float]:
    """(forward passes, requests in them) the service has run so far, from its batch-size metric."""
    passes = requests = 0.0
    for family in app.inference.metrics.batch_size.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name.endswith("_count"):
                passes += sample.value
            elif sample.name.endswith("_sum"):
                requests += sample.value
    return passes, requests


async def main(
    count: int, max_queue: int, block_s: float = 0.0, command: str = "nexttoken", chart_processes: bool = True
) -> dict:
    import aiohttp
    import discord
    import yarl

    from bot import charts
    from bot.app import App
    from bot.config import parse_config
    from bot.frontends.discord.client import LmbotClient
    from bot.frontends.discord.runner import run_bot
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
    if chart_processes:
        charts.start_process_pool()  # as `lmbot run` does
    client = LmbotClient(app, connector=aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()), guild_ready_timeout=0.05)
    bot = asyncio.create_task(run_bot(app, "fake-token", client))
    await asyncio.wait_for(fake.ready.wait(), 60)
    # The model is preloaded: measure serving, not loading. The inference client lives on the
    # command loop (where handlers run), so it is asked there.
    await client.command_loop.run(app.inference.wait_ready(300))
    await client.command_loop.run(engine_built(app))

    if block_s:
        blocker = await fake.interact("block", user_id=9_999)
        await fake.wait_for(lambda calls: any(blocker in c.path for c in calls))
        await asyncio.sleep(0.2)  # the handler is blocking its loop now
    # One student's command first, answered before the burst: the bot's first use of a command
    # (its plugin's imports, the tokenizer, a drawing process's first chart of its kind) is a
    # start-up cost, paid once a term, not a class's; the model-only peer runs warm too.
    warm = await fake.interact(command, student_options(command, count), user_id=9_998)
    await fake.wait_for(lambda calls: any(warm in c.path and "webhooks" in c.path for c in calls), timeout=300)
    fake.calls.clear()
    cpu = CpuSeconds()
    passes_before = forward_passes(app)
    started = time.perf_counter()
    tokens = [await fake.interact(command, student_options(command, i), user_id=10_000 + i) for i in range(count)]

    # Each token's calls, filed as they arrive: checking every token against every call on each
    # new call would cost the process the bot runs in seconds of CPU in a burst of 200.
    by_token: dict[str, list] = {t: [] for t in tokens}
    filed = 0
    unfinished = set(tokens)

    def all_final(calls: list) -> bool:
        nonlocal filed
        for call in calls[filed:]:
            for part in call.path.split("/"):
                if part in by_token:
                    by_token[part].append(call)
                    break
        filed = len(calls)
        unfinished.difference_update([t for t in unfinished if final(t)])
        return not unfinished

    def first_answer(token: str) -> float | None:
        for call in by_token[token]:
            if "callback" in call.path:
                return call.at - fake.sent[token]
        return None

    def final(token: str) -> str | None:
        ours = by_token[token]
        if any("callback" in c.path and c.body["type"] == 4 for c in ours):
            return outcome(ours[0].body["data"].get("content", ""), ours[0].files)
        posts = [c for c in ours if "webhooks" in c.path and c.method == "POST"]
        if posts:
            # Busy can also be found after the defer, when the request reaches the full queue.
            return outcome((posts[-1].body or {}).get("content", ""), posts[-1].files)
        return None

    await fake.wait_for(all_final, timeout=600)
    elapsed = time.perf_counter() - started
    burst_cpu = cpu.since_start()
    passes, in_passes = (after - before for after, before in zip(forward_passes(app), passes_before, strict=True))
    defer = [first_answer(t) for t in tokens]
    outcomes = [final(t) for t in tokens]
    # The model-only peer, on the same warm service right after the burst (where handlers submit).
    cpu = CpuSeconds()
    peer_s, peer_busy, peer_failed = await client.command_loop.run(model_only(app, command, count))
    peer_cpu = cpu.since_start()
    await client.shutdown()
    await bot
    await fake.stop()
    charts.stop_process_pool()
    blocked = [m for m in warnings.messages if "heartbeat blocked" in m.lower() or "can't keep up" in m.lower()]
    for message in blocked:  # discord.py adds the loop thread's stack: where the loop was stuck
        print("discord.py warned:", message[-1500:], file=sys.stderr)
    return {
        "interactions": count,
        "command": command,
        "max_queue": max_queue,
        "blocking_handler_s": block_s,
        "chart_processes": chart_processes,
        "seconds_until_all_answered": elapsed,
        "model_only_s": peer_s,
        "model_only_busy": peer_busy,
        "model_only_failed": peer_failed,
        "ratio_to_model_only": elapsed / peer_s,
        "defer_p50_ms": 1000 * percentile([d for d in defer if d is not None], 0.5),
        "defer_p99_ms": 1000 * percentile([d for d in defer if d is not None], 0.99),
        "defer_max_ms": 1000 * max(d for d in defer if d is not None),
        "first_response_missing": sum(d is None for d in defer),
        "answered_with_result": outcomes.count("result"),
        "answered_busy": outcomes.count("busy"),
        "answered_deadline": outcomes.count("deadline"),
        "answered_failed": outcomes.count("failed"),
        "unanswered": sum(o is None for o in outcomes),
        "heartbeat_warnings": len(blocked),
        "burst_forward_passes": passes,
        "burst_mean_batch": in_passes / passes if passes else 0.0,
        "burst_cpu_s": burst_cpu,
        "model_only_cpu_s": peer_cpu,
    }


def report(figures: dict, block_s: float) -> None:
    """The figures of one class size, in words."""
    blocking = f", while a handler blocks its loop for {block_s:g} s" if block_s else ""
    print(
        f"{figures['interactions']} students press /{figures['command']} at once, "
        f"queue limit {figures['max_queue']}{blocking}"
    )
    print(
        f"first response (defer or reply): p50 {figures['defer_p50_ms']:.0f} ms, "
        f"p99 {figures['defer_p99_ms']:.0f} ms, max {figures['defer_max_ms']:.0f} ms"
    )
    print(
        f"answered: {figures['answered_with_result']} with a result, {figures['answered_busy']} busy, "
        f"{figures['answered_deadline']} given up at the deadline, {figures['answered_failed']} failed, "
        f"{figures['unanswered']} unanswered; all answered after {figures['seconds_until_all_answered']:.1f} s"
    )
    print(
        f"model-only peer (same {figures['interactions']} requests straight to the service, no Discord, no charts): "
        f"{figures['model_only_s']:.1f} s ({figures['model_only_busy']} told busy, "
        f"{figures['model_only_failed']} failed); "
        f"all answered after / model-only = {figures['ratio_to_model_only']:.1f}×"
    )
    print(f"heartbeat warnings from discord.py: {figures['heartbeat_warnings']}")
    print(
        f"forward passes in the burst: {figures['burst_forward_passes']:.0f}, "
        f"{figures['burst_mean_batch']:.1f} requests each on average"
    )
    for label, key in (("burst", "burst_cpu_s"), ("model-only peer", "model_only_cpu_s")):
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in figures[key].items())
        print(f"CPU seconds during the {label}: {sum(figures[key].values()):.1f} ({parts})")
    ok = figures["defer_p99_ms"] <= 250 and figures["unanswered"] == 0 and figures["heartbeat_warnings"] == 0
    print(f"target p99 defer <= 250 ms, every interaction answered, no heartbeat warning: {'met' if ok else 'NOT met'}")
    figures["targets_met"] = ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--interactions",
        type=int,
        nargs="+",
        default=[200],
        metavar="N",
        help="class sizes, one burst each, e.g. 30 100 200 (default: 200)",
    )
    parser.add_argument("--command", choices=COMMANDS, default="nexttoken", help="what every student presses")
    parser.add_argument("--max-queue", type=int, default=50, help="the inference queue's length limit")
    parser.add_argument("--block-s", type=float, default=0.0, help="first send a command that blocks for this long")
    parser.add_argument(
        "--charts-in-process",
        action="store_true",
        help="draw charts in the bot's process (as before), not in drawing processes as `lmbot run` does",
    )
    args = parser.parse_args()
    runs = []
    for count in args.interactions:
        with tempfile.TemporaryDirectory():
            figures = asyncio.run(main(count, args.max_queue, args.block_s, args.command, not args.charts_in_process))
        report(figures, args.block_s)
        runs.append(figures)
    print(json.dumps(runs[0] if len(runs) == 1 else runs))
