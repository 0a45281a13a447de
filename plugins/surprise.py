"""Beyond topic "LLMs vs classical statistical models": how surprised a language model is
by each token of a text (its surprisal, −log₂ p), and the same text under the n-gram model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Boolean,
    CodeBlock,
    Command,
    Context,
    Field,
    ModelRole,
    Reply,
    Request,
    Segment,
    Table,
    Text,
    UserError,
    command,
    hookimpl,
)
from bot.charts import render, shaded_text, show_bytes
from bot.render import probability
from plugins.ngram import UNKNOWN, Comparison, NgramModel, amount, builtin_corpus, compare_with_neural, sentences

LN2 = math.log(2)
MAX_TOKENS = 120  # one chart of shaded text, and a reply that fits Discord
TOP = 5  # most surprising tokens listed
NGRAM_ORDER, NGRAM_SMOOTHING = 2, 1.0  # /ngram's defaults: a bigram model, add-one smoothing
# Surprisal bands (bits): (upper bound, console colour, the marks around a token in the text, meaning).
# The marks say the band where no colour shows (a pipe, NO_COLOR, Discord on a phone).
BANDS: tuple[tuple[float, str | None, tuple[str, str], str], ...] = (
    (2.0, "green", ("", ""), "under 2 bits (expected)"),
    (6.0, None, ("", ""), "2–6"),
    (12.0, "yellow", ("‹", "›"), "6–12"),
    (math.inf, "red", ("«", "»"), "12 or more (rarer than 1 in 4,096)"),
)
MARKS_LINE = "In the text below, ‹…› marks a token of 6–12 bits and «…» one of 12 bits or more (a space token as ␣)."


@dataclass(frozen=True)
class Surprisal(Request):
    """ln p of each token of ``text`` given the tokens before it (the first after the document start)."""

    text: str
    max_tokens: int = MAX_TOKENS
    task: ClassVar[str] = "plugins.surprise:surprisal"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class SurprisalResult:
    model: str
    ids: list[int]
    raw: list[bytes]  # each token's bytes
    logprobs: list[float]  # natural log of each token's probability, given everything before it
    expected: list[bytes]  # the model's likeliest token at each position
    expected_probs: list[float]  # and its probability
    problem: str = ""  # why nothing was computed (too long); shown to the user


def surprisal(model: Any, tokenizer: Any, batch: Sequence[Surprisal]) -> list[SurprisalResult]:
    """Runs in the worker: one left-padded forward for the batch (position ids count real
    tokens only, so each text gets the numbers it gets alone)."""
    import inspect

    import torch

    from bot.worker.tasks import document_start_id, token_bytes

    start = document_start_id(tokenizer)
    texts = [list(tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in batch]
    results: list[SurprisalResult | None] = [None] * len(batch)
    live = []
    for index, (request, ids) in enumerate(zip(batch, texts, strict=True)):
        if len(ids) > request.max_tokens:
            problem = f"That text is {len(ids)} tokens; /surprise scores at most {request.max_tokens}."
            results[index] = SurprisalResult("", [], [], [], [], [], problem)
        elif not ids:
            results[index] = SurprisalResult("", [], [], [], [], [], "That text gives the model no tokens to read.")
        else:
            live.append(index)
    if live:
        rows = [[start, *texts[i]] for i in live]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(**kwargs).logits.float(), dim=-1)
        for b, i in enumerate(live):
            ids = texts[i]
            n = len(ids)
            # Row position p predicts the token at p + 1; the text's tokens fill the last n columns.
            predicting = logp[b, width - n - 1 : width - 1]
            chosen = predicting.gather(-1, torch.tensor(ids, device=model.device).unsqueeze(-1)).squeeze(-1)
            best_logp, best_ids = predicting.max(dim=-1)
            best = [int(t) for t in best_ids.tolist()]
            results[i] = SurprisalResult(
                model="",
                ids=ids,
                raw=token_bytes(tokenizer, ids),
                logprobs=chosen.tolist(),
                expected=token_bytes(tokenizer, best),
                expected_probs=[math.exp(v) for v in best_logp.tolist()],
            )
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- the command


def as_text(raw: bytes) -> str:
    """A token as it reads in running text (spaces kept); ⟨hex⟩ when it is part of a character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return show_bytes(raw)


def band(bits: float) -> str | None:
    return next(colour for bound, colour, _, _ in BANDS if bits < bound)


def marked(piece: str, bits: float) -> str:
    """``piece`` inside its band's marks (a leading or trailing space stays outside them; a token
    of spaces only is written as ␣, or a 10-bit space would go unmarked)."""
    opening, closing = next(marks for bound, _, marks, _ in BANDS if bits < bound)
    core = piece.strip(" ")
    if not opening or not piece:
        return piece
    if not core:  # a token of spaces only: shown as ␣ so its marks have something to hold
        return f"{opening}{'␣' * len(piece)}{closing}"
    start = piece.index(core[0])
    return f"{piece[:start]}{opening}{core}{closing}{piece[start + len(core) :]}"


def coloured(pieces: Sequence[str], bits: Sequence[float]) -> list[Segment]:
    """Segments coloured and marked by surprisal band; neighbours of one colour share a segment."""
    segments: list[Segment] = []
    for raw_piece, value in zip(pieces, bits, strict=True):
        colour, piece = band(value), marked(raw_piece, value)
        if segments and segments[-1].colour == colour:
            segments[-1] = Segment(segments[-1].text + piece, colour)
        else:
            segments.append(Segment(piece, colour))
    return segments


@dataclass(frozen=True)
class NgramScores:
    words: list[str]
    bits: list[float]
    unknown: list[str]
    perplexity: float  # per word, as /ngram computes it
    model: NgramModel
    comparison: Comparison  # whether this perplexity can be set beside the neural model's (never a plain yes)


def ngram_scores(text: str) -> NgramScores | None:
    """The text scored word by word by /ngram's bigram model on its built-in corpus."""
    corpus = sentences(builtin_corpus())
    model = NgramModel.fit(corpus, NGRAM_ORDER, NGRAM_SMOOTHING)
    held = sentences(text)
    found = [word for sentence in held for word in sentence]
    if not found:
        return None
    steps = model.held_out_steps(held)  # as /ngram scores its held-out text; add-one: no probability is 0
    bits = [-math.log2(step.prob) for step in steps]
    unknown = sorted({step.word for step in steps if step.scored_as == UNKNOWN})
    perplexity = 2 ** (sum(bits) / len(found))
    return NgramScores(found, bits, unknown, perplexity, model, compare_with_neural(model, held, corpus))


@command(
    "surprise",
    "How surprised the language model is by each token of a text (surprisal in bits)",
    topic="ngrams",
    options=[
        Text("text", f"The text to score (at most {MAX_TOKENS} tokens)", max_length=400),
        Boolean("ngram", "Also score it word by word with the n-gram model of /ngram", default=False),
    ],
)
async def surprise(ctx: Context, text: str, ngram: bool) -> Reply:
    result = await ctx.inference.submit(Surprisal(text))
    if result.problem:
        raise UserError(result.problem)
    bits = [-lp / LN2 for lp in result.logprobs]
    pieces = [as_text(raw) for raw in result.raw]
    mean_bits = sum(bits) / len(bits)
    perplexity = 2**mean_bits
    ranked = sorted(range(len(bits)), key=lambda i: -bits[i])[:TOP]
    rows = [
        [
            str(i + 1),
            show_bytes(result.raw[i]),
            f"{bits[i]:.1f}",
            f"{math.exp(result.logprobs[i]):.2g}",
            f"{show_bytes(result.expected[i])} ({probability(result.expected_probs[i])})",
        ]
        for i in ranked
    ]
    lines = [
        f"Surprisal is −log₂ p: how many bits of surprise each token gives {short(result.model)}. One bit is a "
        "coin flip (p = ½); 10 bits is a 1-in-1,024 event. The model reads left to right, so each token is "
        "scored from the ones before it (the first one after a start-of-text token: how likely a document "
        "is to begin with it).",
        f"Perplexity {perplexity:.1f} per token (2 to the average surprisal, {mean_bits:.2f} bits): on average "
        f"the model was as unsure as choosing among {perplexity:,.1f} equally likely tokens. Lower is better.",
        "Surprise bands (the chart's colour bar): "
        + ", ".join(meaning for _, _, _, meaning in BANDS)
        + ". "
        + MARKS_LINE,
    ]
    fields = [Field("tokens", str(len(bits))), Field("perplexity", f"{perplexity:.1f} per token")]
    panels = [(f"{short(result.model)}: surprisal of each token (bits)", pieces, bits)]
    segments = coloured(pieces, bits)
    data: dict[str, Any] = {
        "model": result.model,
        "ids": result.ids,
        "tokens": [show_bytes(raw) for raw in result.raw],
        "bits": bits,
        "perplexity_per_token": perplexity,
        "most_surprising": [{"position": i + 1, "token": show_bytes(result.raw[i]), "bits": bits[i]} for i in ranked],
    }
    if ngram:
        scored = ngram_scores(text)
        if scored is None:
            lines.append("The n-gram model finds no words in that text to score.")
            data["ngram"] = None
        else:
            neural_per_word = math.exp(-sum(result.logprobs) / len(scored.words))
            lines.append(
                f"The {NGRAM_ORDER}-gram model of /ngram (counted from its small built-in corpus) scores the same "
                f"text word by word: perplexity {amount(scored.perplexity)} per word, against "
                f"{amount(neural_per_word)} per word for {short(result.model)}. "
                "It only knows the words it counted, and only one word back."
            )
            lines.append("Can the two be compared? " + scored.comparison.answer(scored.model))
            fields.append(Field(f"{NGRAM_ORDER}-gram perplexity", f"{amount(scored.perplexity)} per word"))
            fields.append(Field("neural perplexity", f"{amount(neural_per_word)} per word"))
            if scored.unknown:
                unknown = ", ".join(scored.unknown)
                fields.append(Field("unknown to the n-gram model (scored as <unk>)", unknown[:1000], inline=False))
            panels.append(
                (
                    f"{NGRAM_ORDER}-gram model: surprisal of each word (bits), "
                    + (
                        "not comparable with the row above (see the text)"
                        if scored.comparison.verdict == "no"
                        else "per word, not per token: only partly comparable"
                    ),
                    [f" {w}" for w in scored.words],
                    scored.bits,
                )
            )
            segments += [Segment(f"\n\n{NGRAM_ORDER}-gram, word by word:\n")]
            segments += coloured([f"{w} " for w in scored.words], scored.bits)
            data["ngram"] = {
                "order": NGRAM_ORDER,
                "smoothing": NGRAM_SMOOTHING,
                "words": scored.words,
                "bits": scored.bits,
                "unknown": scored.unknown,
                "perplexity_per_word": scored.perplexity,
                "neural_perplexity_per_word": neural_per_word,
                "comparable": scored.comparison.verdict,  # "no" or "partly", never a plain yes
                "not_comparable_because": scored.comparison.reasons,
                "counted_ngrams": scored.comparison.counted,
                "heldout_ngrams": scored.comparison.ngrams,
            }
    # The colour bar ends at a whole number of bits past the largest value, so its last tick reads 27, not 26.0878.
    top_bits = math.ceil(max(max(values) for _, _, values in panels) + 1e-9)
    chart = await render(
        shaded_text,
        panels,
        colorbar="surprisal (bits): −log₂ p",
        filename="surprise.png",
        bounds=[bound for bound, _, _, _ in BANDS if math.isfinite(bound)],
        vmax=max(1, top_bits),
    )
    return Reply(
        title=f"Surprise: {short(result.model)} reads your text",
        text="\n".join(lines),
        fields=fields,
        table=Table(["position", "token", "bits", "p", "model expected"], rows, align="rlrrl"),
        code=CodeBlock(segments),
        images=[chart],
        data=data,
    )


def short(model: str) -> str:
    return model.split(" (")[0][:40]


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(surprise)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
