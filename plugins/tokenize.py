"""Topic "Subword OOV handling": how byte-level BPE, WordPiece and a word list cut text."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import tiktoken

from bot import (
    Boolean,
    CodeBlock,
    Command,
    Context,
    Field,
    Reply,
    Segment,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.charts import render, show_bytes, show_token, split_bar_chart
from bot.render import plural
from bot.tokenizers import TIKTOKEN_ENCODINGS, tiktoken_encoding, wordpiece, wordpiece_tokens

TOPIC = Topic.load("plugins", "subwords")  # plugins/data/topics/subwords.toml

COLOURS = ("blue", "yellow", "green", "pink", "cyan", "red")
TOKEN_BAR = "│"  # after each token in the text block
WORD = re.compile(r"\w+|[^\w\s]")
MAX_ROWS = 30


# Python counts code points, not what a reader sees as one character (a grapheme cluster), so say so.
CODE_POINTS_LINE = (
    "Code points are Unicode's numbered characters; one visible character can be several "
    "(👍🏽 is 👍 plus a skin-tone code point, é can be e plus an accent)."
)


def word_level(text: str) -> tuple[list[str], int]:
    """A word-level vocabulary: BERT's whole-word entries; any other word becomes [UNK]."""
    vocab = wordpiece_tokens()
    words = WORD.findall(text.lower())
    out = [w if w in vocab else "[UNK]" for w in words]
    return out, out.count("[UNK]")


def _compare(text: str, enc: tiktoken.Encoding, ids: list[int]) -> tuple[Table, dict]:
    words, unknown = word_level(text)
    pieces = wordpiece().encode(text, add_special_tokens=False).tokens
    bpe = [show_bytes(enc.decode_single_token_bytes(i)) for i in ids]
    rows = [
        ["code points", str(len(text)), "0", " ".join(show_token(c) for c in text[:14])],
        ["word list", str(len(words)), str(unknown), " ".join(words[:10])],
        ["WordPiece (BERT)", str(len(pieces)), str(pieces.count("[UNK]")), " ".join(pieces[:10])],
        [f"byte BPE ({enc.name})", str(len(ids)), "0", " ".join(bpe[:10])],
    ]
    data = {
        "characters": len(text),
        "words": len(words),
        "unknown_words": unknown,
        "wordpiece": pieces,
        "wordpiece_unknown": pieces.count("[UNK]"),
        "bpe": len(ids),
        "unknown": {row[0]: int(row[2]) for row in rows},
    }
    return Table(["strategy", "tokens", "unknown", "first pieces"], rows, align="lrrl"), data


def unknown_line(table: Table) -> str:
    """What the [UNK] counts mean, in words: fewer tokens is no gain when some are lost."""
    lost = [(row[0], int(row[2]), int(row[1])) for row in table.rows if int(row[2])]
    if not lost:
        return "No strategy needed [UNK] for this text: every piece is known."
    parts = [f"{name} {n} of {total}" for name, n, total in lost]
    return (
        f"[UNK] tokens (hatched in the chart): {', '.join(parts)}. Each [UNK] stands for a word the "
        "vocabulary does not have, and what it was is lost, so fewer tokens is no gain when some are [UNK]."
    )


def normalising_line(text: str) -> str:
    """What the uncased vocabularies drop before cutting (case; WordPiece also accents), with the
    first word it changes: fewer tokens there is partly information thrown away, with no [UNK]
    to show it. Empty when nothing changes."""
    normalizer = wordpiece().normalizer
    assert normalizer is not None  # BertWordPieceTokenizer always has its BertNormalizer

    def read(word: str) -> str:
        return "".join(normalizer.normalize_str(word).split())  # CJK characters get spaces around

    changed = [(w, read(w)) for w in text.split() if read(w) != w]
    if not changed:
        return ""
    accents = any(new != old.lower() for old, new in changed)
    case = any(old != old.lower() for old, _ in changed)
    lost = "case and accents are" if accents and case else "accents are" if accents else "case is"
    old, new = changed[0]
    return (
        f"The word list and WordPiece (bert-base-uncased) read the text lower-cased"
        f"{', and WordPiece also drops accents' if accents else ''}: “{old}” is cut as “{new}”, so {lost} "
        "lost before any piece is cut, with no [UNK] to show it."
    )


@command(
    "tokenize",
    "Show how a BPE tokenizer cuts text into tokens",
    topic=TOPIC.slug,
    options=[
        Text("text", "The text to tokenize", max_length=500),
        Text("encoding", "tiktoken encoding", default="cl100k_base", choices=TIKTOKEN_ENCODINGS),
        Boolean("compare", "Compare with a word list, WordPiece and characters", default=False),
    ],
)
async def tokenize(ctx: Context, text: str, encoding: str, compare: bool) -> Reply:
    enc = await asyncio.to_thread(tiktoken_encoding, encoding, ctx.config.cache_dir)
    ids = await asyncio.to_thread(enc.encode, text, disallowed_special=())
    raw = [enc.decode_single_token_bytes(i) for i in ids]
    labels = [show_bytes(b) for b in raw]
    # Colours tell neighbouring tokens apart only where colour shows; the bar does everywhere.
    segments = [Segment(f"{label}{TOKEN_BAR}", COLOURS[n % len(COLOURS)]) for n, label in enumerate(labels)]
    rows = [[str(n), label, str(i), str(len(b))] for n, (label, i, b) in enumerate(zip(labels, ids, raw, strict=True))]
    shown = rows[:MAX_ROWS]
    note = f" (first {MAX_ROWS} shown)" if len(rows) > MAX_ROWS else ""
    data = {"encoding": encoding, "ids": ids, "pieces": labels, "count": len(ids), "bytes": [b.hex() for b in raw]}
    text_line = (
        f"{plural(len(text), 'code point')} became {plural(len(ids), 'token')}{note}. {CODE_POINTS_LINE} "
        "⟨..⟩ marks bytes that are not text on their own; "
        f"in the text below, {TOKEN_BAR} ends each token."
    )
    table = Table(["#", "piece", "id", "bytes"], shown, align="rlrr")
    images = []
    if compare:
        table, counts = await asyncio.to_thread(_compare, text, enc, ids)
        data["compare"] = counts
        text_line += "\n" + unknown_line(table)
        if normalised := normalising_line(text):
            text_line += "\n" + normalised
        unknown = [int(row[2]) for row in table.rows]
        images.append(
            await render(
                split_bar_chart,
                [row[0] for row in table.rows],
                [
                    ("known pieces", [int(row[1]) - n for row, n in zip(table.rows, unknown, strict=True)]),
                    ("[UNK]: unknown, information lost", unknown),
                ],
                title=f"Tokens for the same text of {plural(len(text), 'code point')}",
                xlabel="tokens",
                filename="tokenize.png",
            )
        )
    return Reply(
        title=f"{plural(len(ids), 'token')} ({encoding})",
        text=text_line,
        code=CodeBlock(segments),
        table=table,
        fields=[Field("ids", " ".join(map(str, ids))[:1000])],
        images=images,
        data=data,
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(tokenize)


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
