"""/attention: the weights equal an eager transformers forward with output_attentions=True,
batched and alone, on models whose default attention kernel (sdpa) never forms them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from bot.app import App
from bot.charts import heatmap
from plugins.attention import MAX_TOKENS, Attention, MaskedAttention, attention_weights, looks_ahead
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord

TEXTS = ["The cat sat on the mat because it was tired.", "Hi", "東京 is far 🙂, and the 🦜 talks"]
TOL = 1e-5


def load(path: Path, cls=transformers.AutoModelForCausalLM, **kw):  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return cls.from_pretrained(path, **kw).eval(), tok


def eager_reference(model, tok, text: str, layer: int | None, head: int | None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The weights as an eager model reports them for one unpadded text, averaged as asked."""
    with torch.no_grad():
        maps = torch.stack(model(**tok(text, return_tensors="pt"), output_attentions=True).attentions)[:, 0]
    if layer is not None:
        maps = maps[layer - 1 : layer]
    if head is not None:
        maps = maps[:, head - 1 : head]
    return maps.float().mean(dim=(0, 1))


def requests(cls: type[Attention]) -> list[Attention]:
    return [cls(TEXTS[0]), cls(TEXTS[1], layer=1), cls(TEXTS[2], layer=2, head=2), cls(TEXTS[0], layer=2, head=1)]


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal_path(request) -> Path:  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


@torch.inference_mode()
def test_causal_weights_equal_an_eager_forward_batched_and_alone(causal_path: Path) -> None:
    model, tok = load(causal_path)
    eager, _ = load(causal_path, attn_implementation="eager")
    assert model.config._attn_implementation == "sdpa"
    # The point of switching: the fused kernel reports no weights at all.
    assert not model(**tok("Hi there", return_tensors="pt"), output_attentions=True).attentions
    batch = requests(Attention)
    together = attention_weights(model, tok, batch)
    assert model.config._attn_implementation == "sdpa"  # switched back after the call
    for request, got in zip(batch, together, strict=True):
        alone = attention_weights(model, tok, [request])[0]
        want = eager_reference(eager, tok, request.text, request.layer, request.head)
        n = len(tok(request.text)["input_ids"])
        assert torch.tensor(got.weights).shape == (n, n)
        torch.testing.assert_close(torch.tensor(got.weights), want, atol=TOL, rtol=0)
        torch.testing.assert_close(torch.tensor(alone.weights), want, atol=TOL, rtol=0)
        assert all(abs(sum(row) - 1) < 1e-4 for row in got.weights)
        assert all(w == 0 for i, row in enumerate(got.weights) for w in row[i + 1 :])  # the causal triangle
        assert got.layers == model.config.num_hidden_layers and got.heads == model.config.num_attention_heads
        assert b"".join(got.raw) == request.text.encode()


@torch.inference_mode()
def test_masked_weights_equal_an_eager_forward_and_look_both_ways(tiny_bert_mlm: Path) -> None:
    model, tok = load(tiny_bert_mlm, transformers.AutoModelForMaskedLM)
    eager, _ = load(tiny_bert_mlm, transformers.AutoModelForMaskedLM, attn_implementation="eager")
    batch = requests(MaskedAttention)
    together = attention_weights(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        alone = attention_weights(model, tok, [request])[0]
        want = eager_reference(eager, tok, request.text, request.layer, request.head)
        torch.testing.assert_close(torch.tensor(got.weights), want, atol=TOL, rtol=0)
        torch.testing.assert_close(torch.tensor(alone.weights), want, atol=TOL, rtol=0)
        assert got.pieces == tok.convert_ids_to_tokens(tok(request.text)["input_ids"])
        assert got.special[0] and got.special[-1] and got.pieces[0] == "[CLS]"
        assert looks_ahead(got.weights) > 0.1


@torch.inference_mode()
def test_problems_are_reported_per_request(tiny_gpt2: Path) -> None:
    model, tok = load(tiny_gpt2)
    long = "word " * (MAX_TOKENS + 5)
    got = attention_weights(model, tok, [Attention(long), Attention("Hi", layer=3), Attention("Hi", layer=1, head=9)])
    assert "at most 40" in got[0].problem
    assert got[1].problem == "This model has 2 layers: `layer` must be 1 to 2."
    assert got[2].problem == "This model has 2 heads per layer: `head` must be 1 to 2."


# ----------------------------------------------------------------------------- the command


async def test_attention_command_through_the_service(app_factory, tiny_gpt2: Path, tiny_bert_mlm: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm})
    text = TEXTS[0]
    reply = await app.execute("attention", {"text": text, "layer": 2}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.images[0].filename == "attention.png" and reply.images[0].data.startswith(b"\x89PNG")
    eager, tok = load(tiny_gpt2, attn_implementation="eager")
    want = eager_reference(eager, tok, text, 2, None)
    torch.testing.assert_close(torch.tensor(reply.data["causal"]["weights"]), want, atol=TOL, rtol=0)
    top = torch.topk(want[-1], 5)
    assert [t["position"] - 1 for t in reply.data["causal"]["last_token_top"]] == top.indices.tolist()
    first = reply.data["causal"]["last_token_top"][0]["token"]
    assert f"The last token “.” attends most to “{first}”" in reply.text
    masked_eager, masked_tok = load(tiny_bert_mlm, transformers.AutoModelForMaskedLM, attn_implementation="eager")
    masked_want = eager_reference(masked_eager, masked_tok, text, 2, None)
    torch.testing.assert_close(torch.tensor(reply.data["masked"]["weights"]), masked_want, atol=TOL, rtol=0)
    assert reply.data["masked"]["tokens"][0] == "[CLS]"
    assert f"{reply.data['masked']['looks_ahead']:.0%} of a token's attention goes to tokens after it" in reply.text


async def test_concurrent_requests_batch_without_changing_a_weight(cache_dir: Path, tiny_llama: Path) -> None:
    app = App(make_config(cache_dir, {"causal_lm": tiny_llama}, max_wait_ms=300))
    try:
        asked = [(TEXTS[0], None, None), (TEXTS[1], 1, None), (TEXTS[2], 2, 3), ("A fourth, longer text here", 1, 4)]
        replies = await asyncio.gather(
            *(
                app.execute("attention", {"text": t, "layer": layer, "head": head}, app.local_context())
                for t, layer, head in asked
            )
        )
        assert app.inference.metrics.summary()["tasks"]["plugins.attention:attention_weights"]["batch_size_mean"] > 1
        eager, tok = load(tiny_llama, attn_implementation="eager")
        for (text, layer, head), reply in zip(asked, replies, strict=True):
            assert not reply.error, reply.text
            want = eager_reference(eager, tok, text, layer, head)
            torch.testing.assert_close(torch.tensor(reply.data["causal"]["weights"]), want, atol=TOL, rtol=0)
    finally:
        await app.close()


async def test_without_a_masked_lm_one_line_says_so(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory({"causal_lm": tiny_gpt2}).execute_line('/attention text:"東京 is big"')
    assert not reply.error, reply.text
    assert reply.data["masked"] is None
    assert "No masked LM is available here (offline), so only the causal side is shown." in reply.text.splitlines()
    tokens = reply.data["causal"]["tokens"]
    assert any(t.startswith("⟨") for t in tokens) and not any("\ufffd" in t for t in tokens)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"text": "word " * 59 + "word"}, "That text is 60 tokens; /attention shows at most 40"),
        ({"text": "Hi there", "layer": 7}, "This model has 2 layers: `layer` must be 1 to 2."),
        ({"text": "Hi there", "layer": 1, "head": 3}, "This model has 2 heads per layer: `head` must be 1 to 2."),
        ({"text": "Hi there", "head": 1}, "A head belongs to one layer: give `layer` too"),
        ({"text": "Hi there", "layer": 0}, "`layer` must be at least 1."),
    ],
)
async def test_bad_requests_get_a_clear_answer(app_factory, tiny_gpt2: Path, values: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2})
    reply = await app.execute("attention", values, app.local_context())
    assert reply.error and reply.text.startswith(message), reply.text


def test_heatmap_draws_literal_text() -> None:
    labels = ["$x$", "a_b", "$$", "⟨E6 9D⟩"]
    grid = [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]]
    image = heatmap([("$5 and $6", labels, grid, True), ("both ways", labels, grid, False)], colorbar="weight")
    assert image.data.startswith(b"\x89PNG") and image.description == "$5 and $6"
