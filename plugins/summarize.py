"""Topic "Sequence-to-sequence": an encoder reads, a decoder writes."""

from __future__ import annotations

import time
from collections.abc import Callable

from bot import (
    Command,
    Context,
    Field,
    Generate,
    Integer,
    ModelRole,
    NoModelForRole,
    Reply,
    Seq2Seq,
    Text,
    Topic,
    command,
    hookimpl,
)

TOPIC = Topic.load("plugins", "seq2seq")  # plugins/data/topics/seq2seq.toml

PREFIX = "summarize: "
PROMPT = "Summarize the following text in one or two sentences.\n\n{text}"


@command(
    "summarize",
    "Summarize text with an encoder-decoder model (T5)",
    topic=TOPIC.slug,
    options=[
        Text("text", "The text to summarize", max_length=3000),
        Integer("max_length", "Longest summary, in tokens", default=60, min_value=5, max_value=200),
    ],
)
async def summarize(ctx: Context, text: str, max_length: int) -> Reply:
    started = time.perf_counter()
    try:
        result = await ctx.inference.submit(Seq2Seq(PREFIX + text, max_new_tokens=max_length))
        kind, note = "seq2seq", f"T5-style text-to-text with the task prefix `{PREFIX.strip()}`."
    except NoModelForRole as missing:
        result = await ctx.inference.submit(Generate(PROMPT.format(text=text), max_new_tokens=max_length, chat=True))
        kind = "causal_lm_prompt"
        note = f"Not seq2seq: an instruction-tuned causal LM asked to summarize, because {missing}"
    seconds = time.perf_counter() - started
    return Reply(
        title=f"Summary ({result.model})",
        text=result.text.strip() or "(the model produced no text)",
        fields=[Field("how", note[:1024], inline=False), Field("time", f"{seconds * 1000:.0f} ms")],
        data={"kind": kind, "model": result.model, "summary": result.text, "seconds": seconds},
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(summarize)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("seq2seq")
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
