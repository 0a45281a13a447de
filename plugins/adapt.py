"""Topic "Foundation vs task-specific": prompting a base model, and what LoRA would train."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import Command, Context, Field, ModelRole, QuizQuestion, Reply, Table, Text, Topic, command, hookimpl
from bot.inference.protocol import Generate, Request

QUIZ = (
    QuizQuestion(
        "What is the core idea of a foundation model?",
        (
            "Pretrain once broadly, then adapt to many tasks",
            "Train one model per task",
            "Use no training data",
            "Only use rules",
        ),
        0,
        "One expensive pretraining run is amortised across products.",
    ),
    QuizQuestion(
        "What does LoRA train?",
        (
            "Small low-rank matrices added beside chosen layers",
            "Every weight of the model",
            "Only the embeddings",
            "A new tokenizer",
        ),
        0,
        "The base weights stay frozen; only the low-rank update is learned.",
    ),
    QuizQuestion(
        "What is few-shot prompting?",
        (
            "Putting a few solved examples in the prompt",
            "Training for a few steps",
            "Using a few GPUs",
            "Asking a few times and voting",
        ),
        0,
        "The model adapts in context, with no weight updates.",
    ),
    QuizQuestion(
        "When does a task-specific model often win?",
        (
            "Fixed labels, tight latency and cost, need for audit",
            "Constantly changing labels",
            "No labelled data at all",
            "Open-ended chat",
        ),
        0,
        "Small dedicated models are cheaper, faster and easier to control.",
    ),
    QuizQuestion(
        "Raising LoRA's rank r does what to the trainable parameter count?",
        ("Increases it roughly in proportion to r", "Decreases it", "Leaves it unchanged", "Squares it"),
        0,
        "Each adapted layer adds r × (inputs + outputs) parameters; /adapt shows the numbers.",
    ),
)

TOPIC = Topic(
    quiz=QUIZ,
    slug="foundation",
    title="Foundation vs task-specific",
    order=8,
    key_idea=(
        "Instead of training one model per task, start from a broadly pretrained model and adapt it: by "
        "prompting (zero or a few examples), or by light fine-tuning such as LoRA, which freezes the model and "
        "trains small low-rank matrices beside some layers. One pretraining run pays for many products, but a "
        "small task-specific model can still win on cost, latency and control."
    ),
    try_command="/adapt text:This product exceeded all my expectations!",
    table=Table(
        ["", "foundation model", "task-specific model"],
        [
            ["changing labels", "easy", "retrain"],
            ["cost per answer", "higher", "lower"],
            ["latency", "higher", "lower"],
            ["control and audit", "harder", "easier"],
            ["labelled data", "none or a few", "a training set"],
        ],
    ),
    questions=(
        "What are the risks of building on a third-party foundation model?",
        "Is fine-tuning a foundation model the same as building a task-specific one?",
        "How do you choose between prompting and fine-tuning?",
    ),
)

ZERO_SHOT = 'Classify the following review as positive or negative.\nReview: "{text}"\nClassification:'
FEW_SHOT = (
    "Classify reviews as positive or negative.\n"
    'Review: "Absolutely love it!" -> positive\n'
    'Review: "Terrible quality." -> negative\n'
    'Review: "{text}" ->'
)
RANKS = (4, 8, 16)


@dataclass(frozen=True)
class LoraCounts(Request):
    """Trainable vs total parameters of the served causal LM under a few LoRA settings."""

    ranks: tuple[int, ...] = RANKS
    task: ClassVar[str] = "plugins.adapt:lora_counts"

    def texts(self) -> list[str]:
        return []


@dataclass(frozen=True)
class LoraRow:
    targets: str
    modules: list[str]
    r: int
    trainable: int
    total: int


@dataclass(frozen=True)
class LoraTable:
    model: str
    rows: list[LoraRow]


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "∅"


def attention_targets(model: Any) -> list[str]:
    """The query/value projections under this architecture's own names."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidates in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["qkv_proj"]):
        if all(c in names for c in candidates):
            return candidates
    raise ValueError("no attention projections found to adapt")


def lora_counts(model: Any, tokenizer: Any, batch: Sequence[LoraCounts]) -> list[LoraTable]:
    """Runs in the worker. peft is applied to an empty (meta-device) copy of the served
    model's architecture, so the served model is never touched and no memory is used."""
    import torch
    from peft import LoraConfig, get_peft_model

    settings: list[tuple[str, list[str] | str]] = [
        ("query + value", attention_targets(model)),
        ("all linear layers", "all-linear"),
    ]
    tables = []
    for request in batch:
        rows = []
        for label, targets in settings:
            for r in request.ranks:
                with torch.device("meta"):
                    skeleton = type(model)(model.config)
                peft_model = get_peft_model(skeleton, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
                trainable, total = peft_model.get_nb_trainable_parameters()
                modules = targets if isinstance(targets, list) else [targets]
                rows.append(LoraRow(label, modules, r, int(trainable), int(total)))
        tables.append(LoraTable("", rows))
    return tables


@command(
    "adapt",
    "Zero-shot vs few-shot prompting, and what LoRA would train",
    topic=TOPIC.slug,
    options=[Text("text", "A short review to classify", max_length=500)],
)
async def adapt(ctx: Context, text: str) -> Reply:
    started = time.perf_counter()
    zero = await ctx.inference.submit(Generate(ZERO_SHOT.format(text=text), max_new_tokens=3))
    few = await ctx.inference.submit(Generate(FEW_SHOT.format(text=text), max_new_tokens=3))
    prompt_s = time.perf_counter() - started
    lora = await ctx.inference.submit(LoraCounts())
    rows = [
        [row.targets, str(row.r), f"{row.trainable:,}", f"{row.total:,}", f"{row.trainable / row.total:.3%}"]
        for row in lora.rows
    ]
    return Reply(
        title=f"Adapting {zero.model}",
        text=(
            "The same base model, asked two ways (greedy, 3 tokens), then the cost of LoRA fine-tuning: "
            "only the low-rank matrices train; everything else stays frozen."
        ),
        fields=[
            Field("zero-shot answer", first_line(zero.text)),
            Field("few-shot answer", first_line(few.text)),
            Field("prompting time", f"{prompt_s * 1000:.0f} ms"),
        ],
        table=Table(["LoRA on", "r", "trainable", "total", "share"], rows, align="lrrrr"),
        data={
            "model": zero.model,
            "zero_shot": zero.text,
            "few_shot": few.text,
            "lora": [row.__dict__ for row in lora.rows],
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(adapt)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
