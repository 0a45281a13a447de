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
from bot.charts import bar_chart, render, show_bytes, show_token
from bot.tokenizers import TIKTOKEN_ENCODINGS, tiktoken_encoding, wordpiece, wordpiece_tokens

TOPIC = Topic.load("plugins", "subwords")  # plugins/data/topics/subwords.toml

COLOURS = ("blue", "yellow", "green", "pink", "cyan", "red")
WORD = re.compile(r"\w+|[^\w\s]")
MAX_ROWS = 30


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
        ["characters", str(len(text)), "0", " ".join(show_token(c) for c in text[:14])],
        ["word list", str(len(words)), str(unknown), " ".join(words[:10])],
        ["WordPiece (BERT)", str(len(pieces)), str(pieces.count("[UNK]")), " ".join(pieces[:10])],
        [f"byte BPE ({enc.name})", str(len(ids)), "0", " ".join(bpe[:10])],
    ]
    data = {
        "characters": len(text),
        "words": len(words),
        "unknown_words": unknown,
        "wordpiece": pieces,
        "bpe": len(ids),
    }
    return Table(["strategy", "tokens", "unknown", "first pieces"], rows, align="lrrl"), data


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
    segments = [Segment(label, COLOURS[n % len(COLOURS)]) for n, label in enumerate(labels)]
    rows = [[str(n), label, str(i), str(len(b))] for n, (label, i, b) in enumerate(zip(labels, ids, raw, strict=True))]
    shown = rows[:MAX_ROWS]
    note = f" (first {MAX_ROWS} shown)" if len(rows) > MAX_ROWS else ""
    data = {"encoding": encoding, "ids": ids, "pieces": labels, "count": len(ids), "bytes": [b.hex() for b in raw]}
    reply = Reply(
        title=f"{len(ids)} tokens ({encoding})",
        text=f"{len(text)} characters became {len(ids)} tokens{note}. ⟨..⟩ marks bytes that are not text on their own.",
        code=CodeBlock(segments),
        table=Table(["#", "piece", "id", "bytes"], shown, align="rlrr"),
        fields=[Field("ids", " ".join(map(str, ids))[:1000])],
        data=data,
    )
    if compare:
        table, counts = await asyncio.to_thread(_compare, text, enc, ids)
        reply.table = table
        reply.data["compare"] = counts
        reply.images.append(
            await render(
                bar_chart,
                [row[0] for row in table.rows],
                [int(row[1]) for row in table.rows],
                title=f"Tokens for the same {len(text)}-character text",
                xlabel="tokens",
                filename="tokenize.png",
                value_format="{:.0f}",
            )
        )
    return reply


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(tokenize)


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
