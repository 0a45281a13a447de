"""Topic "LLMs vs classical statistical models": a counted n-gram model beside a neural one."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.resources import files

from bot import (
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    Number,
    Reply,
    Score,
    Table,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.charts import bar_chart, render

TOPIC = Topic.load("plugins", "ngrams")  # plugins/data/topics/ngrams.toml

START, END, UNKNOWN = "<s>", "</s>", "<unk>"
WORD = re.compile(r"[\w']+|[.,!?;:]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
DEFAULT_CONTEXT = "the cat sat on the"
DEFAULT_HELDOUT = "The dog sat on the warm mat by the window."


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def sentences(text: str) -> list[list[str]]:
    return [w for s in SENTENCE_END.split(text.strip()) if (w := words(s))]


@dataclass
class NgramModel:
    """Counts of each word after each (n-1)-word context, with add-k smoothing."""

    n: int
    k: float
    counts: dict[tuple[str, ...], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    vocab: set[str] = field(default_factory=set)

    @classmethod
    def fit(cls, corpus: Iterable[list[str]], n: int, k: float) -> NgramModel:
        model = cls(n, k)
        for sentence in corpus:
            padded = [START] * (n - 1) + sentence + [END]
            model.vocab.update([*sentence, END])
            for i in range(n - 1, len(padded)):
                model.counts[tuple(padded[i - n + 1 : i])][padded[i]] += 1
        model.vocab.add(UNKNOWN)  # every unseen word maps here, so it has a (smoothed) probability
        return model

    def prob(self, context: tuple[str, ...], word: str) -> float:
        word = word if word in self.vocab else UNKNOWN
        seen = self.counts.get(context, Counter())
        return (seen[word] + self.k) / (sum(seen.values()) + self.k * len(self.vocab))

    def next_words(self, context: tuple[str, ...], top: int) -> list[tuple[str, int, float]]:
        seen = self.counts.get(context, Counter())
        ranked = sorted(self.vocab, key=lambda w: (-seen[w], w))[:top]
        return [(w, seen[w], self.prob(context, w)) for w in ranked]

    def sentence_logprob(self, sentence: list[str]) -> float:
        """Natural-log probability of the sentence's words (the end marker not counted)."""
        padded = [START] * (self.n - 1) + sentence
        return sum(
            math.log(self.prob(tuple(padded[i - self.n + 1 : i]), padded[i])) for i in range(self.n - 1, len(padded))
        )


@functools.cache
def builtin_corpus() -> str:
    return files("plugins").joinpath("data/corpus.txt").read_text(encoding="utf-8")


@command(
    "ngram",
    "A counted n-gram model's next words and perplexity, beside the neural LM's",
    topic=TOPIC.slug,
    options=[
        Text("context", "Words to continue (the last n-1 are used)", default=DEFAULT_CONTEXT, max_length=200),
        Integer("n", "Order of the model: 2 (bigram) to 5", default=2, min_value=2, max_value=5),
        Text("text", "Text to count (default: the bot's small built-in corpus)", required=False, max_length=4000),
        Text("sentence", "Held-out sentence to score with both models", default=DEFAULT_HELDOUT, max_length=300),
        Number("smoothing", "k for add-k smoothing", default=1.0, min_value=0.001, max_value=10.0),
    ],
)
async def ngram(ctx: Context, context: str, n: int, text: str | None, sentence: str, smoothing: float) -> Reply:
    corpus = sentences(text if text is not None else builtin_corpus())
    if not corpus:
        raise UserError("The text has no words to count.")
    model = NgramModel.fit(corpus, n, smoothing)
    context_words = words(context)
    if len(context_words) < n - 1:
        raise UserError(f"A {n}-gram model needs at least {n - 1} context words; `context` has {len(context_words)}.")
    key = tuple(context_words[-(n - 1) :])
    top = model.next_words(key, 10)
    held = words(sentence)
    if not held:
        raise UserError("The held-out `sentence` has no words.")
    ngram_ppl = math.exp(-model.sentence_logprob(held) / len(held))
    scored = await ctx.inference.submit(Score(sentence))
    neural_logprob = sum(scored.logprobs)
    neural_word_ppl = math.exp(-neural_logprob / len(held))
    neural_token_ppl = math.exp(-neural_logprob / len(scored.logprobs))
    seen = sum(model.counts.get(key, Counter()).values())
    chart = await render(
        bar_chart,
        [w for w, _, _ in top],
        [p for _, _, p in top],
        title=f"{n}-gram: next word after “{' '.join(key)}”",
        xlabel=f"probability (add-{smoothing:g} smoothing)",
        filename="ngram.png",
    )
    return Reply(
        title=f"{n}-gram model vs {scored.model}",
        text=(
            f"Counted {sum(len(s) for s in corpus)} words in {len(corpus)} sentences "
            f"({len(model.vocab)} word types). “{' '.join(key)}” was seen {seen} times."
        ),
        table=Table(["next word", "count", "probability"], [[w, str(c), f"{p:.4f}"] for w, c, p in top], align="lrr"),
        fields=[
            Field("held-out sentence", sentence, inline=False),
            Field(f"{n}-gram perplexity", f"{ngram_ppl:.1f} per word"),
            Field("neural perplexity", f"{neural_word_ppl:.1f} per word ({neural_token_ppl:.1f} per token)"),
        ],
        images=[chart],
        data={
            "n": n,
            "smoothing": smoothing,
            "context": list(key),
            "context_count": seen,
            "next": [{"word": w, "count": c, "prob": p} for w, c, p in top],
            "vocab_size": len(model.vocab),
            "ngram_perplexity": ngram_ppl,
            "neural_model": scored.model,
            "neural_logprob": neural_logprob,
            "neural_perplexity_per_word": neural_word_ppl,
            "neural_perplexity_per_token": neural_token_ppl,
            "heldout_words": held,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(ngram)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
