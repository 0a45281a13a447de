"""An example lmbot plugin: how a language model copies from its own context.

``/induction`` shows the model a run of random tokens, then the same run again, and measures
how surprised the model is by each token. Random tokens are unpredictable the first time;
the second time a trained model has already seen them a moment ago and copies them (the
"induction heads" behaviour), so its surprise drops sharply, with no weight change at all.

Everything a plugin can use comes from ``bot`` (and charts from ``bot.charts``); the model
work runs in a worker process (``lmbot_example.tasks``), found through the request's ``task``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean
from typing import ClassVar

from bot import (
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    Option,
    QuizQuestion,
    Reply,
    Request,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
    plugin_options,
)
from bot.charts import line_chart, render, show_token

__version__ = "0.1.0"

# The name lmbot knows this plugin by: the entry point's name in pyproject.toml.
PLUGIN = "example"
LN2 = math.log(2)


# --------------------------------------------------------------------------- the worker-task contract


@dataclass(frozen=True)
class RepeatedTokens(Request):
    """``length`` random tokens (drawn in the worker from ``seed``), then the same tokens again."""

    length: int
    seed: int = 0
    # "package.module:function": the worker imports lmbot_example.tasks and calls repeated_tokens.
    task: ClassVar[str] = "lmbot_example.tasks:repeated_tokens"
    role: ClassVar[str | None] = "causal_lm"

    def texts(self) -> list[str]:
        # The tokens are drawn in the worker: there is no user text to hold to the input limits.
        return []


@dataclass(frozen=True)
class RepeatResult:
    model: str  # a result's `model` field gets the served model's label
    ids: list[int]  # the random tokens (one copy)
    tokens: list[str]
    first_nats: list[float]  # loss on tokens 2..length of the first copy (the first has no context)
    second_nats: list[float]  # loss on every token of the second copy
    vocabulary: int  # how many tokens the random ones were drawn from


# --------------------------------------------------------------------------- the command


def per_token(nats: list[float], unit: str) -> list[float]:
    return [n / LN2 for n in nats] if unit == "bits" else list(nats)


@command(
    "induction",
    "Random tokens, then the same tokens again: how much easier the model finds the repeat",
    options=[
        Integer("length", "How many random tokens (then repeated)", min_value=4, max_value=64, default=32),
        Integer("seed", "Which random tokens", min_value=0, max_value=1_000_000, default=0),
    ],
    topic="in-context-copying",
)
async def induction(ctx: Context, length: int, seed: int) -> Reply:
    unit = plugin_options(ctx, PLUGIN)["unit"]
    result: RepeatResult = await ctx.inference.submit(RepeatedTokens(length, seed))
    first = per_token(result.first_nats, unit)
    second = per_token(result.second_nats, unit)
    # Both means over the same positions, 2..length: the first copy's first token has no context,
    # and the second copy's first token cannot be copied yet (what follows it comes later).
    first_mean, second_mean = fmean(first), fmean(second[1:] or second)
    # A model that spread its probability evenly over the vocabulary would pay this on every token.
    uniform = math.log(result.vocabulary) / (LN2 if unit == "bits" else 1.0)
    rows = [
        [str(i + 1), show_token(token), f"{first[i - 1]:.2f}" if i else "-", f"{second[i]:.2f}"]
        for i, token in enumerate(result.tokens[:10])
    ]
    chart = await render(
        line_chart,
        [
            ("first copy", list(range(2, length + 1)), first, "o-"),
            ("second copy", list(range(1, length + 1)), second, "s-"),
        ],
        title=f"Surprise per token, {length} random tokens read twice",
        xlabel="position in the copy",
        ylabel=f"surprise ({unit})",
        filename="induction.png",
        log=False,
    )
    return Reply(
        title=f"Copying from context ({result.model})",
        text=(
            f"The model read {length} random tokens, then the same {length} again. "
            f"Surprise is −log₂ P(token) in bits (−ln in nats): how unexpected each token was. "
            f"First copy: {first_mean:.2f} {unit} per token; second copy: {second_mean:.2f} "
            "(both over positions 2 on: a copy's first token has nothing yet to be copied from). "
            "The first copy cannot be predicted; the second can be copied from what the model just read. "
            f"Guessing evenly among its {result.vocabulary:,} tokens would cost {uniform:.2f} {unit} on each."
        ),
        fields=[
            Field("first copy", f"{first_mean:.2f} {unit}/token"),
            Field("second copy", f"{second_mean:.2f} {unit}/token"),
            Field("even guess", f"{uniform:.2f} {unit}/token"),
            Field("seed", str(seed)),
        ],
        table=Table(["#", "token", f"1st ({unit})", f"2nd ({unit})"], rows, align="rlrr"),
        images=[chart],
        data={
            "model": result.model,
            "unit": unit,
            "ids": result.ids,
            "tokens": result.tokens,
            "first": first,
            "second": second,
            "first_mean": first_mean,
            "second_mean": second_mean,
            "vocabulary": result.vocabulary,
            "uniform": uniform,
        },
    )


# --------------------------------------------------------------------------- the study card

QUIZ = (
    QuizQuestion(
        "A model reads random tokens, then the same tokens again. Why is the second copy easier?",
        (
            "It can copy the tokens from earlier in its context",
            "Its weights were updated after the first copy",
            "Random tokens are always easy",
            "The tokenizer merges repeated tokens",
        ),
        0,
        "Nothing is trained: the model looks back at what it read and predicts the same continuation.",
    ),
    QuizQuestion(
        "What does a surprise of 1 bit for a token mean?",
        (
            "The model gave that token probability 1/2",
            "The token is one byte long",
            "The model was certain",
            "The token appeared once before",
        ),
        0,
        "Surprise is −log₂ P: probability 1/2 is 1 bit, 1/4 is 2 bits, certainty is 0.",
    ),
    QuizQuestion(
        "Why is the first token of the sequence not scored?",
        (
            "Nothing comes before it, so there is nothing to predict it from",
            "It is always a special token",
            "Its probability is always 1",
            "The model skips even positions",
        ),
        0,
        "A causal model predicts each token from the ones before it.",
    ),
    QuizQuestion(
        "Which attention pattern is thought to do this copying?",
        (
            "Induction heads: find the earlier copy of the current token, look at what followed",
            "Heads that attend only to the first token",
            "Heads that attend only to the current token",
            "The feed-forward layers alone",
        ),
        0,
        "Two heads work together: one marks what followed each token, the other looks it up.",
    ),
    QuizQuestion(
        "What does this say about in-context learning?",
        (
            "A model can use patterns in its prompt without any training step",
            "Prompts change the model's weights",
            "Only fine-tuning can teach a model anything",
            "Longer prompts always make answers worse",
        ),
        0,
        "Few-shot prompting builds on the same ability: the examples are in the context.",
    ),
)

TOPIC = Topic(
    slug="in-context-copying",
    title="Copying from context",
    key_idea=(
        "A trained language model reads its whole context on every step. Shown a run of random tokens it "
        "cannot guess them, but shown the same run again it predicts each next token by finding where it "
        "appeared before: its surprise falls sharply with no change to its weights. This copying is one of "
        "the simplest forms of in-context learning."
    ),
    try_command="/induction length:32",
    table=Table(
        ["", "first copy", "second copy"],
        [["predictable from context", "no", "yes"], ["typical surprise", "high", "low"]],
    ),
    questions=(
        "Would a 2-gram model find the second copy easier? Why not?",
        "What happens to the second copy's surprise when the copy is longer?",
    ),
    quiz=QUIZ,
    order=90,
    go_deeper=("/induction length:64 seed:7",),
)


# --------------------------------------------------------------------------- hooks


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(induction)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    # config.toml: [plugins.options.example] unit = "nats"
    register(
        Text("unit", "Surprise in bits (log base 2) or nats (natural log)", choices=("bits", "nats"), default="bits")
    )
