"""Topic "Masked language modeling": fill in blanks, and see what BERT trains on."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
from collections.abc import Callable

from bot import (
    MASK,
    CodeBlock,
    Command,
    Context,
    Field,
    FillMask,
    Integer,
    ModelRole,
    NoModelForRole,
    Reply,
    Segment,
    Table,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.charts import bar_panels, render, token_label, token_text
from bot.render import plural
from bot.tokenizers import wordpiece, wordpiece_tokens

TOPIC = Topic.load("plugins", "masked-lm")  # plugins/data/topics/masked-lm.toml

log = logging.getLogger(__name__)

MAX_MASKS = 5
NO_MASKED_LM = (
    "This server has no masked language model (a BERT-style model), so /mask cannot run here. "
    "With one, it would show the likeliest words for each blank and how sure the model is of each, "
    "read from the words on both sides. `/maskrecipe` works here: it shows how BERT's training hides words."
)
BLANK = re.compile(r"\[MASK\]|<mask>|_{3,}", re.IGNORECASE)
SELECT, AS_MASK, AS_RANDOM = 0.15, 0.8, 0.1


@command(
    "mask",
    "Fill the blanks in a sentence with a masked language model",
    topic=TOPIC.slug,
    options=[
        Text("sentence", "A sentence with [MASK], <mask> or ___ where a word is missing", max_length=500),
        Integer("k", "How many fills to show per blank", default=5, min_value=1, max_value=10),
    ],
)
async def mask(ctx: Context, sentence: str, k: int) -> Reply:
    blanks = len(BLANK.findall(sentence))
    if blanks == 0:
        raise UserError("Put [MASK], <mask> or ___ where the missing word goes.")
    if blanks > MAX_MASKS:
        raise UserError(f"That sentence has {blanks} blanks; at most {MAX_MASKS} at a time.")
    try:
        result = await ctx.inference.submit(FillMask(BLANK.sub(MASK, sentence), k=k))
    except NoModelForRole as missing:
        # The student sees what /mask is for; the operator's fix (a config key) goes to the log.
        log.warning("/mask cannot run: %s", missing)
        return Reply.failure(NO_MASKED_LM, missing_role="masked_lm")
    rows, panels = [], []
    for n, fill in enumerate(result.masks, 1):
        labels = [token_label(t.token, t.raw) for t in fill.top]
        rows += [
            [str(n), str(r), label, f"{t.prob:.4f}"]
            for r, (label, t) in enumerate(zip(labels, fill.top, strict=True), 1)
        ]
        panels.append((f"blank {n}", labels, [t.prob for t in fill.top]))
    chart = await render(bar_panels, panels, xlabel=f"probability ({result.model})", filename="mask.png")
    best_fills = iter([token_text(f.top[0].token, f.top[0].raw).strip() for f in result.masks])
    best = BLANK.sub(lambda _blank: next(best_fills), sentence)
    return Reply(
        title=f"Fill the blank ({result.model})",
        text=f"Best guess: {best}",
        table=Table(["blank", "#", "token", "probability"], rows, align="rrlr"),
        images=[chart],
        data={
            "model": result.model,
            "tokens": result.tokens,
            "masks": [
                {
                    "position": f.position,
                    "top": [
                        {"token": token_text(t.token, t.raw), "id": t.id, "score": t.prob, "bytes": t.raw.hex()}
                        for t in f.top
                    ],
                }
                for f in result.masks
            ],
        },
    )


def masking_recipe(tokens: list[str], vocab: list[str], seed: int) -> list[tuple[int, str, str, str]]:
    """BERT's recipe on ``tokens``: choose 15% of positions (at least one); of those,
    80% become [MASK], 10% a random vocabulary token, 10% stay as they are."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(tokens)), max(1, round(SELECT * len(tokens)))))
    changes = []
    for position in chosen:
        roll = rng.random()
        if roll < AS_MASK:
            changes.append((position, tokens[position], "[MASK]", "mask"))
        elif roll < AS_MASK + AS_RANDOM:
            changes.append((position, tokens[position], rng.choice(vocab), "random"))
        else:
            changes.append((position, tokens[position], tokens[position], "kept"))
    return changes


@functools.cache
def _ordinary_vocab() -> list[str]:
    return sorted(t for t in wordpiece_tokens() if not (t.startswith("[") and t.endswith("]")))


# How each rule's positions show in the sentence: (console colour, marks around the token). The marks
# carry the meaning where no colour shows (a pipe, NO_COLOR, Discord on a phone).
RECIPE_MARKS = {"mask": ("red", ("", "")), "random": ("yellow", ("~", "~")), "kept": ("green", ("=", "="))}


@command(
    "maskrecipe",
    "Apply BERT's 15% / 80-10-10 masking recipe to a sentence",
    topic=TOPIC.slug,
    options=[
        Text("sentence", "The sentence to mask", max_length=500),
        Integer("seed", "Random seed: the same seed gives the same masking", default=0, min_value=0, max_value=2**31),
    ],
)
async def maskrecipe(ctx: Context, sentence: str, seed: int) -> Reply:
    tokens = (await asyncio.to_thread(wordpiece().encode, sentence, add_special_tokens=False)).tokens
    if not tokens:
        raise UserError("BERT's tokenizer finds no tokens in that sentence (only invisible characters?).")
    vocab = await asyncio.to_thread(_ordinary_vocab)
    changes = masking_recipe(tokens, vocab, seed)
    by_position = {c[0]: c for c in changes}
    segments = []
    for position, token in enumerate(tokens):
        change = by_position.get(position)
        if change is None:
            segments.append(Segment(token))
        else:
            colour, (opening, closing) = RECIPE_MARKS[change[3]]
            segments.append(Segment(f"{opening}{change[2]}{closing}", colour))
        segments.append(Segment(" "))
    rows = [[str(p), old, new, rule] for p, old, new, rule in changes]
    return Reply(
        title="What BERT would train on",
        text=(
            f"{plural(len(tokens), 'WordPiece token')}; {len(changes)} chosen "
            f"({len(changes) / len(tokens):.0%} of them). The recipe aims at {SELECT:.0%} of the tokens, "
            f"a whole number, at least one: {SELECT:.0%} of {len(tokens)} is {SELECT * len(tokens):.2f}, "
            f"so {len(changes)}. "
            "Below, the sentence as the model sees it: [MASK] where a chosen token was masked (80% of the "
            "chosen), ~word~ where it was swapped for a random token (10%), =word= where it was chosen but "
            "kept (10%). "
            "The model must predict the original token at every chosen position."
        ),
        code=CodeBlock(segments),
        table=Table(["position", "original", "model sees", "rule"], rows, align="rlll"),
        fields=[Field("seed", str(seed))],
        data={
            "tokens": tokens,
            "changes": [dict(zip(("position", "original", "input", "rule"), c, strict=True)) for c in changes],
            "chosen_share": len(changes) / len(tokens),
            "target_share": SELECT,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(mask)
    register(maskrecipe)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("masked_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
