"""Beyond topic "Subword OOV handling": what tokenization costs across languages.

One meaning written in several languages is cut into tokens by each tiktoken encoding. A
language that needs more tokens for the same meaning fits less into a context window and
costs more where models are priced per token.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot import Command, Context, Field, Reply, Table, Text, UserError, command, hookimpl
from bot.charts import bar_panels, render
from bot.tokenizers import tiktoken_encoding
from plugins.ngram import CJK

ENCODINGS = ("gpt2", "cl100k_base", "o200k_base")  # GPT-2, GPT-4, GPT-4o: three generations
# One meaning, written in each language (no spaces between words in Chinese and Japanese).
PARALLEL: tuple[tuple[str, str], ...] = (
    ("English", "The weather is nice today, so we are going for a walk in the park."),
    ("German", "Das Wetter ist heute schön, also gehen wir im Park spazieren."),
    ("French", "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc."),
    ("Spanish", "Hoy hace buen tiempo, así que vamos a pasear por el parque."),
    ("Turkish", "Bugün hava güzel, bu yüzden parkta yürüyüşe çıkıyoruz."),
    ("Swahili", "Leo hali ya hewa ni nzuri, kwa hivyo tunaenda kutembea kwenye bustani."),
    ("Russian", "Сегодня хорошая погода, поэтому мы идём гулять в парк."),
    ("Greek", "Σήμερα ο καιρός είναι ωραίος, οπότε πάμε βόλτα στο πάρκο."),
    ("Arabic", "الطقس جميل اليوم، لذلك سنذهب للتنزه في الحديقة."),
    ("Hindi", "आज मौसम अच्छा है, इसलिए हम पार्क में टहलने जा रहे हैं।"),
    ("Korean", "오늘은 날씨가 좋아서 공원에 산책하러 갑니다."),
    ("Chinese", "今天天气很好，所以我们去公园散步。"),
    ("Japanese", "今日は天気がいいので、公園に散歩に行きます。"),
)
# Scripts written without spaces between words: Chinese and Japanese (as /ngram), Thai, Lao, Khmer, Myanmar.
NO_SPACE_SCRIPT = re.compile(rf"[{CJK}\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")
WORDLESS = re.compile(r"[^\W_]")  # a letter or digit: without one, a text has no words to count
NO_SPACES_REASON = "written without spaces between words (Chinese, Japanese, Thai…), so a word count means nothing"
NO_WORDS_REASON = "no letters or digits (emoji or symbols only), so there are no words to count"
MAX_TEXTS = 8
COST_LINE = (
    "Multiplier: this language's tokens divided by the first one's, for the same meaning. A model reads a fixed "
    "number of tokens (its context window), so ×2 means half as much of this language fits; priced per token, "
    "the same message costs twice as much."
)


@dataclass(frozen=True)
class Counted:
    language: str
    text: str
    words: int | None  # space-separated words; None when a word count means nothing (see no_words)
    tokens: dict[str, int]  # per encoding
    no_words: str = ""  # why there is no word count


def parse_texts(texts: str) -> list[tuple[str, str]]:
    """A student's own parallel texts, separated by "|": the first is the one the rest are compared with."""
    parts = [part.strip() for part in texts.split("|")]
    parts = [part for part in parts if part]
    if len(parts) < 2:
        raise UserError(
            'Give at least two versions of one meaning separated by "|", e.g. `Good morning | Buenos días`.'
        )
    if len(parts) > MAX_TEXTS:
        raise UserError(f"Give at most {MAX_TEXTS} versions separated by “|”.")
    return [(f"text {n}", part) for n, part in enumerate(parts, 1)]


def count(texts: Sequence[tuple[str, str]], cache_dir: Path) -> list[Counted]:
    """Token counts of every text in every encoding (tiktoken's batch encoder, one call per encoding)."""
    per_encoding = {
        name: [len(ids) for ids in tiktoken_encoding(name, cache_dir).encode_ordinary_batch([t for _, t in texts])]
        for name in ENCODINGS
    }
    counted = []
    for n, (language, text) in enumerate(texts):
        words, no_words = word_count(text)
        counted.append(Counted(language, text, words, {name: per_encoding[name][n] for name in ENCODINGS}, no_words))
    return counted


def word_count(text: str) -> tuple[int | None, str]:
    """Space-separated words of ``text``, or None and why: a text with characters of a script
    written without spaces, or with no letter or digit at all, has no words to count (splitting it
    at spaces would call a whole sentence one word)."""
    if NO_SPACE_SCRIPT.search(text):
        return None, NO_SPACES_REASON
    if not WORDLESS.search(text):
        return None, NO_WORDS_REASON
    return len(text.split()), ""


def times(value: float) -> str:
    return f"×{value:.2f}"


@command(
    "tokencost",
    "What tokenization costs across languages: one meaning, tokens and price per encoding",
    topic="subwords",
    options=[
        Text(
            "texts",
            "Your own versions of one meaning, separated by | (default: built-in sentences in 13 languages)",
            required=False,
            max_length=1500,
        ),
    ],
)
async def tokencost(ctx: Context, texts: str | None) -> Reply:
    chosen = parse_texts(texts) if texts is not None else list(PARALLEL)
    counted = await asyncio.to_thread(count, chosen, ctx.config.cache_dir)
    base = counted[0]
    multipliers = {name: [c.tokens[name] / max(1, base.tokens[name]) for c in counted] for name in ENCODINGS}
    rows = []
    for n, c in enumerate(counted):
        per_word = f"{c.tokens['o200k_base'] / c.words:.1f}" if c.words else "–"
        rows.append(
            [
                c.language,
                *(f"{c.tokens[name]} ({times(multipliers[name][n])})" for name in ENCODINGS),
                per_word,
            ]
        )
    worst = max(range(len(counted)), key=lambda n: multipliers["cl100k_base"][n])
    lines = [
        f"The same meaning in {len(counted)} {'languages' if texts is None else 'versions'}, cut into tokens by "
        f"three tiktoken encodings: gpt2 (GPT-2's), cl100k_base (GPT-4's), o200k_base (GPT-4o's). "
        "Each cell: tokens (multiplier against the first row).",
        COST_LINE,
        f"In cl100k_base, {counted[worst].language} needs {times(multipliers['cl100k_base'][worst])} the tokens of "
        f"{base.language}: a window that holds a page of {base.language} holds "
        f"{1 / multipliers['cl100k_base'][worst]:.0%} of that page in {counted[worst].language}.",
        "Vocabularies are learned mostly from English-heavy text: frequent English words become single tokens, "
        "while other scripts are cut into pieces, sometimes single bytes. Larger, more multilingual vocabularies "
        "(o200k_base) narrow the gap.",
    ]
    for reason in dict.fromkeys(c.no_words for c in counted if c.words is None):
        which = ", ".join(c.language for c in counted if c.no_words == reason)
        lines.append(f"Tokens per word is – for {which}: {reason}.")
    chart = await render(
        bar_panels,
        [
            (f"{name}: tokens against {base.language[:20]}", [c.language for c in counted], multipliers[name])
            for name in ENCODINGS
        ],
        xlabel=f"tokens for the same meaning, as a multiple of {base.language[:20]}'s",
        value_format="×{:.2f}",
        # One scale for every panel, so a bar's length compares across encodings as the text does
        # (room past the longest bar for its value label).
        xmax=1.25 * max(m for name in ENCODINGS for m in multipliers[name]),
        filename="tokencost.png",
    )
    return Reply(
        title="What tokenization costs across languages",
        text="\n".join(lines),
        table=Table(["language", *ENCODINGS, "o200k tokens/word"], rows, align="lrrrr"),
        fields=[Field("first row (the baseline)", base.text[:1000], inline=False)],
        images=[chart],
        data={
            "encodings": list(ENCODINGS),
            "rows": [
                {
                    "language": c.language,
                    "text": c.text,
                    "words": c.words,
                    "no_words_because": c.no_words,
                    "tokens": c.tokens,
                    "multiplier": {name: multipliers[name][n] for name in ENCODINGS},
                }
                for n, c in enumerate(counted)
            ],
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(tokencost)
