"""/nsp, /summarize, /sentiment, /complexity and /adapt against the reference libraries."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from bot.app import App
from plugins.adapt import FEW_SHOT, ZERO_SHOT, LoraTrain, attention_targets, lora_train
from plugins.sentiment import LABELS, PROMPT, training_set
from plugins.summarize import PREFIX
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord

TOL = 1e-5


def direct_logprob(path: Path, context_ids: list[int], text_ids: list[int]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = context_ids + text_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return sum(lp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(text_ids))


async def test_nsp_equals_the_nsp_head(app_factory, tiny_bert_nsp: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"nsp": tiny_bert_nsp})
    reply = await app.execute_line('/nsp sentence_a:"The cat sat down." sentence_b:"It purred."')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model = transformers.BertForNextSentencePrediction.from_pretrained(tiny_bert_nsp).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert_nsp)
    with torch.no_grad():
        want = torch.softmax(model(**tok("The cat sat down.", "It purred.", return_tensors="pt")).logits, -1)[0, 0]
    assert reply.data["is_next"] == pytest.approx(want.item(), abs=TOL)


async def test_nsp_without_a_head_falls_back_to_labelled_coherence(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2})
    reply = await app.execute_line('/nsp sentence_a:"The cat sat down." sentence_b:"It purred."')
    assert not reply.error
    assert reply.data["kind"] == "causal_lm_coherence" and "not NSP" in reply.title
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    b = tok(" It purred.")["input_ids"]
    with_a = direct_logprob(tiny_gpt2, tok("The cat sat down.")["input_ids"], b)
    alone = direct_logprob(tiny_gpt2, [eot], tok("It purred.")["input_ids"])
    assert reply.data["logprob_b_given_a"] == pytest.approx(with_a, rel=TOL)
    assert reply.data["coherence"] == pytest.approx(with_a - alone, rel=1e-4, abs=1e-4)
    assert "set `models.nsp`" in str(reply.fields)


async def test_summarize_with_t5_equals_generate(app_factory, tiny_t5: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"seq2seq": tiny_t5})
    text = "Transformers replaced recurrent models by processing tokens in parallel."
    reply = await app.execute("summarize", {"text": text, "max_length": 8}, app.local_context())
    assert reply.data["kind"] == "seq2seq"
    model = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_t5)
    enc = tok(PREFIX + text, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
    assert reply.data["summary"] == tok.decode(out[0], skip_special_tokens=True)


async def test_summarize_offline_uses_a_labelled_prompted_lm(app_factory, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_llama})
    reply = await app.execute("summarize", {"text": "A short text.", "max_length": 5}, app.local_context())
    assert not reply.error
    assert reply.data["kind"] == "causal_lm_prompt"
    assert "Not seq2seq" in str(reply.fields) and "models.seq2seq" in str(reply.fields)


async def test_sentiment_with_a_classifier_and_a_prompted_lm(app_factory, tiny_classifier, tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"classifier": tiny_classifier, "causal_lm": tiny_gpt2})
    text = "What a wonderful film."
    reply = await app.execute_line(f"/sentiment text:{text}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    pipe = transformers.pipeline("text-classification", model=str(tiny_classifier), top_k=None, device="cpu")
    want = {d["label"].lower(): d["score"] for d in pipe([text])[0]}
    assert reply.data["discriminative"]["probs"] == pytest.approx(want, abs=TOL)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    context = tok(PROMPT.format(text=text))["input_ids"]
    logps = [direct_logprob(tiny_gpt2, context, tok(" " + label)["input_ids"]) for label in LABELS]
    total = sum(math.exp(lp) for lp in logps)
    want_gen = {label: math.exp(lp) / total for label, lp in zip(LABELS, logps, strict=True)}
    assert reply.data["generative"]["probs"] == pytest.approx(want_gen, rel=1e-4)


async def test_sentiment_offline_head_on_the_packaged_embedder(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression

    from bot.inference.registry import PACKAGED

    app = app_factory({"causal_lm": tiny_gpt2})
    texts = ["I absolutely loved it, wonderful!", "Awful, broken and useless."]
    replies = [await app.execute("sentiment", {"text": t}, app.local_context()) for t in texts]
    for reply in replies:
        assert "logistic regression on sentence embeddings" in reply.data["discriminative"]["kind"]
    # The same head, fitted here on embeddings computed directly with transformers.
    folder = PACKAGED["embedder"].folder()
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def embed(sentences: list[str]) -> list[list[float]]:
        enc = tok(sentences, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()

    examples = training_set()
    head = LogisticRegression(C=10.0, max_iter=1000).fit(embed([t for _, t in examples]), [lab for lab, _ in examples])
    for text, reply in zip(texts, replies, strict=True):
        want = dict(zip(head.classes_, head.predict_proba(embed([text]))[0], strict=True))
        assert reply.data["discriminative"]["probs"] == pytest.approx(want, abs=1e-4)
    assert replies[0].data["discriminative"]["probs"]["positive"] > 0.5
    assert replies[1].data["discriminative"]["probs"]["negative"] > 0.5


async def test_complexity_counts_and_timings(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    reply = await app.execute_line("/complexity lengths:256,16,64 width:32")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    data = reply.data
    assert data["lengths"] == [16, 64, 256]
    assert data["attention_pairs"] == [256, 4096, 65536] and data["recurrent_steps"] == [16, 64, 256]
    assert all(t > 0 for t in data["attention_ms"] + data["recurrent_ms"])
    assert reply.images[0].data.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("lengths", "message"),
    [("a,b", "whole numbers"), ("1,2,3,4,5,6,7", "between 1 and 6"), ("0", "between 1 and 8,192"), ("99999", "8,192")],
)
async def test_complexity_bad_lengths(app_factory, lengths: str, message: str) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute("complexity", {"lengths": lengths}, app_factory().local_context())
    assert reply.error and message in reply.text


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
async def test_adapt_lora_counts_equal_peft_on_the_model(app_factory, request, fixture: str) -> None:  # type: ignore[no-untyped-def]
    path = request.getfixturevalue(fixture)
    app = app_factory({"causal_lm": path})
    reply = await app.execute_line("/adapt text:Great product")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    for row in reply.data["lora"]:
        targets = row["modules"] if row["modules"] != ["all-linear"] else "all-linear"
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=row["r"], lora_alpha=2 * row["r"], target_modules=targets)
        )
        assert (row["trainable"], row["total"]) == peft_model.get_nb_trainable_parameters()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for prompt, key in ((ZERO_SHOT, "zero_shot"), (FEW_SHOT, "few_shot")):
        enc = tok(prompt.format(text="Great product"), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        assert reply.data[key] == tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


async def test_adapt_lora_closed_form_for_llama(app_factory, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory({"causal_lm": tiny_llama}).execute_line("/adapt text:ok")
    config = transformers.AutoConfig.from_pretrained(tiny_llama)
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    row = next(r for r in reply.data["lora"] if r["modules"] == ["q_proj", "v_proj"] and r["r"] == 8)
    assert row["trainable"] == config.num_hidden_layers * 8 * ((d + d) + (d + kv))


def _lora_request(allow_cpu: bool = True, steps: int = 6) -> LoraTrain:
    examples = ((ZERO_SHOT.format(text="Loved it"), " positive"), (ZERO_SHOT.format(text="Hated it"), " negative"))
    return LoraTrain(ZERO_SHOT.format(text="Fine"), examples, steps=steps, r=4, learning_rate=1e-2, allow_cpu=allow_cpu)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_lora_run_trains_then_leaves_the_served_model_untouched(request, fixture: str) -> None:  # type: ignore[no-untyped-def]
    path = request.getfixturevalue(fixture)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_names = {name for name, _ in model.named_modules()}
    with torch.inference_mode():  # as the worker runs every task
        (run,) = lora_train(model, tok, [_lora_request()])
    assert not run.refused and len(run.losses) == 6
    assert run.losses[-1] < run.losses[0]  # it learns the two answers
    fresh = transformers.AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=attention_targets(fresh))
    assert (run.trainable, run.total) == get_peft_model(fresh, config).get_nb_trainable_parameters()
    # The served model comes back exactly: same modules, same weights, and it still answers as before.
    assert {name for name, _ in model.named_modules()} == before_names
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    enc = tok(ZERO_SHOT.format(text="Fine"), return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert run.before == tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_lora_run_is_refused_on_a_cpu_worker_unless_allowed(tiny_gpt2: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    (run,) = lora_train(model, tok, [_lora_request(allow_cpu=False)])
    assert "GPU workers" in run.refused and 'training = "always"' in run.refused and not run.losses


async def test_adapt_train_through_the_service(tmp_path: Path, tiny_gpt2: Path) -> None:
    app = App(make_config(tmp_path, {"causal_lm": tiny_gpt2}, {"adapt": {"training": "always"}}))
    try:
        reply = await app.execute_line("/adapt text:Great product train:true")
        assert not reply.error, reply.text
        assert_fits_discord(reply)
        run = reply.data["lora_run"]
        assert len(run["losses"]) == 20 and run["losses"][-1] < run["losses"][0]
        assert [i.filename for i in reply.images] == ["lora.png"]
        assert any(f.name == "zero-shot after LoRA" for f in reply.fields)
        # Untouched afterwards: the plain command still answers exactly as transformers does.
        again = await app.execute_line("/adapt text:Great product")
        assert again.data["zero_shot"] == reply.data["zero_shot"] == run["before"]
    finally:
        await app.close()


async def test_adapt_train_by_default_only_on_gpu_workers(app_factory, tmp_path: Path, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    refused = await app_factory({"causal_lm": tiny_gpt2}).execute_line("/adapt text:ok train:true")
    assert not refused.error and refused.data["lora_run"]["refused"]
    assert any(f.name == "LoRA training" and "GPU workers" in f.value for f in refused.fields)
    app = App(make_config(tmp_path, {"causal_lm": tiny_gpt2}, {"adapt": {"training": "never"}}))
    try:
        off = await app.execute_line("/adapt text:ok train:true")
        assert off.data["lora_run"] is None
        assert any(f.value == "Training is turned off on this bot." for f in off.fields)
    finally:
        await app.close()
