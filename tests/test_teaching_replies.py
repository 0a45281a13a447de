"""Replies that teach their topic truthfully: charts that never break a reply, tokens shown
as their bytes, /compare's fair comparison, /nsp's verdict, /summarize's warnings, and jargon
explained. Numbers are checked against transformers on the same models."""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

from bot import FillMask, NextToken, NextTokenResult, TokenProb
from bot.app import App
from bot.charts import show_token
from bot.commands import Reply
from bot.inference.offline import bert_tokenizer_dir
from bot.render import significant
from plugins.complexity import spread_cell
from plugins.nexttoken import step_buttons
from plugins.nsp import FOLLOWS_NATS_PER_TOKEN, UNRELATED, times
from plugins.summarize import MAX_TEXT, language_of, unsupported, unsupported_words
from tests.conftest import examples, make_config
from tests.plugin_helpers import assert_fits_discord, causal_reference

TOL = 1e-5


@pytest.fixture
def models(tiny_gpt2: Path, tiny_bert_mlm: Path) -> dict[str, Path]:
    return {"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm}


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """Every figure a chart function saves, to look at what it drew."""
    drawn: list[Figure] = []
    savefig = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> Any:
        drawn.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    yield drawn


def everything_shown(reply: Reply) -> str:
    """All the text a reply shows or hands to scripts."""
    parts = [reply.text, reply.title or "", *(f.name + f.value for f in reply.fields)]
    if reply.table is not None:
        parts += [" ".join(row) for row in reply.table.rows]
    parts += [b.label + b.value for b in reply.buttons]
    parts.append(json.dumps(reply.data, ensure_ascii=False, default=str))
    return "\n".join(parts)


def read_probability(cell: str) -> float:
    """A table's probability as a number: "0.4512", or "1 in 49,987" / "1 in 10^9" where 4 decimals
    would read 0.0000 (at temperature 5 every token of a 50,257-token vocabulary is below 0.0001)."""
    if cell.startswith("1 in 10^"):
        return 10.0 ** -int(cell.removeprefix("1 in 10^"))
    if cell.startswith("1 in "):
        return 1 / int(cell.removeprefix("1 in ").replace(",", ""))
    return float(cell)


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte stands for one printable character), built here
    independently of the bot's own code."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


# ----------------------------------------------------------------------------- charts never break a reply


@pytest.mark.parametrize(
    "line",
    [
        '/nexttoken prompt:"The capital of France is" k:3',
        "/compare text:The capital of France is Paris. k:3",
        "/mask sentence:Paris is the [MASK] of France.",
        "/tokenize text:electroencephalography compare:true",
    ],
)
async def test_a_chart_that_fails_to_draw_leaves_the_reply_without_it(  # type: ignore[no-untyped-def]
    app_factory, models, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, line: str
) -> None:
    def broken(self: Figure, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated drawing failure")

    monkeypatch.setattr(Figure, "savefig", broken)
    app = app_factory(models)
    with caplog.at_level(logging.ERROR, logger="bot.charts"):
        reply = await app.execute_line(line)
    assert not reply.error, reply.text
    assert reply.images == []
    assert reply.table is not None or reply.fields  # the numbers are still there
    assert "could not be drawn" in caplog.text and "simulated drawing failure" in caplog.text


@pytest.mark.parametrize("text", ["Pay $5 (20% off) instead of $6", "It costs $$0 and $10", "Solve $x^2$ for x: $"])
async def test_dollar_signs_in_the_text_still_give_a_chart(shared_app, models, text: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app(models)
    for name, option in (("nexttoken", "prompt"), ("compare", "text")):
        reply = await app.execute(name, {option: text}, app.local_context())
        assert not reply.error, reply.text
        assert_fits_discord(reply)
        assert len(reply.images) == 1 and reply.images[0].data.startswith(b"\x89PNG")


async def test_a_model_token_with_dollar_signs_still_gives_a_chart(  # type: ignore[no-untyped-def]
    app_factory, models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model predicts " $$" (SmolLM2 does after "Solve for x:"): it is drawn as text."""
    app = app_factory(models)
    submit = app.inference.submit
    odd = [" $$", "$", "$x^2$", "\\frac{1}{2}$", " $$\n"]

    async def predicting_dollars(request: Any, **kw: Any) -> Any:
        result = await submit(request, **kw)
        if isinstance(result, NextTokenResult):
            top = [TokenProb(t.id, text, t.prob, text.encode()) for t, text in zip(result.top, odd, strict=False)]
            result = replace(result, top=top)
        return result

    monkeypatch.setattr(app.inference, "submit", predicting_dollars)
    for line in ['/nexttoken prompt:"Solve for x:" k:5', "/compare text:Solve for x: 2x = 4. k:5"]:
        reply = await app.execute_line(line)
        assert not reply.error, reply.text
        assert len(reply.images) == 1 and reply.images[0].data.startswith(b"\x89PNG")
        assert "␣$$" in everything_shown(reply)


# ----------------------------------------------------------------------------- byte-fragment tokens


@pytest.mark.parametrize("prompt", ["日本の首都は", "The weather today makes me feel 🙂"])
async def test_tokens_that_are_part_of_a_character_show_their_bytes(shared_app, smollm_dir: Path, prompt: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute("nexttoken", {"prompt": prompt, "k": 10}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    want = torch.topk(causal_reference(smollm_dir, prompt), 10)
    tok = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    decoder = gpt2_byte_decoder()
    raws = [bytes(decoder[ch] for ch in tok.convert_ids_to_tokens(i)) for i in want.indices.tolist()]
    assert [t["id"] for t in reply.data["top"]] == want.indices.tolist()
    assert [t["prob"] for t in reply.data["top"]] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert [bytes.fromhex(t["bytes"]) for t in reply.data["top"]] == raws

    def shown(raw: bytes) -> str:
        try:
            return show_token(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return "⟨" + " ".join(f"{b:02X}" for b in raw) + "⟩"

    assert reply.table is not None
    assert [row[1] for row in reply.table.rows] == [shown(raw) for raw in raws]
    assert "\ufffd" not in everything_shown(reply)
    # A button appends the token's bytes, only where the prompt then is still text.
    steps = []
    for raw in raws[:3]:
        try:
            steps.append((prompt.encode() + raw).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    assert [b.value for b in reply.buttons] == list(dict.fromkeys(steps))
    prompt_bytes = [bytes.fromhex(h) for h in reply.data["prompt_bytes"]]
    assert b"".join(prompt_bytes) == prompt.encode()
    assert reply.data["prompt_ids"] == tok(prompt)["input_ids"]


async def test_the_japanese_prompt_from_the_issue_shows_hex_rows(shared_app, smollm_dir: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute_line('/nexttoken prompt:"日本の首都は" k:5')
    assert reply.table is not None
    labels = [row[1] for row in reply.table.rows]
    assert any(label.startswith("⟨") for label in labels) and "�" not in "".join(labels)
    assert all("\ufffd" not in b.value and not b.label.startswith("+ ⟨") for b in reply.buttons)
    assert "part of a character" in reply.text


def _token(n: int, raw: bytes) -> TokenProb:
    return TokenProb(n, raw.decode("utf-8", errors="replace"), 0.1, raw)


@settings(max_examples=examples(300), deadline=None)
@given(
    prompt=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30),
    raws=st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=6),
)
def test_step_buttons_append_bytes_faithfully_and_never_repeat(prompt: str, raws: list[bytes]) -> None:
    top = [_token(n, raw) for n, raw in enumerate(raws)]
    buttons, _ = step_buttons(prompt, top)
    keys = [(b.command, b.option, b.value) for b in buttons]
    assert len(keys) == len(set(keys))
    for button in buttons:
        added = button.value.encode()[len(prompt.encode()) :]
        assert button.value.encode().startswith(prompt.encode()) and added in raws[:3]
        assert "\ufffd" not in button.value[len(prompt) :]
        assert button.fits
    for raw in raws[:3]:
        try:
            text = (prompt.encode() + raw).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\ufffd" not in text[len(prompt) :] and len(text) + len("nexttokenprompt") <= 80:
            assert text in [b.value for b in buttons]


def test_two_tokens_with_the_same_bytes_make_one_button() -> None:
    buttons, partial = step_buttons("Hello", [_token(1, b" world"), _token(2, b" world"), _token(3, b"\xe6\x9d")])
    assert [b.value for b in buttons] == ["Hello world"] and partial == 1


# ----------------------------------------------------------------------------- /compare


async def test_compare_continues_the_text_before_the_hidden_word(shared_app, models, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app(models)
    reply = await app.execute_line("/compare text:The capital of France is Paris, a big city.")
    assert not reply.error, reply.text
    assert reply.data["hidden"] == "city" and reply.data["left"] == "The capital of France is Paris, a big "
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    enc = tok("The capital of France is Paris, a big", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).rstrip("\ufffd").strip()
    assert reply.data["causal"]["continuation"] == want
    assert "continues the text before the hidden word" in str(reply.fields)


async def test_compare_times_warm_models_only(app_factory, models, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(models)
    submit = app.inference.submit
    sent: list[str] = []

    async def recording(request: Any, **kw: Any) -> Any:
        sent.append(type(request).__name__)
        return await submit(request, **kw)

    monkeypatch.setattr(app.inference, "submit", recording)
    first = await app.execute_line("/compare text:The capital of France is Paris.")
    # The first request of each model loads it: sent once untimed, then timed three times.
    assert sent.count(NextToken.__name__) == 4 and sent.count(FillMask.__name__) == 4
    sent.clear()
    second = await app.execute_line("/compare text:The cat sat on the mat.")
    assert sent.count(NextToken.__name__) == 3 and sent.count(FillMask.__name__) == 3
    for reply in (first, second):
        assert reply.data["causal"]["warm"] and reply.data["masked"]["warm"]
        shown = next(f.value for f in reply.fields if f.name == "time (warm)")
        assert "already loaded" in shown and "over 3 runs" in shown
        causal, masked = reply.data["causal"], reply.data["masked"]
        for side in (causal, masked):
            assert f"on {side['model'].rsplit(', ', 1)[-1]}" in shown and len(side["runs_ms"]) == 3
        a, b = causal["runs_ms"], masked["runs_ms"]
        want = (
            "The causal model was faster"
            if max(a) < min(b)
            else "The masked model was faster"
            if max(b) < min(a)
            else "Within noise"
        )
        assert want in shown
        # Two models of their own sizes on two inputs: the reply must not invite reading them as a race.
        assert "two different models" in shown and "not which way of reading is faster" in shown


async def test_compare_hides_a_named_span_that_is_not_a_word(  # type: ignore[no-untyped-def]
    shared_app, models, tiny_gpt2: Path, tiny_bert_mlm: Path
) -> None:
    app = shared_app(models)
    reply = await app.execute_line('/compare text:"It costs $10 at the shop." hide:$10 k:3')
    assert not reply.error, reply.text
    assert (reply.data["left"], reply.data["hidden"], reply.data["right"]) == ("It costs ", "$10", " at the shop.")
    want = torch.topk(causal_reference(tiny_gpt2, "It costs"), 3)
    assert [t["id"] for t in reply.data["causal"]["top"]] == want.indices.tolist()
    pipe = transformers.pipeline("fill-mask", model=str(tiny_bert_mlm), device="cpu")
    expected = pipe("It costs [MASK] at the shop.", top_k=3)
    assert [t["id"] for t in reply.data["masked"]["top"]] == [e["token"] for e in expected]
    assert [t["prob"] for t in reply.data["masked"]["top"]] == pytest.approx([e["score"] for e in expected], abs=TOL)


@pytest.mark.parametrize(
    ("text", "left", "hidden"),
    [
        ("東京は日本の首都です。", "東京は日本の", "首都"),
        ("北京是中国的首都。", "北京是中国的", "首都"),
        ("Pay $5 (20% off) instead of $6", "Pay $5 (20% off) instead of ", "$6"),
        ("The capital of France is Paris.", "The capital of France is ", "Paris"),
    ],
)
async def test_compare_picks_a_sensible_hidden_word(shared_app, models, tiny_gpt2: Path, text, left, hidden) -> None:  # type: ignore[no-untyped-def]
    app = shared_app(models)
    reply = await app.execute("compare", {"text": text, "k": 3}, app.local_context())
    assert not reply.error, reply.text
    assert (reply.data["left"], reply.data["hidden"]) == (left, hidden)
    assert f"“{hidden}”" in reply.text
    want = torch.topk(causal_reference(tiny_gpt2, left.rstrip()), 3)
    assert [t["id"] for t in reply.data["causal"]["top"]] == want.indices.tolist()
    if " " not in text:
        assert "no spaces" in reply.text  # the reply says how the word was chosen


@pytest.mark.parametrize(
    ("hide", "message"),
    [
        ("London", "`hide` must be part of the text"),
        ("cat", "`hide` only occurs inside a longer word"),
        ("...", "`hide` needs a letter or a digit"),
        ("The", "Hide a word that has some text before it"),
    ],
)
async def test_compare_bad_hide_values_answer_clearly(shared_app, models, hide: str, message: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app(models)
    reply = await app.execute("compare", {"text": "The concatenation is done...", "hide": hide}, app.local_context())
    assert reply.error and reply.text.startswith(message), reply.text
    assert "error id" not in reply.text


async def test_without_a_masked_lm_students_get_a_plain_line_and_the_log_the_key(  # type: ignore[no-untyped-def]
    app_factory, tiny_gpt2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_factory({"causal_lm": tiny_gpt2})
    with caplog.at_level(logging.WARNING):
        masked = await app.execute_line("/mask sentence:Paris is the [MASK] of France.")
        compared = await app.execute_line("/compare text:The capital of France is Paris.")
    assert masked.error and "no masked language model" in masked.text and "likeliest words" in masked.text
    assert not compared.error and "no masked language model" in str(compared.fields)
    for reply in (masked, compared):
        assert "config" not in everything_shown(reply) and "models.masked_lm" not in everything_shown(reply)
    assert caplog.text.count("set `models.masked_lm` in config.toml") == 2


# ----------------------------------------------------------------------------- /nsp without an NSP head


def _logprob(model: Any, context_ids: list[int], text_ids: list[int]) -> float:
    ids = context_ids + text_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(lp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(text_ids))


async def test_nsp_fallback_verdict_comes_from_numbers_equal_to_transformers(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    a, b = "The cat sat down.", "It purred."
    reply = await app.execute("nsp", {"sentence_a": a, "sentence_b": b}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    follower = tok(" " + b)["input_ids"]
    alone = _logprob(model, [tok.convert_tokens_to_ids("<|endoftext|>")], tok(b)["input_ids"])
    gain = _logprob(model, tok(a)["input_ids"], follower) - alone
    unrelated = [_logprob(model, tok(u)["input_ids"], follower) - alone for u in UNRELATED]
    assert reply.data["coherence"] == pytest.approx(gain, rel=1e-4, abs=1e-4)
    assert reply.data["unrelated_coherence"] == pytest.approx(unrelated, rel=1e-4, abs=1e-4)
    margin = (gain - statistics.median(unrelated)) / len(follower)
    assert reply.data["margin_per_token"] == pytest.approx(margin, rel=1e-4, abs=1e-4)
    assert reply.data["follows"] == (margin >= FOLLOWS_NATS_PER_TOKEN)
    verdict = "B follows A" if margin >= FOLLOWS_NATS_PER_TOKEN else "B does not seem to follow A"
    assert reply.text.startswith(verdict)
    assert f"makes B {times(gain)} as likely" in reply.text and "e+" not in reply.text
    assert "nats (natural-log units; 1 nat ≈ 1.44 bits)" in reply.text


@pytest.mark.parametrize(
    ("a", "b", "follows"),
    [
        ("The cat sat on the warm windowsill.", "It stretched lazily in the afternoon sun.", True),
        ("The cat sat on the warm windowsill.", "Stock markets fell sharply on Monday.", False),
        ("It started to rain heavily.", "We ran inside to stay dry.", True),
        ("I baked bread this morning.", "Jupiter has dozens of moons.", False),
    ],
)
async def test_nsp_fallback_verdicts_on_the_offline_model(shared_app, smollm_dir: Path, a, b, follows) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute("nsp", {"sentence_a": a, "sentence_b": b}, app.local_context())
    assert not reply.error, reply.text
    assert reply.data["follows"] is follows
    assert ("IsNext-like" if follows else "NotNext-like") in reply.text


# ----------------------------------------------------------------------------- /summarize


def test_numbers_and_names_missing_from_the_text_are_flagged() -> None:
    text = "The French Revolution began in 1789 and ended in 1,799. It changed France."
    summary = "The Revolution began in 1799 and ended in 1799 under Napoleon. Overall, France changed in 1789."
    assert unsupported(summary, text) == ([], ["Napoleon"])
    assert unsupported("It began in 1799 in Paris.", "It began in 1789 in France.") == (["1799"], ["Paris"])
    assert unsupported("Nothing new here.", "Nothing new here.") == ([], [])


async def test_summarize_says_it_may_be_wrong_and_flags_what_is_not_in_the_text(  # type: ignore[no-untyped-def]
    app_factory, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory({"causal_lm": tiny_llama})
    text = "The French Revolution began in 1789 and ended in 1795 in France."
    submit = app.inference.submit

    async def wrong_facts(request: Any, **kw: Any) -> Any:
        result = await submit(request, **kw)  # the real model runs; its words are swapped for known ones
        return replace(result, text="The French Revolution began in 1799 and ended in 1799 under Napoleon.")

    monkeypatch.setattr(app.inference, "submit", wrong_facts)
    reply = await app.execute("summarize", {"text": text, "max_length": 5}, app.local_context())
    assert not reply.error, reply.text
    assert "generated by a model and may be wrong" in reply.text
    assert reply.data["not_in_text"] == {"numbers": ["1799"], "names": ["Napoleon"], "words": []}
    assert "1799, Napoleon" in str(reply.fields)
    assert isinstance(reply.data["summary"], str)


def test_content_words_missing_from_the_text_are_flagged() -> None:
    # The check claims content words, so it must catch a summary that adds them ("Hi." is no welcome).
    assert unsupported_words("Hi, welcome to the team.", "Hi.") == ["welcome", "team"]
    # Plain forms of a word the text has are supported; function words are not content.
    assert unsupported_words("The cats changed under the team's plan.", "A cat changes; the teams plan.") == []
    assert unsupported_words("Napoleon won.", "It was lost.", skip=["Napoleon"]) == ["won"]


@pytest.mark.parametrize(
    ("summary", "text"),
    [
        ("They cut the budget.", "The council is cutting the budget."),
        ("The council is cutting costs.", "The council cut costs."),
        ("She runs daily.", "Running every day is her habit; she ran daily."),
        ("He was running late.", "He had to run; he was late."),
        ("The studies were making news.", "One study will make news."),
        ("A bigger plan.", "A big plan."),
        ("It stopped.", "Stop it."),
    ],
)
def test_common_inflections_are_not_false_alarms(summary: str, text: str) -> None:
    assert unsupported_words(summary, text) == []


def test_look_alike_words_are_still_flagged() -> None:
    assert unsupported_words("A thing happened.", "The end.") == ["thing", "happened"]
    assert unsupported_words("The cutter broke.", "The cat broke.") == ["cutter"]


async def test_summarize_checks_what_it_claims_and_says_when_it_was_cut(  # type: ignore[no-untyped-def]
    app_factory, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory({"causal_lm": tiny_llama})
    submit = app.inference.submit
    answers = {"ids": [5, 6, 7, 8, 9], "text": "Hi, welcome to the team."}

    async def swapped(request: Any, **kw: Any) -> Any:
        result = await submit(request, **kw)  # the real model runs; its output is swapped for a known one
        return replace(result, text=answers["text"], token_ids=answers["ids"])

    monkeypatch.setattr(app.inference, "submit", swapped)
    reply = await app.execute("summarize", {"text": "Hi.", "max_length": 5}, app.local_context())
    assert not reply.error, reply.text
    assert reply.data["not_in_text"]["words"] == ["welcome", "team"]
    assert "welcome, team" in str(reply.fields)
    # What the check does not look at is said whether or not something was flagged.
    assert any(f.name == "what the check covers" and "truthfully" in f.value for f in reply.fields)
    # Five tokens written with no end-of-text token at a limit of 5: stopped, not finished.
    assert reply.data["cut_at_max_length"] and "Cut off" in reply.text
    assert "5 of at most 5 tokens" in str(reply.fields) and "not words" in str(reply.fields)
    answers.update(ids=[5, 6, 7], text="Hi.")
    reply = await app.execute("summarize", {"text": "Hi.", "max_length": 5}, app.local_context())
    assert not reply.data["cut_at_max_length"] and "Cut off" not in reply.text
    assert "3 of at most 5 tokens" in str(reply.fields)
    assert any(f.name == "what the check covers" and "truthfully" in f.value for f in reply.fields)


@pytest.mark.parametrize(
    ("sentence", "language"),
    [
        ("The committee approved the new budget for the schools of the city.", "English"),
        ("Der Ausschuss hat den neuen Haushalt für die Schulen der Stadt genehmigt.", "German"),
        ("Le comité a approuvé le nouveau budget pour les écoles de la ville.", "French"),
        ("Comitetul a aprobat noul buget pentru școlile din oraș, care este mai mare.", "Romanian"),
        ("Комитет утвердил новый бюджет для школ города.", "Cyrillic script"),
        ("委員会は市の学校のための新しい予算を承認した。", "Chinese/Japanese characters"),
        ("Budget approved.", None),  # too few common words to tell
    ],
)
def test_the_language_guess_names_what_a_t5_model_may_switch_to(sentence: str, language: str | None) -> None:
    assert language_of(sentence) == language


async def test_summarize_says_when_the_summary_is_in_another_language(  # type: ignore[no-untyped-def]
    app_factory, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t5-small answers some English texts with a German translation: a student must not read it as a
    summary. The reply says so, and what the word check covers, whatever the check found."""
    app = app_factory({"causal_lm": tiny_llama})
    submit = app.inference.submit
    written = {"text": "Der Ausschuss hat den neuen Haushalt für die Schulen der Stadt genehmigt."}

    async def swapped(request: Any, **kw: Any) -> Any:
        result = await submit(request, **kw)  # the real model runs; its output is swapped for a known one
        return replace(result, text=written["text"])

    monkeypatch.setattr(app.inference, "submit", swapped)
    text = "The committee approved the new budget for the schools of the city after a long debate."
    reply = await app.execute("summarize", {"text": text, "max_length": 40}, app.local_context())
    assert not reply.error, reply.text
    assert "looks like German, your text like English" in reply.text and "translated" in reply.text
    assert reply.data["language"] == {"text": "English", "summary": "German"}
    covers = next(f.value for f in reply.fields if f.name == "what the check covers")
    assert "words only" in covers and "does not check meaning" in covers
    assert "`max_length` counts the model's tokens, not words" in str(reply.fields)
    written["text"] = "The committee approved the budget for the schools."
    same = await app.execute("summarize", {"text": text, "max_length": 40}, app.local_context())
    assert "looks like" not in same.text and same.data["language"] == {"text": "English", "summary": "English"}
    assert any(f.name == "what the check covers" for f in same.fields)


async def test_summarize_counts_the_tokens_generate_wrote(shared_app, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_llama})
    text = "A short text about cats."
    reply = await app.execute("summarize", {"text": text, "max_length": 6}, app.local_context())
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = "Summarize the following text in one or two sentences.\n\n" + text
    if getattr(tok, "chat_template", None):
        turn = [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    new = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=pad)[0, enc["input_ids"].shape[1] :]
    finished = tok.eos_token_id in new.tolist()
    assert reply.data["cut_at_max_length"] is (not finished)
    if not finished:
        assert reply.data["tokens_written"] == 6


async def test_summarize_has_one_length_limit(app_factory, tiny_llama: Path, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_llama})
    for length in (MAX_TEXT + 50, 2_500):  # under the old option limit (3,000) and over the service's (2,000)
        reply = await app.execute("summarize", {"text": "a" * length, "max_length": 5}, app.local_context())
        assert reply.error and reply.text == f"`text` is too long: {length:,} characters, the limit is {MAX_TEXT:,}."
    # A server with a smaller input limit: the same message, with its limit (the instruction around
    # the text counts too), and a text at that limit is accepted by the service.
    small = App(make_config(cache_dir, {"causal_lm": tiny_llama}, max_input_chars=500))
    try:
        limit = 500 - len("Summarize the following text in one or two sentences.\n\n")
        over = await small.execute("summarize", {"text": "b" * (limit + 1), "max_length": 5}, small.local_context())
        assert over.error and over.text == f"`text` is too long: {limit + 1:,} characters, the limit is {limit:,}."
        words = ("word " * limit)[:limit]
        at = await small.execute("summarize", {"text": words, "max_length": 5}, small.local_context())
        assert not at.error, at.text
    finally:
        await small.close()


# ----------------------------------------------------------------------------- /tokenize, /maskrecipe, jargon


async def test_tokenize_comparison_shows_unknowns_in_chart_and_text(app_factory, figures: list[Figure]) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    text = "The transformerization of electroencephalography"
    reply = await app.execute("tokenize", {"text": text, "compare": True}, app.local_context())
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    ax = figures[-1].axes[0]
    known, unknown = ax.containers
    counts = reply.data["compare"]
    totals = [counts["characters"], counts["words"], len(counts["wordpiece"]), counts["bpe"]]
    unknowns = [0, counts["unknown_words"], counts["wordpiece"].count("[UNK]"), 0]
    assert [bar.get_width() for bar in unknown] == unknowns == [0, 2, 0, 0]
    assert [k.get_width() + u.get_width() for k, u in zip(known, unknown, strict=True)] == totals
    assert "[UNK]" in ax.get_legend().get_texts()[1].get_text()
    assert "word list 2 of 4" in reply.text and "[UNK]" in reply.text


@pytest.mark.parametrize(
    "sentence", ["Hi there", "The cat sat on the warm windowsill.", "A much longer sentence " * 8, "Hi"]
)
async def test_maskrecipe_reports_the_real_share(shared_app, cache_dir: Path, sentence: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app()
    reply = await app.execute("maskrecipe", {"sentence": sentence}, app.local_context())
    assert not reply.error, reply.text
    tokens = transformers.BertTokenizerFast.from_pretrained(bert_tokenizer_dir(cache_dir)).tokenize(sentence)
    chosen = len(reply.data["changes"])
    assert chosen == max(1, round(0.15 * len(tokens)))
    assert reply.data["chosen_share"] == chosen / len(tokens)
    assert f"{chosen} chosen ({chosen / len(tokens):.0%} of them)" in reply.text
    assert "aims at 15%" in reply.text and "at least one" in reply.text
    if sentence == "Hi there":
        assert "1 chosen (50% of them)" in reply.text


async def test_nexttoken_explains_entropy_with_a_number_a_student_can_check(  # type: ignore[no-untyped-def]
    shared_app, models, tiny_gpt2: Path
) -> None:
    app = shared_app(models)
    reply = await app.execute_line('/nexttoken prompt:"The capital of France is" k:3')
    probs = causal_reference(tiny_gpt2, "The capital of France is")
    bits = -(probs * probs.clamp_min(1e-30).log2()).sum().item()
    line = re.search(r"Entropy measures .* fair pick among ([\d,.]+) tokens", reply.text)
    assert line is not None and float(line.group(1).replace(",", "")) == pytest.approx(2**bits, rel=1e-2)
    assert "0 bits means one certain token" in reply.text


# ----------------------------------------------------------------------------- /nsp ratios


def test_nsp_ratios_read_as_plain_numbers() -> None:
    assert times(math.log(5420)) == "5,420×" and times(-math.log(5420)) == "1/5,420×"
    assert times(math.log(2.7183)) == "2.72×" and times(math.log(1.03)) == "1.03×" and times(math.log(0.5)) == "0.5×"
    assert times(math.log(3.1e6)) == "3.1 million×" and times(-math.log(4.2e9)) == "1/4.2 billion×"
    assert times(60) == "about 10²⁶×"


@settings(max_examples=examples(200), deadline=None)
@given(gain=st.floats(-1000, 1000))
def test_nsp_ratios_never_use_e_notation(gain: float) -> None:
    shown = times(gain)
    assert "e+" not in shown and "e-" not in shown and shown.endswith("×")


# ----------------------------------------------------------------------------- measured times: plain notation


def test_measured_times_read_in_plain_notation() -> None:
    """/complexity's milliseconds: a slow GRU at n = 4,096 reads "1,230", never "1.23e+03"."""
    assert significant(1234.5) == "1,230" and significant(6.634) == "6.63" and significant(0.051234) == "0.0512"
    assert significant(9.996) == "10" and significant(0) == "0" and significant(123456.0) == "123,000"
    assert significant(5.5) == "5.5" and significant(0.0500001) == "0.05"
    assert spread_cell(1234.5, (1200.1, 1300.2)) == "1,230 (1,200–1,300)" and spread_cell(2.5, (2.5, 2.5)) == "2.5"


@settings(max_examples=examples(200), deadline=None)
@given(x=st.floats(1e-9, 1e9))
def test_measured_numbers_never_use_e_notation_and_keep_three_figures(x: float) -> None:
    shown = significant(x)
    assert "e" not in shown
    assert float(shown.replace(",", "")) == pytest.approx(x, rel=5e-3)


# ----------------------------------------------------------------------------- /compare: the hidden word itself


@pytest.mark.parametrize(
    "text", ["The capital of France is Paris.", "The cat sat on the mat", "東京 is far from Osaka"]
)
async def test_compare_shows_the_hidden_words_own_probability_and_rank(shared_app, tiny_gpt2: Path, text: str) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    reply = await app.execute_line(f"/compare text:{text}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    left, word = reply.data["left"], reply.data["hidden"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    context = tok(left.rstrip())["input_ids"]
    word_ids = tok(left.rstrip() + left[len(left.rstrip()) :] + word)["input_ids"][len(context) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + word_ids])).logits[0].float(), -1)
    first = logp[len(context) - 1]
    causal = reply.data["causal"]
    assert causal["hidden_first_token_prob"] == pytest.approx(float(first[word_ids[0]].exp()), rel=1e-4)
    assert causal["hidden_first_token_rank"] == int((first > first[word_ids[0]]).sum()) + 1
    whole = sum(float(logp[len(context) - 1 + n, t]) for n, t in enumerate(word_ids))
    assert causal["hidden_word_prob"] == pytest.approx(math.exp(whole), rel=1e-4)
    assert causal["hidden_word_tokens"] == len(word_ids)
    shown = next(f.value for f in reply.fields if f.name.startswith("the hidden word"))
    assert f"rank {causal['hidden_first_token_rank']:,} of {len(first):,} tokens" in shown


def masked_reference(path: Path, left: str, right: str, word: str) -> tuple[float, range, int, str]:
    """The word's first WordPiece token at the one [MASK]: probability, rank among every token
    (the ranks it may have where probabilities within 1e-4 of it tie), how many tokens the word is,
    and that token, from transformers' own BertForMaskedLM."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    enc = tok(f"{left}{tok.mask_token}{right}", return_tensors="pt")
    position = enc["input_ids"][0].tolist().index(tok.mask_token_id)
    with torch.no_grad():
        probs = model(**enc).logits[0, position].float().softmax(-1)
    pieces = tok(word.strip(), add_special_tokens=False)["input_ids"]
    first = pieces[0]
    p = probs[first]
    ranks = range(int((probs > p * (1 + 1e-4)).sum()) + 1, int((probs > p * (1 - 1e-4)).sum()) + 2)
    return float(p), ranks, len(pieces), tok.convert_ids_to_tokens(first)


@pytest.mark.parametrize(
    "text", ["The capital of France is Paris.", "The cat sat on the mat", "Unbelievably, the zxqv won."]
)
async def test_compare_shows_the_hidden_words_own_probability_and_rank_on_the_masked_side(  # type: ignore[no-untyped-def]
    shared_app, models, tiny_bert_mlm: Path, text: str
) -> None:
    reply = await shared_app(models).execute_line(f"/compare text:{text}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    left, word, right = reply.data["left"], reply.data["hidden"], reply.data["right"]
    prob, rank, pieces, first = masked_reference(tiny_bert_mlm, left, right, word)
    masked = reply.data["masked"]
    assert masked["hidden_first_token_prob"] == pytest.approx(prob, rel=1e-4)
    assert masked["hidden_first_token_rank"] in rank and masked["hidden_word_tokens"] == pieces
    shown = next(f.value for f in reply.fields if f.name.endswith("for the masked LM"))
    vocabulary = transformers.AutoConfig.from_pretrained(tiny_bert_mlm).vocab_size
    assert f"rank {masked['hidden_first_token_rank']:,} of {vocabulary:,} tokens" in shown
    assert (f"its first token “{first}”" in shown) == (pieces > 1)


@pytest.mark.parametrize(("text", "k"), [("The capital of France is Paris.", 10), ("The cat sat on the zxqv", 1)])
async def test_compare_chart_labels_the_top_guesses_and_marks_the_hidden_words_bar(  # type: ignore[no-untyped-def]
    shared_app, models, tiny_gpt2: Path, tiny_bert_mlm: Path, text: str, k: int
) -> None:
    """The bars are each model's top guesses, not the hidden word: the axis says so, and the hidden
    word's first token has a marked bar of its own (inside the top k or added below them) whose
    length is its probability from transformers."""
    reply = await shared_app(models).execute_line(f"/compare text:{text} k:{k}")
    assert not reply.error, reply.text
    chart = reply.data["chart"]
    assert "top guesses" in chart["xlabel"] and chart["xlabel"] != "probability of the hidden word's first token"
    left, word, right = reply.data["left"], reply.data["hidden"], reply.data["right"]
    causal_panel, masked_panel = chart["panels"]
    # Causal side, by transformers directly.
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    context = tok(left.rstrip())["input_ids"]
    word_ids = tok(left + word)["input_ids"][len(context) :]
    with torch.no_grad():
        probs = model(torch.tensor([context])).logits[0, -1].float().softmax(-1)
    top = probs.topk(k).indices.tolist()
    masked_prob, _, _, _ = masked_reference(tiny_bert_mlm, left, right, word)
    for panel, prob, inside in (
        (causal_panel, float(probs[word_ids[0]]), word_ids[0] in top),
        (masked_panel, masked_prob, None),
    ):
        marked = [n for n, label in enumerate(panel["labels"]) if label.startswith("hidden")]
        assert len(marked) == 1, panel["labels"]
        assert panel["probs"][marked[0]] == pytest.approx(prob, rel=1e-3, abs=1e-7)
        if inside is not None:
            assert len(panel["labels"]) == k + (0 if inside else 1)
            assert (marked[0] < k) == inside
    assert reply.images and reply.images[0].data.startswith(b"\x89PNG")


@torch.inference_mode()
def test_the_masked_hidden_word_is_the_same_batched_and_alone(tiny_bert_mlm: Path) -> None:
    from bot import MASK
    from plugins.compare import MaskedHiddenWord, masked_hidden_word

    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert_mlm)
    model = transformers.AutoModelForMaskedLM.from_pretrained(tiny_bert_mlm).eval()
    cases = [("The capital of France is ", ".", "Paris"), ("A ", " sat on a long mat today", "cat"), ("", "", "zxqv")]
    batch = [MaskedHiddenWord(f"{left}{MASK}{right}", word) for left, right, word in cases]
    together = masked_hidden_word(model, tok, batch)
    for (left, right, word), request, got in zip(cases, batch, together, strict=True):
        alone = masked_hidden_word(model, tok, [request])[0]
        prob, rank, pieces, first = masked_reference(tiny_bert_mlm, left, right, word)
        for result in (got, alone):
            assert result.first_prob == pytest.approx(prob, rel=1e-4, abs=1e-7)
            assert result.first_rank in rank and (result.tokens, result.first_token) == (pieces, first)


# ----------------------------------------------------------------------------- keys that read without colour

COLOUR_WORDS = re.compile(r"\b(red|green|yellow|blue|grey|gray|orange|pink|cyan|purple)\b", re.IGNORECASE)


async def test_text_keys_read_right_where_no_colour_shows(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    """A pipe, NO_COLOR and Discord on a phone show the text block without colour: the keys name
    marks that are in the plain text, never a colour."""
    from bot.render import render_text
    from plugins.surprise import BANDS
    from plugins.tokenize import TOKEN_BAR

    app = shared_app({"causal_lm": tiny_gpt2})
    sentence = "The quick brown fox jumps over the lazy dog near the quiet river bank today and tomorrow"
    replies = {}
    for line in (
        f"/maskrecipe sentence:{sentence} seed:11",
        "/adapt text:Great product",
        "/surprise text:Zyx qwv plomb frax, the cat sat on the mat.",
        "/tokenize text:Hello world, tokenizers!",
    ):
        reply = await app.execute_line(line)
        assert not reply.error, reply.text
        assert reply.code is not None
        replies[line.split()[0]] = reply
        plain = render_text(reply, [], colour=False)
        assert COLOUR_WORDS.findall(reply.text) == [], (line, reply.text)
        assert "\x1b[" not in plain
    # /maskrecipe: each chosen position reads as its rule says, in the plain sentence.
    recipe = replies["/maskrecipe"]
    shown = recipe.code.plain.split()
    for change in recipe.data["changes"]:
        mark = {"mask": "{}", "random": "~{}~", "kept": "={}="}[change["rule"]]
        assert shown[change["position"]] == mark.format(change["input"])
        assert mark.format("word") in recipe.text or change["rule"] == "mask"
    assert {c["rule"] for c in recipe.data["changes"]} >= {"mask"}
    # /surprise: the plain text is the text with ‹…› and «…» around exactly the 6–12 and 12+ bit tokens.
    surprise = replies["/surprise"]
    plain_text = surprise.code.plain
    opened = [(bound, marks) for bound, _, marks, _ in BANDS if marks[0]]
    assert all(f"{o}…{c}" in surprise.text for _, (o, c) in opened)
    assert sum(plain_text.count(o) for _, (o, _c) in opened) == sum(1 for b in surprise.data["bits"] if b >= 6)
    stripped = plain_text
    for _, (o, c) in opened:
        stripped = stripped.replace(o, "").replace(c, "")
    assert stripped == "Zyx qwv plomb frax, the cat sat on the mat."
    # /tokenize: the bar ends each token, so the plain block splits into the table's pieces.
    tokens = replies["/tokenize"]
    assert tokens.code.plain.split(TOKEN_BAR)[:-1] == tokens.data["pieces"]
    assert TOKEN_BAR in tokens.text
    # /adapt: the answers are in «…», which the text names.
    assert "in «…»" in replies["/adapt"].text and "«" in replies["/adapt"].code.plain


# ----------------------------------------------------------------------------- /nexttoken away from temperature 1


@pytest.mark.parametrize("temperature", [5.0, 0.05])
async def test_nexttoken_away_from_temperature_1_shows_the_models_own_probability_beside(  # type: ignore[no-untyped-def]
    app_factory, models, tiny_gpt2: Path, figures: list[Figure], temperature: float
) -> None:
    """At temperature 5 the bars and the table are the flattened distribution; a student must not
    read them as the model's own probabilities, so both are shown and the chart says which."""
    app = app_factory(models)
    prompt = "The capital of France is"
    reply = await app.execute_line(f'/nexttoken prompt:"{prompt}" k:4 temperature:{temperature:g}')
    assert not reply.error, reply.text
    own, tempered = causal_reference(tiny_gpt2, prompt), causal_reference(tiny_gpt2, prompt, temperature)
    assert reply.table is not None and reply.table.headers[-1] == "model's own (T=1)"
    for token, row in zip(reply.data["top"], reply.table.rows, strict=True):
        assert read_probability(row[3]) == pytest.approx(tempered[token["id"]].item(), abs=1e-4, rel=1e-3)
        assert read_probability(row[4]) == pytest.approx(own[token["id"]].item(), abs=1e-4, rel=1e-3)
    assert f"Temperature {temperature:g} divides the logits" in reply.text and "not the model's own" in reply.text
    assert ("flattened" if temperature > 1 else "sharpened") in reply.text
    drawn = " ".join(t.get_text() for t in figures[-1].findobj(Text))
    assert f"probability at temperature {temperature:g}" in drawn


async def test_nexttoken_at_temperature_1_has_one_probability_column(shared_app, models) -> None:  # type: ignore[no-untyped-def]
    app = shared_app(models)
    reply = await app.execute_line('/nexttoken prompt:"The capital of France is" k:3')
    assert reply.table is not None and reply.table.headers[-1] == "probability"
    assert "Temperature" not in reply.text


# ----------------------------------------------------------------------------- /surprise: a memorised sentence


async def test_a_memorised_sentence_is_not_called_low_perplexity_when_it_is_not(  # type: ignore[no-untyped-def]
    shared_app, smollm_dir: Path
) -> None:
    """On the offline SmolLM2 the counted 2-gram scores the corpus sentence worse per word than the
    neural model: the reply must not call the n-gram's perplexity low there."""
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute_line('/surprise text:"The cat sat on the mat." ngram:true')
    assert not reply.error, reply.text
    ngram = reply.data["ngram"]
    assert ngram["perplexity_per_word"] > ngram["neural_perplexity_per_word"]  # the case in point
    assert ngram["comparable"] == "no" and "memorised" in reply.text
    assert "low perplexity" not in reply.text and "recall" in reply.text


# ----------------------------------------------------------------------------- /tokencost: one scale


@pytest.mark.parametrize("texts", [None, "Hello world|Bonjour le monde|नमस्ते दुनिया"])
async def test_tokencost_panels_share_one_scale(app_factory, figures: list[Figure], texts: str | None) -> None:  # type: ignore[no-untyped-def]
    """The text says o200k_base narrows the gap; the chart's three panels must draw their bars on
    one scale, or a ×0.94 bar in one panel looks as long as a ×4.82 bar in another."""
    app = app_factory()
    reply = await app.execute_line("/tokencost" + (f" texts:{texts}" if texts else ""))
    assert not reply.error, reply.text
    axes = figures[-1].axes
    assert len(axes) == 3
    assert len({ax.get_xlim() for ax in axes}) == 1
    longest = max(x for ax in axes for poly in ax.collections[0].get_paths() for x, _ in poly.vertices)
    assert longest == pytest.approx(max(m for row in reply.data["rows"] for m in row["multiplier"].values()))
    assert all(ax.get_xlim()[1] >= longest for ax in axes)


# ----------------------------------------------------------------------------- /maskrecipe: the share explained


@pytest.mark.parametrize("sentence", ["The quick brown fox jumps over the lazy dog", "Hi there", "a"])
async def test_maskrecipe_explains_its_share_with_the_arithmetic(shared_app, cache_dir: Path, sentence: str) -> None:  # type: ignore[no-untyped-def]
    """9 tokens get 1 chosen (11%, below 15%): the reply must not say a short sentence gets a larger
    share; it shows 15% of the count and the whole number taken."""
    app = shared_app()
    reply = await app.execute("maskrecipe", {"sentence": sentence}, app.local_context())
    assert not reply.error, reply.text
    tokens = transformers.BertTokenizerFast.from_pretrained(bert_tokenizer_dir(cache_dir)).tokenize(sentence)
    chosen = max(1, round(0.15 * len(tokens)))
    assert f"15% of {len(tokens)} is {0.15 * len(tokens):.2f}, so {chosen}." in reply.text
    assert "larger share" not in reply.text or chosen / len(tokens) > 0.15


# ----------------------------------------------------------------------------- axis labels read as their values


@settings(max_examples=examples(60), deadline=None)
@given(top=st.floats(1e-6, 1.0), share=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
def test_every_percent_tick_label_reads_as_its_position(top: float, share: list[float]) -> None:
    """/compare's chart read 0%, 2%, 3%, 4% under ticks at 0, 1.5, 3 and 4.5 %: a student reads the
    bars against the wrong numbers. Each tick's label must equal its value."""
    from bot.charts import bar_chart

    figure: list[Figure] = []
    savefig = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> Any:
        figure.append(self)
        return savefig(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", keep)
        bar_chart([f"t{n}" for n in range(len(share))], [top * s for s in share], title="t", xlabel="p")
    ticks = [t for t in figure[-1].findobj(Text) if t.get_gid() == "tick"]
    assert ticks
    for tick in ticks:
        assert float(tick.get_text().rstrip("%")) / 100 == pytest.approx(tick.get_position()[0], rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------- /tokenize: what uncased WordPiece drops


@pytest.mark.parametrize(
    ("text", "lost"),
    [
        ("Ünïcödé naïve café", "case and accents are"),
        ("naïve café", "accents are"),
        ("Hello World", "case is"),
        ("hello world", ""),
    ],
)
async def test_tokenize_compare_says_what_uncased_wordpiece_throws_away(  # type: ignore[no-untyped-def]
    shared_app, cache_dir: Path, text: str, lost: str
) -> None:
    """“Ünïcödé naïve café” is 3 WordPiece tokens with no [UNK] because bert-base-uncased lower-cases
    and strips accents first: the reply must say so, or fewer tokens reads as free."""
    app = shared_app()
    reply = await app.execute("tokenize", {"text": text, "compare": True}, app.local_context())
    assert not reply.error, reply.text
    normalizer = transformers.BertTokenizerFast.from_pretrained(
        bert_tokenizer_dir(cache_dir)
    ).backend_tokenizer.normalizer
    first = next((w for w in text.split() if normalizer.normalize_str(w) != w), None)
    if not lost:
        assert first is None and "lower-cased" not in reply.text
        return
    assert first is not None
    assert f"“{first}” is cut as “{normalizer.normalize_str(first)}”, so {lost} lost" in reply.text
    assert ("drops accents" in reply.text) == ("accents" in lost)


# ----------------------------------------------------------------------------- /complexity: the budget figure explained


async def test_complexity_says_how_an_untimed_lengths_cost_adds_up(shared_app) -> None:  # type: ignore[no-untyped-def]
    """1.38e11 beside a table whose largest count is 3.44e10 reads as a contradiction unless the reply
    says it is 4 forwards (one warm-up, 3 timed) of both layers."""
    app = shared_app()
    reply = await app.execute_line("/complexity lengths:8,32768 width:16")
    assert not reply.error, reply.text
    n, d = 32768, 16
    want = 4 * (6 * n * d * d + 4 * n * d * d + 2 * n * n * d)
    shown = re.search(
        r"would take up to ([\d.e+,]+) multiply-accumulates \(4 forwards of each layer, one warm-up and 3 timed",
        reply.text,
    )
    assert shown is not None, reply.text
    assert float(shown.group(1).replace(",", "")) == pytest.approx(want, rel=1e-2)


# ----------------------------------------------------------------------------- /surprise: every token marked


async def test_surprise_text_key_marks_a_surprising_space_token(shared_app, smollm_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """In “1 1 1 …” SmolLM2's most surprising token is a lone space (about 10 bits): the text key
    must mark it as the table ranks it, not leave it bare."""
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute_line("/surprise text:1 1 1 1 1 1 1 1 1 1 1 1")
    assert not reply.error, reply.text
    bits, tokens = reply.data["bits"], reply.data["tokens"]
    spaces = [b for b, t in zip(bits, tokens, strict=True) if t.strip(" ␣") == "" and b >= 6]
    assert spaces  # the case in point, from the model
    assert reply.code is not None
    key = "".join(segment.text for segment in reply.code.segments)
    assert key.count("‹") + key.count("«") == sum(b >= 6 for b in bits)
    assert "‹␣›" in key or "«␣»" in key


# ----------------------------------------------------------------------------- /compare: the continuation quoted


async def test_compare_quotes_the_continuation_so_it_does_not_read_as_the_bots_text(  # type: ignore[no-untyped-def]
    shared_app, smollm_dir: Path
) -> None:
    """SmolLM2 continues “The cat sat on the” with “… back.\\n\\nThe original sentence is”: printed
    bare, its last line read as the bot's own unfinished sentence."""
    app = shared_app({"causal_lm": smollm_dir})
    reply = await app.execute_line("/compare text:The cat sat on the mat.")
    assert not reply.error, reply.text
    continued = reply.data["causal"]["continuation"]
    assert "\n" in continued  # the case in point, from the model
    field = next(f for f in reply.fields if f.name.startswith("causal LM continues"))
    assert field.value == "“" + continued.replace("\n", "⏎") + "”"


# ----------------------------------------------------------------------------- /nsp: copying is predictable too


@pytest.mark.parametrize(
    ("a", "b", "share"),
    [
        ("I like tea.", "I like tea.", 1.0),
        ("The cat sat on the mat.", "the mat, the cat.", 1.0),
        ("The cat sat down.", "It purred.", 0.0),
        ("The cat sat down.", "The dog ran off.", 0.25),
    ],
)
async def test_nsp_says_the_score_is_predictability_and_warns_when_b_repeats_a(  # type: ignore[no-untyped-def]
    shared_app, tiny_gpt2: Path, tiny_bert_nsp: Path, a: str, b: str, share: float
) -> None:
    # Hand count: the share of B's words (case aside) that are words of A.
    for models in ({"causal_lm": tiny_gpt2}, {"nsp": tiny_bert_nsp}):
        reply = await shared_app(models).execute_line(f'/nsp sentence_a:"{a}" sentence_b:"{b}"')
        assert not reply.error, reply.text
        assert reply.data["b_words_in_a"] == pytest.approx(share)
        warned = "Warning: B repeats A" in reply.text
        assert warned == (share >= 0.8) == reply.data["repeats"]
        if "causal_lm" in models:
            assert "how predictable B is once the model has read A" in reply.text and "Copying" in reply.text


# ----------------------------------------------------------------------------- /tokenize: code points, not "characters"


async def test_tokenize_counts_code_points_and_says_so(shared_app) -> None:  # type: ignore[no-untyped-def]
    """👍🏽 is one visible character but two code points (what len() counts): the reply calls them
    code points and says why one character can be several."""
    app = shared_app()
    text = "Nice 👍🏽 café"
    reply = await app.execute("tokenize", {"text": text, "compare": True}, app.local_context())
    assert not reply.error, reply.text
    assert len(text) == 12  # by hand: "Nice " 5, 👍 and 🏽 2, " café" 5
    assert "12 code points became" in reply.text and "characters became" not in reply.text
    assert "skin-tone code point" in reply.text
    assert reply.table is not None and reply.table.rows[0][:2] == ["code points", "12"]


# ----------------------------------------------------------------------------- /surprise: a round colour-bar top


@pytest.mark.parametrize("ngram", [False, True])
async def test_surprise_colour_bar_ticks_are_round(
    app_factory, tiny_gpt2: Path, figures: list[Figure], ngram: bool
) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2})
    reply = await app.execute("surprise", {"text": "Zyx qwv plomb frax 東京.", "ngram": ngram}, app.local_context())
    assert not reply.error, reply.text
    ticks = [t.get_text() for t in figures[-1].texts if t.get_gid() == "tick"]
    assert ticks and all(re.fullmatch(r"\d+", tick) for tick in ticks), ticks
    largest = max([*reply.data["bits"], *(reply.data["ngram"]["bits"] if ngram else [])])
    assert int(ticks[-1]) == math.ceil(largest + 1e-9) and int(ticks[-1]) - 1 < largest <= int(ticks[-1])
