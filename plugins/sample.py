"""Beyond topic "What is a language model": how temperature, top-k and top-p reshape the
next-token distribution, and continuations drawn from it with a seed a group can share.

The worker calls transformers' own ``generate`` (after ``torch.manual_seed(seed)``), so a
draw is exactly what ``generate(do_sample=True, temperature=…, top_k=…, top_p=…,
num_return_sequences=n)`` gives with that seed; each request is drawn alone, so batching
never changes a draw. The before/after distributions come from transformers' own logits
warpers, in ``generate``'s order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    Number,
    Reply,
    Request,
    Table,
    Text,
    command,
    hookimpl,
)
from bot.charts import cell_percent, grouped_bars, render, show_bytes
from bot.render import decimal_probability, plural, probability

NEW_TOKENS = 12  # tokens per continuation
SHOWN = 12  # tokens of the first distribution shown (the model's likeliest)
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Sample(Request):
    """``n`` continuations of ``text`` sampled with these settings after seeding torch with ``seed``.

    ``top_k`` 0 and ``top_p`` 1.0 switch those filters off, as in transformers.
    """

    text: str
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    max_new_tokens: int = NEW_TOKENS
    shown: int = SHOWN
    task: ClassVar[str] = "plugins.sample:sample"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class StagedToken:
    """One token's probability at each stage of the first step."""

    id: int
    raw: bytes
    model: float  # softmax of the logits
    temperature: float  # after dividing the logits by the temperature
    top_k: float  # after top-k, renormalised (0 when cut)
    final: float  # after top-p too, renormalised: what the first token is drawn from (0 when cut)


@dataclass(frozen=True)
class Continuation:
    ids: list[int]
    raw: list[bytes]
    drawn: list[float]  # each token's probability in the distribution it was drawn from
    model: list[float]  # its probability under the model alone (temperature 1, nothing cut)
    ended: bool  # the model drew its end-of-text token


@dataclass(frozen=True)
class SampleResult:
    model: str
    prompt_tokens: int
    vocabulary: int
    shown: list[StagedToken]
    kept_top_k: int  # tokens left after top-k (the whole vocabulary when off)
    kept_top_p: int  # tokens left after top-p too
    mass_top_k: float  # share of the temperature distribution that top-k kept
    mass_top_p: float  # share of the top-k distribution that top-p kept
    continuations: list[Continuation]
    tempered_spread: float = 0.0  # e^entropy of the temperature distribution: as many equally likely tokens


def sample(model: Any, tokenizer: Any, batch: Sequence[Sample]) -> list[SampleResult]:
    """Runs in the worker, one request at a time: each draw has its own seeded random stream."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from bot.worker.tasks import token_bytes

    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    results = []
    for request in batch:
        enc = tokenizer(request.text, return_tensors="pt").to(model.device)
        prompt_length = enc["input_ids"].shape[1]
        torch.manual_seed(request.seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            num_return_sequences=request.n,
            max_new_tokens=request.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # The stages of the first step, with the warpers generate applies (and skips when off).
        logits = out.logits[0][:1].float()
        ids = enc["input_ids"]
        tempered = TemperatureLogitsWarper(request.temperature)(ids, logits.clone())
        after_k = TopKLogitsWarper(request.top_k)(ids, tempered.clone()) if request.top_k else tempered
        after_p = TopPLogitsWarper(request.top_p)(ids, after_k.clone()) if request.top_p < 1.0 else after_k
        # In float64: a float32 softmax at a low temperature gives 0 to tokens that keep a (tiny) probability.
        stages = [torch.log_softmax(s, dim=-1)[0].double().exp() for s in (logits, tempered, after_k, after_p)]
        top = torch.topk(stages[0], min(request.shown, stages[0].shape[-1])).indices.tolist()
        shown = [
            StagedToken(int(t), raw, *(float(stage[t]) for stage in stages))
            for t, raw in zip(top, token_bytes(tokenizer, top), strict=True)
        ]
        kept_k, kept_p = (after_k[0] > -float("inf")), (after_p[0] > -float("inf"))
        tempered_p = stages[1]
        spread = float(torch.exp(-(tempered_p * torch.log(tempered_p.clamp_min(1e-45))).sum()))
        continuations = []
        new = out.sequences[:, prompt_length:]
        for row in range(new.shape[0]):
            drawn_ids: list[int] = []
            for token in new[row].tolist():
                drawn_ids.append(int(token))
                if token in stop:
                    break
            steps = range(len(drawn_ids))
            drawn = [
                float(torch.log_softmax(out.scores[s][row].float(), -1)[drawn_ids[s]].double().exp()) for s in steps
            ]
            plain = [
                float(torch.log_softmax(out.logits[s][row].float(), -1)[drawn_ids[s]].double().exp()) for s in steps
            ]
            ended = bool(drawn_ids) and drawn_ids[-1] in stop
            continuations.append(Continuation(drawn_ids, token_bytes(tokenizer, drawn_ids), drawn, plain, ended))
        results.append(
            SampleResult(
                model="",
                prompt_tokens=prompt_length,
                vocabulary=int(logits.shape[-1]),
                shown=shown,
                kept_top_k=int(kept_k.sum()),
                kept_top_p=int(kept_p.sum()),
                mass_top_k=float(stages[1][kept_k].sum()),
                mass_top_p=float(stages[2][kept_p].sum()),
                continuations=continuations,
                tempered_spread=spread,
            )
        )
    return results


# --------------------------------------------------------------------------- the command


def short(model: str) -> str:
    return model.split(" (")[0][:40]


def cut_by(token: StagedToken) -> str:
    if token.top_k == 0:
        return "cut by top-k"
    if token.final == 0:
        return "cut by top-p"
    return ""


def continuation_text(c: Continuation) -> str:
    return "".join(show_bytes(raw) if i == len(c.raw) - 1 and c.ended else _text(raw) for i, raw in enumerate(c.raw))


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return show_bytes(raw)


STAGES = ("model", "temperature", "final")  # the table's probability columns


def held_line(temperature: float, result: SampleResult) -> str:
    """How much of the temperature distribution the listed tokens hold, and how far the rest spreads
    (at a high temperature the few listed tokens can hold almost nothing)."""
    held = sum(t.temperature for t in result.shown)
    rest = result.vocabulary - len(result.shown)
    others = 1 - held
    other = "over 99.9%" if others > 0.999 else "under 0.1%" if others < 0.001 else f"{others:.1%}"
    return (
        f"At T={temperature:g} these {len(result.shown)} tokens hold {cell_percent(held)} of the probability; "
        f"the other {other} is spread over the remaining {rest:,} tokens. "
        f"Its spread: as if choosing among ~{result.tempered_spread:,.0f} equally likely tokens (e to the entropy)."
    )


def settings_line(temperature: float, top_k: int, top_p: float) -> str:
    return f"temperature {temperature:g}, top-k {top_k or 'off'}, top-p {top_p:g}" + (" (off)" if top_p >= 1 else "")


@command(
    "sample",
    "Temperature, top-k and top-p at work: the next-token distribution and seeded samples",
    topic="language-model",
    options=[
        Text("prompt", "The text the model continues", max_length=500),
        Number(
            "temperature",
            "Divide the logits by this (below 1 sharpens, above 1 flattens)",
            default=1.0,
            min_value=0.05,
            max_value=5.0,
        ),
        Integer("top_k", "Keep only the k likeliest tokens (0 = off)", default=50, min_value=0, max_value=1000),
        Number(
            "top_p",
            "Keep the fewest likeliest tokens whose probability reaches p (1 = off)",
            default=0.9,
            min_value=0.01,
            max_value=1.0,
        ),
        Integer("n", "How many continuations to sample", default=3, min_value=1, max_value=5),
        Integer(
            "seed",
            "Seed of the random draw (default: a new one, shown in the reply)",
            required=False,
            min_value=0,
            max_value=MAX_SEED,
        ),
    ],
)
async def sample_command(
    ctx: Context, prompt: str, temperature: float, top_k: int, top_p: float, n: int, seed: int | None
) -> Reply:
    if seed is None:
        seed = random.randrange(MAX_SEED + 1)
    result = await ctx.inference.submit(Sample(prompt, temperature, top_k, top_p, n, seed))
    labels = [show_bytes(t.raw) for t in result.shown]
    rows = [
        [
            label,
            decimal_probability(t.model, 3),
            decimal_probability(t.temperature, 3),
            decimal_probability(t.final, 3) if t.final else "-",
            cut_by(t),
        ]
        for label, t in zip(labels, result.shown, strict=True)
    ]
    steps = [
        f"1. The model's own distribution over {result.vocabulary:,} tokens (grey bars).",
        f"2. Temperature {temperature:g} divides the logits before the softmax: "
        + (
            "below 1 sharpens it (the favourite gains)."
            if temperature < 1
            else "above 1 flattens it (unlikely tokens gain)."
            if temperature > 1
            else "1 leaves it as it is."
        ),
    ]
    steps.append(held_line(temperature, result))
    if top_k:
        steps.append(
            f"3. Top-k {top_k} keeps the {plural(result.kept_top_k, 'likeliest token')}, "
            f"{probability(result.mass_top_k)} of the probability, and cuts the rest."
        )
    else:
        steps.append("3. Top-k is off: no token is cut by rank.")
    if top_p < 1:
        steps.append(
            f"4. Top-p {top_p:g} then keeps the fewest likeliest tokens whose probability reaches {top_p:.0%}: "
            f"{plural(result.kept_top_p, 'token')}, {probability(result.mass_top_p)} of what was left."
        )
    else:
        steps.append("4. Top-p is off: nothing more is cut.")
    steps.append(
        "The kept probabilities are divided by the mass they hold, so they sum to 1 again "
        "(the bars “after top-k and top-p”); "
        "each token is drawn from that. transformers applies the three in this order."
    )
    fields = [
        Field("settings", settings_line(temperature, top_k, top_p)),
        Field("seed", f"{seed} (the same prompt, settings and seed draw the same samples again)", inline=False),
    ]
    for number, c in enumerate(result.continuations, 1):
        shares = [probability(p) for p in c.drawn]  # never "0%" for a token that was drawn, nor 100% short of 1
        tokens = " · ".join(f"{show_bytes(raw)} {p}" for raw, p in zip(c.raw, shares, strict=True))
        fields.append(Field(f"sample {number}", f"“{continuation_text(c)}”\n{tokens}"[:1000], inline=False))
    chart = await render(
        grouped_bars,
        labels,
        [
            ("model", [t.model for t in result.shown]),
            (f"temperature {temperature:g}", [t.temperature for t in result.shown]),
            ("after top-k and top-p (drawn from)", [t.final for t in result.shown]),
        ],
        title=f"Next token after “{prompt[-40:]}”",
        xlabel=f"probability ({short(result.model)}; {settings_line(temperature, top_k, top_p)})",
        notes=[cut_by(t) for t in result.shown],
        filename="sample.png",
    )
    return Reply(
        title=f"Sampling: {settings_line(temperature, top_k, top_p)}",
        text="\n".join(steps)
        + "\nEach sample lists its tokens with the probability each had in the distribution it was drawn from.",
        fields=fields,
        table=Table(["token", "model", f"T={temperature:g}", "drawn from", ""], rows, align="lrrrl"),
        images=[chart],
        data={
            "model": result.model,
            "seed": seed,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "n": n,
            "kept_top_k": result.kept_top_k,
            "kept_top_p": result.kept_top_p,
            "mass_top_k": result.mass_top_k,
            "mass_top_p": result.mass_top_p,
            "shown_hold_at_temperature": sum(t.temperature for t in result.shown),
            "tempered_spread": result.tempered_spread,
            "shown": [
                {
                    "id": t.id,
                    "token": label,
                    "model": t.model,
                    "temperature": t.temperature,
                    "top_k": t.top_k,
                    "final": t.final,
                }
                for label, t in zip(labels, result.shown, strict=True)
            ],
            "samples": [
                {
                    "ids": c.ids,
                    "tokens": [show_bytes(raw) for raw in c.raw],
                    "text": continuation_text(c),
                    "drawn": c.drawn,
                    "model": c.model,
                    "ended": c.ended,
                }
                for c in result.continuations
            ],
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(sample_command)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
