"""/tokencost: every count is tiktoken's own encode of the same text, one text at a time."""

from __future__ import annotations

import pytest
import tiktoken

from bot.inference.offline import prepare_tiktoken
from plugins.tokencost import ENCODINGS, PARALLEL
from tests.plugin_helpers import assert_fits_discord


async def test_built_in_parallel_sentences_equal_tiktoken(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute_line("/tokencost")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    prepare_tiktoken(app.config.cache_dir)
    rows = reply.data["rows"]
    assert [r["language"] for r in rows] == [language for language, _ in PARALLEL]
    for name in ENCODINGS:
        enc = tiktoken.get_encoding(name)
        english = len(enc.encode(PARALLEL[0][1]))
        for row, (_, text) in zip(rows, PARALLEL, strict=True):
            assert row["tokens"][name] == len(enc.encode(text))
            assert row["multiplier"][name] == pytest.approx(len(enc.encode(text)) / english)
    # The teaching point holds on these numbers: some script costs more than English in GPT-4's encoding.
    assert max(r["multiplier"]["cl100k_base"] for r in rows) > 1.5
    assert reply.images[0].filename == "tokencost.png" and reply.images[0].data.startswith(b"\x89PNG")
    assert "context window" in reply.text and "priced per token" in reply.text


async def test_a_students_own_versions(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute(
        "tokencost", {"texts": "Good morning | Buenos días | Доброе утро | おはよう"}, app.local_context()
    )
    assert not reply.error, reply.text
    prepare_tiktoken(app.config.cache_dir)
    enc = tiktoken.get_encoding("o200k_base")
    texts = ["Good morning", "Buenos días", "Доброе утро", "おはよう"]
    assert [r["tokens"]["o200k_base"] for r in reply.data["rows"]] == [len(enc.encode(t)) for t in texts]
    # おはよう is written without spaces: splitting it at spaces would call it one word.
    assert [r["words"] for r in reply.data["rows"]] == [2, 2, 2, None]


@pytest.mark.parametrize(
    ("texts", "words", "reason"),
    [
        ("I love you | 我爱你", [3, None], "without spaces"),
        ("Well done | 👍🎉🙂", [2, None], "no letters or digits"),
        ("Hello there | สวัสดีครับ", [2, None], "without spaces"),
        ("Good night | Gute Nacht", [2, 2], ""),
    ],
)
async def test_tokens_per_word_is_a_dash_with_a_reason_for_texts_without_word_boundaries(  # type: ignore[no-untyped-def]
    app_factory, texts: str, words: list[int | None], reason: str
) -> None:
    app = app_factory()
    reply = await app.execute("tokencost", {"texts": texts}, app.local_context())
    assert not reply.error, reply.text
    prepare_tiktoken(app.config.cache_dir)
    enc = tiktoken.get_encoding("o200k_base")
    assert [r["words"] for r in reply.data["rows"]] == words
    assert reply.table is not None
    for row, text, count in zip(reply.table.rows, [t.strip() for t in texts.split("|")], words, strict=True):
        assert row[-1] == ("–" if count is None else f"{len(enc.encode(text)) / count:.1f}")
    if reason:
        assert "Tokens per word is – for text 2: " in reply.text and reason in reply.text
    else:
        assert "Tokens per word is –" not in reply.text


@pytest.mark.parametrize(
    ("texts", "message"), [("only one", "at least two"), (" | | ", "at least two"), ("a|" * 9, "at most 8")]
)
async def test_tokencost_bad_input(app_factory, texts: str, message: str) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute("tokencost", {"texts": texts}, app.local_context())
    assert reply.error and message in reply.text
