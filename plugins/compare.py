"""Topic "Autoregressive vs masked models": one sentence, read left-to-right and both ways."""

from __future__ import annotations

import functools
import logging
import math
import re
import unicodedata
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    MASK,
    Command,
    Context,
    Field,
    FillMask,
    Generate,
    Integer,
    ModelRole,
    NextToken,
    NoModelForRole,
    Reply,
    Request,
    Text,
    TokenProb,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.charts import bar_panels, render, token_label, token_text
from bot.render import probability
from plugins._timing import Spread, engine, interleaved, versus

TOPIC = Topic.load("plugins", "ar-vs-masked")  # plugins/data/topics/ar-vs-masked.toml

log = logging.getLogger(__name__)
TIMED_RUNS = 3  # warm runs of each model; median, fastest and slowest shown

WORD = re.compile(r"[\w'-]+")
LONG_HAN_RUN, HAN_WORD = 4, 2  # a longer run of kanji/hanzi is cut: its last 2 characters are hidden
NO_MASKED_LM = (
    "This server has no masked language model (a BERT-style model), so only the left-to-right side is shown. "
    "With one, you would see its guesses for the hidden word, made from the words on both sides."
)


def script(ch: str) -> str:
    """The script of a character, as far as finding words in text without spaces needs."""
    code = ord(ch)
    if 0x3040 <= code <= 0x309F:
        return "hiragana"
    if 0x30A0 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9F:
        return "katakana"
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if code == 0x3005 or unicodedata.name(ch, "").startswith("CJK "):  # 々 repeats the kanji before it
        return "han"
    return "other"


@dataclass(frozen=True)
class Unit:
    """A word-like unit of the text: a run of word characters in one script."""

    start: int
    end: int
    script: str
    split: bool  # cut out of a longer run of word characters (text without spaces)


def word_units(text: str) -> list[Unit]:
    """Words, with runs of word characters split where the script changes (東京|は|日本|の|首都),
    which is where words often begin in Japanese text written without spaces."""
    units = []
    for match in WORD.finditer(text):
        start = match.start()
        for position in range(match.start() + 1, match.end() + 1):
            if position == match.end() or script(text[position]) != script(text[start]):
                split = (start, position) != match.span()
                units.append(Unit(start, position, script(text[start]), split))
                start = position
    return units


def _hidden_span(unit: Unit) -> tuple[int, int]:
    """What of a unit is hidden: all of it, or the last characters of a long run of kanji/hanzi
    (Chinese is written without spaces or kana, and most of its words are two characters)."""
    if unit.script == "han" and unit.end - unit.start > LONG_HAN_RUN:
        return unit.end - HAN_WORD, unit.end
    return unit.start, unit.end


def default_hidden(text: str) -> tuple[int, int, str]:
    """(start, end, how it was chosen): the last word that has text before it. In text without
    spaces, the last run of kanji or katakana (content words; kana runs are mostly endings)."""
    units = [u for u in word_units(text) if text[: _hidden_span(u)[0]].strip()]
    if not units:
        raise UserError("The text needs a word with some text before it: the causal model reads only what comes first.")
    content = [u for u in units if u.script != "hiragana"] or units
    unit = content[-1]
    start, end = _hidden_span(unit)
    if not unit.split and (start, end) == (unit.start, unit.end):
        if text[start].isdigit():  # an amount keeps its sign: $6, 20%, €5
            if start > 1 and unicodedata.category(text[start - 1]) == "Sc" and text[: start - 1].strip():
                start -= 1
            if end < len(text) and text[end] == "%":
                end += 1
        return start, end, "the last word"
    how = "the text has no spaces, so "
    if unit.split:
        how += "words were split where the script changes (kanji, kana, Latin) and "
    if (start, end) != (unit.start, unit.end):
        how += (
            f"the last {HAN_WORD} characters of its last run of {unit.end - unit.start} kanji/hanzi are hidden "
            "(many such words are two characters long)"
        )
    else:
        how += "the last run of kanji or katakana is hidden" if unit.script != "hiragana" else "the last run is hidden"
    return start, end, how


def _cuts_a_word(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] starts or ends inside a space-separated word (``cat`` in ``concat``)."""

    def joined(a: str, b: str) -> bool:
        return bool(WORD.fullmatch(a + b)) and script(a) == script(b) == "other"

    return (start > 0 and joined(text[start - 1], text[start])) or (
        end < len(text) and joined(text[end - 1], text[end])
    )


def named_hidden(text: str, hide: str) -> tuple[int, int, str]:
    """(start, end, how): the last whole occurrence of ``hide`` that has text before it. Any
    span a student names may be hidden (``$10``, ``New York``), not only a word."""
    wanted = hide.strip()
    if not any(ch.isalnum() for ch in wanted):
        raise UserError("`hide` needs a letter or a digit: name a word of the text, e.g. its last word.")
    spans = [m.span() for m in re.finditer(re.escape(wanted), text, re.IGNORECASE)]
    if not spans:
        raise UserError("`hide` must be part of the text: name one of its words (or leave `hide` out).")
    whole = [s for s in spans if not _cuts_a_word(text, *s)]
    if not whole:
        raise UserError("`hide` only occurs inside a longer word of the text: name a whole word.")
    with_text_before = [s for s in whole if text[: s[0]].strip()]
    if not with_text_before:
        raise UserError("Hide a word that has some text before it, so the causal model has something to read.")
    start, end = with_text_before[-1]
    return start, end, "the part you named" + (" (its last occurrence)" if len(whole) > 1 else "")


@dataclass(frozen=True)
class HiddenWord(Request):
    """The hidden word's own probability after ``context`` (causal LM): its first token's probability
    and rank among every token, and the whole word's probability (all its tokens in turn)."""

    context: str
    continuation: str  # what follows the context: the gap before the word, then the word
    task: ClassVar[str] = "plugins.compare:hidden_word"

    def texts(self) -> list[str]:
        return [self.context + self.continuation]


@dataclass(frozen=True)
class HiddenWordResult:
    model: str
    first_prob: float  # P(first token of the word | context)
    first_rank: int  # 1 = the model's top guess
    word_prob: float  # P(every token of the word, in turn | context)
    tokens: int  # how many tokens the word takes here
    vocabulary: int
    first_id: int = -1  # the word's first token, to mark its bar among the top guesses
    first_raw: bytes = b""  # and its bytes, to label that bar when it is not among them


def hidden_word(model: Any, tokenizer: Any, batch: Sequence[HiddenWord]) -> list[HiddenWordResult]:
    """Runs in the worker, one text at a time (each is a single short forward)."""
    import torch

    from bot.worker.tasks import token_bytes

    results = []
    for request in batch:
        context = list(tokenizer(request.context)["input_ids"])
        full = list(tokenizer(request.context + request.continuation)["input_ids"])
        # Merges across the boundary are rare; the word's tokens are what follows the context's own.
        same = 0
        while same < min(len(context), len(full)) and context[same] == full[same]:
            same += 1
        start = min(same, len(context))
        word = full[start:] or full[-1:]
        ids = torch.tensor([context[:start] + word], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        steps = [logp[start - 1 + n, token] for n, token in enumerate(word)]
        first = logp[start - 1]
        first_prob = math.exp(float(steps[0]))  # float64: a float32 exp rounds tiny ones to 0
        rank = int((first > steps[0]).sum()) + 1
        results.append(
            HiddenWordResult(
                "",
                first_prob,
                rank,
                math.exp(float(torch.stack(steps).sum())),
                len(word),
                first.shape[-1],
                first_id=int(word[0]),
                first_raw=token_bytes(tokenizer, word[:1])[0],
            )
        )
    return results


@dataclass(frozen=True)
class MaskedHiddenWord(Request):
    """The hidden word's own probability at the one :data:`MASK` in ``text`` (masked LM): its first
    token's probability and rank among every token (one mask holds one token, as the top-k shown)."""

    text: str
    word: str
    task: ClassVar[str] = "plugins.compare:masked_hidden_word"
    role: ClassVar[str] = "masked_lm"

    def texts(self) -> list[str]:
        return [self.text, self.word]


@dataclass(frozen=True)
class MaskedHiddenWordResult:
    model: str
    first_token: str  # the word's first token in the masked LM's own vocabulary
    first_prob: float  # P(that token at the mask | both sides)
    first_rank: int  # 1 = the model's top guess
    tokens: int  # how many tokens the word takes in the masked LM's vocabulary
    vocabulary: int
    first_id: int = -1  # that token's id, to mark its bar among the top guesses


def masked_hidden_word(model: Any, tokenizer: Any, batch: Sequence[MaskedHiddenWord]) -> list[MaskedHiddenWordResult]:
    """Runs in the worker: one padded forward for the batch, as ``fill_mask``."""
    import torch

    texts = [r.text.replace(MASK, tokenizer.mask_token) for r in batch]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()
    results = []
    for row, request in enumerate(batch):
        position = int((enc["input_ids"][row] == tokenizer.mask_token_id).nonzero()[0, 0])
        logp = torch.log_softmax(logits[row, position], dim=-1)
        pieces = list(tokenizer(request.word.strip(), add_special_tokens=False)["input_ids"]) or [
            int(tokenizer.unk_token_id)
        ]
        first = pieces[0]
        results.append(
            MaskedHiddenWordResult(
                "",
                str(tokenizer.convert_ids_to_tokens(first)),
                math.exp(float(logp[first])),
                int((logp > logp[first]).sum()) + 1,
                len(pieces),
                int(logp.shape[-1]),
                first_id=int(first),
            )
        )
    return results


HIDDEN_MARK = "hidden: "
GUESSES_AXIS = (
    "probability of the model's top guesses for the hidden position; "
    "the bar marked “hidden:” is the hidden word's first token"
)


def with_hidden_bar(
    labels: list[str], probs: list[float], ids: Sequence[int], hidden_id: int, hidden: str, prob: float, rank: int
) -> tuple[list[str], list[float]]:
    """The top guesses' bars with the hidden word's first token marked: its own bar when it is
    among them, else one more bar below them with its rank (what the text says, drawn)."""
    if hidden_id in ids:
        at = list(ids).index(hidden_id)
        return [HIDDEN_MARK + label if n == at else label for n, label in enumerate(labels)], probs
    return [*labels, f"hidden (#{rank:,}): {hidden}"], [*probs, prob]


def short(model: str) -> str:
    """A model's name without the note in brackets, for chart titles."""
    return model.split(" (")[0][:40]


class _Warm:
    """Which model roles each inference service has already answered in this process."""

    def __init__(self) -> None:
        self._roles: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    def roles(self, service: Any) -> set[str]:
        try:
            return self._roles.setdefault(service, set())
        except TypeError:  # a service that cannot be weakly referenced: warm up every time
            return set()


WARM = _Warm()


async def timed(ctx: Context, request: Request) -> tuple[Any, Spread]:
    """A request's result and its times over :data:`TIMED_RUNS` runs with the model already loaded (warm).

    The first request of a role loads the model, which takes far longer than the work
    itself; that request is sent once untimed, so the two sides compare like with like.
    """
    role = type(request).role or ""
    # ctx.inference is a per-user view of the app's one shared service: the models live there.
    warm = WARM.roles(getattr(ctx.app, "inference", None) or ctx.inference)
    if role not in warm:
        await ctx.inference.submit(request)
        warm.add(role)
    (result,), (spread,) = await interleaved([functools.partial(ctx.inference.submit, request)], TIMED_RUNS)
    return result, spread


def token_record(token: TokenProb) -> dict[str, Any]:
    return {"id": token.id, "token": token_text(token.token, token.raw), "bytes": token.raw.hex(), "prob": token.prob}


def continuation_text(text: str) -> str:
    # A continuation cut at its token limit can end inside a character: drop that half.
    return text.rstrip("\ufffd").strip()


@command(
    "compare",
    "One sentence through a causal LM and a masked LM, side by side",
    topic=TOPIC.slug,
    options=[
        Text("text", "A sentence; one word of it is hidden from both models", max_length=500),
        Text("hide", "The word to hide (default: the last word)", required=False, max_length=50),
        Integer("k", "How many guesses to show", default=5, min_value=1, max_value=10),
    ],
)
async def compare(ctx: Context, text: str, hide: str | None, k: int) -> Reply:
    start, end, how = named_hidden(text, hide) if hide else default_hidden(text)
    left, word, right = text[:start], text[start:end], text[end:]
    fields: list[Field] = []
    panels: list[tuple[str, list[str], list[float]]] = []
    data: dict[str, Any] = {"hidden": word, "left": left, "right": right, "chosen": how}

    # One forward pass each, timed warm; the continuation is extra, untimed work.
    causal, causal_s = await timed(ctx, NextToken(left.rstrip(), k=k))
    continuation = await ctx.inference.submit(Generate(left.rstrip(), max_new_tokens=20))
    continued = continuation_text(continuation.text)
    causal_labels = [token_label(t.token, t.raw) for t in causal.top]
    fields.append(Field("causal LM guesses", ", ".join(causal_labels)))
    context = left.rstrip()
    own: HiddenWordResult = await ctx.inference.submit(HiddenWord(context, left[len(context) :] + word))
    panels.append(
        (
            f"{short(causal.model)} reads left to right: “…{left.rstrip()[-25:]}”",
            *with_hidden_bar(
                causal_labels,
                [t.prob for t in causal.top],
                [t.id for t in causal.top],
                own.first_id,
                token_label("", own.first_raw),
                own.first_prob,
                own.first_rank,
            ),
        )
    )
    fields.append(
        Field(
            f"the hidden word “{word[:40]}” itself, for the causal LM",
            f"first token: probability {probability(own.first_prob)}, rank {own.first_rank:,} of "
            f"{own.vocabulary:,} tokens"
            + (
                f"; the whole word ({own.tokens} tokens): {probability(own.word_prob)}"
                if own.tokens > 1
                else " (the word is one token)"
            ),
            inline=False,
        )
    )
    fields.append(
        # Quoted, line breaks as ⏎: the model's words must not read as the bot's own lines.
        Field(
            "causal LM continues the text before the hidden word with",
            f"“{continued[:1000].replace(chr(10), '⏎')}”" if continued else "∅",
            inline=False,
        )
    )
    data["causal"] = {
        "model": causal.model,
        "top": [token_record(t) for t in causal.top],
        "continuation": continued,
        "hidden_first_token_prob": own.first_prob,
        "hidden_first_token_rank": own.first_rank,
        "hidden_word_prob": own.word_prob,
        "hidden_word_tokens": own.tokens,
        "seconds": causal_s.median,
        "runs_ms": [t * 1000 for t in causal_s.runs],
        "warm": True,
    }

    masked_s = None
    try:
        masked, masked_s = await timed(ctx, FillMask(f"{left}{MASK}{right}", k=k))
    except NoModelForRole as missing:
        log.warning("/compare shows the causal side only: %s", missing)
        fields.append(Field("masked LM", NO_MASKED_LM, inline=False))
        data["masked"] = {"error": NO_MASKED_LM, "missing_role": "masked_lm"}
    else:
        top = masked.masks[0].top if masked.masks else []
        masked_labels = [token_label(t.token, t.raw) for t in top]
        fields.append(Field("masked LM guesses", ", ".join(masked_labels) or "∅"))
        wanted = word.strip().casefold()
        place = next((n for n, t in enumerate(top, 1) if token_text(t.token, t.raw).strip().casefold() == wanted), None)
        mine: MaskedHiddenWordResult = await ctx.inference.submit(MaskedHiddenWord(f"{left}{MASK}{right}", word))
        panels.append(
            (
                f"{short(masked.model)} reads both sides",
                *with_hidden_bar(
                    masked_labels,
                    [t.prob for t in top],
                    [t.id for t in top],
                    mine.first_id,
                    token_label(mine.first_token),
                    mine.first_prob,
                    mine.first_rank,
                ),
            )
        )
        fields.append(
            Field(
                f"the hidden word “{word[:40]}” itself, for the masked LM",
                (
                    f"probability {probability(mine.first_prob)}, rank {mine.first_rank:,} of {mine.vocabulary:,} "
                    "tokens (the word is one token here)"
                    if mine.tokens == 1
                    else f"it is {mine.tokens} tokens here and one mask holds one: its first token "
                    f"“{mine.first_token}” has probability {probability(mine.first_prob)}, rank "
                    f"{mine.first_rank:,} of {mine.vocabulary:,} tokens"
                )
                + (f"; guess {place} of the top {k} above" if place is not None else ""),
                inline=False,
            )
        )
        data["masked"] = {
            "model": masked.model,
            "top": [token_record(t) for t in top],
            "hidden_first_token": mine.first_token,
            "hidden_first_token_prob": mine.first_prob,
            "hidden_first_token_rank": mine.first_rank,
            "hidden_word_tokens": mine.tokens,
            "seconds": masked_s.median,
            "runs_ms": [t * 1000 for t in masked_s.runs],
            "warm": True,
        }
    timing = f"causal {causal_s.text()} on {engine(causal.model)}" + (
        f", masked {masked_s.text()} on {engine(masked.model)}" if masked_s else ""
    )
    passes = "one forward pass each" if masked_s else "one forward pass"
    verdict = f" {versus('The causal model', causal_s, 'The masked model', masked_s)}" if masked_s else ""
    # Two different models on two different inputs: the times are what each costs here, not a race
    # between the two ways of reading.
    caveat = (
        " These are two different models (their own sizes) on different inputs (the text before the word; the whole "
        "text with one mask), so these say what each costs here, not which way of reading is faster."
        if masked_s
        else ""
    )
    fields.append(
        Field("time (warm)", f"{timing}: {passes}, models already loaded.{verdict}{caveat}", inline=False)
    )
    chart = await render(bar_panels, panels, xlabel=GUESSES_AXIS, filename="compare.png")
    data["chart"] = {
        "xlabel": GUESSES_AXIS,
        "panels": [{"title": title, "labels": labels, "probs": probs} for title, labels, probs in panels],
    }
    return Reply(
        title="Left-to-right vs both ways",
        text=(
            f"Hidden word: “{word}” ({how}). The causal model reads only the text before it and continues it; "
            "the masked model reads both sides."
        ),
        fields=fields,
        images=[chart],
        data=data,
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(compare)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
    register("masked_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
