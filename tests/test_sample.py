"""/sample: seeded draws equal transformers' generate with the same settings and seed
(batched or alone), and the before/after distributions follow the definitions of
temperature, top-k and top-p, computed here by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from bot.app import App
from bot.charts import grouped_bars
from bot.render import probability
from plugins.sample import Sample, sample
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord

TOL = 1e-5
FORWARD_TOL = 1e-4  # generate's prefill and a plain forward differ by float32 noise on 30 layers


def load(path: Path):  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tok


def stops(model) -> set[int]:  # type: ignore[no-untyped-def]
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def reference_draws(model, tok, request: Sample) -> tuple[list[list[int]], list[list[float]]]:  # type: ignore[no-untyped-def]
    """transformers' generate, alone, seeded as a user would: each row cut after its end token,
    with the probability generate's own processed scores gave each drawn token."""
    enc = tok(request.text, return_tensors="pt")
    torch.manual_seed(request.seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            num_return_sequences=request.n,
            max_new_tokens=request.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    rows, probs = [], []
    for row, ids in enumerate(out.sequences[:, enc["input_ids"].shape[1] :].tolist()):
        kept: list[int] = []
        for token in ids:
            kept.append(token)
            if token in stops(model):
                break
        rows.append(kept)
        probs.append([torch.softmax(out.scores[s][row], -1)[t].item() for s, t in enumerate(kept)])
    return rows, probs


def by_definition(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[torch.Tensor]:
    """The four stages in float64, from the definitions: softmax; logits / T; keep the k
    likeliest; keep the likeliest tokens until their mass reaches p (the one that crosses
    it included); renormalise what is kept."""
    logits = logits.double()
    model = torch.softmax(logits, -1)
    tempered = torch.softmax(logits / temperature, -1)
    keep = torch.ones_like(tempered, dtype=torch.bool)
    if top_k:
        keep &= tempered >= torch.topk(tempered, top_k).values[-1]
    after_k = torch.where(keep, tempered, 0.0)
    after_k = after_k / after_k.sum()
    if top_p < 1:
        order = torch.argsort(after_k, descending=True)
        before = torch.cumsum(after_k[order], 0) - after_k[order]  # mass of the likelier tokens
        nucleus = torch.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    final = torch.where(keep, after_k, 0.0)
    return [model, tempered, after_k, final / final.sum()]


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal(request):  # type: ignore[no-untyped-def]
    return load(request.getfixturevalue(request.param))


BATCH = [
    Sample("The capital of France is", temperature=0.8, top_k=50, top_p=0.9, n=3, seed=7, max_new_tokens=6),
    Sample("The capital of France is", temperature=0.8, top_k=50, top_p=0.9, n=3, seed=8, max_new_tokens=6),
    Sample("Once upon a time", temperature=1.3, top_k=0, top_p=0.95, n=2, seed=7, max_new_tokens=6),
    Sample("Hi", temperature=1.0, top_k=5, top_p=1.0, n=4, seed=123456, max_new_tokens=6),
]


@torch.inference_mode()
def test_draws_equal_generate_with_the_same_seed_batched_and_alone(causal) -> None:  # type: ignore[no-untyped-def]
    model, tok = causal
    together = sample(model, tok, BATCH)
    for request, got in zip(BATCH, together, strict=True):
        alone = sample(model, tok, [request])[0]
        want_ids, want_probs = reference_draws(model, tok, request)
        assert [c.ids for c in got.continuations] == [c.ids for c in alone.continuations] == want_ids
        for c, probs in zip(got.continuations, want_probs, strict=True):
            assert c.drawn == pytest.approx(probs, abs=TOL)
            assert c.ended == (c.ids[-1] in stops(model)) and len(c.ids) <= request.max_new_tokens
            assert b"".join(c.raw) == tok.decode(c.ids).encode() or "\ufffd" in tok.decode(c.ids)
    # Different seeds, different draws (the two French prompts share everything else).
    assert together[0].continuations != together[1].continuations


@torch.inference_mode()
def test_stages_follow_the_definitions(smollm_dir: Path) -> None:
    model, tok = load(smollm_dir)
    # The stages are those of the first step; one drawn token is enough.
    for request in (
        Sample("The capital of France is", 0.8, 50, 0.9, max_new_tokens=1),
        Sample("My favourite colour is", 1.5, 20, 0.8, max_new_tokens=1),
        Sample("1, 2, 3,", 0.5, 0, 0.5, max_new_tokens=1),
    ):
        (got,) = sample(model, tok, [request])
        with torch.no_grad():
            logits = model(**tok(request.text, return_tensors="pt")).logits[0, -1]
        stages = by_definition(logits, request.temperature, request.top_k, request.top_p)
        model_p, tempered, after_k, final = stages
        assert [t.id for t in got.shown] == torch.topk(model_p, len(got.shown)).indices.tolist()
        for t in got.shown:
            assert (t.model, t.temperature, t.top_k, t.final) == pytest.approx(
                (model_p[t.id].item(), tempered[t.id].item(), after_k[t.id].item(), final[t.id].item()),
                abs=FORWARD_TOL,
            )
        assert got.kept_top_k == int((after_k > 0).sum())
        assert got.kept_top_p == int((final > 0).sum())
        assert got.mass_top_k == pytest.approx(tempered[after_k > 0].sum().item(), abs=FORWARD_TOL)
        assert got.mass_top_p == pytest.approx(after_k[final > 0].sum().item(), abs=FORWARD_TOL)


@torch.inference_mode()
def test_each_drawn_probability_equals_a_forward_on_its_prefix(tiny_gpt2: Path) -> None:
    model, tok = load(tiny_gpt2)
    request = Sample("The cat", temperature=0.7, top_k=8, n=2, seed=3)
    (got,) = sample(model, tok, [request])
    prompt = tok(request.text)["input_ids"]
    for c in got.continuations:
        for step, token in enumerate(c.ids):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.ids[:step]])).logits[0, -1]
            model_p, *_, final = by_definition(logits, request.temperature, request.top_k, request.top_p)
            assert c.drawn[step] == pytest.approx(final[token].item(), abs=TOL)
            assert c.model[step] == pytest.approx(model_p[token].item(), abs=TOL)
            assert final[token] > 0  # never a token the settings cut


# ----------------------------------------------------------------------------- the command


async def test_concurrent_commands_batch_and_each_draw_equals_generate_alone(cache_dir: Path, tiny_llama: Path) -> None:
    app = App(make_config(cache_dir, {"causal_lm": tiny_llama}, max_wait_ms=300))
    asked = [
        {"prompt": "The capital of France is", "temperature": 0.8, "top_k": 50, "top_p": 0.9, "n": 3, "seed": 7},
        {"prompt": "The capital of France is", "temperature": 0.8, "top_k": 50, "top_p": 0.9, "n": 3, "seed": 8},
        {"prompt": "Once upon a time", "temperature": 1.4, "top_k": 0, "top_p": 1.0, "n": 2, "seed": 99},
    ]
    try:
        replies = await asyncio.gather(*(app.execute("sample", values, app.local_context()) for values in asked))
        assert app.inference.metrics.summary()["tasks"]["plugins.sample:sample"]["batch_size_mean"] > 1
        model, tok = load(tiny_llama)
        for values, reply in zip(asked, replies, strict=True):
            assert not reply.error, reply.text
            assert_fits_discord(reply)
            request = Sample(
                values["prompt"], values["temperature"], values["top_k"], values["top_p"], values["n"], values["seed"]
            )
            want_ids, want_probs = reference_draws(model, tok, request)
            assert [s["ids"] for s in reply.data["samples"]] == want_ids
            for s, probs in zip(reply.data["samples"], want_probs, strict=True):
                assert s["drawn"] == pytest.approx(probs, abs=TOL)
        again = await app.execute("sample", asked[1], app.local_context())
        assert again.data["samples"] == replies[1].data["samples"]
    finally:
        await app.close()


async def test_reply_explains_each_stage_and_the_seed(shared_app, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_gpt2})
    reply = await app.execute_line('/sample prompt:"The cat sat on the" temperature:0.7 top_k:5 n:2')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    seed = reply.data["seed"]
    assert 0 <= seed < 2**31 and any(f.name == "seed" and f.value.startswith(str(seed)) for f in reply.fields)
    assert "Temperature 0.7 divides the logits" in reply.text and "below 1 sharpens" in reply.text
    # The 5 tokens of a random model's 50,257 hold about 0.01%: shown as such, never as "0.0%".
    mass = probability(reply.data["mass_top_k"])
    assert f"Top-k 5 keeps the 5 likeliest tokens, {mass} of the probability" in reply.text and mass != "0.0%"
    assert reply.data["kept_top_p"] == 5  # top-p 0.9 of five near-equal tokens keeps all five
    final = [t["final"] for t in reply.data["shown"]]
    assert sum(final) == pytest.approx(1.0, abs=1e-5) and sum(f > 0 for f in final) == 5
    assert [f.name for f in reply.fields if f.name.startswith("sample")] == ["sample 1", "sample 2"]
    assert reply.images[0].filename == "sample.png" and reply.images[0].data.startswith(b"\x89PNG")
    rerun = await app.execute_line(f'/sample prompt:"The cat sat on the" temperature:0.7 top_k:5 n:2 seed:{seed}')
    assert rerun.data["samples"] == reply.data["samples"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/sample prompt:Hi temperature:0", "`temperature` must be at least 0.05."),
        ("/sample prompt:Hi top_p:0", "`top_p` must be at least 0.01."),
        ("/sample prompt:Hi n:6", "`n` must be at most 5."),
        ("/sample prompt:Hi seed:-1", "`seed` must be at least 0."),
    ],
)
async def test_bad_settings_get_a_clear_answer(shared_app, line: str, message: str) -> None:  # type: ignore[no-untyped-def]
    reply = await shared_app().execute_line(line)
    assert reply.error and reply.text == message


def test_grouped_bars_draw_literal_text() -> None:
    image = grouped_bars(
        ["$x$", "␣$$", "a_b"],
        [("model", [0.5, 0.3, 0.2]), ("drawn from", [0.62, 0.38, 0.0])],
        title="after “$5 and $6”",
        xlabel="probability",
        notes=["", "", "cut by top-k"],
    )
    assert image.data.startswith(b"\x89PNG")



def odds(cell: str) -> float:
    """A table cell as a number: a decimal, or bot.render.probability's "1 in 2,236" / "1 in 10^12"."""
    if not cell.startswith("1 in "):
        return float(cell)
    rest = cell[len("1 in ") :].replace(",", "")
    return 10.0 ** -float(rest[3:]) if rest.startswith("10^") else 1 / float(rest)

async def test_a_high_temperature_says_how_little_the_listed_tokens_hold(shared_app, smollm_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """At T=5 the listed tokens hold almost nothing: the reply says how much (their share of
    softmax(logits / 5) from transformers) and how far the rest spreads (e to the entropy), and
    no table cell shows a probability that is not 0 as 0.000."""
    from bot.charts import cell_percent

    prompt = "The capital of France is"
    reply = await shared_app({"causal_lm": smollm_dir}).execute_line(f'/sample prompt:"{prompt}" temperature:5')
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    model, tok = load(smollm_dir)
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1].float()
    plain, hot = torch.softmax(logits, -1), torch.softmax(logits / 5, -1)
    shown = len(reply.data["shown"])
    held = float(hot[torch.topk(plain, shown).indices].sum())
    spread = float(torch.exp(-(hot * torch.log(hot)).sum()))
    assert reply.data["shown_hold_at_temperature"] == pytest.approx(held, rel=1e-4)
    assert reply.data["tempered_spread"] == pytest.approx(spread, rel=1e-3)
    assert held < 0.05  # the case in point
    assert f"At T=5 these {shown} tokens hold {cell_percent(held)} of the probability" in reply.text
    assert f"remaining {len(plain) - shown:,} tokens" in reply.text
    assert f"~{reply.data['tempered_spread']:,.0f} equally likely tokens" in reply.text
    assert reply.table is not None
    for row, token in zip(reply.table.rows, reply.data["shown"], strict=True):
        for cell, value in ((row[1], token["model"]), (row[2], token["temperature"])):
            read = odds(cell)
            assert read == pytest.approx(value, rel=0.2, abs=5e-4) and (value == 0 or read > 0), row
