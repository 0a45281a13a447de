"""/nsp, /summarize, /sentiment, /complexity and /adapt against the reference libraries."""

from __future__ import annotations

import asyncio
import copy
import math
import time
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bot import UserError
from bot.app import App
from bot.frontends.discord.render import render_reply
from bot.render import render_table
from plugins.adapt import FEW_SHOT, ZERO_SHOT, LoraTrain, attention_targets, lora_train
from plugins.complexity import (
    HEADS,
    LayerTimes,
    LayerTiming,
    build_layers,
    check_width,
    listing,
    measured_verdict,
    pair_macs,
    projection_macs,
    recurrent_macs,
    slower_from,
)
from plugins.sentiment import LABELS, PROMPT, distinct_events, training_set
from plugins.summarize import PREFIX
from tests.conftest import examples, make_config
from tests.plugin_helpers import assert_fits_discord

TOL = 1e-5


def direct_logprob(path: Path, context_ids: list[int], text_ids: list[int]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = context_ids + text_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return sum(lp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(text_ids))


async def test_nsp_equals_the_nsp_head(shared_app, tiny_bert_nsp: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"nsp": tiny_bert_nsp})
    reply = await app.execute_line('/nsp sentence_a:"The cat sat down." sentence_b:"It purred."')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model = transformers.BertForNextSentencePrediction.from_pretrained(tiny_bert_nsp).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert_nsp)
    with torch.no_grad():
        want = torch.softmax(model(**tok("The cat sat down.", "It purred.", return_tensors="pt")).logits, -1)[0, 0]
    assert reply.data["is_next"] == pytest.approx(want.item(), abs=TOL)


async def test_nsp_without_a_head_falls_back_to_labelled_coherence(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
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


async def test_summarize_with_t5_equals_generate(shared_app, tiny_t5: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"seq2seq": tiny_t5})
    text = "Transformers replaced recurrent models by processing tokens in parallel."
    reply = await app.execute("summarize", {"text": text, "max_length": 8}, app.local_context())
    assert reply.data["kind"] == "seq2seq"
    model = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_t5)
    enc = tok(PREFIX + text, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
    assert reply.data["summary"] == tok.decode(out[0], skip_special_tokens=True)


async def test_summarize_offline_uses_a_labelled_prompted_lm(shared_app, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_llama})
    reply = await app.execute("summarize", {"text": "A short text.", "max_length": 5}, app.local_context())
    assert not reply.error
    assert reply.data["kind"] == "causal_lm_prompt"
    assert "Not seq2seq" in str(reply.fields) and "models.seq2seq" in str(reply.fields)


def label_forms_reference(path: Path, prompt: str) -> dict[str, float]:
    """P(each surface form | prompt) from direct forwards, leaving out a form whose tokens begin with
    another form's tokens (its probability is already inside that one's)."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    context = tok(prompt)["input_ids"]
    forms = [space + form for label in LABELS for space in (" ", "") for form in (label, label.title(), label.upper())]
    ids = {form: tok(form)["input_ids"] for form in forms}
    kept = [f for f in forms if not any(len(ids[g]) < len(ids[f]) and ids[f][: len(ids[g])] == ids[g] for g in forms)]
    return {f: math.exp(direct_logprob(path, context, ids[f])) for f in kept}


async def test_sentiment_with_a_classifier_and_a_prompted_lm(shared_app, tiny_classifier, tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"classifier": tiny_classifier, "causal_lm": tiny_gpt2})
    text = "What a wonderful film."
    reply = await app.execute_line(f"/sentiment text:{text}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    pipe = transformers.pipeline("text-classification", model=str(tiny_classifier), top_k=None, device="cpu")
    want = {d["label"].lower(): d["score"] for d in pipe([text])[0]}
    assert reply.data["discriminative"]["probs"] == pytest.approx(want, abs=TOL)
    # The generative side adds up every way of writing each label word (case, leading space).
    forms = label_forms_reference(tiny_gpt2, PROMPT.format(text=text))
    got = reply.data["generative"]["forms"]
    assert {f for f, v in got.items() if v["counted"]} == set(forms)
    assert {f: got[f]["prob"] for f in forms} == pytest.approx(forms, rel=1e-4)
    mass = {label: sum(p for f, p in forms.items() if f.strip().lower() == label) for label in LABELS}
    covered = sum(mass.values())
    assert reply.data["generative"]["mass"] == pytest.approx(mass, rel=1e-4)
    assert reply.data["generative"]["mass_covered"] == pytest.approx(covered, rel=1e-4)
    assert reply.data["generative"]["probs"] == pytest.approx({k: v / covered for k, v in mass.items()}, rel=1e-4)
    assert f"{covered:.3f}" in str(reply.fields)  # the mass covered is shown
    assert "Probability mass:" in reply.text


def test_label_forms_that_extend_another_are_not_counted_twice() -> None:
    forms = [" pos", " positive", " POS"]
    tokens = [[" pos"], [" pos", "itive"], [" POS"]]
    assert distinct_events(forms, tokens) == [True, False, True]


async def test_sentiment_times_warm_inference_only(app_factory, tiny_classifier, tiny_gpt2, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The first request of each kind stands in for loading a model: it is slow. The times shown leave it out."""
    app = app_factory({"classifier": tiny_classifier, "causal_lm": tiny_gpt2})
    submit, seen = app.inference.submit, set()
    loading_s = 3.0

    async def slow_first(request, **kw):  # type: ignore[no-untyped-def]
        if type(request) not in seen:
            seen.add(type(request))
            await asyncio.sleep(loading_s)
        return await submit(request, **kw)

    monkeypatch.setattr(app.inference, "submit", slow_first)
    reply = await app.execute_line("/sentiment text:What a wonderful film.")
    assert not reply.error, reply.text
    assert reply.data["discriminative"]["seconds"] < loading_s
    assert reply.data["generative"]["seconds"] < loading_s
    assert "warm" in reply.text
    # A narrow table: model names live in fields, not in table cells.
    assert reply.table is not None
    assert max(len(line) for line in render_table(reply.table).splitlines()) <= 60
    assert any(f.name == "generative model" and f.value == reply.data["generative"]["model"] for f in reply.fields)


async def test_sentiment_names_each_times_engine_and_calls_a_difference_only_outside_the_runs(  # type: ignore[no-untyped-def]
    shared_app, tiny_classifier, tiny_gpt2
) -> None:
    reply = await shared_app({"classifier": tiny_classifier, "causal_lm": tiny_gpt2}).execute_line(
        "/sentiment text:What a wonderful film."
    )
    assert not reply.error, reply.text
    disc, gen = reply.data["discriminative"], reply.data["generative"]
    for side, row in ((disc, 0), (gen, 1)):
        assert side["engine"] == side["model"].rsplit(", ", 1)[-1] and len(side["runs_ms"]) == 3
        assert side["seconds"] * 1000 == pytest.approx(sorted(side["runs_ms"])[1])
        assert reply.table is not None and reply.table.rows[row][-1].endswith(side["engine"])
    a, b = disc["runs_ms"], gen["runs_ms"]
    if max(a) < min(b):
        assert "The classifier was faster in every run" in reply.text
    elif max(b) < min(a):
        assert "The LM was faster in every run" in reply.text
    else:
        assert "Within noise" in reply.text


def test_sentiment_timing_says_when_the_engines_differ_and_when_it_is_noise() -> None:
    from plugins._timing import Spread
    from plugins.sentiment import timing_line

    # The reviewer's case: a torch classifier against an onnxruntime LM.
    line = timing_line("torch", Spread((0.059, 0.055, 0.061)), "onnxruntime", Spread((0.104, 0.098, 0.120)))
    assert "different engines (torch and onnxruntime)" in line and "The classifier was faster in every run" in line
    assert "59 ms (55–61 ms over 3 runs) on torch" in line
    same = timing_line("torch", Spread((0.05, 0.07, 0.06)), "torch", Spread((0.065, 0.055, 0.08)))
    assert "different engines" not in same and "Within noise" in same


async def test_sentiment_offline_head_on_the_packaged_embedder(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression

    from plugins.sentiment import EMBEDDER_ROLE

    app = shared_app({"causal_lm": tiny_gpt2})
    texts = ["I absolutely loved it, wonderful!", "Awful, broken and useless."]
    replies = [await app.execute("sentiment", {"text": t}, app.local_context()) for t in texts]
    for reply in replies:
        assert "logistic regression on sentence embeddings" in reply.data["discriminative"]["kind"]
    # The same head, fitted here on embeddings computed directly with transformers.
    folder = EMBEDDER_ROLE.offline.folder() if EMBEDDER_ROLE.offline else None
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


async def test_complexity_counts_and_timings(shared_app) -> None:  # type: ignore[no-untyped-def]
    app = shared_app()
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
    [
        ("a,b", "whole numbers"),
        ("1,2,3,4,5,6,7", "between 1 and 6"),
        ("0", "between 1 and 65,536"),
        ("99999", "65,536"),
    ],
)
async def test_complexity_bad_lengths(app_factory, lengths: str, message: str) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute("complexity", {"lengths": lengths}, app_factory().local_context())
    assert reply.error and message in reply.text


@pytest.mark.parametrize(("length", "width"), [(1, 16), (7, 20), (64, 32), (100, 64)])
def test_timing_cost_is_the_layers_counted_operations(length: int, width: int) -> None:
    """LayerTiming.cost() against torch's own FLOP counter on the very layers the worker times."""
    attention, recurrent = build_layers(width, HEADS, torch.device("cpu"))
    attention.train()  # the composed path (dropout is 0), whose matrix products the counter sees
    x = torch.randn(1, length, width)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as attention_count:
        attention(x, x, x, need_weights=False)
    with torch.no_grad(), FlopCounterMode(display=False) as recurrent_count:
        recurrent(x)
    # A multiply-accumulate is two floating-point operations.
    assert 2 * recurrent_macs(length, width) == recurrent_count.get_total_flops()
    assert 2 * (projection_macs(length, width) + pair_macs(length, width)) == attention_count.get_total_flops()
    request = LayerTiming(length, width)
    total = (recurrent_count.get_total_flops() + attention_count.get_total_flops()) // 2
    assert request.cost() == (request.repeats + 1) * total  # one warm-up forward, then the timed ones


def spy_on_submit(app: App, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    submitted: list[object] = []
    submit = app.inference.submit

    async def spy(request, **kw):  # type: ignore[no-untyped-def]
        submitted.append(request)
        return await submit(request, **kw)

    monkeypatch.setattr(app.inference, "submit", spy)
    return submitted


async def test_complexity_counts_the_course_lengths_and_times_what_fits(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    app = App(make_config(tmp_path, max_request_cost=2e8))
    try:
        submitted = spy_on_submit(app, monkeypatch)
        reply = await app.execute_line("/complexity lengths:128,512,2048,8192,32768 width:32")
        assert not reply.error, reply.text
        assert_fits_discord(reply)
        data = reply.data
        ns = [128, 512, 2048, 8192, 32768]
        assert data["lengths"] == ns
        # Counted by hand for d = 32: GRU 6·n·d², attention's projections 4·n·d², its pairs 2·n²·d.
        assert data["recurrent_macs"] == [786_432, 3_145_728, 12_582_912, 50_331_648, 201_326_592]
        assert data["attention_projection_macs"] == [524_288, 2_097_152, 8_388_608, 33_554_432, 134_217_728]
        assert data["attention_pair_macs"] == [1_048_576, 16_777_216, 268_435_456, 4_294_967_296, 68_719_476_736]
        # Timing n costs 4 forwards of both layers; only 128 and 512 stay within 2e8.
        assert data["timing_cost"][:3] == [4 * 2_359_296, 4 * 22_020_096, 4 * 289_406_976]
        assert data["timed"] == [True, True, False, False, False]
        assert [r.length for r in submitted] == [128, 512]  # type: ignore[attr-defined]
        assert [t is None for t in data["attention_ms"]] == [False, False, True, True, True]
        assert "Not timed: n = 2,048, 8,192 and 32,768" in reply.text and "budget" in reply.text
        assert "-" in reply.table.rows[-1]  # type: ignore[union-attr]
        assert "6·n·d²" in reply.text and "4·n·d²" in reply.text and "2·n²·d" in reply.text
        assert "n = d = 32" in reply.text and "n = 2d = 64" in reply.text
    finally:
        await app.close()


async def test_complexity_over_budget_lengths_do_not_hold_the_worker(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    submitted = spy_on_submit(app, monkeypatch)
    started = time.perf_counter()
    reply = await app.execute_line("/complexity lengths:8192,8191,8190,8189,8188,8187 width:1024")
    assert time.perf_counter() - started < 30
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    budget = app.config.inference.max_request_cost
    assert submitted == [] and reply.data["timed"] == [False] * 6
    assert all(cost > budget for cost in reply.data["timing_cost"])
    assert reply.data["attention_pair_macs"][-1] == 2 * 8192 * 8192 * 1024
    assert reply.images and reply.images[0].data.startswith(b"\x89PNG")  # the counts, charted


async def test_complexity_does_not_time_what_would_only_move_memory(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """n = 16,384 at width 16 is within the multiply-accumulate budget, but its attention weights
    (4 heads × n² × 4 bytes = 4 GiB) make one forward take minutes on a CPU: it is counted, not timed."""
    app = app_factory()
    submitted: list[int] = []

    async def fake(request, **kw):  # type: ignore[no-untyped-def]
        submitted.append(request.length)
        return LayerTimes("cpu", 1.0, 1.0)

    monkeypatch.setattr(app.inference, "submit", fake)
    reply = await app.execute_line("/complexity lengths:4096,8192,16384 width:16")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    budget = app.config.inference.max_request_cost
    assert all(cost <= budget for cost in reply.data["timing_cost"])  # the budget alone would time them all
    assert 4 * 16384 * 16384 * 4 == 4 * 2**30
    assert submitted == [4096] and reply.data["timed"] == [True, False, False]
    assert reply.data["not_timed_reason"] == [None, "memory", "memory"]
    assert "Not timed: n = 8,192 and 16,384" in reply.text and "up to 4.0 GiB" in reply.text
    assert reply.data["attention_pair_macs"][-1] == 2 * 16384 * 16384 * 16  # still counted


async def test_complexity_reference_lines_go_through_the_longest_timed_length(shared_app) -> None:  # type: ignore[no-untyped-def]
    reply = await shared_app().execute_line("/complexity lengths:16,64,256 width:32")
    data = reply.data
    top, attention, recurrent = data["lengths"][-1], data["attention_ms"], data["recurrent_ms"]
    assert data["reference_n2"] == pytest.approx([attention[-1] * (n / top) ** 2 for n in data["lengths"]])
    assert data["reference_n"] == pytest.approx([recurrent[-1] * n / top for n in data["lengths"]])
    # The worker reports each layer's fastest and slowest timed run around the median.
    for medians, ranges in ((attention, data["attention_range_ms"]), (recurrent, data["recurrent_range_ms"])):
        assert all(low <= median <= high for median, (low, high) in zip(medians, ranges, strict=True))


def timed_as(app: App, monkeypatch: pytest.MonkeyPatch, times: dict[int, tuple[float, float]]) -> None:
    """The worker's timings replaced by given (attention ms, GRU ms) per length: what a noisy machine may measure."""

    async def fake(request, **kw):  # type: ignore[no-untyped-def]
        assert isinstance(request, LayerTiming)
        return LayerTimes("cpu", *times[request.length])

    monkeypatch.setattr(app.inference, "submit", fake)


async def test_complexity_says_slower_from_only_where_attention_stays_slower(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Slower at 16 (overhead), faster at 64, slower at 256: no "slower from n = 16"."""
    app = app_factory()
    timed_as(app, monkeypatch, {16: (5.0, 1.0), 64: (1.0, 2.0), 256: (9.0, 3.0)})
    reply = await app.execute_line("/complexity lengths:16,64,256 width:32")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.data["measured_attention_slower_from"] == 256
    assert reply.data["measured_attention_slower_at"] == [16, 256]
    assert "slower from n = 16" not in reply.text
    assert "slower than the GRU at n = 16 and 256 and faster at n = 64" in reply.text
    # Against the counts (d = 32): at 16 attention does less work and is still slower (overhead); at 64 it
    # does more and is still faster (parallel products vs the GRU's chain of steps).
    assert "At n = 16 attention was slower though it does fewer multiply-accumulates" in reply.text
    assert "At n = 64 attention was faster though it does more multiply-accumulates" in reply.text


async def test_complexity_calls_overlapping_runs_within_noise_and_warns_when_time_falls_with_length(  # type: ignore[no-untyped-def]
    app_factory, monkeypatch
) -> None:
    """The reviewer's timings: attention 2.85/3.36/6.63 ms vs GRU 3.06/7.27/5.88 ms, whose runs
    overlap at n = 1 and 4; and a GRU that took 233 ms at n = 256 but 73 ms at n = 1,024."""
    app = app_factory()

    async def fake(request, **kw):  # type: ignore[no-untyped-def]
        runs = {
            1: ((2.85, (2.7, 3.2)), (3.06, (2.9, 3.3))),
            2: ((3.36, (3.2, 3.5)), (7.27, (7.0, 7.6))),
            4: ((6.63, (5.5, 7.0)), (5.88, (5.6, 6.9))),
        }[request.length]
        (a, a_range), (r, r_range) = runs
        return LayerTimes("cpu", a, r, a_range, r_range)

    monkeypatch.setattr(app.inference, "submit", fake)
    reply = await app.execute_line("/complexity lengths:1,2,4 width:1024")
    assert not reply.error, reply.text
    assert "slower from n = 4" not in reply.text and "faster than the GRU up to" not in reply.text
    assert "At n = 1 and 4 the two times are within noise" in reply.text
    assert "attention was faster than the GRU at n = 2." in reply.text
    assert reply.table is not None and reply.table.rows[2][-2:] == ["6.63 (5.5–7)", "5.88 (5.6–6.9)"]
    timed_as(app, monkeypatch, {64: (10.0, 62.9), 256: (20.0, 233.1), 1024: (90.0, 73.0)})
    reply = await app.execute_line("/complexity lengths:64,256,1024 width:32")
    assert "The GRU's time fell from n = 256 to n = 1,024 (233 → 73 ms)" in reply.text
    assert "Attention's time fell" not in reply.text  # attention's times grew: no warning for it


async def test_complexity_names_a_real_crossover(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    timed_as(app, monkeypatch, {16: (1.0, 2.0), 64: (1.0, 2.0), 256: (9.0, 3.0), 1024: (90.0, 10.0)})
    reply = await app.execute_line("/complexity lengths:16,64,256,1024 width:32")
    assert reply.data["measured_attention_slower_from"] == 256
    assert "faster than the GRU up to n = 64 and slower from n = 256 on" in reply.text


@settings(max_examples=examples(100), deadline=None)
@given(
    pattern=st.lists(st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)), min_size=1, max_size=6),
    width=st.sampled_from([16, 64, 256]),
)
def test_measured_verdict_matches_the_timings(pattern: list[tuple[float, float]], width: int) -> None:
    measured = [(4**i, LayerTimes("cpu", a, r)) for i, (a, r) in enumerate(pattern)]
    slower = [n for n, t in measured if t.attention_ms > t.recurrent_ms]
    start = slower_from(measured)
    # "Slower from n" means slower there and at every longer length, and not at the length just before.
    if start is None:
        assert not slower or slower[-1] != measured[-1][0]
    else:
        assert [n for n, _ in measured if n >= start] == [n for n in slower if n >= start]
        before = [t for n, t in measured if n < start]
        assert not before or not before[-1].attention_ms > before[-1].recurrent_ms
    text = measured_verdict(measured, width)
    if "slower from n = " in text:
        assert f"slower from n = {start:,} on" in text and all(n >= start for n in slower)  # type: ignore[operator]
    # The lengths where the time goes against the counts are named, and only those.
    for phrase, exceptions in (
        ("slower though it does fewer", [n for n, t in measured if t.attention_ms > t.recurrent_ms and n < width]),
        ("faster though it does more", [n for n, t in measured if t.attention_ms < t.recurrent_ms and n > width]),
    ):
        if exceptions:
            named = text.split(phrase)[0].rsplit("At n = ", 1)[1].split(" attention was")[0]
            assert named == listing(exceptions), (named, exceptions)
        else:
            assert phrase not in text


@pytest.mark.parametrize("width", [18, 17, 1023, 30])
async def test_complexity_width_the_heads_cannot_split_is_a_validation_message(shared_app, width: int) -> None:  # type: ignore[no-untyped-def]
    app = shared_app()
    reply = await app.execute("complexity", {"lengths": "8", "width": width}, app.local_context())
    assert reply.error and reply.ephemeral
    assert f"multiple of {HEADS}" in reply.text and "error id" not in reply.text
    below = width - width % HEADS
    assert f"{below + HEADS}" in reply.text


@settings(max_examples=examples(12), deadline=None)
@given(width=st.integers(16, 1024))
def test_complexity_any_width_answers_sensibly(width: int) -> None:
    """Every width in range is either timed or refused with the heads' reason, never a failure."""
    try:
        check_width(width)
    except UserError as error:
        assert width % HEADS and f"multiple of {HEADS}" in str(error)
        return
    assert width % HEADS == 0
    attention, recurrent = build_layers(width, HEADS, torch.device("cpu"))
    x = torch.randn(1, 3, width)
    with torch.inference_mode():
        assert attention(x, x, x, need_weights=False)[0].shape == x.shape
        assert recurrent(x)[0].shape == x.shape


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
async def test_adapt_lora_counts_equal_peft_on_the_model(shared_app, request, fixture: str) -> None:  # type: ignore[no-untyped-def]
    path = request.getfixturevalue(fixture)
    app = shared_app({"causal_lm": path})
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


async def test_adapt_times_each_prompt_three_times_with_its_length_and_calls_noise_noise(  # type: ignore[no-untyped-def]
    shared_app, tiny_gpt2: Path
) -> None:
    reply = await shared_app({"causal_lm": tiny_gpt2}).execute_line('/adapt text:"The soup was cold."')
    assert not reply.error, reply.text
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    data = reply.data
    for name, key in (("zero-shot", "zero_shot_prompt"), ("few-shot", "few_shot_prompt")):
        assert data["prompt_tokens"][name] == len(tok(data[key])["input_ids"])
        runs = data["prompt_runs_ms"][name]
        assert len(runs) == 3 and data["prompt_ms"][name] == pytest.approx(sorted(runs)[1])
    timing = next(f.value for f in reply.fields if f.name.startswith("prompting time"))
    assert f"prompt {data['prompt_tokens']['few-shot']:,} tokens" in timing and "over 3 runs" in timing
    zero, few = data["prompt_runs_ms"]["zero-shot"], data["prompt_runs_ms"]["few-shot"]
    if max(zero) < min(few):
        assert "Zero-shot was faster in every run" in timing
    elif max(few) < min(zero):
        assert "Few-shot was faster in every run" in timing
    else:
        assert "Within noise" in timing


async def test_adapt_shows_both_prompts_as_the_model_reads_them(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    for review in ("Great product", "x" * 490 + " @everyone"):
        reply = await app.execute("adapt", {"text": review}, app.local_context())
        assert not reply.error, reply.text
        assert_fits_discord(reply)
        assert reply.code is not None
        shown = reply.code.plain
        zero, few = ZERO_SHOT.format(text=review), FEW_SHOT.format(text=review)
        assert reply.data["zero_shot_prompt"] == zero and reply.data["few_shot_prompt"] == few
        # Each prompt verbatim, followed by what the model wrote after it.
        assert zero + "«" + reply.data["zero_shot"].replace("\n", "↵") + "»" in shown
        assert few + "«" + reply.data["few_shot"].replace("\n", "↵") + "»" in shown
        rendered = render_reply(reply)
        assert rendered.embed is not None and len(rendered.embed.description or "") <= 4096
        assert not any(f.filename == "reply.txt" for f in rendered.files)  # it all fits in the embed
        assert "@everyone" not in (rendered.embed.description or "")  # escaped
        assert "warm" in str(reply.fields)


async def test_help_says_optional_for_an_option_without_a_default(shared_app) -> None:  # type: ignore[no-untyped-def]
    reply = await shared_app().execute_line("/help command:ngram")
    assert reply.table is not None
    required = {row[0]: row[2] for row in reply.table.rows}
    assert required["text"] == "optional"
    assert required["n"] == "optional (default 2)"
    assert "None" not in render_table(reply.table)


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
    said = [line for line in refused.text.splitlines() if line.startswith("Nothing was trained. ")]
    assert len(said) == 1 and "GPU workers" in said[0], refused.text
    assert not any("GPU workers" in f.value for f in refused.fields)  # said once, not again in a field
    app = App(make_config(tmp_path, {"causal_lm": tiny_gpt2}, {"adapt": {"training": "never"}}))
    try:
        off = await app.execute_line("/adapt text:ok train:true")
        assert off.data["lora_run"] is None
        assert "Nothing was trained. Training is turned off on this bot." in off.text
    finally:
        await app.close()


async def test_jargon_in_complexity_and_adapt_gets_a_plain_line(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    counted = await app.execute("complexity", {"lengths": "65536", "width": 1024}, app.local_context())  # not timed
    assert not counted.error and "multiply-accumulates" in counted.text
    assert "A multiply-accumulate is one multiplication added to a running sum" in counted.text
    adapted = await app.execute_line("/adapt text:Great product")
    assert not adapted.error, adapted.text
    assert adapted.table is not None and "r" in adapted.table.headers
    assert "r is their rank" in adapted.text and "greedy 3-token answer (the likeliest token" in adapted.text
    # "grows in proportion to r", as the reply says: the same targets at twice the rank train twice as much.
    rows = adapted.data["lora"]
    for row in rows:
        per_rank = {other["r"]: other["trainable"] for other in rows if other["targets"] == row["targets"]}
        assert {r: t / r for r, t in per_rank.items()} == {r: row["trainable"] / row["r"] for r in per_rank}


async def test_complexity_never_generalises_from_one_timed_length(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """lengths:8,16384,32768 width:16 times n = 8 only: no "every timed length", no one-dot curve,
    and the counted n² growth is charted beside the table."""
    app = app_factory()
    timed_as(app, monkeypatch, {8: (0.5, 0.2)})
    reply = await app.execute_line("/complexity lengths:8,16384,32768 width:16")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.data["timed"] == [True, False, False]
    assert "every timed length" not in reply.text
    assert "Measured at one length only (n = 8)" in reply.text and "One point shows no growth" in reply.text
    assert reply.data["charted"] == ["counts"]
    assert [image.filename for image in reply.images] == ["complexity-counts.png"]
    assert "counted" in reply.images[0].description


async def test_complexity_charts_timings_and_counts_from_two_timed_lengths(app_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    timed_as(app, monkeypatch, {16: (1.0, 2.0), 64: (3.0, 2.5)})
    reply = await app.execute_line("/complexity lengths:16,64 width:16")
    assert reply.data["charted"] == ["timings", "counts"]
    assert [image.filename for image in reply.images] == ["complexity.png", "complexity-counts.png"]
    assert all(image.data.startswith(b"\x89PNG") for image in reply.images)


async def test_adapt_says_nothing_was_trained_when_the_worker_refuses(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    # On a CPU worker with the default setting, train:true trains nothing: the reply's text says so.
    reply = await app_factory({"causal_lm": tiny_gpt2}).execute_line("/adapt text:ok train:true")
    assert not reply.error and reply.data["lora_run"]["refused"]
    assert reply.data["trained"] is False
    assert "Nothing was trained" in reply.text and "No weights changed" in reply.text
    untouched = await app_factory({"causal_lm": tiny_gpt2}).execute_line("/adapt text:ok")
    assert "Nothing was trained" not in untouched.text and untouched.data["trained"] is False


async def test_topic_try_beside_a_name_runs_that_card_or_says_why_not(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    topics = await app.execute_line("/topic")
    slug = "transformers-vs-rnns"
    assert topics.data["topics"][0] != slug  # so "1" read as a topic number would be another card
    direct = await app.execute_line(app.registry.topics[slug].try_command)
    for answer in ("1", "yes", "true", slug):
        tried = await app.execute("topic", {"name": slug, "try": answer}, app.local_context())
        assert not tried.error, tried.text
        assert tried.data["lengths"] == direct.data["lengths"]
    shown = await app.execute("topic", {"name": slug, "try": "no"}, app.local_context())
    assert shown.data["topic"] == slug
    other = await app.execute("topic", {"name": slug, "try": "ngrams"}, app.local_context())
    assert other.error and "give one topic" in other.text
    unknown = await app.execute("topic", {"name": "attention", "try": "1"}, app.local_context())
    assert unknown.error and "attention" in unknown.text


async def test_sentiment_says_forced_choice_and_calibrates_by_the_label_prior(
    shared_app, tiny_classifier, tiny_gpt2
) -> None:  # type: ignore[no-untyped-def]
    """Contextual calibration (Zhao et al. 2021): the label shares on content-free inputs, from direct
    forwards here, are the prior; the calibrated reading divides by it and renormalises."""
    app = shared_app({"classifier": tiny_classifier, "causal_lm": tiny_gpt2})
    text = "The meeting is at 3 pm."
    reply = await app.execute_line(f"/sentiment text:{text}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)

    def shares(review: str) -> dict[str, float]:
        forms = label_forms_reference(tiny_gpt2, PROMPT.format(text=review))
        mass = {label: sum(p for f, p in forms.items() if f.strip().lower() == label) for label in LABELS}
        return {label: m / sum(mass.values()) for label, m in mass.items()}

    free = [shares(blank) for blank in ("N/A", "", "[MASK]")]
    prior = {label: sum(s[label] for s in free) / len(free) for label in LABELS}
    generative = reply.data["generative"]
    assert generative["prior"] == pytest.approx(prior, rel=1e-4)
    raw = shares(text)
    assert generative["probs"] == pytest.approx(raw, rel=1e-4)
    weighted = {label: raw[label] / prior[label] for label in LABELS}
    want = {label: w / sum(weighted.values()) for label, w in weighted.items()}
    assert generative["calibrated"] == pytest.approx(want, rel=1e-4)
    assert "Forced choice" in reply.text and "not how sure the model is" in reply.text
    assert "Label prior" in reply.text and "Zhao et al. 2021" in reply.text
    assert reply.table is not None and "confidence" not in reply.table.headers
    assert [row[0] for row in reply.table.rows][-1] == "prompted LM, calibrated"
