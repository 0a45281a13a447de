"""/surprise: per-token surprisal equals a direct transformers forward (batched and alone);
the n-gram side equals bigram counts done here by hand on /ngram's corpus."""

from __future__ import annotations

import asyncio
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import transformers

from bot.app import App
from bot.charts import shaded_text
from bot.render import render_code
from bot.worker.tasks import document_start_id
from plugins.ngram import builtin_corpus, sentences, words
from plugins.surprise import MAX_TOKENS, Surprisal, band, marked, surprisal
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord
from tests.test_charts import drawn_texts

TEXTS = ["The cat sat on the mat. The cat sat on the purple elephant.", "Hi", "東京 🙂 and 🦜, then\nnew lines"]
TOL = 1e-5
# Log-probabilities reach -20 and beyond; through 30 layers (SmolLM2) a padded batch and an
# unpadded forward differ by float32 noise of about 1e-5 of the value.
LOGP_TOL = 1e-4


def load(path: Path):  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tok


def reference(model, tok, text: str) -> tuple[list[int], torch.Tensor]:  # type: ignore[no-untyped-def]
    """ln p of each token, one unpadded forward after the document separator."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([[document_start_id(tok), *ids]])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[:-1]
    return ids, logp


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal(request):  # type: ignore[no-untyped-def]
    return load(request.getfixturevalue(request.param))


@torch.inference_mode()
def test_logprobs_equal_a_direct_forward_batched_and_alone(causal) -> None:  # type: ignore[no-untyped-def]
    model, tok = causal
    batch = [Surprisal(t) for t in TEXTS]
    together = surprisal(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        alone = surprisal(model, tok, [request])[0]
        ids, logp = reference(model, tok, request.text)
        want = [logp[i, t].item() for i, t in enumerate(ids)]
        assert got.ids == alone.ids == ids
        assert got.logprobs == pytest.approx(want, rel=LOGP_TOL, abs=TOL)
        assert alone.logprobs == pytest.approx(want, rel=LOGP_TOL, abs=TOL)
        assert got.expected_probs == pytest.approx(logp.max(-1).values.exp().tolist(), abs=LOGP_TOL)
        assert b"".join(got.raw) == request.text.encode()


@torch.inference_mode()
def test_too_long_is_refused_per_request(tiny_gpt2: Path) -> None:
    model, tok = load(tiny_gpt2)
    got = surprisal(model, tok, [Surprisal("1 " * MAX_TOKENS + "1"), Surprisal("fine")])
    assert got[0].problem == f"That text is {MAX_TOKENS + 1} tokens; /surprise scores at most {MAX_TOKENS}."
    assert not got[1].problem and len(got[1].logprobs) == 1


def bigram_bits(text: str) -> list[float]:
    """Add-one bigram surprisal of each word, counted here from /ngram's built-in corpus."""
    follows: defaultdict[str, Counter[str]] = defaultdict(Counter)
    vocab: set[str] = {"<unk>"}
    for sentence in sentences(builtin_corpus()):
        vocab.update([*sentence, "</s>"])
        for a, b in zip(["<s>", *sentence], [*sentence, "</s>"], strict=True):
            follows[a][b] += 1
    bits = []
    for sentence in sentences(text):  # each held-out sentence starts after <s>, as /ngram scores it
        for a, b in zip(["<s>", *sentence], sentence, strict=False):
            b = b if b in vocab else "<unk>"
            bits.append(-math.log2((follows[a][b] + 1) / (sum(follows[a].values()) + len(vocab))))
    return bits


async def test_surprise_command_with_the_ngram_model(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    text = TEXTS[0]
    reply = await app.execute("surprise", {"text": text, "ngram": True}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model, tok = load(tiny_gpt2)
    ids, logp = reference(model, tok, text)
    nats = [-logp[i, t].item() for i, t in enumerate(ids)]
    assert reply.data["bits"] == pytest.approx([n / math.log(2) for n in nats], rel=TOL)
    perplexity = math.exp(sum(nats) / len(nats))
    assert reply.data["perplexity_per_token"] == pytest.approx(perplexity, rel=1e-4)
    assert f"Perplexity {perplexity:.1f} per token" in reply.text and "Lower is better." in reply.text
    ranked = sorted(range(len(nats)), key=lambda i: -nats[i])[:5]
    assert [t["position"] - 1 for t in reply.data["most_surprising"]] == ranked
    assert [row[0] for row in reply.table.rows] == [str(i + 1) for i in ranked]

    ngram = reply.data["ngram"]
    assert ngram["bits"] == pytest.approx(bigram_bits(text), rel=1e-12)
    assert ngram["unknown"] == ["elephant", "purple"]
    # The same number /ngram prints for this held-out sentence.
    same = await app.execute("ngram", {"sentence": text}, app.local_context())
    assert ngram["perplexity_per_word"] == pytest.approx(same.data["ngram_perplexity"], rel=1e-12)
    assert ngram["neural_perplexity_per_word"] == pytest.approx(math.exp(sum(nats) / len(words(text))), rel=1e-4)

    # The console colours each token by its band; the plain text is the text itself, with the
    # marks of the 6–12 and 12+ bit bands around those tokens.
    plain = reply.code.plain
    for mark in "‹›«»":
        plain = plain.replace(mark, "")
    assert plain.startswith(text)
    coloured = render_code(reply.code, colour=True)
    for bits, token in zip(reply.data["bits"], [tok.decode([i]) for i in ids], strict=True):
        colour = band(bits)
        if colour is not None:
            assert marked(token, bits) in "".join(s.text for s in reply.code.segments if s.colour == colour)
    assert "\x1b[" in coloured
    assert reply.images[0].filename == "surprise.png" and reply.images[0].data.startswith(b"\x89PNG")


async def test_byte_pieces_show_as_hex_and_batching_changes_nothing(cache_dir: Path, tiny_llama: Path) -> None:
    app = App(make_config(cache_dir, {"causal_lm": tiny_llama}, max_wait_ms=300))
    try:
        replies = await asyncio.gather(*(app.execute("surprise", {"text": t}, app.local_context()) for t in TEXTS))
        assert app.inference.metrics.summary()["tasks"]["plugins.surprise:surprisal"]["batch_size_mean"] > 1
        model, tok = load(tiny_llama)
        for text, reply in zip(TEXTS, replies, strict=True):
            assert not reply.error, reply.text
            ids, logp = reference(model, tok, text)
            want = [-logp[i, t].item() / math.log(2) for i, t in enumerate(ids)]
            assert reply.data["bits"] == pytest.approx(want, rel=LOGP_TOL, abs=TOL)
            assert "\ufffd" not in "".join(reply.data["tokens"]) + reply.code.plain
        assert any(t.startswith("⟨") for t in replies[2].data["tokens"])
    finally:
        await app.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"text": "1 " * MAX_TOKENS + "1"}, f"That text is {MAX_TOKENS + 1} tokens; /surprise scores at most"),
        ({"text": "   "}, "`text` is empty"),
        ({"text": "x" * 401}, "`text` is too long"),
    ],
)
async def test_bad_text_gets_a_clear_answer(shared_app, tiny_gpt2: Path, values: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    reply = await app.execute("surprise", values, app.local_context())
    assert reply.error and reply.text.startswith(message), reply.text


async def test_ngram_side_scores_symbols_and_emoji_as_words(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    # /ngram counts every visible character as a word, so text of emoji alone is still scored,
    # each emoji unseen in the corpus (and scored as <unk>).
    app = shared_app({"causal_lm": tiny_gpt2})
    reply = await app.execute("surprise", {"text": "🙂 🦜", "ngram": True}, app.local_context())
    assert not reply.error, reply.text
    ngram = reply.data["ngram"]
    assert ngram["words"] == ["🙂", "🦜"] and ngram["unknown"] == ["🙂", "🦜"]
    assert ngram["bits"] == pytest.approx(bigram_bits("🙂 🦜"), rel=1e-12)


def test_shaded_text_draws_literal_text() -> None:
    image = shaded_text(
        [("$5 and $6", ["$x$", " a_b", "\n", " ⟨E6 9D⟩", " $$"], [1.0, 5.0, 0.5, 12.0, 20.0])],
        colorbar="bits",
    )
    assert image.data.startswith(b"\x89PNG") and image.description == "$5 and $6"


async def test_surprise_says_when_the_two_perplexities_are_not_comparable(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    # One judgement, shared with /ngram: unknown words (all lumped into <unk>) and a memorised
    # corpus sentence both make the n-gram's per-word perplexity look better than it is.
    app = shared_app({"causal_lm": tiny_gpt2})
    corpus = sentences(builtin_corpus())
    cases = {
        "Zyx qwv plomb frax.": ("unknown to the n-gram model", "no"),
        "The cat sat on the mat.": ("memorised", "no"),
        "The cat ate the fish and then slept on the mat": ("memorised", "no"),  # no full stop, still a corpus run
        "The cat sat on the rug.": ("lower-cased", "partly"),
    }
    assert sentences("The cat sat on the mat.")[0] in corpus
    assert sentences("The cat sat on the rug.")[0] not in corpus
    for text, (reason, comparable) in cases.items():
        with drawn_texts() as drawn:
            reply = await app.execute("surprise", {"text": text, "ngram": True}, app.local_context())
        assert not reply.error, reply.text
        # The chart says it too: one colour scale for two rows that do not compare as they are.
        ngram_title = next(d.text for d in drawn if d.text.startswith("2-gram model"))
        assert ("not comparable" if comparable == "no" else "only partly comparable") in ngram_title
        same = await app.execute("ngram", {"sentence": text}, app.local_context())
        assert reply.data["ngram"]["comparable"] == comparable == same.data["comparable"]
        assert reply.data["ngram"]["counted_ngrams"] == same.data["counted_ngrams"]
        assert "Yes" not in reply.text
        if comparable == "partly":
            assert "Can the two be compared? Partly: same unit (per word), but not like with like" in reply.text
            assert reason in reply.text
        else:
            assert "Can the two be compared? No" in reply.text and "not comparable" in reply.text
            assert reason in reply.text
