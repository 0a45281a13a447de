"""The five headline commands, compared with the reference libraries."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import tiktoken
import torch
import transformers

from bot.inference.offline import bert_tokenizer_dir
from bot.tokenizers import TIKTOKEN_ENCODINGS
from plugins.mask import masking_recipe
from tests.plugin_helpers import assert_fits_discord, causal_reference

TOL = 1e-5


@pytest.fixture
def models(tiny_gpt2: Path, tiny_bert_mlm: Path) -> dict[str, Path]:
    return {"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm}


# ----------------------------------------------------------------------------- /nexttoken


async def test_nexttoken_equals_softmax_of_last_logits(app_factory, models, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    reply = await app.execute_line('/nexttoken prompt:"The capital of France is" k:7 temperature:0.8')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    probs = causal_reference(tiny_gpt2, "The capital of France is", 0.8)
    want = torch.topk(probs, 7)
    assert [t["id"] for t in reply.data["top"]] == want.indices.tolist()
    assert [t["prob"] for t in reply.data["top"]] == pytest.approx(want.values.tolist(), abs=TOL)
    entropy = -(probs * probs.clamp_min(1e-30).log2()).sum().item()
    assert reply.data["entropy_bits"] == pytest.approx(entropy, abs=1e-3)
    assert len(reply.table.rows) == 7


async def test_nexttoken_buttons_step_through_generation(app_factory, models, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    prompt = "The capital of France is"
    reply = await app.execute_line(f'/nexttoken prompt:"{prompt}" k:5')
    assert [b.value for b in reply.buttons] == [prompt + t["token"] for t in reply.data["top"][:3]]
    pressed = reply.buttons[0]
    step = await app.execute_text(pressed.command, {pressed.option: pressed.value}, app.local_context())
    want = torch.topk(causal_reference(tiny_gpt2, pressed.value), 10)
    assert [t["id"] for t in step.data["top"]] == want.indices.tolist()
    assert [t["prob"] for t in step.data["top"]] == pytest.approx(want.values.tolist(), abs=TOL)

    # A prompt too long for a button's command gets no buttons (never a cut prompt).
    long = await app.execute_line(f"/nexttoken prompt:{'word ' * 30}")
    assert not long.error and long.buttons == [] and "Each button" not in long.text


# ----------------------------------------------------------------------------- /tokenize


@pytest.mark.parametrize("encoding", TIKTOKEN_ENCODINGS)
@pytest.mark.parametrize("text", ["electroencephalography", "COVID-19 and ChatGPT", "日本語 🙂 naïve", "   spaces  "])
async def test_tokenize_ids_equal_tiktoken(app_factory, encoding: str, text: str, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute("tokenize", {"text": text, "encoding": encoding}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    enc = tiktoken.get_encoding(encoding)  # the tests' environment points tiktoken at the same offline files
    assert reply.data["ids"] == enc.encode(text)
    assert reply.data["count"] == len(enc.encode(text))
    assert b"".join(bytes.fromhex(h) for h in reply.data["bytes"]) == text.encode()
    assert "�" not in "".join(reply.data["pieces"])


async def test_tokenize_shows_partial_utf8_as_bytes(app_factory) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute_line("/tokenize text:語 encoding:cl100k_base")
    assert reply.data["pieces"] == ["⟨E8 AA⟩", "⟨9E⟩"]


async def test_tokenize_comparison_counts(app_factory, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    text = "The transformerization of electroencephalography"
    reply = await app_factory().execute("tokenize", {"text": text, "compare": True}, app_factory().local_context())
    counts = reply.data["compare"]
    bert = transformers.BertTokenizerFast.from_pretrained(bert_tokenizer_dir(cache_dir))
    assert counts["wordpiece"] == bert.tokenize(text)
    assert counts["characters"] == len(text)
    assert (counts["words"], counts["unknown_words"]) == (4, 2)  # transformerization, electroencephalography
    assert counts["bpe"] == len(tiktoken.get_encoding("cl100k_base").encode(text))


# ----------------------------------------------------------------------------- /mask


async def test_mask_equals_fill_mask_pipeline(app_factory, models, tiny_bert_mlm: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm), device="cpu")
    for sentence, spelled in [
        ("The ___ sat on the mat.", "The [MASK] sat on the mat."),
        ("Paris is the <mask> of [MASK].", "Paris is the [MASK] of [MASK]."),
    ]:
        reply = await app.execute("mask", {"sentence": sentence, "k": 3}, app.local_context())
        assert not reply.error, reply.text
        assert_fits_discord(reply)
        want = pipe(spelled, top_k=3)
        want = [want] if isinstance(want[0], dict) else want
        assert len(reply.data["masks"]) == len(want)
        for got, expected in zip(reply.data["masks"], want, strict=True):
            assert [t["id"] for t in got["top"]] == [e["token"] for e in expected]
            assert [t["score"] for t in got["top"]] == pytest.approx([e["score"] for e in expected], abs=TOL)


@pytest.mark.parametrize(
    ("sentence", "message"),
    [
        ("No blank here.", "Put [MASK], <mask> or ___ where the missing word goes."),
        ("[MASK] " * 6, "That sentence has 6 blanks; at most 5 at a time."),
    ],
)
async def test_mask_bad_sentences(app_factory, models, sentence: str, message: str) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    reply = await app.execute("mask", {"sentence": sentence}, app.local_context())
    assert reply.error and reply.text == message


async def test_mask_without_a_masked_lm_tells_the_student_and_logs_the_key(app_factory, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level("WARNING"):
        reply = await app_factory().execute_line("/mask sentence:Paris is the [MASK] of France.")
    assert reply.error and "This server has no masked language model" in reply.text
    assert "set `models.masked_lm` in config.toml" in caplog.text


def test_masking_recipe_follows_15_80_10_10() -> None:
    tokens = [f"t{i}" for i in range(200)]
    vocab = [f"v{i}" for i in range(1000)]
    assert masking_recipe(tokens, vocab, 1) == masking_recipe(tokens, vocab, 1)
    rules: Counter[str] = Counter()
    for seed in range(200):
        changes = masking_recipe(tokens, vocab, seed)
        assert len(changes) == 30  # 15% of 200
        for position, original, shown, rule in changes:
            assert original == tokens[position]
            assert (shown == "[MASK]") == (rule == "mask")
            assert (shown == original) == (rule == "kept")
            assert rule != "random" or shown in vocab
            rules[rule] += 1
    total = sum(rules.values())
    assert abs(rules["mask"] / total - 0.8) < 0.02
    assert abs(rules["random"] / total - 0.1) < 0.02
    assert abs(rules["kept"] / total - 0.1) < 0.02


async def test_maskrecipe_command_uses_wordpiece(app_factory, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute_line("/maskrecipe sentence:The cat sat on the warm windowsill. seed:3")
    bert = transformers.BertTokenizerFast.from_pretrained(bert_tokenizer_dir(cache_dir))
    assert reply.data["tokens"] == bert.tokenize("The cat sat on the warm windowsill.")
    again = await app.execute_line("/maskrecipe sentence:The cat sat on the warm windowsill. seed:3")
    assert again.data == reply.data


# ----------------------------------------------------------------------------- /ngram

TOY = "the cat sat on the mat the cat ate the food"


async def test_ngram_counts_and_probabilities_are_exact(app_factory, models) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    reply = await app.execute("ngram", {"text": TOY, "context": "the", "smoothing": 0.5}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    # The course's bigram count, done independently: after "the" come cat 2, mat 1, food 1.
    words = TOY.split()
    follows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for a, b in zip(["<s>", *words], [*words, "</s>"], strict=True):
        follows[a][b] += 1
    vocab = set(words) | {"</s>", "<unk>"}
    got = {row["word"]: (row["count"], row["prob"]) for row in reply.data["next"]}
    for word in vocab:
        count = follows["the"][word]
        assert got[word] == (count, pytest.approx((count + 0.5) / (4 + 0.5 * len(vocab)), abs=1e-12))
    assert reply.data["context_count"] == 4 and reply.data["vocab_size"] == len(vocab)


async def test_ngram_perplexities_equal_direct_computation(app_factory, models, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    sentence = "the cat ate the mat"
    reply = await app.execute("ngram", {"text": TOY, "sentence": sentence, "smoothing": 1.0}, app.local_context())
    words = TOY.split()
    follows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for a, b in zip(["<s>", *words], [*words, "</s>"], strict=True):
        follows[a][b] += 1
    v = len(set(words)) + 2
    held = sentence.split()
    logp = sum(
        math.log((follows[a][b] + 1) / (sum(follows[a].values()) + v))
        for a, b in zip(["<s>", *held[:-1]], held, strict=True)
    )
    assert reply.data["ngram_perplexity"] == pytest.approx(math.exp(-logp / len(held)), rel=1e-12)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = [tok.convert_tokens_to_ids("<|endoftext|>"), *tok(sentence)["input_ids"]]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    neural = sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert reply.data["neural_logprob"] == pytest.approx(neural, rel=1e-5)
    assert reply.data["neural_perplexity_per_word"] == pytest.approx(math.exp(-neural / len(held)), rel=1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": 3, "context": "the"}, "A 3-gram model needs at least 2 context words; `context` has 1."),
        ({"n": 5, "context": "the cat"}, "A 5-gram model needs at least 4 context words; `context` has 2."),
    ],
)
async def test_ngram_bad_input(app_factory, models, values, message) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    reply = await app.execute("ngram", values, app.local_context())
    assert reply.error
    assert reply.text.startswith(message) or message in reply.text


async def test_ngram_counts_symbols_as_words_on_both_sides(app_factory, models) -> None:  # type: ignore[no-untyped-def]
    # Both per-word perplexities divide by the same words, symbols included, so the neural LM's
    # per-word figure covers exactly the text the n-gram model scored.
    app = app_factory(models)
    reply = await app.execute("ngram", {"text": "@@ ## $$", "sentence": "@@@ ###", "context": "@"}, app.local_context())
    assert not reply.error, reply.text
    assert reply.data["heldout_words"] == ["@", "@", "@", "#", "#", "#"]
    neural = reply.data["neural_logprob"]
    assert reply.data["neural_perplexity_per_word"] == pytest.approx(math.exp(-neural / 6), rel=1e-12)


# ----------------------------------------------------------------------------- /compare


async def test_compare_shows_both_models(app_factory, models, tiny_gpt2: Path, tiny_bert_mlm: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    reply = await app.execute_line("/compare text:The capital of France is Paris. k:4")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.data["hidden"] == "Paris"
    want = torch.topk(causal_reference(tiny_gpt2, "The capital of France is"), 4)
    assert [t["id"] for t in reply.data["causal"]["top"]] == want.indices.tolist()
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm), device="cpu")
    expected = pipe("The capital of France is [MASK].", top_k=4)
    assert [t["id"] for t in reply.data["masked"]["top"]] == [e["token"] for e in expected]
    assert reply.data["causal"]["seconds"] > 0 and reply.data["masked"]["seconds"] > 0


async def test_compare_offline_without_masked_lm_still_answers(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2})
    reply = await app.execute_line("/compare text:The capital of France is Paris.")
    assert not reply.error
    assert reply.data["masked"]["missing_role"] == "masked_lm"
    assert "no masked language model" in reply.data["masked"]["error"]
    assert reply.data["causal"]["top"]
