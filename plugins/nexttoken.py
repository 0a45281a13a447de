"""Topic "What is a language model": the next-token distribution after a prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    TokenProb,
    Topic,
    command,
    hookimpl,
)
from bot.charts import bar_chart, is_partial, render, token_label, token_text
from bot.render import decimal_probability, plural, probability

STEPS = 3  # buttons that append one of the likeliest tokens


TOPIC = Topic.load("plugins", "language-model")  # plugins/data/topics/language-model.toml


def token_data(token: TokenProb) -> dict[str, Any]:
    return {
        "id": token.id,
        "token": token_text(token.token, token.raw),
        "bytes": token.raw.hex(),
        "partial": is_partial(token.raw),
        "prob": token.prob,
    }


def appended(prompt: str, token: TokenProb) -> str | None:
    """The prompt with the token's bytes appended, when the result is text; ``None`` when it is
    not (a token that is part of a character: appending it would show U+FFFD, not the token)."""
    raw = token.raw or token.token.encode("utf-8")
    try:
        text = (prompt.encode("utf-8") + raw).decode("utf-8")
    except UnicodeError:
        return None
    return None if "\ufffd" in text[len(prompt) :] else text


def step_buttons(prompt: str, top: list[TokenProb]) -> tuple[list[Button], int]:
    """Buttons that append one of the likeliest tokens, and how many of those tokens got none
    because appending them alone does not make text. No two buttons run the same command."""
    buttons: list[Button] = []
    seen: set[tuple[str, str, str]] = set()
    partial = 0
    for token in top[:STEPS]:
        value = appended(prompt, token)
        if value is None:
            partial += 1
            continue
        button = Button(f"+ {token_label(token.token, token.raw)}", "nexttoken", "prompt", value)
        key = (button.command, button.option, button.value)
        if button.fits and key not in seen:
            seen.add(key)
            buttons.append(button)
    return buttons, partial


def entropy_line(bits: float) -> str:
    """Entropy in words a student can check: 2 ** bits is the number of equally likely tokens
    that would be just as uncertain."""
    picks = 2**bits
    shown = f"{picks:,.1f}" if picks < 10 else f"{picks:,.0f}"  # "38,858" tokens, not "38,858.1"
    return (
        f"Entropy measures how spread out the guess is: 0 bits means one certain token; "
        f"{bits:.2f} bits is as unsure as a fair pick among {shown} tokens."
    )


async def model_own_probs(ctx: Context, prompt: str, k: int, temperature: float) -> dict[int, float]:
    """The model's own (temperature 1) probability of each of the top ``k`` tokens, by id; empty
    at temperature 1, where the shown probabilities already are the model's own."""
    if temperature == 1.0:
        return {}
    plain = await ctx.inference.submit(NextToken(prompt, k=k, temperature=1.0))
    return {t.id: t.prob for t in plain.top}


def own_cell(own: dict[int, float], token_id: int) -> str:
    # A tie at the k-th place can swap one token between the two lists: then it has no own figure.
    return decimal_probability(own[token_id]) if token_id in own else "–"


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
    labels = [token_label(t.token, t.raw) for t in result.top]
    # Away from temperature 1 the shown probabilities are not the model's own: show its own beside
    # them (dividing logits by T keeps their order, so the same top-k tokens come back).
    own = await model_own_probs(ctx, prompt, k, temperature)
    rows = [
        [str(n), label, str(t.id), decimal_probability(t.prob), *([own_cell(own, t.id)] if own else [])]
        for n, (label, t) in enumerate(zip(labels, result.top, strict=True), 1)
    ]
    shown_prompt = ("…" if len(prompt) > 50 else "") + prompt[-50:]
    chart = await render(
        bar_chart,
        labels,
        [t.prob for t in result.top],
        title=f"Next token after “{shown_prompt}”",
        xlabel=f"probability{f' at temperature {temperature:g}' if own else ''} ({result.model})",
        filename="nexttoken.png",
    )
    shown = sum(t.prob for t in result.top)
    # One step of generation by hand: each button appends a token and asks again.
    steps, partial = step_buttons(prompt, result.top)
    text = (
        f"The top {plural(len(result.top), 'token')} cover {probability(shown)} of the probability; "
        "the rest is spread over the other tokens of the vocabulary."
    )
    if steps:
        text += " Each button appends its token and asks again: generation one step at a time."
    if any(is_partial(t.raw) for t in result.top):
        text += " ⟨..⟩ marks a token that is only part of a character (its bytes in hex)"
        text += "; it gets no button, as appending it alone would not be text." if partial else "."
    if own:
        first = result.top[0]
        text += (
            f"\nTemperature {temperature:g} divides the logits by {temperature:g} before the softmax, so these are the "
            f"{'flattened' if temperature > 1 else 'sharpened'} probabilities a sampler would draw from, not the "
            f"model's own: at temperature 1, {labels[0]} has {own_cell(own, first.id)}, "
            f"here {decimal_probability(first.prob)} "
            "(both columns in the table)."
        )
    text += "\n" + entropy_line(result.entropy_bits)
    prompt_raw = result.prompt_raw or [b""] * len(result.prompt_tokens)
    return Reply(
        title=f"Next token ({result.model})",
        text=text,
        buttons=steps,
        fields=[
            Field("prompt tokens", str(len(result.prompt_ids))),
            Field("entropy", f"{result.entropy_bits:.2f} bits" + (f" (at temperature {temperature:g})" if own else "")),
            Field("temperature", f"{temperature:g}"),
        ],
        table=Table(
            ["#", "token", "id", *([f"p at T={temperature:g}", "model's own (T=1)"] if own else ["probability"])],
            rows,
            align="rlrrr" if own else "rlrr",
        ),
        images=[chart],
        data={
            "model": result.model,
            "prompt_tokens": [token_text(t, raw) for t, raw in zip(result.prompt_tokens, prompt_raw, strict=True)],
            "prompt_bytes": [raw.hex() for raw in prompt_raw],
            "prompt_ids": result.prompt_ids,
            "top": [token_data(t) for t in result.top],
            "entropy_bits": result.entropy_bits,
            "temperature": temperature,
            "own_prob": {str(i): p for i, p in own.items()},
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
