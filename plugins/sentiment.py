"""Topic "Generative vs discriminative": one label, two kinds of model."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, ClassVar

from bot import (
    Classify,
    ClassifyResult,
    Command,
    Context,
    Embed,
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
)

TOPIC = Topic.load("plugins", "gen-vs-disc")  # plugins/data/topics/gen-vs-disc.toml

LABELS = ("negative", "positive")
PROMPT = 'Classify the sentiment of the review as positive or negative.\nReview: "{text}"\nSentiment:'


@functools.cache
def training_set() -> list[tuple[str, str]]:
    """The plugin's own labelled sentences (label, text)."""
    text = files("plugins").joinpath("data/sentiment.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


@dataclass(frozen=True)
class EmbeddingHead(Request):
    """Sentiment from a logistic-regression head on the sentence embedder (offline stand-in)."""

    text: str
    task: ClassVar[str] = "plugins.sentiment:embedding_head"
    role: ClassVar[str | None] = "embedder"

    def texts(self) -> list[str]:
        return [self.text]


_heads: dict[int, Any] = {}  # per worker: one head per loaded embedder


def fit_head(model: Any, tokenizer: Any) -> Any:
    """Train the logistic-regression head on the shipped labelled set (runs in the worker)."""
    from sklearn.linear_model import LogisticRegression

    from bot.inference.tasks import embed

    examples = training_set()
    vectors = [r.vector for r in embed(model, tokenizer, [Embed(text) for _, text in examples])]
    return LogisticRegression(C=10.0, max_iter=1000).fit(vectors, [label for label, _ in examples])


def embedding_head(model: Any, tokenizer: Any, batch: Sequence[EmbeddingHead]) -> list[ClassifyResult]:
    from bot.inference.tasks import embed

    head = _heads.get(id(model))
    if head is None:
        head = _heads[id(model)] = fit_head(model, tokenizer)
    vectors = [r.vector for r in embed(model, tokenizer, [Embed(r.text) for r in batch])]
    probs = head.predict_proba(vectors)
    return [ClassifyResult("", list(head.classes_), [float(p) for p in row]) for row in probs]


async def discriminative(ctx: Context, text: str) -> tuple[str, ClassifyResult]:
    try:
        return "fine-tuned classifier", await ctx.inference.submit(Classify(text))
    except NoModelForRole:
        kind = f"logistic regression on sentence embeddings, trained on {len(training_set())} examples"
        return kind, await ctx.inference.submit(EmbeddingHead(text))


@command(
    "sentiment",
    "Label sentiment with a classifier and with a prompted language model",
    topic=TOPIC.slug,
    options=[Text("text", "A review or any short text", max_length=1000)],
)
async def sentiment(ctx: Context, text: str) -> Reply:
    started = time.perf_counter()
    kind, disc = await discriminative(ctx, text)
    disc_s = time.perf_counter() - started
    disc_probs = {label.lower(): p for label, p in zip(disc.labels, disc.probs, strict=True)}
    disc_label = max(disc_probs, key=disc_probs.__getitem__)

    started = time.perf_counter()
    prompt = PROMPT.format(text=text)
    scores = [await ctx.inference.submit(Score(" " + label, context=prompt)) for label in LABELS]
    gen_s = time.perf_counter() - started
    logps = [sum(s.logprobs) for s in scores]
    total = sum(math.exp(lp) for lp in logps)
    gen_probs = {label: math.exp(lp) / total for label, lp in zip(LABELS, logps, strict=True)}
    gen_label = max(gen_probs, key=gen_probs.__getitem__)

    rows = [
        ["discriminative", disc.model, disc_label, f"{disc_probs[disc_label]:.3f}", f"{disc_s * 1000:.0f} ms"],
        ["generative", scores[0].model, gen_label, f"{gen_probs[gen_label]:.3f}", f"{gen_s * 1000:.0f} ms"],
    ]
    return Reply(
        title="Two ways to label sentiment",
        text=(
            f"Discriminative: {kind}. Generative: the causal LM's probability of “ positive” vs “ negative” "
            "after a classification prompt, renormalised over the two words."
        ),
        table=Table(["approach", "model", "label", "confidence", "time"], rows, align="lllrr"),
        fields=[Field("P(the two label words | prompt)", f"{sum(math.exp(lp) for lp in logps):.3f} of all next words")],
        data={
            "discriminative": {"kind": kind, "model": disc.model, "probs": disc_probs, "seconds": disc_s},
            "generative": {
                "model": scores[0].model,
                "logprobs": dict(zip(LABELS, logps, strict=True)),
                "probs": gen_probs,
                "seconds": gen_s,
            },
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(sentiment)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("classifier")
    register("embedder")
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
