"""Topic "Next sentence prediction": does sentence B follow sentence A?"""

from __future__ import annotations

from collections.abc import Callable

from bot import (
    Command,
    Context,
    Field,
    ModelRole,
    NextSentence,
    NoModelForRole,
    Reply,
    Score,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)

TOPIC = Topic.load("plugins", "nsp")  # plugins/data/topics/nsp.toml


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
    return Reply(
        title=f"Next sentence prediction ({result.model})",
        text=f"{verdict}: P(B follows A) = {result.is_next:.4f}",
        table=Table(
            ["label", "probability"], [["IsNext", f"{result.is_next:.4f}"], ["NotNext", f"{1 - result.is_next:.4f}"]]
        ),
        data={"model": result.model, "is_next": result.is_next, "label": verdict},
    )


async def coherence(ctx: Context, first: str, second: str, why: str) -> Reply:
    """With no NSP head: how much reading A first helps a causal LM predict B."""
    given_a = await ctx.inference.submit(Score(" " + second.lstrip(), context=first.rstrip()))
    alone = await ctx.inference.submit(Score(second))
    with_a, without = sum(given_a.logprobs), sum(alone.logprobs)
    gain = with_a - without
    return Reply(
        title=f"Coherence score from a causal LM ({given_a.model}), not NSP",
        text=(
            "No model with an NSP head is available, so this is a different measure: "
            "log P(B | A) − log P(B), how much reading A first makes B more likely. "
            "Positive means A helps predict B."
        ),
        fields=[
            Field("log P(B | A)", f"{with_a:.2f}"),
            Field("log P(B)", f"{without:.2f}"),
            Field("coherence", f"{gain:+.2f} nats"),
            Field("why not NSP", why, inline=False),
        ],
        data={
            "kind": "causal_lm_coherence",
            "model": given_a.model,
            "logprob_b_given_a": with_a,
            "logprob_b": without,
            "coherence": gain,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(nsp)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("nsp")
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
