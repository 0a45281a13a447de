"""Topic "What is a language model": the next-token distribution after a prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from bot import (
    Button,
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    NextToken,
    Number,
    Reply,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.charts import bar_chart, render, show_token

STEPS = 3  # buttons that append one of the likeliest tokens


TOPIC = Topic.load("plugins", "language-model")  # plugins/data/topics/language-model.toml


@command(
    "nexttoken",
    "Show the model's probabilities for the next token after a prompt",
    topic=TOPIC.slug,
    options=[
        Text("prompt", "The text the model continues", max_length=1000),
        Integer("k", "How many of the likeliest tokens to show", default=10, min_value=1, max_value=25),
        Number("temperature", "Divide the logits by this before softmax", default=1.0, min_value=0.05, max_value=5.0),
    ],
)
async def nexttoken(ctx: Context, prompt: str, k: int, temperature: float) -> Reply:
    result = await ctx.inference.submit(NextToken(prompt, k=k, temperature=temperature))
    rows = [[str(n), show_token(t.token), str(t.id), f"{t.prob:.4f}"] for n, t in enumerate(result.top, 1)]
    chart = await render(
        bar_chart,
        [show_token(t.token) for t in result.top],
        [t.prob for t in result.top],
        title=f"Next token after “{prompt[-50:]}”",
        xlabel=f"probability ({result.model[:60]})",
        filename="nexttoken.png",
    )
    shown = sum(t.prob for t in result.top)
    # One step of generation by hand: each button appends a token and asks again.
    steps = [Button(f"+ {show_token(t.token)}", "nexttoken", "prompt", prompt + t.token) for t in result.top[:STEPS]]
    steps = [b for b in steps if b.fits]
    hint = " Each button appends its token and asks again: generation one step at a time." if steps else ""
    return Reply(
        title=f"Next token ({result.model})",
        text=f"The top {len(result.top)} tokens cover {shown:.1%} of the probability.{hint}",
        buttons=steps,
        fields=[
            Field("prompt tokens", str(len(result.prompt_ids))),
            Field("entropy", f"{result.entropy_bits:.2f} bits"),
            Field("temperature", f"{temperature:g}"),
        ],
        table=Table(["#", "token", "id", "probability"], rows, align="rlrr"),
        images=[chart],
        data={
            "model": result.model,
            "prompt_tokens": result.prompt_tokens,
            "prompt_ids": result.prompt_ids,
            "top": [asdict(t) for t in result.top],
            "entropy_bits": result.entropy_bits,
            "temperature": temperature,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(nexttoken)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
