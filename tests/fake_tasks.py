"""Inference tasks for fault tests, run by real worker processes.

They are named ``"tests.fake_tasks:<function>"`` so the worker imports them
like any task that lives outside the core. This module imports torch only inside
task functions (worker-side), so a bot process may import its request types. Each writes what it computed to a
log file, so tests can tell whether a request reached the model at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from bot.inference.protocol import InferenceError, Request


@dataclass(frozen=True)
class Slow(Request):
    text: str
    seconds: float = 0.0
    log: str = ""
    task: ClassVar[str] = "tests.fake_tasks:slow"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class SlowNoModel(Slow):
    """Like Slow, but needs no model (its own deployment on the Ray backend)."""

    role: ClassVar[str | None] = None


@dataclass(frozen=True)
class OomAboveOne(Request):
    """Raises out-of-memory for any batch of more than one request."""

    text: str
    log: str = ""
    task: ClassVar[str] = "tests.fake_tasks:oom_above_one"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Recorded(Request):
    """Logs each batch it runs as one line: the texts, in the order they were batched."""

    text: str
    log: str = ""
    seconds: float = 0.0
    task: ClassVar[str] = "tests.fake_tasks:recorded"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Picky(Request):
    """Raises on any batch holding a text that starts with "poison" (a task bug one input triggers)."""

    text: str
    log: str = ""
    task: ClassVar[str] = "tests.fake_tasks:picky"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class CrashOnPoison(Request):
    """Ends the worker process (as a segfault or an abort would) on a batch holding "poison"."""

    text: str
    log: str = ""
    task: ClassVar[str] = "tests.fake_tasks:crash_on_poison"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class Sneaky(Slow):
    """Plain text in the bot process; in a worker, its text grows a lone surrogate.

    It passes every check the bot process makes and brings unreadable text into
    the worker, as a request of a plugin with a bug could.
    """

    bot_pid: int = 0  # 0: an honest request of the same type

    def texts(self) -> list[str]:
        sneaking = self.bot_pid and os.getpid() != self.bot_pid
        return [self.text + "\udce9" if sneaking else self.text]


def _explode_outside(bot_pid: int) -> int:
    if os.getpid() != bot_pid:
        raise RuntimeError("this value cannot be rebuilt in a worker")
    return bot_pid


@dataclass(frozen=True)
class Unreadable:
    """Pickles in the bot process; unpickling it anywhere else raises."""

    bot_pid: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_outside, (self.bot_pid,))


def _explode_inside(bot_pid: int) -> int:
    if os.getpid() == bot_pid:
        raise RuntimeError("this value cannot be rebuilt in the bot process")
    return bot_pid


@dataclass(frozen=True)
class UnreadableInBot:
    """Pickles in a worker; unpickling it in the bot process raises."""

    bot_pid: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_inside, (self.bot_pid,))


@dataclass(frozen=True)
class CarriesUnreadable(Slow):
    payload: Any = None


@dataclass(frozen=True)
class Costly(SlowNoModel):
    """A request that says what it costs (multiply-accumulates); needs no model."""

    macs: float = 0.0

    def cost(self) -> float:
        return self.macs


@dataclass(frozen=True)
class MisspelledTask(Slow):
    """A plugin's typo: the task it names does not exist."""

    task: ClassVar[str] = "tests.fake_tasks:slwo"


def _record(path: str, line: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def slow(model: Any, tokenizer: Any, batch: list[Slow]) -> list[str]:
    for request in batch:
        _record(request.log, f"start {request.text} pid={os.getpid()}")
    time.sleep(max(r.seconds for r in batch))
    return [f"done {r.text}" for r in batch]


def oom_above_one(model: Any, tokenizer: Any, batch: list[OomAboveOne]) -> list[str]:
    import torch

    _record(batch[0].log, f"batch {len(batch)}")
    if len(batch) > 1:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return [f"ok {batch[0].text}"]


def recorded(model: Any, tokenizer: Any, batch: list[Recorded]) -> list[str]:
    _record(batch[0].log, " ".join(r.text for r in batch))
    time.sleep(max(r.seconds for r in batch))
    return [f"done {r.text}" for r in batch]


def picky(model: Any, tokenizer: Any, batch: list[Picky]) -> list[str]:
    _record(batch[0].log, f"batch {len(batch)}")
    if any(r.text.startswith("poison") for r in batch):
        raise ValueError("this task cannot handle a poisonous text")
    return [f"ok {r.text}" for r in batch]


def crash_on_poison(model: Any, tokenizer: Any, batch: list[CrashOnPoison]) -> list[str]:
    _record(batch[0].log, f"pid={os.getpid()} " + " ".join(r.text for r in batch))
    if any(r.text.startswith("poison") for r in batch):
        os._exit(3)  # no cleanup, no exception: what a crash in native code looks like from outside
    return [f"ok {r.text}" for r in batch]


class PluginError(InferenceError):
    """A plugin's own error whose constructor takes more than the message (pickle cannot rebuild it)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"Plugin error {code}: {detail}")


@dataclass(frozen=True)
class Answers(Request):
    """Answers as ``mode`` says: "ok", "unreadable" (a result the bot process cannot unpickle)
    or "plugin-error" (raises :class:`PluginError`)."""

    text: str
    mode: str = "ok"
    bot_pid: int = 0
    task: ClassVar[str] = "tests.fake_tasks:answers"
    role: ClassVar[str | None] = None

    def texts(self) -> list[str]:
        return [self.text]

    def batch_key(self) -> tuple[Any, ...]:
        return (self.mode,)


def answers(model: Any, tokenizer: Any, batch: list[Answers]) -> list[Any]:
    if any(r.mode == "plugin-error" for r in batch):
        raise PluginError(7, "the plugin says no")
    return [UnreadableInBot(r.bot_pid) if r.mode == "unreadable" else f"ok {r.text}" for r in batch]


@dataclass(frozen=True)
class Smuggles(Request):
    """Its task returns what ``kind`` says: "tensor" (a torch tensor), "nested" (a dict holding
    a numpy array), "object" (an arbitrary object) or "plain" (plain data). Needs no model."""

    kind: str
    task: ClassVar[str] = "tests.fake_tasks:smuggles"
    role: ClassVar[str | None] = None

    def texts(self) -> list[str]:
        return [self.kind]

    def batch_key(self) -> tuple[Any, ...]:
        return (self.kind,)


class Opaque:
    """Not plain data: a class the bot process has no reason to import."""


def smuggles(model: Any, tokenizer: Any, batch: list[Smuggles]) -> list[Any]:
    import torch

    made: dict[str, Any] = {
        "tensor": lambda: torch.zeros(2),
        "nested": lambda: {"top": [1, 2], "probs": torch.zeros(2).numpy()},
        "object": Opaque,
        "plain": lambda: {"top": [1, 2], "probs": [0.5, 0.25], "label": "plain"},
    }
    return [made[r.kind]() for r in batch]


# ---------------------------------------------------------------------- waiting on events in tests


async def until(condition: Any, poll_s: float = 0.01) -> None:
    """Return once ``condition()`` is true (a state change the test waits for, however long it takes)."""
    import asyncio

    while True:
        if condition():
            return
        await asyncio.sleep(poll_s)


def logged(path: str, text: str) -> Any:
    """A condition for :func:`until`: ``text`` is in the task log at ``path``."""
    return lambda: os.path.exists(path) and text in open(path, encoding="utf-8").read()


def raised_at_once(awaitable: Any) -> BaseException:
    """The exception a coroutine raises in its first step, before it waits for anything.

    This is what "refused at once" means, on a loaded machine or not: the refusal did not
    wait on a worker, a timer or another task. Fails the test if the coroutine waited.
    """
    try:
        awaitable.send(None)
    except BaseException as exc:  # the refusal under test, whatever its class
        return exc
    awaitable.close()
    raise AssertionError("it waited instead of answering at once")
