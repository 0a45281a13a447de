"""Each inference task against transformers' own computation, batched and alone.

The tasks are pure functions of (model, tokenizer, batch), so they are tested
here in-process; tests/test_service.py runs the same through the workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from bot.inference.protocol import (
    MASK,
    Classify,
    Embed,
    FillMask,
    Generate,
    NextToken,
    Score,
    Seq2Seq,
)
from bot.worker import tasks
from plugins.nsp import NextSentence, next_sentence

PROMPTS = ["The capital of France is", "Hi", "A much longer prompt, so that the others need padding: one two three"]
TOL = 1e-5


def load(path: Path, cls=transformers.AutoModelForCausalLM):  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return cls.from_pretrained(path).eval(), tok


def reference_next_token(model, tok, prompt: str, temperature: float = 1.0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The course's recipe: one unpadded forward, softmax of the last logits."""
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[:, -1, :]
    return torch.softmax(logits / temperature, dim=-1)[0]


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal(request):  # type: ignore[no-untyped-def]
    return load(request.getfixturevalue(request.param))


@torch.inference_mode()
def test_next_token_equals_reference_batched_and_alone(causal) -> None:  # type: ignore[no-untyped-def]
    model, tok = causal
    batch = [NextToken(p, k=5, temperature=t) for p, t in zip(PROMPTS, (1.0, 0.7, 1.3), strict=True)]
    together = tasks.next_token(model, tok, batch)
    for request, batched in zip(batch, together, strict=True):
        alone = tasks.next_token(model, tok, [request])[0]
        probs = reference_next_token(model, tok, request.text, request.temperature)
        top = torch.topk(probs, 5)
        assert [t.id for t in batched.top] == top.indices.tolist() == [t.id for t in alone.top]
        for got_b, got_a, want in zip(batched.top, alone.top, top.values.tolist(), strict=True):
            assert abs(got_b.prob - want) < TOL and abs(got_a.prob - want) < TOL
        entropy = -(probs * probs.clamp_min(1e-30).log2()).sum().item()
        assert abs(batched.entropy_bits - entropy) < 1e-3
        assert batched.prompt_ids == tok(request.text)["input_ids"]


@torch.inference_mode()
def test_score_equals_reference(causal) -> None:  # type: ignore[no-untyped-def]
    model, tok = causal
    batch = [Score(" Paris.", context="The capital of France is"), Score("Hello there, friend"), Score(" x")]
    together = tasks.score(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        start = tasks.document_start_id(tok)
        ctx = tok(request.context, add_special_tokens=False)["input_ids"] if request.context else [start]
        text = tok(request.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + text])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        want = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(text)]
        # Log-probabilities reach -20 and beyond, so float32 noise is relative: 1e-5 of the value.
        assert got.logprobs == pytest.approx(want, rel=TOL, abs=TOL)
        assert got.logprobs == pytest.approx(tasks.score(model, tok, [request])[0].logprobs, rel=TOL, abs=TOL)


def test_document_start_is_the_separator_not_a_chat_marker(smollm_dir: Path, tiny_gpt2: Path) -> None:
    for path in (smollm_dir, tiny_gpt2):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        assert tok.convert_ids_to_tokens(tasks.document_start_id(tok)) == "<|endoftext|>"


@torch.inference_mode()
def test_greedy_generation_equals_generate_alone(tiny_llama: Path) -> None:
    model, tok = load(tiny_llama)
    batch = [Generate(p, max_new_tokens=6) for p in PROMPTS]
    together = tasks.generate(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        enc = tok(request.text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        want = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert got.text == want


@torch.inference_mode()
def test_seeded_sampling_is_reproducible(tiny_gpt2: Path) -> None:
    model, tok = load(tiny_gpt2)
    request = Generate("Once upon a time", max_new_tokens=8, temperature=1.0, seed=7)
    first, second = tasks.generate(model, tok, [request])[0], tasks.generate(model, tok, [request])[0]
    assert first.text == second.text
    other = tasks.generate(model, tok, [Generate("Once upon a time", max_new_tokens=8, temperature=1.0, seed=8)])[0]
    assert other.token_ids != first.token_ids


@torch.inference_mode()
def test_fill_mask_equals_pipeline(tiny_bert_mlm: Path) -> None:
    model, tok = load(tiny_bert_mlm, transformers.AutoModelForMaskedLM)
    pipe = transformers.pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")
    sentences = [f"The {MASK} sat on the mat.", f"Paris is the {MASK} of {MASK}.", f"{MASK}"]
    together = tasks.fill_mask(model, tok, [FillMask(s, k=4) for s in sentences])
    for sentence, got in zip(sentences, together, strict=True):
        want = pipe(sentence.replace(MASK, tok.mask_token), top_k=4)
        want = [want] if isinstance(want[0], dict) else want
        assert len(got.masks) == len(want)
        for fill, expected in zip(got.masks, want, strict=True):
            assert [t.id for t in fill.top] == [e["token"] for e in expected]
            assert [t.token for t in fill.top] == [e["token_str"] for e in expected]
            assert [t.prob for t in fill.top] == pytest.approx([e["score"] for e in expected], abs=TOL)
        alone = tasks.fill_mask(model, tok, [FillMask(sentence, k=4)])[0]
        assert [t.prob for m in alone.masks for t in m.top] == pytest.approx(
            [t.prob for m in got.masks for t in m.top], abs=TOL
        )


@torch.inference_mode()
def test_next_sentence_equals_direct_softmax(tiny_bert_nsp: Path) -> None:
    model, tok = load(tiny_bert_nsp, transformers.AutoModelForNextSentencePrediction)
    pairs = [("The cat sat on the windowsill.", "It stretched in the sun."), ("Hi.", "Stocks fell sharply today.")]
    together = next_sentence(model, tok, [NextSentence(a, b) for a, b in pairs])
    for (a, b), got in zip(pairs, together, strict=True):
        want = torch.softmax(model(**tok(a, b, return_tensors="pt")).logits, -1)[0, 0].item()
        assert abs(got.is_next - want) < TOL


@torch.inference_mode()
def test_classify_equals_pipeline(tiny_classifier: Path) -> None:
    model, tok = load(tiny_classifier, transformers.AutoModelForSequenceClassification)
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok, device="cpu", top_k=None)
    texts = ["This movie was absolutely fantastic!", "Terrible.", "It was fine, I suppose, in parts."]
    for text, got in zip(texts, tasks.classify(model, tok, [Classify(t) for t in texts]), strict=True):
        want = {d["label"]: d["score"] for d in pipe([text])[0]}
        assert dict(zip(got.labels, got.probs, strict=True)) == pytest.approx(want, abs=TOL)


@torch.inference_mode()
def test_seq2seq_equals_generate_alone(tiny_t5: Path) -> None:
    model, tok = load(tiny_t5, transformers.AutoModelForSeq2SeqLM)
    texts = ["summarize: a short text", "summarize: a rather longer text that needs more padding than the first"]
    together = tasks.seq2seq(model, tok, [Seq2Seq(t, max_new_tokens=5) for t in texts])
    for text, got in zip(texts, together, strict=True):
        enc = tok(text, return_tensors="pt", return_token_type_ids=False)
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, num_beams=1)
        assert got.text == tok.decode(out[0], skip_special_tokens=True)


@torch.inference_mode()
def test_embedding_of_the_packaged_minilm(cache_dir: Path) -> None:
    from plugins.sentiment import EMBEDDER_ROLE

    folder = EMBEDDER_ROLE.offline.folder() if EMBEDDER_ROLE.offline else None
    assert folder is not None
    model, tok = load(folder, transformers.AutoModel)
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly revenue grew by four percent."]
    together = tasks.embed(model, tok, [Embed(t) for t in texts])
    for text, got in zip(texts, together, strict=True):
        hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
        assert got.vector == pytest.approx(want.tolist(), abs=TOL)
    cos = [sum(a * b for a, b in zip(together[0].vector, v.vector, strict=True)) for v in together[1:]]
    assert cos[0] > cos[1]  # the real model knows a kitten on a rug is closer than revenue


def test_token_bytes_equal_tiktokens_gpt2_bytes_for_every_token(tiny_gpt2: Path, cache_dir: Path) -> None:
    """The real GPT-2 BPE: every vocabulary entry's bytes, as tiktoken's own gpt2 table has them."""
    from bot.tokenizers import tiktoken_encoding

    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    enc = tiktoken_encoding("gpt2", cache_dir)
    ids = list(range(enc.n_vocab - 1))  # the last id is <|endoftext|>, a special token
    assert tasks.token_bytes(tok, ids) == [enc.decode_single_token_bytes(i) for i in ids]


@pytest.mark.parametrize("text", ["日本の首都は", "emoji 🙂🦜 and 東京", "café"])
def test_token_bytes_join_into_the_texts_own_bytes(smollm_dir: Path, text: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tasks.token_bytes(tok, ids)
    assert b"".join(pieces) == text.encode()
    assert any("\ufffd" in tok.decode([i]) for i in ids) == (text != "café")  # the point: some are partial


def test_next_token_reports_each_tokens_bytes(smollm_dir: Path) -> None:
    model, tok = load(smollm_dir)
    with torch.inference_mode():
        (result,) = tasks.next_token(model, tok, [NextToken("日本の首都は", k=10)])
    for t in result.top:
        assert t.raw == b"".join(tasks.token_bytes(tok, [t.id]))
        if "\ufffd" not in t.token:
            assert t.raw == t.token.encode()
