"""Topic "Transformers vs RNNs": quadratic attention against sequential recurrence, measured."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Command,
    Context,
    Field,
    Integer,
    Reply,
    Request,
    Table,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.charts import line_chart, render

TOPIC = Topic.load("plugins", "transformers-vs-rnns")  # plugins/data/topics/transformers-vs-rnns.toml

MAX_LENGTH, MAX_LENGTHS, HEADS = 8192, 6, 4


@dataclass(frozen=True)
class LayerTiming(Request):
    """Wall time of one self-attention layer and one GRU layer of ``width`` on ``length`` tokens."""

    length: int
    width: int
    repeats: int = 3
    task: ClassVar[str] = "plugins.complexity:time_layers"
    role: ClassVar[str | None] = None  # needs no model, only the worker's device

    def texts(self) -> list[str]:
        return []

    def batch_key(self) -> tuple[Any, ...]:
        return (self.length, self.width)  # timed one at a time


@dataclass(frozen=True)
class LayerTimes:
    device: str
    attention_ms: float
    recurrent_ms: float


def _median_ms(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    import torch

    fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def time_layers(model: Any, tokenizer: Any, batch: Sequence[LayerTiming]) -> list[LayerTimes]:
    """Runs in the worker, on its device: one attention layer and one GRU of the same width."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    results = []
    for request in batch:
        torch.manual_seed(0)
        attention = torch.nn.MultiheadAttention(request.width, HEADS, batch_first=True).to(device).eval()
        recurrent = torch.nn.GRU(request.width, request.width, batch_first=True).to(device).eval()
        x = torch.randn(1, request.length, request.width, device=device)
        with torch.inference_mode():
            attention_ms = _median_ms(functools.partial(attention, x, x, x, need_weights=False), request.repeats, cuda)
            recurrent_ms = _median_ms(functools.partial(recurrent, x), request.repeats, cuda)
        results.append(LayerTimes(str(device), attention_ms, recurrent_ms))
    return results


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        raise UserError("`lengths` must be whole numbers separated by commas, e.g. 128,512,2048.") from None
    if not lengths or len(lengths) > MAX_LENGTHS:
        raise UserError(f"Give between 1 and {MAX_LENGTHS} lengths.")
    if lengths[0] < 1 or lengths[-1] > MAX_LENGTH:
        raise UserError(f"Lengths must be between 1 and {MAX_LENGTH:,}.")
    return lengths


@command(
    "complexity",
    "Operations and measured time: self-attention vs a recurrent layer",
    topic=TOPIC.slug,
    options=[
        Text("lengths", "Sequence lengths, comma-separated", default="64,256,1024,4096", max_length=60),
        Integer("width", "Hidden size of both layers", default=256, min_value=16, max_value=1024),
    ],
)
async def complexity(ctx: Context, lengths: str, width: int) -> Reply:
    ns = parse_lengths(lengths)
    times = [await ctx.inference.submit(LayerTiming(n, width)) for n in ns]
    rows = []
    for n, t in zip(ns, times, strict=True):
        rows.append(
            [
                f"{n:,}",
                f"{n:,}",
                "1",
                f"{n * n:,}",
                f"{n * n * width:,}",
                f"{t.attention_ms:.2f}",
                f"{t.recurrent_ms:.2f}",
            ]
        )
    series = [
        ("self-attention (measured)", ns, [t.attention_ms for t in times], "o-"),
        ("GRU (measured)", ns, [t.recurrent_ms for t in times], "s-"),
    ]
    # Reference slopes anchored at the first measurement, so the eye can compare shapes.
    a0, r0, n0 = times[0].attention_ms, times[0].recurrent_ms, ns[0]
    if len(ns) > 1:
        series += [
            ("∝ n² (reference)", ns, [a0 * (n / n0) ** 2 for n in ns], "--"),
            ("∝ n (reference)", ns, [r0 * n / n0 for n in ns], ":"),
        ]
    chart = await render(
        line_chart,
        series,
        title=f"One layer, width {width}, on {times[0].device}",
        xlabel="sequence length (tokens)",
        ylabel="milliseconds per forward pass",
        filename="complexity.png",
    )
    return Reply(
        title="Self-attention vs recurrence",
        text=(
            "A recurrent layer takes n steps that must run one after another; attention takes one parallel step "
            "but compares all n² pairs of tokens. Times are medians of 3 forwards on the worker's device."
        ),
        table=Table(
            ["n", "RNN steps", "attn steps", "attn pairs", "attn pair×width", "attn ms", "GRU ms"],
            rows,
            align="rrrrrrr",
        ),
        fields=[Field("device", times[0].device), Field("width", str(width)), Field("heads", str(HEADS))],
        images=[chart],
        data={
            "device": times[0].device,
            "width": width,
            "lengths": ns,
            "attention_ms": [t.attention_ms for t in times],
            "recurrent_ms": [t.recurrent_ms for t in times],
            "attention_pairs": [n * n for n in ns],
            "recurrent_steps": ns,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(complexity)


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
