"""/ngram teaches the course's counted bigram: counts beside probabilities, no smoothing when asked,
infinite perplexity said in words, and a warning when the two perplexities cannot be compared.

Every number is checked against an independent count written here, and the neural side against a
direct transformers forward on the same tiny model.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.app import App
from bot.render import render_table, render_text
from plugins.ngram import DEFAULT_HELDOUT, NgramModel, sentences
from tests.conftest import examples, make_config
from tests.plugin_helpers import assert_fits_discord

# The course's own example corpus.
COURSE = "the cat sat on the mat the cat ate the food"


@pytest.fixture(scope="module")
async def app(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[App]:
    """One app on the tiny GPT-2 for the whole module (starting workers is the slow part)."""
    app = App(make_config(cache_dir, {"causal_lm": tiny_gpt2}))
    yield app
    await app.close()


def bigram_counts(text: str) -> defaultdict[str, Counter[str]]:
    """The course's counting, one sentence with start and end markers."""
    words = text.split()
    follows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for a, b in zip(["<s>", *words], [*words, "</s>"], strict=True):
        follows[a][b] += 1
    return follows


def shown(reply) -> str:  # type: ignore[no-untyped-def]
    """Everything a student reads: text, fields and table."""
    return render_text(reply, [])


def direct_sentence_logprob(path: Path, sentence: str) -> tuple[float, int]:
    """log P(sentence) after <|endoftext|>, and its token count, straight from transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = [tok.convert_tokens_to_ids("<|endoftext|>"), *tok(sentence)["input_ids"]]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids))), len(ids) - 1


async def test_unsmoothed_bigram_is_the_course_count(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "context": "the", "smoothing": 0}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    follows = bigram_counts(COURSE)["the"]  # cat 2, mat 1, food 1 of 4
    total = sum(follows.values())
    got = {row["word"]: row for row in reply.data["next"]}
    assert set(got) == set(follows)  # unsmoothed, a word never counted after "the" has no row
    for word, count in follows.items():
        assert got[word]["count"] == count and got[word]["total"] == total
        assert got[word]["prob"] == count / total
    # The table shows count/total beside each probability.
    assert reply.table is not None
    assert [row[1:] for row in reply.table.rows] == [
        [f"{follows[row[0]]}/{total}", f"{follows[row[0]] / total:.4f}"] for row in reply.table.rows
    ]
    assert "count/total" in reply.table.headers
    assert "Smoothing: none" in reply.text and "maximum likelihood" in reply.text


async def test_smoothed_probabilities_show_their_counts_and_name_the_smoothing(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "context": "the", "smoothing": 0.5}, app.local_context())
    follows = bigram_counts(COURSE)["the"]
    outcomes = len(set(COURSE.split())) + 2  # the word types, </s> and <unk>
    assert reply.table is not None
    for word, count_total, prob in reply.table.rows:
        assert count_total == f"{follows[word]}/4"
        assert prob == f"{(follows[word] + 0.5) / (4 + 0.5 * outcomes):.4f}"
    assert "add-0.5" in reply.text and f"0.5 × {outcomes}" in reply.text


async def test_unseen_bigram_gives_infinite_perplexity_said_in_words(app: App) -> None:
    values = {"text": COURSE, "sentence": "the mat sat", "smoothing": 0}
    reply = await app.execute("ngram", values, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.data["ngram_perplexity"] is None and reply.data["ngram_perplexity_infinite"]
    field = next(f for f in reply.fields if f.name == "2-gram perplexity")
    assert field.value.startswith("infinite") and "“sat” never follows “mat”" in field.value
    text = shown(reply)
    assert not re.search(r"\b(inf|nan)\b", text, re.IGNORECASE), text
    # By hand: "the" starts the one sentence (1/1), "mat" is 1 of 4 words after "the", and "mat" is
    # followed only by "the" (0 of 1 for "sat").
    steps = reply.data["ngram_steps"]
    assert [(s["count"], s["total"]) for s in steps] == [(1, 1), (1, 4), (0, 1)]
    # An unseen word, unsmoothed, is impossible too.
    unseen = await app.execute("ngram", {**values, "sentence": "the dog"}, app.local_context())
    assert unseen.data["ngram_perplexity"] is None and "“dog” never occurs" in shown(unseen)


async def test_unsmoothed_perplexity_equals_a_hand_count(app: App) -> None:
    sentence = "the cat ate the mat"
    reply = await app.execute("ngram", {"text": COURSE, "sentence": sentence, "smoothing": 0}, app.local_context())
    follows = bigram_counts(COURSE)
    held = sentence.split()
    logp = sum(
        math.log(follows[a][b] / sum(follows[a].values())) for a, b in zip(["<s>", *held[:-1]], held, strict=True)
    )
    assert reply.data["ngram_perplexity"] == pytest.approx(math.exp(-logp / len(held)), rel=1e-12)
    assert reply.data["comparable"] and reply.data["oov_rate"] == 0


async def test_unknown_words_are_reported_and_the_perplexities_flagged(app: App, tiny_gpt2: Path) -> None:
    reply = await app.execute_line('/ngram text:"hello world" context:hello')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    held = reply.data["heldout_words"]
    assert reply.data["oov_words"] == [w for w in held if w not in {"hello", "world"}] == held
    assert reply.data["oov_rate"] == 1.0
    assert not reply.data["comparable"]
    text = shown(reply)
    assert f"{len(held)} of {len(held)} held-out words (100%)" in text
    assert "not comparable" in text and "<unk>" in text
    assert "per word" in text and "per token" in text and "lower is better" in text
    # Plural and word types: one sentence, two word types (no markers counted as words).
    assert "in 1 sentence " in reply.text and "1 sentences" not in reply.text
    assert "(2 word types)" in reply.text and reply.data["word_types"] == 2
    # The neural side is still a direct transformers forward on the same model.
    logprob, tokens = direct_sentence_logprob(tiny_gpt2, DEFAULT_HELDOUT)
    assert reply.data["neural_logprob"] == pytest.approx(logprob, rel=1e-5)
    assert reply.data["neural_tokens"] == tokens
    assert reply.data["neural_perplexity_per_word"] == pytest.approx(math.exp(-logprob / len(held)), rel=1e-5)
    assert reply.data["neural_perplexity_per_token"] == pytest.approx(math.exp(-logprob / tokens), rel=1e-5)


async def test_some_unknown_words_give_their_rate(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "sentence": "the dog ate the fish"}, app.local_context())
    assert reply.data["oov_words"] == ["dog", "fish"] and reply.data["oov_rate"] == pytest.approx(2 / 5)
    assert "2 of 5 held-out words (40%)" in shown(reply) and not reply.data["comparable"]


async def test_a_held_out_sentence_from_the_counted_text_is_flagged(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "sentence": COURSE}, app.local_context())
    assert not reply.data["comparable"] and "memorised" in shown(reply)


async def test_unsmoothed_unseen_context_has_no_prediction(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "context": "dog", "smoothing": 0}, app.local_context())
    assert not reply.error, reply.text
    assert reply.data["next"] == [] and reply.table is None and not reply.images
    assert "no prediction" in reply.text and "0/0" in reply.text


def test_word_types_leave_out_the_markers() -> None:
    model = NgramModel.fit(sentences(COURSE), 2, 0.0)
    assert model.vocab == set(COURSE.split()) | {"</s>", "<unk>"}
    assert model.word_types == set(COURSE.split())


WORDS = st.sampled_from(["the", "cat", "sat", "on", "mat", "dog", "ran", "."])


@settings(max_examples=examples(60), deadline=None)
@given(
    corpus=st.lists(st.lists(WORDS, min_size=1, max_size=8), min_size=1, max_size=6),
    held=st.lists(WORDS, min_size=1, max_size=8),
    n=st.integers(2, 4),
    k=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_model_equals_an_independent_count(corpus: list[list[str]], held: list[str], n: int, k: float) -> None:
    model = NgramModel.fit(corpus, n, k)
    counts: defaultdict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    types = {w for s in corpus for w in s}
    for s in corpus:
        padded = ["<s>"] * (n - 1) + s + ["</s>"]
        for i in range(n - 1, len(padded)):
            counts[tuple(padded[i - n + 1 : i])][padded[i]] += 1
    outcomes = len(types) + 2
    padded = ["<s>"] * (n - 1) + held
    want = []
    for i in range(n - 1, len(padded)):
        context, word = tuple(padded[i - n + 1 : i]), padded[i]
        word = word if word in types else "<unk>"
        count, total = counts[context][word], sum(counts[context].values())
        want.append((count + k) / (total + k * outcomes) if total + k * outcomes else 0.0)
    steps = model.steps(held)
    assert [s.prob for s in steps] == pytest.approx(want, rel=1e-12)
    assert model.sentence_logprob(held) == (
        -math.inf if min(want) == 0 else pytest.approx(sum(math.log(p) for p in want), rel=1e-12)
    )
    if k > 0:  # smoothed, the next-word probabilities over every outcome add up to 1
        context = tuple((["<s>"] * (n - 1) + held)[-(n - 1) :])
        assert sum(p for _, _, p in model.next_words(context, len(model.vocab))) == pytest.approx(1.0)


@pytest.mark.parametrize("smoothing", ["0", "0.001", "10"])
async def test_every_smoothing_renders_readably(app: App, smoothing: str) -> None:
    reply = await app.execute_line(f'/ngram context:"the cat" smoothing:{smoothing}')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    text = shown(reply)
    assert not re.search(r"\b(inf|nan)\b", text, re.IGNORECASE)
    if reply.table is not None:
        assert max(len(line) for line in render_table(reply.table).splitlines()) <= 60
