"""Topic "What is a language model": the next-token distribution after a prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from bot import (
    Button,
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    NextToken,
    Number,
    QuizQuestion,
    Reply,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.charts import bar_chart, render, show_token

STEPS = 3  # buttons that append one of the likeliest tokens

QUIZ = (
    QuizQuestion(
        "What does a language model compute for a given piece of text?",
        (
            "A probability for every possible next token",
            "The single correct next word",
            "A parse tree",
            "A translation",
        ),
        0,
        "It outputs a whole distribution; generation then picks or samples from it.",
    ),
    QuizQuestion(
        "Raising the temperature above 1 makes the next-token distribution…",
        ("flatter, so unlikely tokens gain probability", "sharper", "unchanged", "sum to more than 1"),
        0,
        "Dividing logits by a larger number shrinks their differences before the softmax.",
    ),
    QuizQuestion(
        "What does high entropy of the next-token distribution tell you?",
        (
            "The model is unsure: probability is spread over many tokens",
            "The model is certain",
            "The prompt is too long",
            "The vocabulary is small",
        ),
        0,
        "Entropy measures spread; one dominant token gives low entropy.",
    ),
    QuizQuestion(
        "Which is NOT one of the things 'large' brings to large language models?",
        (
            "A guarantee of correct answers",
            "Longer training on more varied data",
            "Bigger context windows",
            "New failure modes and higher serving cost",
        ),
        0,
        "Scale brings capability and cost, and new failure modes such as hallucination, not guarantees.",
    ),
    QuizQuestion(
        "Model families differ mainly in…",
        ("their pretraining objective", "their brand name", "the programming language used", "their file format"),
        0,
        "Next-token, masked-token and sequence-to-sequence objectives shape what each family is good at.",
    ),
)

TOPIC = Topic(
    quiz=QUIZ,
    slug="language-model",
    title="What is a language model",
    order=1,
    key_idea=(
        "A language model assigns a probability to every possible next token given the text so far. "
        "Everything else (chat, code, translation) is built by asking that one question over and over. "
        "Scale adds breadth and new failure modes, not a different kind of machine."
    ),
    try_command='/nexttoken prompt:"The capital of France is"',
    table=Table(
        ["family", "trained to", "good at"],
        [
            ["autoregressive", "predict the next token", "writing, dialogue, code"],
            ["masked", "recover hidden tokens", "classification, search"],
            ["encoder-decoder", "turn one sequence into another", "translation, summaries"],
            ["foundation", "pretrain broadly, then adapt", "reuse across many tasks"],
        ],
    ),
    questions=(
        "Where does a model family end and a single model begin?",
        "Is there a size at which a model becomes 'large'?",
        "Which non-language tasks can a next-token predictor take on?",
    ),
)


@command(
    "nexttoken",
    "Show the model's probabilities for the next token after a prompt",
    topic=TOPIC.slug,
    options=[
        Text("prompt", "The text the model continues", max_length=1000),
        Integer("k", "How many of the likeliest tokens to show", default=10, min_value=1, max_value=25),
        Number("temperature", "Divide the logits by this before softmax", default=1.0, min_value=0.05, max_value=5.0),
    ],
)
async def nexttoken(ctx: Context, prompt: str, k: int, temperature: float) -> Reply:
    result = await ctx.inference.submit(NextToken(prompt, k=k, temperature=temperature))
    rows = [[str(n), show_token(t.token), str(t.id), f"{t.prob:.4f}"] for n, t in enumerate(result.top, 1)]
    chart = await render(
        bar_chart,
        [show_token(t.token) for t in result.top],
        [t.prob for t in result.top],
        title=f"Next token after “{prompt[-50:]}”",
        xlabel=f"probability ({result.model[:60]})",
        filename="nexttoken.png",
    )
    shown = sum(t.prob for t in result.top)
    # One step of generation by hand: each button appends a token and asks again.
    steps = [Button(f"+ {show_token(t.token)}", "nexttoken", "prompt", prompt + t.token) for t in result.top[:STEPS]]
    steps = [b for b in steps if b.fits]
    hint = " Each button appends its token and asks again: generation one step at a time." if steps else ""
    return Reply(
        title=f"Next token ({result.model})",
        text=f"The top {len(result.top)} tokens cover {shown:.1%} of the probability.{hint}",
        buttons=steps,
        fields=[
            Field("prompt tokens", str(len(result.prompt_ids))),
            Field("entropy", f"{result.entropy_bits:.2f} bits"),
            Field("temperature", f"{temperature:g}"),
        ],
        table=Table(["#", "token", "id", "probability"], rows, align="rlrr"),
        images=[chart],
        data={
            "model": result.model,
            "prompt_tokens": result.prompt_tokens,
            "prompt_ids": result.prompt_ids,
            "top": [asdict(t) for t in result.top],
            "entropy_bits": result.entropy_bits,
            "temperature": temperature,
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(nexttoken)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
