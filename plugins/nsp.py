"""Topic "Next sentence prediction": does sentence B follow sentence A?"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Command,
    Context,
    Field,
    ModelRole,
    NoModelForRole,
    Reply,
    Request,
    Score,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
    task_name,
)

TOPIC = Topic.load("plugins", "nsp")  # plugins/data/topics/nsp.toml

# The model role this plugin adds (``[models] nsp = "..."`` in config.toml).
NSP_ROLE = ModelRole(
    "nsp", "Model with a next-sentence-prediction head", "bert-base-uncased", "AutoModelForNextSentencePrediction"
)


# --------------------------------------------------------------------------- the worker task


@dataclass(frozen=True)
class NextSentenceResult:
    model: str  # filled in by the worker with the served model's label
    is_next: float


def next_sentence(model: Any, tokenizer: Any, batch: Sequence[NextSentence]) -> list[NextSentenceResult]:
    """Runs in a model worker: P(IsNext) for each pair, from the model's NSP head."""
    enc = tokenizer([r.first for r in batch], [r.second for r in batch], return_tensors="pt", padding=True)
    probs = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float().softmax(-1)
    # Index 0 is IsNext in BERT's NSP head.
    return [NextSentenceResult("", float(p[0])) for p in probs]


@dataclass(frozen=True)
class NextSentence(Request):
    """P(IsNext) for the pair (first, second) from a model with an NSP head."""

    first: str
    second: str
    task: ClassVar[str] = task_name(next_sentence)
    role: ClassVar[str | None] = NSP_ROLE.name

    def texts(self) -> list[str]:
        return [self.first, self.second]


WORDS = re.compile(r"\w+")
REPEATS = 0.8  # B "repeats" A when at least this share of B's words are words of A
PREDICTABILITY_LINE = (
    "What this measures: how predictable B is once the model has read A. Copying or repeating A makes B "
    "very predictable too, so a high score is not proof that B is a sensible next sentence."
)


def repeated_share(first: str, second: str) -> float:
    """The share of B's words (case aside) that are words of A: 1.0 when B only repeats A."""
    a = {w.casefold() for w in WORDS.findall(first)}
    b = [w.casefold() for w in WORDS.findall(second)]
    return sum(w in a for w in b) / len(b) if b else 0.0


def repeat_warning(first: str, second: str) -> str | None:
    """A warning when B repeats A (a model scores copied text as highly predictable), else None."""
    share = repeated_share(first, second)
    if share < REPEATS:
        return None
    return (
        f"Warning: B repeats A ({share:.0%} of B's words are in A). A model finds repeated text easy to predict "
        "(it can copy it), so this score says B is predictable after A, not that B is a new sentence that follows."
    )


@command(
    "nsp",
    "How likely sentence B follows sentence A (BERT's next-sentence head)",
    topic=TOPIC.slug,
    options=[
        Text("sentence_a", "The first sentence", max_length=400),
        Text("sentence_b", "The sentence that may follow it", max_length=400),
    ],
)
async def nsp(ctx: Context, sentence_a: str, sentence_b: str) -> Reply:
    try:
        result = await ctx.inference.submit(NextSentence(sentence_a, sentence_b))
    except NoModelForRole as missing:
        return await coherence(ctx, sentence_a, sentence_b, str(missing))
    verdict = "IsNext" if result.is_next >= 0.5 else "NotNext"
    warning = repeat_warning(sentence_a, sentence_b)
    return Reply(
        title=f"Next sentence prediction ({result.model})",
        text=f"{verdict}: P(B follows A) = {result.is_next:.4f}" + (f"\n{warning}" if warning else ""),
        table=Table(
            ["label", "probability"], [["IsNext", f"{result.is_next:.4f}"], ["NotNext", f"{1 - result.is_next:.4f}"]]
        ),
        data={
            "model": result.model,
            "is_next": result.is_next,
            "label": verdict,
            "b_words_in_a": repeated_share(sentence_a, sentence_b),
            "repeats": warning is not None,
        },
    )


# Sentences on unrelated subjects, like the random B of BERT's NotNext pairs. Any sentence
# before B helps a little (B then starts mid-text), so how much a typical one helps is the
# baseline A has to beat. The median, so one that happens to fit B does not move it.
UNRELATED = (
    "The train to the coast leaves every hour from the main station.",
    "Water boils at a lower temperature high up in the mountains.",
    "She painted the garden fence green at the end of last summer.",
    "Most spiders have eight eyes, but many of them see poorly.",
    "The new software update fixes several security problems.",
    "Our team lost the final match by a single goal.",
)
# B "follows" A when A beats a typical unrelated sentence by this many nats per token of B
# (each token of B about e ≈ 2.7 times as likely). On SmolLM2, pairs that belong together
# scored 1.4-2.3 and unrelated pairs -0.8-0.6.
FOLLOWS_NATS_PER_TOKEN = 1.0
NATS = (
    "Log-probabilities are in nats (natural-log units; 1 nat ≈ 1.44 bits); "
    "a gain of g nats means B became e^g times as likely."
)


SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
LARGE = ((1e12, "trillion"), (1e9, "billion"), (1e6, "million"))


def readable(factor: float) -> str:
    """A factor ≥ 1 as a student reads it aloud: 2.72, 380, 5,420, 3.1 million, about 10²³."""
    if factor < 10:
        return f"{factor:.3g}"  # 1.03× and 1.97× must not both read "2×"
    if factor < 1e6:
        return f"{float(f'{factor:.3g}'):,.0f}"  # three significant figures, digits grouped
    if factor < 1e15:
        scale, word = next((s, w) for s, w in LARGE if factor >= s)
        return f"{factor / scale:.3g} {word}"
    return "about 10" + str(round(math.log10(factor))).translate(SUPERSCRIPT)


def times(gain: float) -> str:
    """e^gain in words: how many times as likely B became (a fraction below 0.1 as 1/N)."""
    gain = max(min(gain, 700.0), -700.0)
    factor = math.exp(gain)
    if factor >= 1:
        return f"{readable(factor)}×"
    return f"{factor:.2g}×" if factor >= 0.1 else f"1/{readable(1 / factor)}×"


async def coherence(ctx: Context, first: str, second: str, why: str) -> Reply:
    """With no NSP head: how much reading A first helps a causal LM predict B, against how much
    an unrelated sentence before B helps, computed on the same model."""
    follower = " " + second.lstrip()
    unrelated = [u for u in UNRELATED if u.casefold() != first.strip().casefold()]
    requests = [Score(follower, context=first.rstrip()), Score(second)]
    requests += [Score(follower, context=u) for u in unrelated]
    given_a, alone, *baselines = await asyncio.gather(*(ctx.inference.submit(r) for r in requests))
    with_a, without = sum(given_a.logprobs), sum(alone.logprobs)
    gain = with_a - without
    unrelated_gains = [sum(b.logprobs) - without for b in baselines]
    typical = statistics.median(unrelated_gains)
    tokens = max(1, len(given_a.logprobs))
    per_token = (gain - typical) / tokens
    follows = per_token >= FOLLOWS_NATS_PER_TOKEN
    label = "B follows A (IsNext-like)" if follows else "B does not seem to follow A (NotNext-like)"
    verdict = (
        f"{label}: reading A first makes B {times(gain)} as likely; a typical unrelated sentence makes it "
        f"{times(typical)} as likely. A beats it by {per_token:+.2f} nats per token of B "
        f"(the rule here: at least {FOLLOWS_NATS_PER_TOKEN:g} to count as following)."
    )
    warning = repeat_warning(first, second)
    return Reply(
        title=f"Coherence score from a causal LM ({given_a.model}), not NSP",
        text=(
            f"{verdict}\n" + (f"{warning}\n" if warning else "") + f"{PREDICTABILITY_LINE}\n"
            "No model with an NSP head is available, so this is a different measure: "
            "log P(B | A) − log P(B), how much reading A first makes B more likely, against the same "
            f"gain after {len(unrelated)} sentences on other subjects (like BERT's random NotNext pairs). {NATS}"
        ),
        fields=[
            Field("log P(B | A)", f"{with_a:.2f}"),
            Field("log P(B)", f"{without:.2f}"),
            Field("coherence", f"{gain:+.2f} nats"),
            Field("after unrelated sentences (median)", f"{typical:+.2f} nats"),
            Field("tokens of B", str(tokens)),
            Field("why not NSP", why, inline=False),
        ],
        data={
            "kind": "causal_lm_coherence",
            "model": given_a.model,
            "logprob_b_given_a": with_a,
            "logprob_b": without,
            "coherence": gain,
            "unrelated": unrelated,
            "unrelated_coherence": unrelated_gains,
            "unrelated_median": typical,
            "b_tokens": tokens,
            "margin_per_token": per_token,
            "follows": follows,
            "b_words_in_a": repeated_share(first, second),
            "repeats": warning is not None,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(nsp)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register(NSP_ROLE)
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
