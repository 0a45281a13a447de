"""Wall times measured as a spread, so a reply calls a difference only where it is outside the noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """Wall times of repeated runs of one thing, in seconds."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def low(self) -> float:
        return min(self.runs)

    @property
    def high(self) -> float:
        return max(self.runs)

    def text(self) -> str:
        """The median with the fastest and slowest run: "104 ms (98–120 ms over 3 runs)"."""
        low, high = ms(self.low).removesuffix(" ms"), ms(self.high)
        return f"{ms(self.median)} ({low}–{high} over {len(self.runs)} runs)"

    def clearly_faster_than(self, other: Spread) -> bool:
        """Faster in every run than ``other`` in any: a difference outside the noise."""
        return self.high < other.low


def engine(model: str) -> str:
    """The engine a served model runs on, from its label ("… · fp32, onnxruntime")."""
    return model.rsplit(", ", 1)[-1] if " · " in model else "unknown engine"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


async def interleaved(runs: Sequence[Callable[[], Awaitable[T]]], repeats: int) -> tuple[list[T], list[Spread]]:
    """Each of ``runs`` timed ``repeats`` times, taking turns (a, b, a, b, …) so that a change in the
    machine's load falls on every side alike. The last result of each, and each one's spread."""
    seconds: list[list[float]] = [[] for _ in runs]
    results: list[T | None] = [None] * len(runs)
    for _ in range(repeats):
        for n, run in enumerate(runs):
            started = time.perf_counter()
            results[n] = await run()
            seconds[n].append(time.perf_counter() - started)
    return [r for r in results if r is not None], [Spread(tuple(s)) for s in seconds]


def versus(first: str, a: Spread, second: str, b: Spread) -> str:
    """Which of two timed things was faster, or "within noise" when their runs overlap."""
    if a.clearly_faster_than(b):
        return f"{first} was faster in every run."
    if b.clearly_faster_than(a):
        return f"{second} was faster in every run."
    return "Within noise: the two sets of runs overlap, so neither is faster in these timings."
