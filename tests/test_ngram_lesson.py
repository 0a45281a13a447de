"""/ngram teaches the course's counted bigram: counts beside probabilities, no smoothing when asked,
infinite perplexity said in words, and a warning when the two perplexities cannot be compared.

Every number is checked against an independent count written here, and the neural side against a
direct transformers forward on the same tiny model.
"""

from __future__ import annotations

import math
import re
import unicodedata
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
from plugins.ngram import DEFAULT_HELDOUT, NgramModel, sentences, words
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
    assert reply.data["comparable"] == "partly" and reply.data["oov_rate"] == 0


async def test_unknown_words_are_reported_and_the_perplexities_flagged(app: App, tiny_gpt2: Path) -> None:
    reply = await app.execute_line('/ngram text:"hello world" context:hello')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    held = reply.data["heldout_words"]
    assert reply.data["oov_words"] == [w for w in held if w not in {"hello", "world"}] == held
    assert reply.data["oov_rate"] == 1.0
    assert reply.data["comparable"] == "no"
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
    assert "2 of 5 held-out words (40%)" in shown(reply) and reply.data["comparable"] == "no"


async def test_a_held_out_sentence_from_the_counted_text_is_flagged(app: App) -> None:
    reply = await app.execute("ngram", {"text": COURSE, "sentence": COURSE}, app.local_context())
    assert reply.data["comparable"] == "no" and "memorised" in shown(reply)


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


# ----------------------------------------------------------------------------- the same text on both sides


def visible(text: str) -> str:
    """The text without its spaces: what both models must account for."""
    return "".join(unicodedata.normalize("NFC", text).lower().split())


@settings(max_examples=examples(200), deadline=None)
@given(text=st.text(max_size=60))
def test_the_ngram_model_leaves_out_nothing_but_spaces(text: str) -> None:
    """Every visible character is part of some word, so the n-gram model scores the text the neural
    model scores (a symbol or an emoji dropped here would leave the neural model's log-probability
    for it divided among fewer words)."""
    assert "".join(words(text)) == visible(text)
    assert all(w and not any(c.isspace() for c in w) for w in words(text))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Pay $5 (20% off)!", ["pay", "$", "5", "(", "20", "%", "off", ")", "!"]),
        ("I love 🍕", ["i", "love", "🍕"]),
        ("東京は日本の首都です。", list("東京は日本の首都です。")),  # written without spaces: one word per character
        ("don't 'quote' me", ["don't", "'", "quote", "'", "me"]),
    ],
)
def test_symbols_emoji_and_unspaced_scripts_are_words(text: str, want: list[str]) -> None:
    assert words(text) == want


async def test_symbols_are_scored_by_both_models(app: App, tiny_gpt2: Path) -> None:
    """The per-word perplexities divide the same text's log-probability: no symbol is left to the neural side."""
    sentence = "Pay $5 (20% off)!"
    reply = await app.execute(
        "ngram", {"text": "Pay $5 (20% off) now. It costs $5!", "sentence": sentence}, app.local_context()
    )
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    held = reply.data["heldout_words"]
    assert "".join(held) == visible(sentence)
    logprob, tokens = direct_sentence_logprob(tiny_gpt2, sentence)
    assert reply.data["neural_tokens"] == tokens
    assert reply.data["neural_perplexity_per_word"] == pytest.approx(math.exp(-logprob / len(held)), rel=1e-5)
    # Its words, "!" aside, run word for word inside the first counted sentence: memorised.
    assert reply.data["oov_rate"] == 0 and reply.data["comparable"] == "no" and reply.data["memorised_sentences"] == 1
    assert "punctuation and symbols count as words" in shown(reply)


async def test_text_without_spaces_counts_characters_and_says_so(app: App) -> None:
    text = "東京は日本の首都です。大阪は大きな町です。"
    reply = await app.execute(
        "ngram", {"text": text, "context": "東京", "sentence": "京都は日本の町です。"}, app.local_context()
    )
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.data["sentences_counted"] == 2  # 。 ends a sentence, with no space after it
    assert reply.data["heldout_words"] == list("京都は日本の町です。")
    assert reply.data["context"] == ["京"]
    assert "each of their characters counts as one word" in reply.text
    # Counted by hand: 東京は日本の首都です。 and 大阪は大きな町です。; "都" follows "京" nowhere, "は" once.
    steps = reply.data["ngram_steps"]
    assert [(s["word"], s["count"], s["total"]) for s in steps[:3]] == [("京", 0, 2), ("都", 0, 1), ("は", 0, 1)]


# ----------------------------------------------------------------------------- a held-out text of several sentences


async def test_each_held_out_sentence_starts_after_the_start_marker(app: App) -> None:
    """The counts were made sentence by sentence, so the held-out text is scored that way too: its
    second sentence starts after <s>, not after the first one's full stop (never continued when counting)."""
    text = "the cat sat. the dog ran. the cat ran."
    held = "the dog sat. the cat ran."
    reply = await app.execute("ngram", {"text": text, "sentence": held, "smoothing": 0}, app.local_context())
    assert not reply.error, reply.text
    follows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for s in ["the cat sat .", "the dog ran .", "the cat ran ."]:
        for key, counter in bigram_counts(s).items():
            follows[key].update(counter)
    want = []
    for s in ["the dog sat .", "the cat ran ."]:
        ws = s.split()
        want += [(b, follows[a][b], sum(follows[a].values())) for a, b in zip(["<s>", *ws[:-1]], ws, strict=True)]
    steps = reply.data["ngram_steps"]
    assert [(s["word"], s["count"], s["total"]) for s in steps] == want
    assert steps[4]["context"] == ["<s>"]
    # "the cat ran." is in the counted text, "the dog sat." is not: the warning says which share.
    assert reply.data["comparable"] == "no"
    assert "1 of the 2 held-out sentences is itself in the counted text" in shown(reply)


# ----------------------------------------------------------------------------- readable numbers and words


async def test_unsmoothed_step_with_no_counts_is_no_estimate_not_zero(app: App) -> None:
    # "dog" is never followed by anything in the counted text: 0/0 is no estimate, not a probability of 0.
    reply = await app.execute("ngram", {"text": COURSE, "sentence": "the dog sat", "smoothing": 0}, app.local_context())
    text = shown(reply)
    assert "0/0 → 0" not in text and "sat 0/0 → no estimate" in text
    assert "<s> marks the start of a sentence" in reply.text  # the markers get a plain line, smoothed or not


async def test_a_huge_perplexity_is_written_readably(app: App) -> None:
    reply = await app.execute("ngram", {"sentence": "x" * 300}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    per_word = reply.data["neural_perplexity_per_word"]
    assert per_word > 1e6
    text = shown(reply).replace(",", "")
    assert not re.search(r"\d{8,}", text), text  # 1.95e14, not fifteen digits
    mantissa, exponent = f"{per_word:.2e}".split("e")
    assert f"{mantissa}e{int(exponent)} per word" in text


# ----------------------------------------------------------------------------- memorised runs; never a plain yes


def hand_counted_ngrams(text: str, held: str, n: int) -> tuple[int, int]:
    """How many of the held-out words, each with the n-1 words before it (<s> padding at the start),
    occur that way in the counted text: counted here from whitespace-split words, one sentence each."""
    grams = set()
    for sentence in re.split(r"(?<=\.)\s+", text):
        ws = ["<s>"] * (n - 1) + sentence.replace(".", " .").split()
        grams |= {tuple(ws[i - n + 1 : i + 1]) for i in range(n - 1, len(ws))}
    hw = ["<s>"] * (n - 1) + held.split()
    wanted = [tuple(hw[i - n + 1 : i + 1]) for i in range(n - 1, len(hw))]
    return sum(g in grams for g in wanted), len(wanted)


@pytest.mark.parametrize(
    ("text", "held", "memorised"),
    [
        # A corpus sentence minus its full stop, and a run inside a longer counted sentence.
        (
            "the cat ate the fish and then slept on the mat. a dog sat.",
            "the cat ate the fish and then slept on the mat",
            True,
        ),
        ("a b a b a b a b", "a b a b", True),
        ("the cat ate the fish and then slept on the mat. a dog sat.", "ate the fish and then slept", True),
        # New text: same unit, but never a plain "Yes".
        ("the cat ate the fish and then slept on the mat. a dog sat.", "the dog ate the mat", False),
    ],
)
async def test_memorised_runs_are_flagged_and_counted_ngrams_reported(
    app: App, text: str, held: str, memorised: bool
) -> None:
    for n in (2, 3):
        reply = await app.execute(
            "ngram", {"text": text, "sentence": held, "n": n, "context": "the cat"}, app.local_context()
        )
        assert not reply.error, reply.text
        counted, total = hand_counted_ngrams(text, held, n)
        assert (reply.data["counted_ngrams"], reply.data["heldout_ngrams"]) == (counted, total)
        answer = next(f.value for f in reply.fields if f.name == "can the two be compared?")
        assert f"{counted} of {total} held-out {n}-grams" in answer
        assert not answer.startswith("Yes")
        if memorised:
            assert reply.data["comparable"] == "no" and answer.startswith("No:") and "memorised" in answer
        else:
            assert reply.data["comparable"] == "partly" and answer.startswith("Partly: same unit (per word)")
            assert "lower-cased" in answer and f"{reply.data['vocab_size']:,} outcomes" in answer
            assert ("no step of it is new" in answer) == (counted == total)


async def test_a_new_sentence_of_counted_pairs_says_every_step_was_counted(app: App) -> None:
    text = "the cat ate. the cat sat. a dog sat on the mat."
    reply = await app.execute("ngram", {"text": text, "sentence": "the cat sat on the mat."}, app.local_context())
    assert hand_counted_ngrams(text, "the cat sat on the mat .", 2) == (7, 7)
    answer = next(f.value for f in reply.fields if f.name == "can the two be compared?")
    assert reply.data["comparable"] == "partly" and "7 of 7 held-out 2-grams" in answer
    assert "no step of it is new" in answer


async def test_the_built_in_corpus_sentence_without_its_full_stop_is_memorised(app: App) -> None:
    reply = await app.execute_line('/ngram sentence:"The cat ate the fish and then slept on the mat"')
    assert reply.data["comparable"] == "no" and "memorised" in shown(reply)
    assert reply.data["counted_ngrams"] == reply.data["heldout_ngrams"] == 11
