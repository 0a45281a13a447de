"""Topic "Autoregressive vs masked models": one sentence, read left-to-right and both ways."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from bot import (
    MASK,
    Command,
    Context,
    Field,
    FillMask,
    Generate,
    Integer,
    ModelRole,
    NextToken,
    NoModelForRole,
    Reply,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.charts import bar_panels, render, show_token

TOPIC = Topic.load("plugins", "ar-vs-masked")  # plugins/data/topics/ar-vs-masked.toml

WORD = re.compile(r"[\w'-]+")


def short(model: str) -> str:
    """A model's name without the note in brackets, for chart titles."""
    return model.split(" (")[0][:40]


def split_at_word(text: str, word: str | None) -> tuple[str, str, str]:
    """(left, hidden word, right): the last occurrence of ``word``, or the last word."""
    matches = [m for m in WORD.finditer(text) if word is None or m.group().lower() == word.lower()]
    if not matches:
        raise UserError(f"`{word}` is not a word of the text." if word else "The text has no word to hide.")
    m = matches[-1]
    return text[: m.start()], m.group(), text[m.end() :]


@command(
    "compare",
    "One sentence through a causal LM and a masked LM, side by side",
    topic=TOPIC.slug,
    options=[
        Text("text", "A sentence; one word of it is hidden from both models", max_length=500),
        Text("hide", "The word to hide (default: the last word)", required=False, max_length=50),
        Integer("k", "How many guesses to show", default=5, min_value=1, max_value=10),
    ],
)
async def compare(ctx: Context, text: str, hide: str | None, k: int) -> Reply:
    left, word, right = split_at_word(text, hide)
    fields: list[Field] = []
    panels: list[tuple[str, list[str], list[float]]] = []
    data: dict[str, Any] = {"hidden": word, "left": left, "right": right}
    if not left.strip():
        raise UserError("Hide a word that has some text before it, so the causal model has something to read.")

    started = time.perf_counter()
    causal = await ctx.inference.submit(NextToken(left.rstrip(), k=k))
    continuation = await ctx.inference.submit(Generate(text, max_new_tokens=20))
    causal_s = time.perf_counter() - started
    panels.append(
        (
            f"{short(causal.model)} reads left to right: “…{left.rstrip()[-25:]}”",
            [show_token(t.token) for t in causal.top],
            [t.prob for t in causal.top],
        )
    )
    fields.append(Field("causal LM guesses", ", ".join(show_token(t.token) for t in causal.top)))
    fields.append(Field("causal LM continues the sentence with", continuation.text.strip()[:1000] or "∅", inline=False))
    data["causal"] = {
        "model": causal.model,
        "top": [asdict(t) for t in causal.top],
        "continuation": continuation.text,
        "seconds": causal_s,
    }

    started = time.perf_counter()
    try:
        masked = await ctx.inference.submit(FillMask(f"{left}{MASK}{right}", k=k))
    except NoModelForRole as exc:
        fields.append(Field("masked LM", str(exc), inline=False))
        data["masked"] = {"error": str(exc)}
        masked_s = None
    else:
        masked_s = time.perf_counter() - started
        top = masked.masks[0].top if masked.masks else []
        panels.append(
            (
                f"{short(masked.model)} reads both sides",
                [show_token(t.token) for t in top],
                [t.prob for t in top],
            )
        )
        fields.append(Field("masked LM guesses", ", ".join(show_token(t.token) for t in top)))
        data["masked"] = {
            "model": masked.model,
            "top": [asdict(t) for t in top],
            "seconds": masked_s,
        }
    timing = f"causal {causal_s * 1000:.0f} ms" + (f", masked {masked_s * 1000:.0f} ms" if masked_s else "")
    fields.append(Field("time", timing))
    chart = await render(
        bar_panels, panels, xlabel="probability of the hidden word's first token", filename="compare.png"
    )
    return Reply(
        title="Left-to-right vs both ways",
        text=(
            f"Hidden word: “{word}”. The causal model reads only the text before it; the masked model reads both sides."
        ),
        fields=fields,
        images=[chart],
        data=data,
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(compare)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
    register("masked_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
