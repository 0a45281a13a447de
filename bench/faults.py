"""Fault benchmark: the bot under faults, while a steady stream of ordinary requests runs.

Drives the real product: an App with every built-in plugin and its real inference
worker processes (the offline SmolLM2 by default, or a model folder given with
--model), each simulated student with a Context of their own on the Discord
transport (App.execute, what every front end calls); with --discord, each request
is an interaction sent to the real discord.py client through the fake Discord of
tests/fake_discord.py, as bench/interactions.py does. A stream of ordinary
requests (/nexttoken and /tokenize, alternating, each from a student of its own)
runs throughout; each scenario injects one fault into it:

  baseline         no fault: what the stream gets from this machine as it is
  kill             kill -9 of the worker
  sigstop          SIGSTOP of the worker for 3x the request timeout (2x with --quick), then SIGCONT
  sigstop-forever  SIGSTOP of the worker, never continued
  poison           lone surrogates, control characters, 5,000 characters, `$$0`
                   and a markdown link, through /nexttoken and /tokenize and, as a
                   plugin bug would send them, straight to the service
  overflow         a burst of /nexttoken larger than inference.max_queue
  slow-flood       /complexity lengths:8192,...,8187 width:1024 from a few students at once
  locked-db        another process holds an exclusive SQLite lock on the quiz
                   database while students answer quiz questions

Each scenario runs on a fresh App and prints, for the ordinary requests and for
the fault's own traffic: requests sent, answered (ok), failed with a reason
(busy, deadline, worker restarted, bad input, budget, user share, storage, ...)
and lost (no reply at all within 120 s of the stream's end, 60 s with --quick,
or an exception out of App.execute; over Discord, an interaction that got no
immediate reply and no followup: must be 0). For each ordinary
command: the recovery time (from the fault to the first ok answer to a request
sent after it) and p50/p99 latency (time to any answer) of the requests sent
during the fault (from its start until it is over and every ordinary command has recovered).
The last line is one JSON object with every figure.

    python bench/faults.py [--quick] [--discord] [--scenario NAME ...] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bot.app import App  # noqa: E402  (after the path and environment are set)
from bot.commands import Button, Context, Reply, User  # noqa: E402
from bot.config import Config, InferenceSection, parse_config  # noqa: E402
from bot.inference.client import LocalInferenceClient  # noqa: E402

GUILD = "424242"
SLOW_COMMAND = {"lengths": "8192,8191,8190,8189,8188,8187", "width": 1024}
POISON = {
    "lone surrogate caf\\udce9": "caf\udce9",
    "lone surrogate \\ud800": "\ud800",
    "control characters": "bell\x07 and escape\x1b[31m red",
    "5,000 characters": "word " * 1000,
    "$$0": "$$0",
    "markdown link": "[click me](https://evil.example/login)",
}
PROMPTS = [
    "The capital of France is",
    "A student who reads every day will",
    "The opposite of hot is",
    "Water boils at a temperature of",
    "My favourite colour is",
    "The first month of the year is",
]
TEXTS = [
    "Tokenizers split electroencephalography differently",
    "hello world",
    "東京 and Paris are capitals",
    "unbelievably long words get cut into pieces",
]

ORDINARY = ("/nexttoken", "/tokenize")  # what the stream sends, alternating
# Error kinds (Reply.data["error_kind"], the class of the CommandError) by the reason they stand for.
REASONS = {
    "Busy": "busy",
    "TooManyRequests": "user share",
    "TooCostly": "budget",
    "DeadlineExceeded": "deadline",
    "WorkerDied": "worker restarted",
    "OptionError": "bad input",
    "UserError": "bad input",
    "InputTooLong": "bad input",
    "InvalidText": "bad input",
    "ModelFailed": "model failed",
    "PluginError": "plugin error",
    "TaskNotFound": "plugin error",
    "NoModelForRole": "no model",
    "InferenceError": "service error",
}
# What a quiz reply says when the score database could not be read or written.
STORAGE_WORDS = ("not saved", "cannot be checked right now", "scores cannot be read", "score database")


@dataclass
class Settings:
    """Counts and durations of one run; --quick shrinks them."""

    # Ordinary requests per second. Each /nexttoken draws a chart in the bot process (about
    # 0.3 s of CPU): a higher rate on a small machine measures the chart backlog, not the fault.
    rate: float = 2.0
    timeout_s: float = 10.0  # inference.request_timeout_s
    max_queue: int = 64
    burst: int = 200
    before_s: float = 5.0  # ordinary stream before the fault
    tail_s: float = 3.0  # stream after every ordinary command has recovered
    settle_max_s: float = 60.0  # stream after the fault at most, recovered or not
    grace_s: float = 120.0  # after the stream stops, a request with no reply by then is lost
    stop_s: float = 30.0  # how long SIGSTOP lasts before SIGCONT
    poison_s: float = 10.0  # poison spread over this long
    baseline_s: float = 10.0  # the no-fault "fault" window of the baseline
    slow_users: int = 3
    slow_command: dict[str, Any] = field(default_factory=lambda: dict(SLOW_COMMAND))
    students: int = 6
    lock_s: float = 20.0
    max_request_cost: float | None = None  # None: the product's default
    watchdog_margin_s: float | None = None  # None: the product's default (where it has one)
    workers: int = 1


QUICK = Settings(
    rate=2.0,
    timeout_s=3.0,
    max_queue=8,
    burst=24,
    before_s=1.0,
    tail_s=0.5,
    settle_max_s=15.0,
    grace_s=60.0,
    stop_s=6.0,
    poison_s=2.0,
    baseline_s=2.0,
    slow_users=2,
    # Smaller than the full flood (memory on a shared test machine), over a budget lowered to match.
    slow_command={"lengths": "4096,4095,4094", "width": 512},
    students=2,
    lock_s=3.0,
    max_request_cost=1e9,
    watchdog_margin_s=1.0,
)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Record:
    """One request: what was sent, when, and how it was answered (times from the scenario's start)."""

    kind: str  # "ordinary", or the fault's own traffic ("poison", "burst", ...)
    command: str
    sent: float
    answered: float | None = None
    reason: str | None = None  # None: answered ok; else why it failed (or, unanswered, why it was lost)
    reply: Reply | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.answered is not None and self.reason is None


def reason_of(reply: Reply, kind: str) -> str | None:
    """Why a reply is a failure, or None for a real answer."""
    unsaved = reply.error or reply.data.get("saved") is False
    if kind.startswith("quiz") and unsaved and any(words in reply.text for words in STORAGE_WORDS):
        return "storage"
    if not reply.error:
        return None
    error_kind = str(reply.data.get("error_kind", ""))
    return REASONS.get(error_kind, error_kind or "error")


class Direct:
    """Requests through App.execute, each student with a Context of their own: what every front end calls."""

    def __init__(self, app: App) -> None:
        self.app = app

    def context(self, user: str) -> Context:
        return Context(user=User(user, user), app=self.app, guild_id=GUILD, transport="discord")

    async def start(self) -> None:
        assert isinstance(self.app.inference, LocalInferenceClient), "the benchmark signals local worker processes"
        await self.app.inference.start()
        await self.app.inference.wait_ready(600)

    async def execute(self, name: str, values: dict[str, Any], user: str) -> Reply:
        return await self.app.execute(name, values, self.context(user))

    async def press(self, button: Button, user: str) -> Reply:
        return await self.app.execute_text(button.command, {button.option: button.value}, self.context(user))

    async def submit(self, request: Any, user: str) -> None:
        await self.context(user).inference.submit(request)

    async def close(self) -> None:
        await self.app.close()


class OverDiscord(Direct):
    """The real discord.py client, connected to the fake Discord of tests/fake_discord.py on 127.0.0.1.

    A request is an INTERACTION_CREATE; it is answered when the fake receives an immediate
    reply or a followup. The Reply behind a followup is read from App.execute (wrapped), so
    its reason is the same as without Discord; an immediate refusal is told by its words.
    """

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.ids: dict[str, int] = {}
        self.replies: dict[str, deque[Reply]] = defaultdict(deque)
        self.waiting: dict[str, asyncio.Future[tuple[str, Any]]] = {}
        self.seen = 0

    async def start(self) -> None:
        import aiohttp
        import discord
        import yarl

        from bot.frontends.discord.client import LmbotClient
        from bot.frontends.discord.runner import run_bot
        from tests.fake_discord import FakeDiscord, LoopbackOnlyResolver

        self.fake = FakeDiscord()
        await self.fake.start()
        discord.http.Route.BASE = self.fake.api
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.fake.gateway_url)
        real_execute = self.app.execute

        async def execute(name: str, values: dict[str, Any], ctx: Context) -> Reply:
            reply = await real_execute(name, values, ctx)
            self.replies[ctx.user.id].append(reply)  # runs on the command loop's thread: a deque is safe
            return reply

        self.app.execute = execute  # type: ignore[method-assign]
        connector = aiohttp.TCPConnector(resolver=LoopbackOnlyResolver())
        self.client = LmbotClient(self.app, connector=connector, guild_ready_timeout=0.05)
        self.bot = asyncio.create_task(run_bot(self.app, "fake-token", self.client))
        await asyncio.wait_for(self.fake.ready.wait(), 120)
        assert isinstance(self.app.inference, LocalInferenceClient), "the benchmark signals local worker processes"
        await self.client.command_loop.run(self.app.inference.wait_ready(600))
        self.watcher = asyncio.create_task(self.watch_calls())

    async def watch_calls(self) -> None:
        """Resolve each interaction's future when its answer (not a defer) reaches the fake."""
        while True:
            calls = self.fake.calls
            for call in calls[self.seen :]:
                parts = call.path.split("/")
                token = next((p for p in parts if p in self.waiting), None)
                if token is None:
                    continue
                if "callback" in parts and (call.body or {}).get("type") == 4:
                    answer = ("now", call.body["data"].get("content", ""))
                elif "webhooks" in parts and call.method in ("POST", "PATCH") and not call.failed:
                    # A follow-up, or (when follow-ups keep failing) the edit of "thinking…" that carries it.
                    answer = ("followup", (call.body or {}).get("content", ""))
                else:
                    continue  # a defer, or the deletion of "thinking…" before an ephemeral answer
                future = self.waiting.pop(token)
                if not future.done():
                    future.set_result(answer)
            self.seen = len(calls)
            await asyncio.sleep(0.02)

    def user_id(self, user: str) -> int:
        return self.ids.setdefault(user, 10_000 + len(self.ids))

    async def _answer(self, token: str, user: str) -> Reply:
        future = self.waiting.setdefault(token, asyncio.get_running_loop().create_future())
        how, text = await future
        if how == "now":  # refused before any work: busy, cooldown, restarting
            return Reply.failure(text, error_kind="Busy" if "busy" in text else "Refused")
        replies = self.replies[str(self.user_id(user))]
        return replies.popleft() if replies else Reply.failure(text, error_kind="FrontEnd")

    async def execute(self, name: str, values: dict[str, Any], user: str) -> Reply:
        token = await self.fake.interact(name, values, user_id=self.user_id(user))
        return await self._answer(token, user)

    async def press(self, button: Button, user: str) -> Reply:
        from bot.frontends.discord.render import button_id

        token = await self.fake.interact("", {"custom_id": button_id(button)}, user_id=self.user_id(user), kind=3)
        return await self._answer(token, user)

    async def submit(self, request: Any, user: str) -> None:
        ctx = Context(user=User(str(self.user_id(user)), user), app=self.app, guild_id=GUILD, transport="discord")
        await self.client.command_loop.run(ctx.inference.submit(request))

    async def close(self) -> None:
        self.watcher.cancel()
        await self.client.shutdown()
        await self.bot
        await self.fake.stop()


class Run:
    """One scenario on one App: sends requests, records their answers, injects the fault."""

    def __init__(self, name: str, front: Direct, settings: Settings) -> None:
        self.name, self.front, self.app, self.settings = name, front, front.app, settings
        self.started = time.perf_counter()
        self.records: list[Record] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.fault_start: float | None = None
        self.fault_end: float | None = None
        self.notes: list[str] = []
        self.worker_replaced: float | None = None
        # The 1-minute load average at the start and the end: how shared the machine was.
        self.load = [round(os.getloadavg()[0], 1)]
        self._sent = 0

    def now(self) -> float:
        return time.perf_counter() - self.started

    # ------------------------------------------------------------------ sending

    def _track(self, record: Record, call: Callable[[], Awaitable[Reply | None]]) -> asyncio.Task[None]:
        self.records.append(record)

        async def run() -> None:
            try:
                reply = await call()
            except asyncio.CancelledError:
                record.reason = "no reply"
                raise
            except Exception as exc:  # App.execute must always return a Reply: this counts as lost
                record.reason = f"exception {type(exc).__name__}"
                return
            record.answered = self.now()
            record.reply = reply
            record.reason = None if reply is None else reason_of(reply, record.kind)

        task = asyncio.create_task(run())
        self.tasks.append(task)
        return task

    def command(self, kind: str, name: str, values: dict[str, Any], user: str) -> asyncio.Task[None]:
        return self._command(kind, name, values, user)[1]

    async def command_answered(self, kind: str, name: str, values: dict[str, Any], user: str) -> Record:
        record, task = self._command(kind, name, values, user)
        await task
        return record

    def _command(self, kind: str, name: str, values: dict[str, Any], user: str) -> tuple[Record, asyncio.Task[None]]:
        record = Record(kind, f"/{name}", self.now())
        return record, self._track(record, lambda: self.front.execute(name, values, user))

    def press(self, kind: str, button: Button, user: str) -> asyncio.Task[None]:
        record = Record(kind, f"/{button.command} {button.option}", self.now())
        return self._track(record, lambda: self.front.press(button, user))

    def raw(self, kind: str, request: Any, user: str) -> asyncio.Task[None]:
        """A request sent straight to the service, as a plugin would (no option checks on the way)."""
        record = Record(kind, f"service {type(request).__name__}", self.now())

        async def call() -> Reply | None:
            from bot.errors import CommandError

            try:
                await self.front.submit(request, user)
            except CommandError as exc:
                return Reply.failure(str(exc), error_kind=type(exc).__name__)
            return None

        return self._track(record, call)

    def ordinary(self) -> None:
        n = self._sent
        self._sent += 1
        user = f"student{n}"  # one request each: over Discord, a reply is matched to its asker
        if n % 2 == 0:
            self.command("ordinary", "nexttoken", {"prompt": PROMPTS[(n // 2) % len(PROMPTS)], "k": 5}, user)
        else:
            self.command("ordinary", "tokenize", {"text": TEXTS[(n // 2) % len(TEXTS)]}, user)

    async def stream(self, stop: asyncio.Event) -> None:
        """Ordinary requests at a steady rate (sent on time whether or not earlier ones are answered)."""
        interval = 1 / self.settings.rate
        due = time.perf_counter()
        while not stop.is_set():
            self.ordinary()
            due += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))

    async def watch_workers(self, stop: asyncio.Event) -> None:
        """Note when a worker process that was not there at the start appears (a replacement)."""
        first = set(self.worker_pids())
        while not stop.is_set():
            if self.worker_replaced is None and self.fault_start is not None and set(self.worker_pids()) - first:
                self.worker_replaced = self.now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    def worker_pids(self) -> list[int]:
        pids: list[int] = getattr(self.app.inference, "worker_pids", list)()
        return pids

    # ------------------------------------------------------------------ the fault

    def begin_fault(self) -> None:
        self.fault_start = self.now()

    def end_fault(self) -> None:
        self.fault_end = self.now()

    def recovered_at(self, command: str) -> float | None:
        """When the first request of ``command`` sent after the fault began was answered ok."""
        assert self.fault_start is not None
        times = [
            r.answered
            for r in self.records
            if r.kind == "ordinary" and r.command == command and r.sent >= self.fault_start and r.ok
        ]
        return min((t for t in times if t is not None), default=None)

    async def settle(self) -> None:
        """Keep the stream going until every ordinary command has recovered (plus a tail), or the cap."""
        assert self.fault_end is not None
        cap = self.fault_end + self.settings.settle_max_s
        while self.now() < cap:
            if all(self.recovered_at(c) is not None for c in ORDINARY):
                await asyncio.sleep(self.settings.tail_s)
                return
            await asyncio.sleep(0.1)

    async def drain(self) -> None:
        """Wait for every reply; what has none within the grace period is lost."""
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=self.settings.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ figures

    def figures(self) -> dict[str, Any]:
        assert self.fault_start is not None and self.fault_end is not None
        kinds: dict[str, dict[str, Any]] = {}
        for kind in dict.fromkeys(r.kind for r in self.records):
            ours = [r for r in self.records if r.kind == kind]
            failed = Counter(r.reason for r in ours if r.answered is not None and r.reason is not None)
            lost = Counter(r.reason or "no reply" for r in ours if r.answered is None)
            kinds[kind] = {
                "sent": len(ours),
                "ok": sum(r.ok for r in ours),
                "failed": sum(failed.values()),
                "failed_by_reason": dict(failed.most_common()),
                "lost": sum(lost.values()),
                "lost_by_reason": dict(lost.most_common()),
            }
        # The fault lasts until it is over and every ordinary command has recovered.
        recoveries = {c: self.recovered_at(c) for c in ORDINARY}
        window_end = max(self.fault_end, *(self.now() if t is None else t for t in recoveries.values()))
        commands: dict[str, dict[str, float | None]] = {}
        for command, recovered in recoveries.items():
            during = [
                r.answered - r.sent
                for r in self.records
                if r.kind == "ordinary"
                and r.command == command
                and self.fault_start <= r.sent <= window_end
                and r.answered is not None
            ]
            p50, p99 = percentile(during, 0.5), percentile(during, 0.99)
            commands[command.lstrip("/")] = {
                "recovery_s": None if recovered is None else round(recovered - self.fault_start, 3),
                "p50_ms": None if p50 is None else round(1000 * p50, 1),
                "p99_ms": None if p99 is None else round(1000 * p99, 1),
                "during_fault": len(during),
            }
        return {
            "kinds": kinds,
            "commands": commands,
            "sent": sum(k["sent"] for k in kinds.values()),
            "ok": sum(k["ok"] for k in kinds.values()),
            "failed": sum(k["failed"] for k in kinds.values()),
            "lost": sum(k["lost"] for k in kinds.values()),
            "fault_s": round(self.fault_end - self.fault_start, 3),
            "worker_replaced_s": None
            if self.worker_replaced is None
            else round(self.worker_replaced - self.fault_start, 3),
            "notes": self.notes,
            "load_average": self.load,
        }


# --------------------------------------------------------------------------- scenarios


def signal_worker(run: Run, pid: int, sig: signal.Signals) -> bool:
    """Signal one of this App's workers, only while it is still one of them (never a reused pid)."""
    if pid not in run.worker_pids():
        return False
    os.kill(pid, sig)
    return True


async def baseline(run: Run) -> None:
    run.begin_fault()
    await asyncio.sleep(run.settings.baseline_s)
    run.end_fault()


async def kill(run: Run) -> None:
    pid = run.worker_pids()[0]
    run.begin_fault()
    signal_worker(run, pid, signal.SIGKILL)
    run.end_fault()


async def sigstop(run: Run) -> None:
    pid = run.worker_pids()[0]
    run.begin_fault()
    signal_worker(run, pid, signal.SIGSTOP)
    await asyncio.sleep(run.settings.stop_s)
    if signal_worker(run, pid, signal.SIGCONT):
        run.notes.append(f"the stopped worker was still in the pool after {run.settings.stop_s:g} s; continued it")
    else:
        run.notes.append("the stopped worker had been replaced before SIGCONT")
    run.end_fault()


async def sigstop_forever(run: Run) -> None:
    pid = run.worker_pids()[0]
    run.begin_fault()
    signal_worker(run, pid, signal.SIGSTOP)
    run.end_fault()
    # App.close() kills a worker that does not stop; nothing here continues it.


async def poison(run: Run) -> None:
    from bot.inference.protocol import NextToken

    run.begin_fault()
    items = list(POISON.values())
    pause = run.settings.poison_s / len(items)
    for n, text in enumerate(items):
        run.command("poison", "nexttoken", {"prompt": text, "k": 5}, f"mallory{n}")
        run.command("poison", "tokenize", {"text": text}, f"trudy{n}")
        # A plugin that hands the service text no option checked: it must fail alone, in its batch.
        run.raw("poison (service)", NextToken(text, k=5), f"eve{n}")
        await asyncio.sleep(pause)
    run.end_fault()


async def overflow(run: Run) -> None:
    run.begin_fault()
    asks = [{"prompt": f"Student {i} asks: the capital of France is", "k": 5} for i in range(run.settings.burst)]
    burst = [run.command("burst", "nexttoken", values, f"crowd{i}") for i, values in enumerate(asks)]
    await asyncio.wait(burst)
    run.end_fault()


async def slow_flood(run: Run) -> None:
    run.begin_fault()
    flood = [
        run.command("slow", "complexity", dict(run.settings.slow_command), f"heavy{i}")
        for i in range(run.settings.slow_users)
    ]
    await asyncio.wait(flood)
    run.end_fault()


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("PRAGMA locking_mode=EXCLUSIVE")  # in WAL mode too: readers and writers wait
db.execute("BEGIN EXCLUSIVE")
db.execute("SELECT count(*) FROM sqlite_master").fetchall()
print("locked", flush=True)
time.sleep(3600)
"""


def locked_for(path: str) -> str:
    """What another connection can still do with the database (to say what the lock holds)."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=0.1)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlite3.OperationalError:
        return "readers and writers wait"
    return "writers wait, readers do not"


async def answer_one(run: Run, phase: str, user: str) -> None:
    """Ask for a question as ``user`` and press its first choice, as a student does."""
    asked = await run.command_answered(f"quiz questions {phase}", "quiz", {}, user)
    choices = [b for b in (asked.reply.buttons if asked.reply else []) if b.option == "answer"]
    if choices:
        await run.press(f"quiz answers {phase}", choices[0], user)


async def locked_db(run: Run) -> None:
    db = str(run.app.config.plugins.options["study"]["quiz_db"])
    students = [f"learner{i}" for i in range(run.settings.students)]
    for user in students:  # the database exists, with its key, before it is locked
        await run.front.execute("quiz", {}, user)
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, db, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert locker.stdout is not None
        line = await asyncio.wait_for(locker.stdout.readline(), 60)
        if line.strip() != b"locked":
            raise RuntimeError(f"the lock holder did not take the lock ({line!r})")
        run.begin_fault()
        run.notes.append(f"another process holds the quiz database: {locked_for(db)}")

        until = run.now() + run.settings.lock_s

        async def student(user: str) -> None:
            while run.now() < until:
                await answer_one(run, "(locked)", user)
                await asyncio.sleep(0.5)

        await asyncio.gather(*(student(u) for u in students))
    finally:
        locker.kill()
        await locker.wait()
    run.end_fault()
    await asyncio.gather(*(answer_one(run, "(after)", u) for u in students))


# --------------------------------------------------------------------------- issue 25: plugins, Discord, disk, ports


async def blocking_plugin(run: Run) -> None:
    """A plugin whose handler does time.sleep(12) (3 s with --quick), pressed by several students,
    while others ask /help and the ordinary stream goes on: only its own commands may wait."""
    from bot import Reply as PluginReply
    from bot import command, hookimpl

    block_s = 3.0 if run.settings.stop_s <= QUICK.stop_s else 12.0  # how long the handler blocks its loop

    @command("sleepy", "Blocks its event loop, as a careless plugin would")
    async def sleepy(ctx: Context) -> PluginReply:
        time.sleep(block_s)  # noqa: ASYNC251 - the fault itself
        return PluginReply("woke up")

    @hookimpl
    def register_commands(register: Callable[[Any], None]) -> None:
        register(sleepy)

    import types

    run.app.host.add(types.SimpleNamespace(register_commands=register_commands), "careless")
    run.app.registry = run.app.host.build_registry()
    run.begin_fault()
    blocked = [run.command("sleepy (its own plugin)", "sleepy", {}, f"careless{i}") for i in range(3)]
    others = []
    for i in range(int(block_s * 2)):
        others.append(run.command("help (during the block)", "help", {}, f"helper{i}"))
        await asyncio.sleep(0.5)
    await asyncio.wait(blocked + others)
    await asyncio.sleep(1.0)  # the watchdog notes a stall's full length at its next look
    stall = run.app.stalls.get("careless")
    run.notes.append(f"/plugins and /stats show careless: {stall.describe() if stall else 'no stall recorded'}")
    helped = [r.answered - r.sent for r in run.records if r.kind.startswith("help") and r.answered is not None]
    if helped:
        run.notes.append(f"/help during the block: slowest answer {max(helped):.2f} s (the block lasts {block_s:g} s)")
    run.end_fault()


async def storm_5xx(run: Run) -> None:
    """Discord answers follow-ups with 503 storms and dropped connections (needs --discord)."""
    fake = getattr(run.front, "fake", None)
    if fake is None:
        run.notes.append("no Discord in this run (App.execute): the 5xx storm needs --discord; nothing injected")
        run.begin_fault()
        run.end_fault()
        return
    run.begin_fault()
    storm: list[int | str] = ([503] * 5 + ["drop"]) * 8  # 48 failed follow-ups, in a row, across students
    fake.fail_webhooks.extend(storm)
    while fake.fail_webhooks:  # noqa: ASYNC110 - the fake's queue drains as the bot tries
        await asyncio.sleep(0.1)
    run.notes.append(f"{len(storm)} follow-ups failed on purpose (503 and dropped connections), retried by the bot")
    run.end_fault()


class _WarmFront:
    """The bench's app as the warm lmbot serves it (closed by the scenario, not by the server)."""

    def __init__(self, app: App) -> None:
        self.app, self.inference, self.registry = app, object(), app.registry

    async def execute_line(self, line: str) -> Reply:
        return await self.app.execute_line(line)

    async def close(self) -> None:
        pass


async def _wait_pending(run: Run, timeout: float) -> None:
    """Wait for the run's requests still out; asyncio.wait refuses an empty set, and all may be done."""
    pending = [t for t in run.tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


async def slow_socket(run: Run) -> None:
    """Clients that hold the warm lmbot's socket with a partial line, while others ask through it."""
    import socket as socket_module

    from bot.frontends import ask

    with tempfile.TemporaryDirectory(prefix="lmbot-faults-run-") as runtime:
        before = os.environ.get("XDG_RUNTIME_DIR")
        os.environ["XDG_RUNTIME_DIR"] = runtime
        try:
            config = run.app.config
            paths = ask.warm_paths(config)
            assert paths is not None
            server = ask.WarmServer(config, "bench", keep_alive=3600, paths=paths)
            serving = asyncio.create_task(server.run(_WarmFront(run.app), []))  # type: ignore[arg-type]
            while not paths.socket.exists():  # noqa: ASYNC110 - the server makes it
                await asyncio.sleep(0.01)
            run.begin_fault()
            slow = []
            for _ in range(8):
                client = socket_module.socket(socket_module.AF_UNIX)
                client.connect(str(paths.socket))
                client.sendall(b'{"op": "ask", "line": "/tok')  # never finished
                slow.append(client)

            def one_ask(n: int) -> Reply:
                request = ask.AskRequest(f"/tokenize text:ask {n}", as_json=False, out_dir=runtime, colour=False)
                answer = ask.ask_warm(config, request, paths, "bench")
                if answer is None or answer.rc != 0:
                    return Reply.failure("the warm lmbot did not answer", error_kind="NoAnswer")
                return Reply(text=answer.stdout)

            for n in range(10):
                record = Record("asks (slow clients on the socket)", "lmbot ask /tokenize", run.now())
                run._track(record, lambda n=n: asyncio.to_thread(one_ask, n))
                await asyncio.sleep(0.2)
            await _wait_pending(run, 60)

            def closed_by_server(client: socket_module.socket) -> bool:
                client.settimeout(30)
                try:
                    return client.recv(1) == b""
                except OSError:
                    return False

            # In threads: the server that closes them runs on this loop.
            cut = sum(await asyncio.gather(*(asyncio.to_thread(closed_by_server, c) for c in slow)))
            run.notes.append(f"{cut} of {len(slow)} slow clients were cut off by the warm lmbot")
            for client in slow:
                client.close()
            server.stop.set()
            await serving
        finally:
            if before is None:
                os.environ.pop("XDG_RUNTIME_DIR", None)
            else:
                os.environ["XDG_RUNTIME_DIR"] = before
    run.end_fault()


async def disk_full(run: Run) -> None:
    """Charts saved (as the console and lmbot ask save them) while the disk is full: ENOSPC on every write."""
    import errno
    import io

    import bot.render

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "x" in mode:
            real_open(path, mode, *args, **kwargs).close()
            return FullDisk()
        return real_open(path, mode, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="lmbot-faults-charts-") as folder:

        async def answer_and_save(n: int) -> Reply:
            reply = await run.front.execute("nexttoken", {"prompt": PROMPTS[n % len(PROMPTS)], "k": 5}, f"saver{n}")
            paths, note = bot.render.save_reply_images(reply, Path(folder), "nexttoken")
            if reply.error:
                return reply
            if paths or "No space left on device" not in note:
                return Reply.failure(f"unexpected: saved {paths}, note {note!r}", error_kind="Unexpected")
            return Reply(text=f"{reply.text}\n{note}")

        bot.render.open = full_open  # type: ignore[attr-defined]
        try:
            run.begin_fault()
            for n in range(10):
                record = Record("answers with a chart (disk full)", "/nexttoken + save", run.now())
                run._track(record, lambda n=n: answer_and_save(n))
                await asyncio.sleep(0.3)
            await _wait_pending(run, 120)
        finally:
            del bot.render.open  # type: ignore[attr-defined]
        left = await asyncio.to_thread(os.listdir, folder)
        run.notes.append(f"every answer printed without its chart, with one line saying why; files left: {len(left)}")
    run.end_fault()


async def postgres_restart(run: Run) -> None:
    """The quiz on PostgreSQL, which is stopped mid-quiz and started again."""
    from tests.postgres import PostgresServer, _bin_dir

    bin_dir = _bin_dir()
    if bin_dir is None:
        run.notes.append("PostgreSQL is not installed here: nothing injected")
        run.begin_fault()
        run.end_fault()
        return
    import pwd
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="lmbot-faults-pg-"))
    run_as = None
    if os.geteuid() == 0:
        account = pwd.getpwnam("nobody")
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = "nobody"
    server = PostgresServer(folder, bin_dir, run_as)
    problem = await asyncio.to_thread(server.start)
    if problem is not None:
        run.notes.append(f"PostgreSQL could not start here ({problem}): nothing injected")
        run.begin_fault()
        run.end_fault()
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        options = dict(run.app.config.plugins.options)
        options["study"] = {**options.get("study", {}), "quiz_db": server.url()}
        plugins = run.app.config.plugins.model_copy(update={"options": options})
        run.app.config = run.app.config.model_copy(update={"plugins": plugins})
        students = [f"pupil{i}" for i in range(run.settings.students)]
        await asyncio.gather(*(answer_one(run, "(before)", u) for u in students))
        run.begin_fault()
        await asyncio.to_thread(server.stop, "fast")
        await asyncio.gather(*(answer_one(run, "(PostgreSQL down)", u) for u in students))
        problem = await asyncio.to_thread(server.resume)
        if problem is not None:
            run.notes.append(f"PostgreSQL did not start again: {problem}")
        run.end_fault()
        await asyncio.gather(*(answer_one(run, "(after)", u) for u in students))
        saved = [r for r in run.records if r.kind == "quiz answers (after)" and r.reply is not None]
        run.notes.append(
            f"answers saved after the restart: {sum(bool(r.reply.data.get('saved')) for r in saved)} of {len(saved)}"
        )
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(folder, ignore_errors=True)


async def port_taken(run: Run) -> None:
    """The metrics port is taken by another program when the service asks for it."""
    import socket as socket_module

    with socket_module.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run.begin_fault()
        served = run.app.inference.metrics.serve(port)
        run.notes.append(f"metrics on taken port {port}: {'served (unexpected)' if served else 'off, one log line'}")
        await asyncio.sleep(run.settings.baseline_s)
    run.end_fault()


async def stop_during_load(run: Run) -> None:
    """kill -9 of the worker, then SIGSTOP of its replacement while it starts (imports torch,
    loads the model), never continued: the load heartbeat goes silent and it is replaced."""
    killed = run.worker_pids()[0]
    run.begin_fault()
    signal_worker(run, killed, signal.SIGKILL)
    while True:  # the replacement is spawned the moment the kill is seen
        fresh = [pid for pid in run.worker_pids() if pid != killed]
        if fresh:
            break
        await asyncio.sleep(0.005)
    signal_worker(run, fresh[0], signal.SIGSTOP)
    run.notes.append(f"stopped the replacement (pid {fresh[0]}) while it was loading")
    run.end_fault()


SCENARIOS: dict[str, tuple[str, Callable[[Run], Awaitable[None]]]] = {
    "baseline": ("no fault, for comparison", baseline),
    "kill": ("kill -9 of the worker", kill),
    "sigstop": ("SIGSTOP of the worker for longer than the request timeout, then SIGCONT", sigstop),
    "sigstop-forever": ("SIGSTOP of the worker, never continued", sigstop_forever),
    "stop-during-load": ("SIGSTOP of a worker while it loads its model, never continued", stop_during_load),
    "poison": ("poison input mixed into the stream", poison),
    "overflow": ("a burst larger than the queue", overflow),
    "slow-flood": ("slow /complexity from several students at once", slow_flood),
    "locked-db": ("another process holds the quiz database locked", locked_db),
    "blocking-plugin": ("a plugin's handler blocks its event loop (time.sleep)", blocking_plugin),
    "5xx-storm": ("Discord answers follow-ups with 503s and dropped connections (--discord)", storm_5xx),
    "slow-socket": ("clients hold the warm lmbot's socket with a partial line", slow_socket),
    "disk-full": ("charts saved while the disk is full (ENOSPC)", disk_full),
    "postgres-restart": ("PostgreSQL stopped mid-quiz and started again", postgres_restart),
    "port-taken": ("the metrics port is taken by another program", port_taken),
}


# --------------------------------------------------------------------------- running


def make_config(settings: Settings, model: str | None, cache_dir: str, folder: Path) -> Config:
    inference: dict[str, Any] = {
        "offline": "always",
        "workers": settings.workers,
        "max_queue": settings.max_queue,
        "request_timeout_s": settings.timeout_s,
        "preload": ["causal_lm"],
        "cache_dir": cache_dir,
    }
    if settings.max_request_cost is not None:
        inference["max_request_cost"] = settings.max_request_cost
    # Keys the service may not have yet: set only where the config knows them.
    if settings.watchdog_margin_s is not None and "watchdog_margin_s" in InferenceSection.model_fields:
        inference["watchdog_margin_s"] = settings.watchdog_margin_s
    data: dict[str, Any] = {
        "inference": inference,
        "models": {"causal_lm": model} if model else {},
        "bot": {"log_level": os.environ.get("LMBOT_BENCH_LOG_LEVEL", "ERROR"), "output_dir": str(folder / "out")},
        "plugins": {"options": {"study": {"quiz_db": str(folder / "quiz.sqlite3")}}},
        # Every request is a different student, but the quiz's students ask again at once.
        "discord": {"cooldown_s": 0.0},
    }
    return parse_config(data, source="bench/faults.py")


async def run_scenario(
    name: str, settings: Settings, model: str | None, cache_dir: str, discord: bool
) -> dict[str, Any]:
    _, inject = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix=f"lmbot-faults-{name}-") as tmp:
        app = App(make_config(settings, model, cache_dir, Path(tmp)), entry_points=False)
        front = OverDiscord(app) if discord else Direct(app)
        try:
            await front.start()
            warm = Run(name, front, settings)  # first uses (tiktoken files, chart fonts) outside the figures
            for _ in range(2):
                warm.ordinary()
                await warm.tasks[-1]
            run = Run(name, front, settings)
            stop, watching = asyncio.Event(), asyncio.Event()
            stream = asyncio.create_task(run.stream(stop))
            watcher = asyncio.create_task(run.watch_workers(watching))
            await asyncio.sleep(settings.before_s)
            await inject(run)
            await run.settle()
            stop.set()
            await stream
            await run.drain()
            watching.set()
            await watcher
            run.load.append(round(os.getloadavg()[0], 1))
            return run.figures()
        finally:
            await front.close()


def build_tiny_model(folder: Path, cache_dir: str) -> str:
    """A tiny random GPT-2 (the real tokenizer), built in a child process: this one never imports torch."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom bot.testing import TestModels\n"
        "print(TestModels(Path(sys.argv[1]), Path(sys.argv[2])).tiny_gpt2)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), cache_dir], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def print_scenario(name: str, figures: dict[str, Any]) -> None:
    print(f"\n== {name}: {SCENARIOS[name][0]}")
    print(f"{'requests':<24} {'sent':>5} {'ok':>5} {'failed':>6} {'lost':>5}  failed by reason")
    for kind, row in figures["kinds"].items():
        reasons = ", ".join(f"{reason} {count}" for reason, count in row["failed_by_reason"].items())
        lost = ", ".join(f"{reason} {count}" for reason, count in row["lost_by_reason"].items())
        tail = reasons + (f"; LOST: {lost}" if lost else "")
        print(f"{kind:<24} {row['sent']:>5} {row['ok']:>5} {row['failed']:>6} {row['lost']:>5}  {tail or '-'}")
    for command, row in figures["commands"].items():
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f} ms"
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.0f} ms"
        recovery = "none within the run" if row["recovery_s"] is None else f"{row['recovery_s']:.1f} s"
        during = f"during the fault p50 {p50}, p99 {p99} ({row['during_fault']} requests)"
        print(f"/{command}: recovery {recovery}; {during}")
    replaced = figures["worker_replaced_s"]
    if replaced is not None:
        print(f"a new worker process appeared {replaced:.1f} s after the fault")
    for note in figures["notes"]:
        print(f"note: {note}")
    start, end = figures["load_average"]
    print(f"load average {start:g} at the start, {end:g} at the end ({os.cpu_count()} cores)")


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    print(
        f"\n{'scenario':<16} {'sent':>5} {'ok':>5} {'failed':>6} {'lost':>4}  "
        f"{'recovery':>9} {'p50':>8} {'p99':>8}  {'tokenize p99':>12}"
    )
    for name, figures in results.items():
        nt, tk = figures["commands"]["nexttoken"], figures["commands"]["tokenize"]
        recovery = "never" if nt["recovery_s"] is None else f"{nt['recovery_s']:.1f} s"
        p50 = "-" if nt["p50_ms"] is None else f"{nt['p50_ms']:.0f} ms"
        p99 = "-" if nt["p99_ms"] is None else f"{nt['p99_ms']:.0f} ms"
        tp99 = "-" if tk["p99_ms"] is None else f"{tk['p99_ms']:.0f} ms"
        print(
            f"{name:<16} {figures['sent']:>5} {figures['ok']:>5} {figures['failed']:>6} {figures['lost']:>4}  "
            f"{recovery:>9} {p50:>8} {p99:>8}  {tp99:>12}"
        )
    print("(recovery, p50 and p99: /nexttoken, the ordinary command that needs a worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts and short faults (the test runs this)")
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), metavar="NAME")
    parser.add_argument("--model", help="causal LM folder (default: the packaged SmolLM2; --quick: a tiny GPT-2)")
    parser.add_argument("--cache-dir", default=None, help="inference.cache_dir (default ~/.cache/lmbot)")
    parser.add_argument("--rate", type=float, help="ordinary requests per second")
    parser.add_argument("--timeout", type=float, help="inference.request_timeout_s")
    parser.add_argument("--workers", type=int, help="inference.workers")
    parser.add_argument(
        "--discord", action="store_true", help="through the real discord.py client and the fake Discord (tests/)"
    )
    args = parser.parse_args()

    settings = Settings(**vars(QUICK)) if args.quick else Settings()
    if args.rate:
        settings.rate = args.rate
    if args.timeout:
        settings.timeout_s = args.timeout
    if args.workers:
        settings.workers = args.workers
    cache_dir = os.path.expanduser(args.cache_dir or "~/.cache/lmbot")
    with tempfile.TemporaryDirectory(prefix="lmbot-faults-model-") as models:
        model = args.model or (build_tiny_model(Path(models), cache_dir) if args.quick else None)
        print(
            f"fault benchmark on {model or 'the packaged SmolLM2'}"
            f"{', through the discord.py client and a fake Discord' if args.discord else ', through App.execute'}: "
            f"{settings.workers} worker(s), "
            f"{settings.rate:g} ordinary requests/s (/nexttoken and /tokenize), request timeout "
            f"{settings.timeout_s:g} s, max_queue {settings.max_queue}",
            flush=True,
        )
        results: dict[str, dict[str, Any]] = {}
        for name in args.scenario:
            results[name] = asyncio.run(run_scenario(name, settings, model, cache_dir, args.discord))
            print_scenario(name, results[name])
            sys.stdout.flush()
    print_summary(results)
    lost = sum(f["lost"] for f in results.values())
    print(f"lost in all: {lost} (must be 0)")
    summary = {
        "commit": commit(),
        "model": model or "SmolLM2-135M-Instruct (packaged)",
        "quick": args.quick,
        "front_end": "discord" if args.discord else "App.execute",
        "settings": dict(vars(settings)),
        "cores": os.cpu_count(),
        "lost": lost,
        "scenarios": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
