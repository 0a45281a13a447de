"""Topic "Sequence-to-sequence": an encoder reads, a decoder writes."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from bot import (
    Command,
    Context,
    Field,
    Generate,
    Integer,
    ModelRole,
    NoModelForRole,
    QuizQuestion,
    Reply,
    Seq2Seq,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)

QUIZ = (
    QuizQuestion(
        "What are the two halves of a sequence-to-sequence model?",
        ("An encoder and a decoder", "A tokenizer and a detokenizer", "Two classifiers", "A generator and a critic"),
        0,
        "The encoder reads the input; the decoder writes the output while attending to it.",
    ),
    QuizQuestion(
        "How does T5 tell which task to do?",
        (
            "A text prefix such as 'summarize:'",
            "A separate model per task",
            "A task id token only",
            "It guesses from the input",
        ),
        0,
        "Every task is text in, text out, selected by a prefix.",
    ),
    QuizQuestion(
        "Which task is a classic fit for encoder-decoder models?",
        ("Translation", "Next-word prediction on its own", "Counting bigrams", "Image classification"),
        0,
        "Input and output play different roles: source and target languages.",
    ),
    QuizQuestion(
        "How does the decoder produce its output?",
        (
            "Token by token, looking at the encoder's representations",
            "All tokens at once",
            "By copying the input",
            "By sorting the input",
        ),
        0,
        "Decoding is autoregressive, conditioned on the encoded input.",
    ),
    QuizQuestion(
        "Can a decoder-only model summarize?",
        (
            "Yes, when prompted or tuned to: the input goes in its context",
            "No, never",
            "Only with an encoder added",
            "Only in English",
        ),
        0,
        "Decoder-only models treat the input as a prefix to continue; that is how the offline /summarize works.",
    ),
)

TOPIC = Topic(
    quiz=QUIZ,
    slug="seq2seq",
    title="Sequence-to-sequence",
    order=6,
    key_idea=(
        "An encoder reads the whole input into representations; a decoder writes the output token by token "
        "while looking back at them. It suits tasks where input and output play different roles: translation, "
        "summaries, clean-up. T5 went further and cast every task as text in, text out, with a task prefix "
        "such as 'summarize:'."
    ),
    try_command="/summarize text:<a paragraph>",
    questions=(
        "How does an encoder-decoder differ from a decoder-only model?",
        "Are chat assistants sequence-to-sequence models?",
        "When would you still pick an encoder-decoder today?",
    ),
)

PREFIX = "summarize: "
PROMPT = "Summarize the following text in one or two sentences.\n\n{text}"
# The service refuses a request over `inference.max_input_chars` (2,000 by default), counting the
# instruction around the text; the option's limit leaves room for it, so one limit holds.
MAX_TEXT = 1900
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
WORD = re.compile(r"[^\W\d_][\w'’-]*")
# Capitalised only because a sentence starts with them: not names to check.
_STARTERS = """a an the this that these those it its he she they we you i in on at of for to from by with as
there here overall summary however also and but so then when while after before both one some many most all each"""
SENTENCE_STARTERS = frozenset(_STARTERS.split())


def text_limit(ctx: Context) -> int:
    """The most characters of text /summarize accepts on this server."""
    room = ctx.config.inference.max_input_chars - max(len(PREFIX), len(PROMPT.format(text="")))
    return max(1, min(MAX_TEXT, room))


def _number(token: str) -> str:
    return token.replace(",", "")  # 1,789 and 1789 are the same number


def unsupported(summary: str, text: str) -> tuple[list[str], list[str]]:
    """Numbers and capitalised names in the summary that the text does not contain.

    A sentence's first word counts as a name only when it is not a common sentence opener.
    """
    numbers = {_number(n) for n in NUMBER.findall(text)}
    words = {w.casefold() for w in WORD.findall(text)}
    new_numbers = list(dict.fromkeys(n for n in NUMBER.findall(summary) if _number(n) not in numbers))
    names: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", summary):
        for n, word in enumerate(WORD.findall(sentence)):
            if not word[0].isupper() or word.casefold() in words or word in names:
                continue
            if n == 0 and word.casefold() in SENTENCE_STARTERS:
                continue
            names.append(word)
    return new_numbers, names


@command(
    "summarize",
    "Summarize text with an encoder-decoder model (T5)",
    topic=TOPIC.slug,
    options=[
        Text("text", "The text to summarize", max_length=MAX_TEXT),
        Integer("max_length", "Longest summary, in tokens", default=60, min_value=5, max_value=200),
    ],
)
async def summarize(ctx: Context, text: str, max_length: int) -> Reply:
    limit = text_limit(ctx)
    if len(text) > limit:  # the same words as the option's own check (clean_text)
        raise UserError(f"`text` is too long: {len(text):,} characters, the limit is {limit:,}.")
    started = time.perf_counter()
    try:
        result = await ctx.inference.submit(Seq2Seq(PREFIX + text, max_new_tokens=max_length))
        kind, note = "seq2seq", f"T5-style text-to-text with the task prefix `{PREFIX.strip()}`."
    except NoModelForRole as missing:
        result = await ctx.inference.submit(Generate(PROMPT.format(text=text), max_new_tokens=max_length, chat=True))
        kind = "causal_lm_prompt"
        note = f"Not seq2seq: an instruction-tuned causal LM asked to summarize, because {missing}"
    seconds = time.perf_counter() - started
    summary = result.text.rstrip("\ufffd").strip()  # a cut at the token limit can split a character
    numbers, names = unsupported(summary, text)
    if not summary:
        check = "Nothing to check: the model produced no text."
    elif numbers or names:
        check = "Not in your text, so check them: " + ", ".join([*numbers, *names])
    else:
        check = (
            "Every number and capitalised name in the summary also appears in your text "
            "(that alone does not make it right)."
        )
    return Reply(
        title=f"Summary ({result.model})",
        text=(summary or "(the model produced no text)")
        + "\n\nThis summary was generated by a model and may be wrong: check it against your text.",
        fields=[
            Field("check", check[:1024], inline=False),
            Field("how", note[:1024], inline=False),
            Field("time", f"{seconds * 1000:.0f} ms"),
        ],
        data={
            "kind": kind,
            "model": result.model,
            "summary": result.text,
            "seconds": seconds,
            "not_in_text": {"numbers": numbers, "names": names},
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(summarize)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("seq2seq")
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
