"""/lens: every layer's guess equals transformers' own hidden states through the final norm and
the output layer; a knock-out equals a model whose weights for that part are zeroed (written here,
without hooks); batched and alone."""

from __future__ import annotations

import io
import itertools
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from bot import charts
from bot.render import probability
from plugins.lens import CANDIDATES, MAX_TOKENS, Lens, logit_lens
from tests.plugin_helpers import assert_fits_discord, causal_reference
from tests.test_charts import drawn_texts

TEXTS = ["The capital of France is", "Hi", "東京 is far 🙂, and the 🦜"]
TOL = 2e-5


def load(path: Path) -> tuple[Any, Any]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tok


def final_norm(model: Any) -> Any:
    base = model.base_model
    return base.norm if hasattr(base, "norm") else base.ln_f


def reference_lens(model: Any, tok: Any, text: str) -> torch.Tensor:
    """(layers + 1) × vocab probabilities at the last position, from output_hidden_states: index 0 is
    what the first layer reads, 1..L-1 each layer's output (not yet normed), and the last is the
    model's own logits (transformers applies the final norm to the last hidden state itself)."""
    with torch.no_grad():
        out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
        states = out.hidden_states
        layers = model.config.num_hidden_layers
        rows = [model.lm_head(final_norm(model)(states[n][0, -1])) for n in range(layers)]
        rows.append(out.logits[0, -1])
    return torch.softmax(torch.stack(rows).float(), dim=-1)


def zeroed(path: Path, knockout: str, layer: int, head: int | None = None) -> Any:
    """A fresh copy of the model with one part's output weights set to zero."""
    model, _ = load(path)
    block = model.base_model.layers[layer - 1] if hasattr(model.base_model, "layers") else model.base_model.h[layer - 1]
    gpt2 = not hasattr(block, "self_attn")
    with torch.no_grad():
        if knockout == "attention":
            projection = block.attn.c_proj if gpt2 else block.self_attn.o_proj
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()
        elif knockout == "mlp":
            projection = block.mlp.c_proj if gpt2 else block.mlp.down_proj
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()
        else:
            assert head is not None
            heads = model.config.num_attention_heads
            if gpt2:  # Conv1D: weight is (in, out); the heads sit side by side along "in"
                size = block.attn.c_proj.weight.shape[0] // heads
                block.attn.c_proj.weight[(head - 1) * size : head * size, :] = 0
            else:  # Linear: weight is (out, in)
                size = block.self_attn.o_proj.weight.shape[1] // heads
                block.self_attn.o_proj.weight[:, (head - 1) * size : head * size] = 0
    return model


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal_path(request) -> Path:  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


@torch.inference_mode()
def test_every_layer_equals_the_hidden_states_through_norm_and_head(causal_path: Path) -> None:
    model, tok = load(causal_path)
    batch = [Lens(text, k=4) for text in TEXTS]
    together = logit_lens(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        alone = logit_lens(model, tok, [request])[0]
        want = reference_lens(model, tok, request.text)
        assert len(got.rows) == model.config.num_hidden_layers + 1
        for result in (got, alone):
            assert not result.problem
            for layer, row in enumerate(result.rows):
                top = torch.topk(want[layer], 4)
                assert [g.id for g in row] == top.indices.tolist(), layer
                assert [g.prob for g in row] == pytest.approx(top.values.tolist(), abs=TOL)
            answer = int(want[-1].argmax())
            assert result.answer is not None and result.answer.id == answer
            assert result.answer_probs == pytest.approx(want[:, answer].tolist(), abs=TOL)
            # The chart's grid: the final top CANDIDATES tokens' probabilities at every layer.
            final_top = torch.topk(want[-1], CANDIDATES).indices.tolist()
            assert [g.id for g in result.candidates] == final_top
            assert result.candidate_probs == [pytest.approx(row, abs=TOL) for row in want[:, final_top].tolist()]
        # The last layer is exactly /nexttoken's distribution.
        nexttoken = causal_reference(causal_path, request.text)
        assert got.answer is not None and got.answer.prob == pytest.approx(float(nexttoken.max()), abs=TOL)


@pytest.mark.parametrize(("knockout", "layer", "head"), [("attention", 1, None), ("mlp", 2, None), ("head", 2, 2)])
@torch.inference_mode()
def test_a_knockout_equals_a_model_with_those_weights_zeroed(
    causal_path: Path, knockout: str, layer: int, head: int | None
) -> None:
    model, tok = load(causal_path)
    cut = zeroed(causal_path, knockout, layer, head)
    batch = [Lens(text, k=5, knockout=knockout, layer=layer, head=head) for text in TEXTS]
    together = logit_lens(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        alone = logit_lens(model, tok, [request])[0]
        before = reference_lens(model, tok, request.text)
        after = reference_lens(cut, tok, request.text)
        p, q = before[-1].double(), after[-1].double()
        kl = float((p * (p.log() - q.log())).sum()) / math.log(2)
        answer = int(p.argmax())
        for result in (got, alone):
            assert not result.problem
            top = torch.topk(after[-1], 5)
            assert [g.id for g in result.after] == top.indices.tolist()
            assert [g.prob for g in result.after] == pytest.approx(top.values.tolist(), abs=TOL)
            assert [g.id for g in result.before] == torch.topk(before[-1], 5).indices.tolist()
            assert result.answer_after == pytest.approx(float(q[answer]), abs=TOL)
            assert result.kl_bits == pytest.approx(kl, abs=1e-4)
            assert result.knocked_answer_probs == pytest.approx(after[:, answer].tolist(), abs=TOL)
        # Nothing stays switched off: the served model answers as before.
        plain = logit_lens(model, tok, [Lens(request.text, k=5)])[0].before
        assert [(g.id, g.prob) for g in plain] == [(g.id, g.prob) for g in alone.before]


@torch.inference_mode()
def test_problems_are_reported_per_request(tiny_gpt2: Path) -> None:
    model, tok = load(tiny_gpt2)
    got = logit_lens(
        model,
        tok,
        [
            Lens("word " * (MAX_TOKENS + 5)),
            Lens("Hi", knockout="mlp", layer=3),
            Lens("Hi", knockout="head", layer=1, head=9),
            Lens("Hi", knockout="head", layer=1),
            Lens("Hi", knockout="attention"),
        ],
    )
    assert f"at most {MAX_TOKENS}" in got[0].problem
    assert got[1].problem == "This model has 2 layers: `layer` must be 1 to 2."
    assert got[2].problem == "This model has 2 heads per layer: `head` must be 1 to 2."
    assert "which head" in got[3].problem and "which layer" in got[4].problem


# ----------------------------------------------------------------------------- the command


async def test_lens_command_through_the_service(shared_app, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]
    app = shared_app({"causal_lm": tiny_llama})
    prompt = TEXTS[0]
    reply = await app.execute_line(f"/lens prompt:{prompt}")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    assert reply.images[0].filename == "lens.png" and reply.images[0].data.startswith(b"\x89PNG")
    model, tok = load(tiny_llama)
    want = reference_lens(model, tok, prompt)
    answer = int(want[-1].argmax())
    final_top = torch.topk(want[-1], CANDIDATES).indices.tolist()
    assert [c["id"] for c in reply.data["candidates"]] == final_top
    assert reply.data["candidate_probs"] == [pytest.approx(row, abs=TOL) for row in want[:, final_top].tolist()]
    assert reply.data["answer"]["id"] == answer
    assert reply.data["answer_probs"] == pytest.approx(want[:, answer].tolist(), abs=TOL)
    nexttoken = await app.execute_line(f"/nexttoken prompt:{prompt}")
    assert nexttoken.data["top"][0]["id"] == answer
    assert "Logit lens" in reply.text and "residual stream" in reply.text
    cut = await app.execute_line(f"/lens prompt:{prompt} knockout:head layer:1 head:2")
    assert not cut.error, cut.text
    assert [image.filename for image in cut.images] == ["lens.png", "lens-knockout.png"]
    # The grid shows the model as it is (the same numbers as without a knock-out), and its title
    # (which is also the picture's alt text) says so; without a knock-out there is nothing to say.
    assert cut.data["candidate_probs"] == reply.data["candidate_probs"]
    assert "unchanged (no knock-out)" in cut.images[0].description
    assert "unchanged" not in reply.images[0].description
    assert_fits_discord(cut)
    after = reference_lens(zeroed(tiny_llama, "head", 1, 2), tok, prompt)
    assert cut.data["answer_after"] == pytest.approx(float(after[-1, answer]), abs=TOL)
    assert f"{cut.data['kl_bits']:.3f} bits" in cut.text and "KL divergence" in cut.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/lens prompt:Hi layer:1", "knockout:attention"),
        ("/lens prompt:Hi knockout:mlp head:1 layer:1", "`head` needs `knockout:head`"),
        ("/lens prompt:Hi knockout:head layer:1", "which head"),
        ("/lens prompt:Hi knockout:attention layer:99", "layers: `layer` must be 1 to"),
        ("/lens prompt:Hi knockout:everything", "must be one of"),
        (f"/lens prompt:{'word ' * 70}", f"at most {MAX_TOKENS}"),
    ],
)
async def test_lens_bad_input_gets_a_short_reply(shared_app, tiny_gpt2: Path, line: str, message: str) -> None:  # type: ignore[no-untyped-def]
    reply = await shared_app({"causal_lm": tiny_gpt2}).execute_line(line)
    assert reply.error and message in reply.text, reply.text
    assert "Traceback" not in reply.text


# ----------------------------------------------------------------------------- the chart

GRID_ROWS = ["embeddings", *(f"layer {n}" for n in range(1, 31))]
GRID_COLUMNS = ["␣Paris", "␣the", "🙂", "東京", "␣a-very-long-token-label-indeed"]


def grid_values() -> list[list[float]]:
    """SmolLM2-sized: 31 rows; values from 0 and 3e-7 to 1, some close together."""
    ladder = [0.0, 3e-7, 2e-5, 0.00042, 0.0031, 0.012, 0.013, 0.094, 0.1, 0.26, 0.5, 0.77, 0.999, 1.0]
    return [[ladder[(r * 5 + c) % len(ladder)] for c in range(len(GRID_COLUMNS))] for r in range(len(GRID_ROWS))]


def draw_grid(rows: list[str], values: list[list[float]]) -> tuple[list[Any], bytes]:
    with drawn_texts() as drawn:
        image = charts.probability_grid(
            rows,
            GRID_COLUMNS[: len(values[0])],
            values,
            title="SmolLM2-135M: the final top 5 next tokens through the lens, layer by layer " * 3,
            row_name="after layer (top: embeddings; bottom: the model's real answer)",
            column_name="the model's final top 5 next tokens (first: its answer)",
        )
    return drawn, image.data


@pytest.mark.parametrize("size", ["smollm", "tiny"])
def test_the_lens_grid_writes_every_value_legibly_and_fits(size: str) -> None:
    values = grid_values() if size == "smollm" else [[0.4, 0.0], [1e-6, 1.0], [0.5, 0.25]]
    rows = GRID_ROWS[: len(values)]
    drawn, png = draw_grid(rows, values)
    assert png.startswith(b"\x89PNG")
    # The same rules as every other chart (tests/test_charts.py): inside, no missing glyph, no overlap.
    assert [d.text for d in drawn if not d.inside()] == []
    assert [d.text for d in drawn if not all(charts.has_glyph(ch) for ch in d.text if ch != "\n")] == []
    boxes = list({(d.text, round(d.x0), round(d.y0)): d for d in drawn}.values())
    assert [
        (a.text, b.text)
        for a, b in itertools.combinations(boxes, 2)
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1
    ] == []
    # Every value is written, in reading order, and a value that is not 0 never reads 0.
    flat = [v for row in values for v in row]
    written = sorted(
        (d for d in drawn if d.text.endswith("%") and d.x1 < max(e.x0 for e in drawn if e.text == "100%")),
        key=lambda d: (-round(d.y0), d.x0),
    )
    assert [d.text for d in written] == [charts.cell_percent(v) for v in flat]
    for value, d in zip(flat, written, strict=True):
        shown = d.text.lstrip("<").rstrip("%")
        assert (float(shown) > 0) == (value > 0)
        if not d.text.startswith("<"):
            assert float(shown) / 100 == pytest.approx(value, rel=0.05, abs=5e-5)
    # Each number contrasts with its cell's colour (WCAG ratio, read from the picture itself).
    from PIL import Image as PILImage

    picture = PILImage.open(io.BytesIO(png)).convert("RGB")
    for d in written:
        box = picture.crop((math.floor(d.x0), math.floor(d.height - d.y1), math.ceil(d.x1), math.ceil(d.height - d.y0)))
        colours = sorted(box.getcolors(box.width * box.height) or [], reverse=True)
        background = colours[0][1]
        ink = max((c for _, c in colours), key=lambda c: contrast(c, background))
        assert contrast(ink, background) >= 4.5, d.text


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    la, lb = (charts.relative_luminance([v / 255 for v in c]) for c in (a, b))
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


# ----------------------------------------------------------------------------- the study card's puzzle


@torch.inference_mode()
def test_smollm2s_layer_12_mlp_matters_more_than_any_other_middle_layers(smollm_dir: Path) -> None:
    """The language-model card's puzzle and quiz: on the offline SmolLM2, switching off layer 12's MLP
    (block 11 counting from 0) moves the next-token distribution further than switching off the MLP of
    any other middle layer (4 to 28), by at least 2 bits, for several prompts; the KL divergences are
    the ones /lens reports, which the knock-out test above checks against zeroed weights."""
    model, tok = load(smollm_dir)
    card = Path(__file__).parents[1] / "plugins" / "data" / "topics" / "language-model.toml"
    assert "Layer 12's MLP moves it far more" in card.read_text(encoding="utf-8")
    prompts = ["The capital of France is", "Once upon a time there was a", "Water boils at 100 degrees"]
    middle = range(4, 29)
    # One batch of the three prompts per knock-out (/lens batches requests with the same knock-out).
    by_layer = {
        layer: logit_lens(model, tok, [Lens(p, knockout="mlp", layer=layer) for p in prompts]) for layer in middle
    }
    for index, prompt in enumerate(prompts):
        kl = {layer: results[index].kl_bits for layer, results in by_layer.items()}
        others = max(v for layer, v in kl.items() if layer != 12)
        assert kl[12] is not None and others is not None
        assert kl[12] > others and kl[12] >= 2.0, (prompt, kl)


# ----------------------------------------------------------------------------- a shared model

# The texts bot.worker.engines verifies a new engine on (a batch of 3, like the flaky failure's).
PROBES = ["The capital of France is", "Hello", "A short story about a robot who learns to paint, in three sentences:"]


def hooks_on(model: Any) -> list[str]:
    """Every module of ``model`` that still has a forward hook or pre-hook."""
    return [
        name or "(model)"
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks  # no public API lists them
    ]


def plain_next_token(path: Path, texts: list[str]) -> list[torch.Tensor]:
    """transformers' own next-token probabilities for each text alone, on a fresh copy of the model."""
    model, tok = load(path)
    with torch.no_grad():
        return [torch.softmax(model(**tok(t, return_tensors="pt")).logits[0, -1].float(), -1) for t in texts]


@pytest.mark.parametrize(("knockout", "layer", "head"), [("none", None, None), ("mlp", 1, None), ("head", 2, 1)])
def test_another_threads_forward_during_the_lens_is_neither_recorded_nor_knocked_out(
    tiny_gpt2: Path, knockout: str, layer: int | None, head: int | None
) -> None:
    """The worker builds a faster engine in a background thread that runs the same model (an export
    and a verification forward of 3 probe texts). Here such a forward runs, deterministically, in the
    middle of every lens forward, the knocked-out one included: /lens gets its own numbers, and the
    other thread's /nexttoken gets transformers' plain forward, never the knock-out."""
    from bot.inference.protocol import NextToken
    from bot.worker.tasks import next_token

    model, tok = load(tiny_gpt2)
    request = Lens(TEXTS[0], k=5, knockout=knockout, layer=layer, head=head)
    with torch.inference_mode():
        undisturbed = logit_lens(model, tok, [request])[0]
    main = threading.get_ident()
    answers: list[Any] = []

    def other_thread_forward(_module: Any, _inputs: Any) -> None:
        if threading.get_ident() != main:
            return

        def run() -> None:
            with torch.inference_mode():
                answers.append(next_token(model, tok, [NextToken(t, k=5) for t in PROBES]))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    # The last layer, so the lens's hooks on the earlier layers have already recorded this forward.
    interloper = model.base_model.h[-1].register_forward_pre_hook(other_thread_forward)
    try:
        with torch.inference_mode():
            got = logit_lens(model, tok, [request])[0]
    finally:
        interloper.remove()
    assert len(answers) == (1 if knockout == "none" else 2)  # one per lens forward
    assert got == undisturbed
    assert hooks_on(model) == []
    reference = plain_next_token(tiny_gpt2, PROBES)
    for answer in answers:
        for result, probs in zip(answer, reference, strict=True):
            top = torch.topk(probs, 5)
            assert [t.id for t in result.top] == top.indices.tolist()
            assert [t.prob for t in result.top] == pytest.approx(top.values.tolist(), abs=TOL)


@pytest.mark.parametrize("knockout", ["attention", "head"])
def test_a_lens_that_fails_mid_forward_leaves_the_model_whole(tiny_gpt2: Path, knockout: str) -> None:
    """A task cut in the middle of a knocked-out forward leaves no hook and no knock-out behind:
    the next /nexttoken on the same model equals transformers' plain forward."""
    from bot.inference.protocol import NextToken
    from bot.worker.tasks import next_token

    model, tok = load(tiny_gpt2)
    calls = itertools.count()

    def fail_in_the_knocked_forward(_module: Any, _inputs: Any) -> None:
        if next(calls) == 1:  # the lens's second forward: the one with the knock-out
            raise RuntimeError("cut")

    interloper = model.base_model.h[-1].register_forward_pre_hook(fail_in_the_knocked_forward)
    with pytest.raises(RuntimeError, match="cut"), torch.inference_mode():
        logit_lens(model, tok, [Lens(TEXTS[0], knockout=knockout, layer=1, head=2 if knockout == "head" else None)])
    interloper.remove()
    assert hooks_on(model) == []
    with torch.inference_mode():
        after = next_token(model, tok, [NextToken(t, k=5) for t in PROBES])
    for result, probs in zip(after, plain_next_token(tiny_gpt2, PROBES), strict=True):
        assert [t.prob for t in result.top] == pytest.approx(torch.topk(probs, 5).values.tolist(), abs=TOL)


# ----------------------------------------------------------------------------- what the table and layer 0 say


def layer_index(cell: str) -> int:
    return 0 if cell == "embeddings" else int(cell)


async def test_a_knockout_table_is_headed_as_the_unchanged_model_and_adds_the_knocked_probability(  # type: ignore[no-untyped-def]
    shared_app, tiny_llama: Path
) -> None:
    """The rows are the unchanged model's lens (said in the heading); the added column is the
    answer's probability through the lens in a model with that head's weights zeroed."""
    app = shared_app({"causal_lm": tiny_llama})
    prompt = TEXTS[0]
    plain = await app.execute_line(f"/lens prompt:{prompt}")
    cut = await app.execute_line(f"/lens prompt:{prompt} knockout:head layer:1 head:2")
    assert not cut.error, cut.text
    assert_fits_discord(cut)
    assert plain.table is not None and cut.table is not None
    assert "unchanged" not in " ".join(plain.table.headers) and len(plain.table.headers) == 3
    assert "unchanged model" in cut.table.headers[1] and "knocked out" in cut.table.headers[-1]
    assert "The table is the unchanged model's" in cut.text
    model, tok = load(tiny_llama)
    before = reference_lens(model, tok, prompt)
    after = reference_lens(zeroed(tiny_llama, "head", 1, 2), tok, prompt)
    answer = int(before[-1].argmax())
    assert cut.data["knocked_answer_probs"] == pytest.approx(after[:, answer].tolist(), abs=TOL)
    for row in cut.table.rows:
        n = layer_index(row[0])
        assert row[3] == probability(cut.data["knocked_answer_probs"][n])
    assert [row[:3] for row in cut.table.rows] == plain.table.rows


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "smollm_dir"])
async def test_layer_0_is_called_an_echo_only_when_the_config_ties_the_embeddings(  # type: ignore[no-untyped-def]
    app_factory, request: pytest.FixtureRequest, name: str
) -> None:
    path = request.getfixturevalue(name)
    app = app_factory({"causal_lm": path})
    prompt = TEXTS[0]
    reply = await app.execute_line(f"/lens prompt:{prompt}")
    assert not reply.error, reply.text
    model, tok = load(path)
    tied = bool(transformers.AutoConfig.from_pretrained(path).tie_word_embeddings)
    echoes = int(reference_lens(model, tok, prompt)[0].argmax()) == tok(prompt)["input_ids"][-1]
    said = "only echoes the last input token" in reply.text
    assert said == (tied and echoes)
    if said:
        assert "tie_word_embeddings" in reply.text and "not a prediction" in reply.text
