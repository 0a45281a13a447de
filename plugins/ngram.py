"""Topic "LLMs vs classical statistical models": a counted n-gram model beside a neural one."""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
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
from bot.render import plural

TOPIC = Topic.load("plugins", "ngrams")  # plugins/data/topics/ngrams.toml

START, END, UNKNOWN = "<s>", "</s>", "<unk>"
# Scripts written without spaces between words (Chinese, Japanese): each character counts as a word.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
MODIFIERS = "\ufe0e\ufe0f\U0001f3fb-\U0001f3ff"  # emoji presentation and skin-tone selectors
# A word is a run of letters and digits (apostrophes inside it allowed); every other visible
# character (punctuation, $, %, an emoji with its modifiers) is a word of its own. Nothing but
# spaces is left out, so the n-gram model scores the same text the neural model does.
WORD = re.compile(
    rf"[{CJK}]|[^\W{CJK}]+(?:['’][^\W{CJK}]+)*|[^\w\s{MODIFIERS}\u200d](?:[{MODIFIERS}]|\u200d[^\w\s])*|\S"
)
HAS_CJK = re.compile(rf"[{CJK}]")
# A sentence ends at . ! or ? before a space, or at the full-width 。！？ (no space follows those).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
DEFAULT_CONTEXT = "the cat sat on the"
DEFAULT_HELDOUT = "The dog sat on the warm mat by the window."
TOP = 10
PERPLEXITY_LINE = (
    "Perplexity: roughly how many equally likely words a model is choosing between at each step; lower is better."
)
MARKERS_LINE = (
    f"{START} marks the start of a sentence and {END} its end; {UNKNOWN} stands for every word the counted "
    "text never had."
)
CJK_LINE = "Chinese and Japanese are written without spaces, so each of their characters counts as one word here."
UNIT = "per word ({count}; punctuation and symbols count as words)"


def words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFC", text).lower())


def sentences(text: str) -> list[list[str]]:
    return [w for s in SENTENCE_END.split(text.strip()) if (w := words(s))]


def amount(value: float) -> str:
    """A perplexity as a student can read it: 36.8, 12,345.6, or 1.24e14 when it is huge."""
    if value < 1_000_000:
        return f"{value:,.1f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count:,} times")


def quoted(parts: Iterable[str]) -> str:
    return "“" + " ".join(clipped(part, 40) for part in parts) + "”"


@dataclass(frozen=True)
class Step:
    """One held-out word as the n-gram model scores it."""

    context: tuple[str, ...]
    word: str
    scored_as: str  # the word itself, or <unk> when it never occurs in the counted text
    count: int
    total: int
    prob: float


@dataclass
class NgramModel:
    """Counts of each word after each (n-1)-word context; add-k smoothing, or none when k is 0."""

    n: int
    k: float
    counts: dict[tuple[str, ...], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    word_types: set[str] = field(default_factory=set)  # the words of the counted text, no markers

    @classmethod
    def fit(cls, corpus: Iterable[list[str]], n: int, k: float) -> NgramModel:
        model = cls(n, k)
        for sentence in corpus:
            padded = [START] * (n - 1) + sentence + [END]
            model.word_types.update(sentence)
            for i in range(n - 1, len(padded)):
                model.counts[tuple(padded[i - n + 1 : i])][padded[i]] += 1
        return model

    @property
    def vocab(self) -> set[str]:
        """Every outcome a next word can be: the word types, the end of the sentence, and <unk>
        (where every word the counted text never had goes), so unseen words are not impossible
        under smoothing."""
        return self.word_types | {END, UNKNOWN}

    def count_total(self, context: tuple[str, ...], word: str) -> tuple[int, int]:
        seen = self.counts.get(context)
        return (seen[word], seen.total()) if seen else (0, 0)

    def prob(self, context: tuple[str, ...], word: str) -> float:
        """P(word | context) = (count + k) / (total + k·V); with k = 0 a context never seen has
        no counts at all, and every word after it gets 0 (the counts say nothing)."""
        count, total = self.count_total(context, word if word in self.vocab else UNKNOWN)
        denominator = total + self.k * len(self.vocab)
        return (count + self.k) / denominator if denominator > 0 else 0.0

    def next_words(self, context: tuple[str, ...], top: int) -> list[tuple[str, int, float]]:
        seen = self.counts.get(context, Counter())
        # Unsmoothed, a word never counted after the context has probability 0: not worth a row.
        candidates = self.vocab if self.k > 0 else set(seen)
        ranked = sorted(candidates, key=lambda w: (-seen[w], w))[:top]
        return [(w, seen[w], self.prob(context, w)) for w in ranked]

    def steps(self, sentence: list[str]) -> list[Step]:
        """Each word of the sentence with its context, counts and probability (the end marker not scored)."""
        padded = [START] * (self.n - 1) + sentence
        out = []
        for i in range(self.n - 1, len(padded)):
            context, word = tuple(padded[i - self.n + 1 : i]), padded[i]
            scored_as = word if word in self.word_types else UNKNOWN
            count, total = self.count_total(context, scored_as)
            out.append(Step(context, word, scored_as, count, total, self.prob(context, word)))
        return out

    def held_out_steps(self, held: list[list[str]]) -> list[Step]:
        """Steps of held-out text, sentence by sentence: each starts after <s>, as the counts were
        made, not after the previous sentence's full stop (which the counted text never continues)."""
        return [step for sentence in held for step in self.steps(sentence)]

    def sentence_logprob(self, sentence: list[str]) -> float:
        """Natural-log probability of the sentence's words; -inf when one of them has probability 0."""
        probs = [s.prob for s in self.steps(sentence)]
        return -math.inf if min(probs, default=1.0) == 0 else sum(math.log(p) for p in probs)


END_PUNCTUATION = frozenset(".!?。！？…")


@dataclass(frozen=True)
class Comparison:
    """Whether the n-gram model's per-word perplexity on held-out text can be set beside a neural
    model's. Never a plain yes: at best the unit is the same (per word) but the two still choose
    among different things."""

    verdict: str  # "no" (unknown words, or memorised text) or "partly" (same unit, not like with like)
    reasons: list[str]  # why not comparable (empty for "partly")
    counted: int  # held-out n-grams (each word with the n-1 before it) that occur in the counted text
    ngrams: int  # held-out n-grams in all
    memorised: int  # held-out sentences whose words run word for word inside the counted text

    def answer(self, model: NgramModel) -> str:
        """The "can the two be compared?" answer, in one paragraph."""
        n = model.n
        counted = (
            f"{self.counted} of {plural(self.ngrams, f'held-out {n}-gram')} (each word with the "
            f"{'word' if n == 2 else f'{n - 1} words'} before it, {START} at a sentence start) "
            f"{'was' if self.counted == 1 else 'were'} counted in the text."
        )
        if self.verdict == "no":
            return f"No: {' '.join(self.reasons)} {counted}"
        return (
            "Partly: same unit (per word), but not like with like. The n-gram model chooses each word among "
            f"only {len(model.vocab):,} outcomes (its own lower-cased word types, {END} and {UNKNOWN}), while "
            "the neural model spells each word out of its whole vocabulary and must get capitals right, so "
            f"its task is harder. {counted}"
            + (
                # Not "memorised" (the sentence is new as a whole), but no step needed more than a count.
                " Every one was: no step of it is new to the n-gram model, which favours it further."
                if self.ngrams and self.counted == self.ngrams
                else ""
            )
        )


def run_inside(words_: Sequence[str], counted: Sequence[Sequence[str]]) -> bool:
    """Whether ``words_`` occurs as a run of consecutive words inside one counted sentence."""
    size = len(words_)
    return any(
        list(sentence[i : i + size]) == list(words_) for sentence in counted for i in range(len(sentence) - size + 1)
    )


def compare_with_neural(model: NgramModel, held: list[list[str]], corpus: list[list[str]]) -> Comparison:
    """Why the n-gram model's perplexity on ``held`` cannot be set beside a neural model's: words it
    never counted (all lumped into one cheap <unk> outcome), and held-out sentences whose words
    (end punctuation aside) run word for word inside the counted text (scored by recall, not
    generalisation); and how many held-out n-grams the counts hold. Every reply that shows the two
    perplexities side by side says this."""
    flat = [w for sentence in held for w in sentence]
    unseen = [w for w in flat if w not in model.word_types]
    reasons = []
    if unseen:
        reasons.append(
            f"{len(unseen)} held-out {'word is' if len(unseen) == 1 else 'words are'} unknown to the n-gram model: "
            f"it chooses among only {len(model.vocab):,} outcomes and lumps every unseen word into {UNKNOWN}, "
            "while the neural model must spell each word out of its whole vocabulary. "
            "Its perplexity looks better than it is, so the two are not comparable."
        )
    # Without its end punctuation, and at least two words long (one counted word is no memory of a sentence).
    cores = [s[:-1] if s and s[-1] in END_PUNCTUATION else s for s in held]
    memorised = [core for core in cores if len(core) >= 2 and run_inside(core, corpus)]
    if memorised:
        one = len(memorised) == 1
        which = (
            "The held-out sentence is"
            if len(held) == 1
            else f"{len(memorised)} of the {len(held)} held-out sentences {'is' if one else 'are'}"
        )
        reasons.append(
            f"{which} itself in the counted text (word for word, end punctuation aside), so the n-gram model has "
            f"memorised {'it' if one else 'them'}: "
            # Not "low": with smoothing, a memorised sentence can still score worse than the neural model.
            "its perplexity there measures recall of text it counted, not prediction of new text, "
            "so the two are not comparable."
        )
    steps = model.held_out_steps(held)
    return Comparison(
        "no" if reasons else "partly",
        reasons,
        counted=sum(1 for step in steps if step.count > 0),
        ngrams=len(steps),
        memorised=len(memorised),
    )


def smoothing_text(k: float, vocab_size: int) -> str:
    if k == 0:
        return (
            "Smoothing: none (k = 0, maximum likelihood): P(word | context) = count / total, "
            "so a word never counted after its context gets probability 0."
        )
    return (
        f"Smoothing: add-{k:g}: P(word | context) = (count + {k:g}) / (total + {k:g} × {vocab_size:,}); "
        f"{vocab_size:,} is every possible next word: the word types plus {END} (end) and {UNKNOWN} (unseen word)."
    )


def zero_reason(step: Step) -> str:
    after = quoted(step.context)
    if step.total == 0:
        return (
            f"{after} never occurs in the counted text, so the counts give no probability for the word after it "
            "(0/0), and the model takes it as 0"
        )
    if step.scored_as == UNKNOWN:
        return f"“{step.word}” never occurs in the counted text (0 of the {plural(step.total, 'word')} after {after})"
    return f"“{step.word}” never follows {after} in the counted text (0/{step.total:,})"


def step_line(step: Step, k: float) -> str:
    shown = step.word if step.scored_as == step.word else f"{step.word}→{UNKNOWN}"
    if k == 0 and step.total == 0:
        return f"{shown} 0/0 → no estimate"  # 0/0 is undefined, not 0
    return f"{shown} {step.count}/{step.total} → {step.prob:.3g}"


def joined(items: Sequence[str], sep: str, limit: int) -> str:
    """Items joined within ``limit`` characters, saying how many were left out."""
    out = ""
    for i, item in enumerate(items):
        candidate = out + sep + item if out else clipped(item, limit - 20)
        if len(candidate) > limit - 20:  # room for the tail
            return f"{out}{sep}… ({len(items) - i} more)"
        out = candidate
    return out


def clipped(word: str, limit: int = 24) -> str:
    """A word cut to ``limit`` characters for a table cell (a "word" of user text can be very long)."""
    return word if len(word) <= limit else word[: limit - 1] + "…"


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
        Number(
            "smoothing",
            "k for add-k smoothing; 0 counts only (maximum likelihood)",
            default=1.0,
            min_value=0.0,
            max_value=10.0,
        ),
    ],
)
async def ngram(ctx: Context, context: str, n: int, text: str | None, sentence: str, smoothing: float) -> Reply:
    corpus = sentences(text if text is not None else builtin_corpus())
    if not corpus:
        raise UserError("The text has no words to count.")
    model = NgramModel.fit(corpus, n, smoothing)
    context_words = words(context)
    if len(context_words) < n - 1:
        raise UserError(
            f"A {n}-gram model needs at least {plural(n - 1, 'context word')}; `context` has {len(context_words)}."
        )
    key = tuple(context_words[-(n - 1) :])
    top = model.next_words(key, TOP)
    held_sentences = sentences(sentence)
    held = [w for s in held_sentences for w in s]
    if not held:
        raise UserError("The held-out `sentence` has no words.")
    steps = model.held_out_steps(held_sentences)
    zero = next((s for s in steps if s.prob == 0), None)
    ngram_ppl = None if zero else math.exp(-sum(math.log(s.prob) for s in steps) / len(held))
    unseen = [w for w in held if w not in model.word_types]
    scored = await ctx.inference.submit(Score(sentence))
    neural_logprob = sum(scored.logprobs)
    neural_word_ppl = math.exp(-neural_logprob / len(held))
    neural_token_ppl = math.exp(-neural_logprob / len(scored.logprobs))
    seen = model.counts.get(key, Counter())
    total = seen.total()
    n_words = sum(len(s) for s in corpus)

    following = (
        f"followed by {plural(len(seen), 'different word')}" if total else "so there is nothing to count after it"
    )
    text_lines = [
        f"Counted {plural(n_words, 'word')} in {plural(len(corpus), 'sentence')} "
        f"({plural(len(model.word_types), 'word type')}). "
        f"{quoted(key)} occurs {times(total)}, {following}.",
        smoothing_text(smoothing, len(model.vocab)),
    ]
    if smoothing == 0 and not total:
        text_lines.append(f"Unsmoothed, the model has no prediction after {quoted(key)}: 0/0.")
    text_lines.append(MARKERS_LINE)
    if any(HAS_CJK.search(part) for part in (text or "", context, sentence)):
        text_lines.append(CJK_LINE)
    text_lines.append(PERPLEXITY_LINE)

    unit = UNIT.format(count=plural(len(held), "word"))
    if ngram_ppl is not None:
        ngram_value = f"{amount(ngram_ppl)} {unit}"
    elif zero is not None:
        ngram_value = (
            f"infinite: {zero_reason(zero)}; probability 0 for one word makes the whole sentence impossible "
            "for this model. Smoothing (k > 0) is what prevents that."
        )
    rate = len(unseen) / len(held)
    oov_value = f"{len(unseen)} of {len(held)} held-out words ({rate:.0%}) never occur in the counted text"
    if unseen:
        shown = joined([f"“{w}”" for w in dict.fromkeys(unseen)], ", ", 300)
        oov_value += f": {shown}. The n-gram model scores each one as {UNKNOWN}."
    comparison = compare_with_neural(model, held_sentences, corpus)
    compare_value = (
        comparison.answer(model) + f" Both perplexities above are {unit}; the neural model really predicts "
        f"{plural(len(scored.logprobs), 'token')}, and per token its perplexity is {amount(neural_token_ppl)}."
    )
    fields = [
        Field("held-out sentence", sentence, inline=False),
        Field(f"{n}-gram perplexity", ngram_value, inline=zero is None),
        Field("neural perplexity", f"{amount(neural_word_ppl)} per word ({amount(neural_token_ppl)} per token)"),
        Field("unseen words", oov_value, inline=False),
        Field("can the two be compared?", compare_value, inline=False),
        Field(
            f"{n}-gram, word by word (count/total → {'probability' if smoothing == 0 else 'smoothed probability'})",
            joined([step_line(s, smoothing) for s in steps], " · ", 1000),
            inline=False,
        ),
    ]
    images = []
    if top:
        label = "no smoothing: count / total" if smoothing == 0 else f"add-{smoothing:g} smoothing"
        images.append(
            await render(
                bar_chart,
                [w for w, _, _ in top],
                [p for _, _, p in top],
                title=f"{n}-gram: next word after {quoted(key)}",
                xlabel=f"probability ({label})",
                filename="ngram.png",
            )
        )
    return Reply(
        title=f"{n}-gram model vs {scored.model}",
        text="\n".join(text_lines),
        table=Table(
            ["next word", "count/total", "probability"],
            [[clipped(w), f"{c}/{total}", f"{p:.4f}"] for w, c, p in top],
            align="lrr",
        )
        if top
        else None,
        fields=fields,
        images=images,
        data={
            "n": n,
            "smoothing": smoothing,
            "context": list(key),
            "context_count": total,
            "next": [{"word": w, "count": c, "total": total, "prob": p} for w, c, p in top],
            "vocab_size": len(model.vocab),
            "word_types": len(model.word_types),
            "words_counted": n_words,
            "sentences_counted": len(corpus),
            "ngram_perplexity": ngram_ppl,
            "ngram_perplexity_infinite": zero is not None,
            "ngram_steps": [
                {
                    "context": list(s.context),
                    "word": s.word,
                    "scored_as": s.scored_as,
                    "count": s.count,
                    "total": s.total,
                    "prob": s.prob,
                }
                for s in steps
            ],
            "oov_words": unseen,
            "oov_rate": rate,
            "comparable": comparison.verdict,  # "no" or "partly", never a plain yes
            "counted_ngrams": comparison.counted,
            "heldout_ngrams": comparison.ngrams,
            "memorised_sentences": comparison.memorised,
            "neural_model": scored.model,
            "neural_logprob": neural_logprob,
            "neural_tokens": len(scored.logprobs),
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
