"""Topic "Sequence-to-sequence": an encoder reads, a decoder writes."""

from __future__ import annotations

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


@command(
    "summarize",
    "Summarize text with an encoder-decoder model (T5)",
    topic=TOPIC.slug,
    options=[
        Text("text", "The text to summarize", max_length=3000),
        Integer("max_length", "Longest summary, in tokens", default=60, min_value=5, max_value=200),
    ],
)
async def summarize(ctx: Context, text: str, max_length: int) -> Reply:
    started = time.perf_counter()
    try:
        result = await ctx.inference.submit(Seq2Seq(PREFIX + text, max_new_tokens=max_length))
        kind, note = "seq2seq", f"T5-style text-to-text with the task prefix `{PREFIX.strip()}`."
    except NoModelForRole as missing:
        result = await ctx.inference.submit(Generate(PROMPT.format(text=text), max_new_tokens=max_length, chat=True))
        kind = "causal_lm_prompt"
        note = f"Not seq2seq: an instruction-tuned causal LM asked to summarize, because {missing}"
    seconds = time.perf_counter() - started
    return Reply(
        title=f"Summary ({result.model})",
        text=result.text.strip() or "(the model produced no text)",
        fields=[Field("how", note[:1024], inline=False), Field("time", f"{seconds * 1000:.0f} ms")],
        data={"kind": kind, "model": result.model, "summary": result.text, "seconds": seconds},
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
