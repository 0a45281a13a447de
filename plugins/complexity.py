"""Topic "Transformers vs RNNs": quadratic attention against sequential recurrence, measured."""

from __future__ import annotations

import functools
import itertools
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
from bot.render import significant

TOPIC = Topic.load("plugins", "transformers-vs-rnns")  # plugins/data/topics/transformers-vs-rnns.toml

# Counting needs no measurement, so lengths go well past what can be timed (the course's 32,768 and beyond).
MAX_LENGTH, MAX_LENGTHS, HEADS, REPEATS = 65_536, 6, 4, 3
# A length is timed only if the attention weights (one 4-byte number per pair of tokens per head) fit in
# this much memory: on a CPU they are all written out, and past it the time goes to moving memory, not to
# the multiply-accumulates the budget counts (n = 16,384 at width 16 is within that budget yet needs 4 GiB
# and minutes per forward). With 4 heads this allows n up to 4,096.
SCORES_MAX_BYTES = 256 * 2**20
MAC_LINE = "A multiply-accumulate is one multiplication added to a running sum: the unit of work of a matrix product."


def score_bytes(length: int) -> int:
    """Memory of one layer's attention weights: heads × n² numbers of 4 bytes."""
    return HEADS * length * length * 4


def recurrent_macs(length: int, width: int) -> int:
    """A GRU step multiplies the input and the previous state by three d×d matrices each
    (reset gate, update gate, candidate): 6·d² multiply-accumulates per token, n steps in a row."""
    return 6 * length * width * width


def projection_macs(length: int, width: int) -> int:
    """Attention's query, key, value and output projections: four d×d matrices per token."""
    return 4 * length * width * width


def pair_macs(length: int, width: int) -> int:
    """Scores q·k for all n² pairs, then the weighted sum of values: n²·d each. Splitting d
    across heads changes how the work is grouped, not how much of it there is."""
    return 2 * length * length * width


@dataclass(frozen=True)
class LayerTiming(Request):
    """Wall time of one self-attention layer and one GRU layer of ``width`` on ``length`` tokens."""

    length: int
    width: int
    heads: int = HEADS
    repeats: int = REPEATS
    task: ClassVar[str] = "plugins.complexity:time_layers"
    role: ClassVar[str | None] = None  # needs no model, only the worker's device

    def texts(self) -> list[str]:
        return []

    def batch_key(self) -> tuple[Any, ...]:
        return (self.length, self.width, self.heads)  # timed one at a time

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass of both layers (heads leave the count unchanged)."""
        n, d = self.length, self.width
        return recurrent_macs(n, d) + projection_macs(n, d) + pair_macs(n, d)

    def cost(self) -> float:
        # One warm-up forward, then ``repeats`` timed ones, of each layer.
        return float((self.repeats + 1) * self.forward_macs())


@dataclass(frozen=True)
class LayerTimes:
    """Median times, and the fastest and slowest of the timed runs (their spread: how noisy they are)."""

    device: str
    attention_ms: float
    recurrent_ms: float
    attention_range: tuple[float, float] | None = None  # (fastest, slowest) run; None: the median only
    recurrent_range: tuple[float, float] | None = None

    def attention_spread(self) -> tuple[float, float]:
        return self.attention_range or (self.attention_ms, self.attention_ms)

    def recurrent_spread(self) -> tuple[float, float]:
        return self.recurrent_range or (self.recurrent_ms, self.recurrent_ms)

    def attention_slower(self) -> bool:
        """Slower in every run than the GRU in any run: outside the spread, not noise."""
        return self.attention_spread()[0] > self.recurrent_spread()[1]

    def attention_faster(self) -> bool:
        return self.attention_spread()[1] < self.recurrent_spread()[0]


def _times_ms(fn: Callable[[], Any], repeats: int, cuda: bool) -> list[float]:
    """Wall time of ``fn`` in each of ``repeats`` runs, after one warm-up run."""
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
    return samples


def build_layers(width: int, heads: int, device: Any) -> tuple[Any, Any]:
    """The two layers that are timed: one multi-head self-attention layer and one GRU layer."""
    import torch

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True).to(device).eval()
    recurrent = torch.nn.GRU(width, width, batch_first=True).to(device).eval()
    return attention, recurrent


def time_layers(model: Any, tokenizer: Any, batch: Sequence[LayerTiming]) -> list[LayerTimes]:
    """Runs in the worker, on its device: one attention layer and one GRU of the same width."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    results = []
    for request in batch:
        attention, recurrent = build_layers(request.width, request.heads, device)
        x = torch.randn(1, request.length, request.width, device=device)
        with torch.inference_mode():
            attention_ms = _times_ms(functools.partial(attention, x, x, x, need_weights=False), request.repeats, cuda)
            recurrent_ms = _times_ms(functools.partial(recurrent, x), request.repeats, cuda)
        results.append(
            LayerTimes(
                str(device),
                statistics.median(attention_ms),
                statistics.median(recurrent_ms),
                (min(attention_ms), max(attention_ms)),
                (min(recurrent_ms), max(recurrent_ms)),
            )
        )
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


def check_width(width: int) -> None:
    if width % HEADS:
        below = width - width % HEADS
        options = " or ".join(f"{w}" for w in (below, below + HEADS) if w >= 16)
        raise UserError(
            f"`width` must be a multiple of {HEADS}: the attention layer splits it across {HEADS} heads "
            f"of equal size. Try {options}."
        )


def short(number: float) -> str:
    """A count as a student can read it: 65,536 or 1.37e11."""
    if number < 1_000_000:
        return f"{int(number):,}"
    mantissa, exponent = f"{number:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def request_budget(ctx: Context) -> float:
    """The service's limit on one request's multiply-accumulates."""
    return float(getattr(ctx.inference, "max_request_cost", ctx.config.inference.max_request_cost))


def slower_from(measured: Sequence[tuple[int, LayerTimes]]) -> int | None:
    """The shortest timed length from which attention is slower than the GRU at every longer one
    (None when it is not slower at the longest)."""
    start = None
    for n, t in reversed(measured):
        if not t.attention_slower():  # faster, or within noise
            break
        start = n
    return start


def measured_verdict(measured: Sequence[tuple[int, LayerTimes]], d: int) -> str:
    """What the timings show, length by length, and why, against the counts (attention does more
    multiply-accumulates than the GRU exactly when n > d)."""
    slower = [n for n, t in measured if t.attention_slower()]
    faster = [n for n, t in measured if t.attention_faster()]
    noise = [n for n, t in measured if n not in slower and n not in faster]
    start = slower_from(measured)
    if len(measured) == 1:
        # One point has no trend: say what was measured there and nothing about "every length".
        n = measured[0][0]
        there = "slower than the GRU" if slower else "faster than the GRU" if faster else "within noise of the GRU"
        verdict = (
            f"Measured at one length only (n = {n:,}): attention was {there} there. One point shows no growth; "
            "give more lengths that can be timed to see how time grows."
        )
    elif not slower and not noise:
        verdict = "Measured, attention was faster than the GRU at every timed length."
    elif not faster and not noise:
        verdict = f"Measured, attention was slower than the GRU at every timed length (n = {listing(slower)})."
    elif not noise and start is not None and slower == [n for n, _ in measured if n >= start]:
        verdict = (
            f"Measured, attention was faster than the GRU up to n = {faster[-1]:,} and slower from n = {start:,} on."
        )
    else:
        found = [f"slower than the GRU at n = {listing(slower)}"] if slower else []
        found += [f"faster{'' if slower else ' than the GRU'} at n = {listing(faster)}"] if faster else []
        verdict = (
            "Measured, attention was " + " and ".join(found) + "." if found else "Measured, no clear difference."
        ) + (" No single crossover in these timings." if slower and faster else "")
    parts = [verdict]
    if noise:
        parts.append(
            f"At n = {listing(noise)} the two times are within noise: the fastest and slowest of the timed runs "
            "of one layer overlap the other's, so neither is faster there."
        )
    parts += not_monotone(measured)
    despite_more = [n for n in faster if n > d]
    if despite_more:
        parts.append(
            f"At n = {listing(despite_more)} attention was faster though it does more multiply-accumulates than the "
            "GRU: the GRU's n steps wait for each other and leave the hardware idle, while attention's work is a few "
            "large matrix products run in parallel, so its extra n² work shows in time only once it dominates."
        )
    else:
        parts.append(
            "The GRU's n steps must wait for each other, while attention's work is a few large matrix products "
            "run in parallel, so attention's extra n² work shows in time only once it dominates."
        )
    despite_less = [n for n in slower if n < d]
    if despite_less:
        parts.append(
            f"At n = {listing(despite_less)} attention was slower though it does fewer multiply-accumulates than "
            "the GRU: at such sizes the time is mostly the fixed cost of launching each operation, not arithmetic."
        )
    return " ".join(parts)


def spread_cell(median: float, spread: tuple[float, float]) -> str:
    """A median time with its fastest and slowest run: 6.63 (6.51–6.92)."""
    low, high = spread
    return f"{significant(median)} ({significant(low)}–{significant(high)})" if high > low else significant(median)


def not_monotone(measured: Sequence[tuple[int, LayerTimes]]) -> list[str]:
    """A warning for each layer whose time fell at a longer length beyond the runs' spread: more
    tokens cannot take less work, so the machine's other load is in those numbers."""
    warnings = []
    for name, spread, median in (
        ("Attention's", LayerTimes.attention_spread, "attention_ms"),
        ("The GRU's", LayerTimes.recurrent_spread, "recurrent_ms"),
    ):
        for (n, shorter), (m, longer) in itertools.combinations(measured, 2):
            if spread(longer)[1] < spread(shorter)[0]:
                warnings.append(
                    f"{name} time fell from n = {n:,} to n = {m:,} ({significant(getattr(shorter, median))} → "
                    f"{significant(getattr(longer, median))} ms): more tokens cannot take less work, so other load "
                    "on the machine is in these times; run it again before reading a trend from them."
                )
                break
    return warnings


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def listing(numbers: Sequence[int]) -> str:
    shown = [f"{n:,}" for n in numbers]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


@command(
    "complexity",
    "Operations and measured time: self-attention vs a recurrent layer",
    topic=TOPIC.slug,
    options=[
        Text("lengths", "Sequence lengths, comma-separated", default="64,256,1024,4096", max_length=60),
        Integer(
            "width", f"Hidden size of both layers (a multiple of {HEADS})", default=256, min_value=16, max_value=1024
        ),
    ],
)
async def complexity(ctx: Context, lengths: str, width: int) -> Reply:
    ns = parse_lengths(lengths)
    check_width(width)
    budget = request_budget(ctx)
    requests = [LayerTiming(n, width) for n in ns]
    over_budget = [r.cost() > budget for r in requests]
    too_big = [score_bytes(n) > SCORES_MAX_BYTES for n in ns]
    timed = [not (a or b) for a, b in zip(over_budget, too_big, strict=True)]
    times: list[LayerTimes | None] = []
    for request, fits in zip(requests, timed, strict=True):
        times.append(await ctx.inference.submit(request) if fits else None)
    measured = [(n, t) for n, t in zip(ns, times, strict=True) if t is not None]
    device = measured[0][1].device if measured else None

    d = width
    rows = []
    for n, t in zip(ns, times, strict=True):
        rows.append(
            [
                f"{n:,}",
                f"{n:,}",
                short(recurrent_macs(n, d)),
                short(projection_macs(n, d)),
                short(pair_macs(n, d)),
                spread_cell(t.attention_ms, t.attention_spread()) if t else "-",
                spread_cell(t.recurrent_ms, t.recurrent_spread()) if t else "-",
            ]
        )

    # Reference slopes through the longest timed length: there the layers do the most work, and the
    # fixed cost of launching a forward pass (which flattens the short end of both curves) matters least.
    reference_n2: list[float] = []
    reference_n: list[float] = []
    if len(measured) > 1:
        n_top, t_top = measured[-1]
        reference_n2 = [t_top.attention_ms * (n / n_top) ** 2 for n, _ in measured]
        reference_n = [t_top.recurrent_ms * n / n_top for n, _ in measured]

    slower = slower_from(measured)
    lines = [
        "A recurrent layer takes n steps that must run one after another; attention takes one parallel step "
        "but compares all n² pairs of tokens.",
        f"Both multiply every token by d×d matrices (d = width = {d}): the GRU 6·n·d² multiply-accumulates "
        f"(three gates, each on the input and on the previous state), attention 4·n·d² (query, key, value and "
        f"output projections). Only attention adds 2·n²·d for the pairs, which outgrows its projections past "
        f"n = 2d = {2 * d:,} and makes attention's total larger than the GRU's past n = d = {d:,}.",
        MAC_LINE,
    ]
    if measured:
        lines.append(
            f"Times are medians of {REPEATS} warm forwards (after one warm-up) on {device}, the fastest and slowest "
            "run in brackets; a difference counts only where the two ranges do not overlap. "
            + measured_verdict(measured, d)
            + (
                " At short lengths both times are mostly fixed overhead, so the reference lines on the chart go "
                "through the longest timed length."
                if reference_n2
                else ""
            )
        )
    skipped = [n for n, over in zip(ns, over_budget, strict=True) if over]
    if skipped:
        worst = max(r.cost() for r, over in zip(requests, over_budget, strict=True) if over)
        lines.append(
            f"Not timed: n = {listing(skipped)}. Timing {'it' if len(skipped) == 1 else 'them'} would take up to "
            f"{short(worst)} multiply-accumulates ({REPEATS + 1} forwards of each layer, one warm-up and {REPEATS} "
            f"timed, each the table's GRU and attention counts added up), over this service's budget of "
            f"{short(budget)} per request; "
            "the counts need no measurement."
        )
    big = [n for n, over, large in zip(ns, over_budget, too_big, strict=True) if large and not over]
    if big:
        lines.append(
            f"Not timed: n = {listing(big)}. {'Its' if len(big) == 1 else 'Their'} attention weights alone "
            f"({HEADS} heads × n² numbers of 4 bytes) would take {'' if len(big) == 1 else 'up to '}"
            f"{gib(score_bytes(big[-1]))}, more than the {gib(SCORES_MAX_BYTES)} this bot lets one timing use "
            "(written out in full, as on a CPU, moving them would take longer than the counted work); "
            "the counts need no measurement."
        )

    # The counts are always charted (they need no measurement); the timings only from two timed
    # lengths on, since one point is no curve and would invite a trend it cannot show.
    attention_total = [projection_macs(n, d) + pair_macs(n, d) for n in ns]
    charted = ["counts"]
    images = [
        await render(
            line_chart,
            [
                ("GRU 6·n·d²", ns, [recurrent_macs(n, d) for n in ns], "s-"),
                ("attention 4·n·d² + 2·n²·d", ns, attention_total, "o-"),
                ("attention pairs 2·n²·d (the n² part)", ns, [pair_macs(n, d) for n in ns], "--"),
            ],
            title=f"One layer, width {width}: counted multiply-accumulates",
            xlabel="sequence length (tokens)",
            ylabel="multiply-accumulates per forward pass",
            filename="complexity-counts.png",
        )
    ]
    if len(measured) > 1:
        series = [
            ("self-attention (measured)", [n for n, _ in measured], [t.attention_ms for _, t in measured], "o-"),
            ("GRU (measured)", [n for n, _ in measured], [t.recurrent_ms for _, t in measured], "s-"),
        ]
        xs = [n for n, _ in measured]
        series += [
            ("∝ n² (through the longest)", xs, reference_n2, "--"),
            ("∝ n (through the longest)", xs, reference_n, ":"),
        ]
        charted.insert(0, "timings")
        images.insert(
            0,
            await render(
                line_chart,
                series,
                title=f"One layer, width {width}, on {device}: measured",
                xlabel="sequence length (tokens)",
                ylabel="milliseconds per forward pass",
                filename="complexity.png",
            ),
        )
    elif measured:
        lines.append("Only one length was timed, so its time is in the table and only the counts are charted.")
    return Reply(
        title="Self-attention vs recurrence",
        text="\n".join(lines),
        table=Table(
            ["n", "RNN steps", "GRU 6nd²", "attn 4nd²", "attn 2n²d", "attn ms", "GRU ms"],
            rows,
            align="rrrrrrr",
        ),
        fields=[
            Field("device", device or "not timed"),
            Field("width", str(width)),
            Field("heads", str(HEADS)),
            Field("budget", f"{short(budget)} multiply-accumulates per request"),
        ],
        images=images,
        data={
            "charted": charted,
            "device": device,
            "width": width,
            "heads": HEADS,
            "lengths": ns,
            "timed": timed,
            "not_timed_reason": [
                "budget" if over else "memory" if large else None
                for over, large in zip(over_budget, too_big, strict=True)
            ],
            "timing_cost": [r.cost() for r in requests],
            "max_request_cost": budget,
            "attention_ms": [t.attention_ms if t else None for t in times],
            "recurrent_ms": [t.recurrent_ms if t else None for t in times],
            "attention_range_ms": [list(t.attention_spread()) if t else None for t in times],
            "recurrent_range_ms": [list(t.recurrent_spread()) if t else None for t in times],
            "reference_n2": reference_n2,
            "reference_n": reference_n,
            "attention_pairs": [n * n for n in ns],
            "recurrent_steps": ns,
            "recurrent_macs": [recurrent_macs(n, d) for n in ns],
            "attention_projection_macs": [projection_macs(n, d) for n in ns],
            "attention_pair_macs": [pair_macs(n, d) for n in ns],
            "measured_attention_slower_from": slower,
            "measured_attention_slower_at": [n for n, t in measured if t.attention_ms > t.recurrent_ms],
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(complexity)


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
