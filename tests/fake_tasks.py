"""Inference tasks for fault tests, run by real worker processes.

They are named ``"tests.fake_tasks:<function>"`` so the worker imports them
like any task that lives outside the core. Each writes what it computed to a
log file, so tests can tell whether a request reached the model at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bot.inference.protocol import Request


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
    _record(batch[0].log, f"batch {len(batch)}")
    if len(batch) > 1:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return [f"ok {batch[0].text}"]
