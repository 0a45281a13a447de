"""Topic "Foundation vs task-specific": prompting a base model, what LoRA would train,
and (on a GPU worker, or where allowed) a short real LoRA run."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Boolean,
    CodeBlock,
    Command,
    Context,
    Field,
    Generate,
    ModelRole,
    Reply,
    Request,
    Score,
    Segment,
    Table,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.charts import line_chart, render
from bot.render import plural
from plugins._timing import interleaved, versus
from plugins.sentiment import training_set

TIMED_RUNS = 3  # warm runs of each prompt; their median, fastest and slowest are shown

TOPIC = Topic.load("plugins", "foundation")  # plugins/data/topics/foundation.toml

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


@dataclass(frozen=True)
class LoraTrain(Request):
    """Train LoRA matrices on labelled examples for a few steps; compare greedy answers before and after."""

    prompt: str
    examples: tuple[tuple[str, str], ...]  # (prompt, answer) pairs
    steps: int = 20
    r: int = 8
    learning_rate: float = 5e-4
    allow_cpu: bool = False
    max_new_tokens: int = 3
    task: ClassVar[str] = "plugins.adapt:lora_train"

    def texts(self) -> list[str]:
        # Only the user's text counts against the input limits; the examples are the plugin's own.
        return [self.prompt]


@dataclass(frozen=True)
class LoraRun:
    model: str
    device: str
    before: str = ""
    after: str = ""
    losses: tuple[float, ...] = ()
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    refused: str = ""  # why it did not train (e.g. a CPU worker where training is off)


def shown_answer(text: str) -> str:
    """A generated continuation on one line: line breaks shown as ↵."""
    return text.replace("\r\n", "\n").replace("\n", "↵")


def prompts_block(zero_prompt: str, zero_answer: str, few_prompt: str, few_answer: str) -> CodeBlock:
    """Both prompts as the model reads them, each followed by what it wrote in «…» (green where colour shows)."""
    segments: list[Segment] = []
    for heading, prompt, answer in (
        ("zero-shot: the instruction alone", zero_prompt, zero_answer),
        ("few-shot: two solved examples, then the review", few_prompt, few_answer),
    ):
        segments += [
            Segment(f"── {heading} ──\n", "gray"),
            Segment(prompt),
            Segment(f"«{shown_answer(answer)}»", "green"),
            Segment("\n"),
        ]
    return CodeBlock(segments[:-1])


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


def lora_train(model: Any, tokenizer: Any, batch: Sequence[LoraTrain]) -> list[LoraRun]:
    """Runs in the worker. LoRA is injected into the served model, trained, used once and
    unloaded again in ``finally``, so the served weights come back untouched (the base
    weights are frozen throughout; only the injected matrices get gradients)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bot.worker.tasks import generate

    def greedy(served: Any, prompt: str, max_new_tokens: int) -> str:
        return generate(served, tokenizer, [Generate(prompt, max_new_tokens=max_new_tokens)])[0].text

    runs = []
    for request in batch:
        device = str(model.device)
        if model.device.type == "cpu" and not request.allow_cpu:
            reason = 'LoRA training runs on GPU workers here (set plugins.options.adapt.training = "always").'
            runs.append(LoraRun("", device, refused=reason))
            continue
        started = time.perf_counter()
        before = greedy(model, request.prompt, request.max_new_tokens)
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        config = LoraConfig(r=request.r, lora_alpha=2 * request.r, target_modules=attention_targets(model))
        torch.manual_seed(0)
        with torch.inference_mode(False), torch.enable_grad():
            peft_model = get_peft_model(model, config)
            try:
                trainable, total = peft_model.get_nb_trainable_parameters()
                # The end-of-text token after each answer teaches the model to stop there.
                texts = [prompt + answer + (tokenizer.eos_token or "") for prompt, answer in request.examples]
                enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(model.device)
                # The loss counts only the answer's tokens: the skill taught is answering, not the prompt.
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                for row, (prompt, _) in enumerate(request.examples):
                    labels[row, : len(tokenizer(prompt)["input_ids"])] = -100
                params = [p for p in peft_model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=request.learning_rate)
                losses = []
                peft_model.train()
                for _ in range(request.steps):
                    loss = peft_model(**enc, labels=labels).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    losses.append(float(loss.detach()))
                peft_model.eval()
                after = greedy(peft_model, request.prompt, request.max_new_tokens)
            finally:
                peft_model.unload()  # takes the LoRA layers out again
                model.eval()
                for name, p in model.named_parameters():
                    p.requires_grad_(grads.get(name, False))
        seconds = time.perf_counter() - started
        runs.append(LoraRun("", device, before, after, tuple(losses), int(trainable), int(total), seconds))
    return runs


@command(
    "adapt",
    "Zero-shot vs few-shot prompting, and what LoRA would train",
    topic=TOPIC.slug,
    options=[
        Text("text", "A short review to classify", max_length=500),
        Boolean("train", "Also train a LoRA for a few steps and compare (GPU workers)", default=False),
    ],
)
async def adapt(ctx: Context, text: str, train: bool) -> Reply:
    zero_prompt, few_prompt = ZERO_SHOT.format(text=text), FEW_SHOT.format(text=text)
    zero = await ctx.inference.submit(Generate(zero_prompt, max_new_tokens=3))
    few = await ctx.inference.submit(Generate(few_prompt, max_new_tokens=3))
    # Timed again once the model is loaded, so the times compare the two prompts and not loading;
    # taking turns, several times, so a difference is called only outside the runs' spread.
    prompts = {"zero-shot": zero_prompt, "few-shot": few_prompt}
    lengths = {name: len((await ctx.inference.submit(Score(p))).tokens) for name, p in prompts.items()}
    _, spreads = await interleaved(
        [functools.partial(ctx.inference.submit, Generate(p, max_new_tokens=3)) for p in prompts.values()],
        TIMED_RUNS,
    )
    timing = dict(zip(prompts, spreads, strict=True))
    prompt_ms = {name: spread.median * 1000 for name, spread in timing.items()}
    lora = await ctx.inference.submit(LoraCounts())
    rows = [
        [row.targets, str(row.r), f"{row.trainable:,}", f"{row.total:,}", f"{row.trainable / row.total:.3%}"]
        for row in lora.rows
    ]
    fields = [
        Field("zero-shot answer", first_line(zero.text)),
        Field("few-shot answer", first_line(few.text)),
        Field(
            "prompting time (warm, 3 new tokens each)",
            "\n".join(f"{name}: {timing[name].text()}, prompt {plural(lengths[name], 'token')}" for name in prompts)
            + "\n"
            + versus("Zero-shot", timing["zero-shot"], "Few-shot", timing["few-shot"])
            + " A longer prompt costs more, since the model reads every prompt token before it writes; "
            "a difference within noise means this run could not show it.",
            inline=False,
        ),
    ]
    images = []
    run: LoraRun | None = None
    mode = str(ctx.config.plugins.options.get("adapt", {}).get("training", "gpu"))
    untrained = ""  # why train:true trained nothing: said once, in the text
    if train and mode == "never":
        untrained = "Training is turned off on this bot."
    elif train:
        # Training takes longer than a forward pass: a longer deadline than other requests.
        deadline = ctx.config.inference.request_timeout_s * 5
        run = await ctx.inference.submit(training_request(text, allow_cpu=mode == "always"), timeout=deadline)
        if run.refused:
            untrained = run.refused
        else:
            fields += [
                Field("zero-shot after LoRA", first_line(run.after)),
                Field(
                    "LoRA run", f"{plural(len(run.losses), 'step')}, loss {run.losses[0]:.2f} → {run.losses[-1]:.2f}"
                ),
                Field("training time", f"{run.seconds:.1f} s on {run.device}"),
            ]
            steps = list(range(1, len(run.losses) + 1))
            images.append(
                await render(
                    line_chart,
                    [("training loss", steps, list(run.losses), "o-")],
                    title=f"LoRA r={LORA_RANK} on {TRAINING_EXAMPLES} labelled reviews",
                    xlabel="step",
                    ylabel="loss on the answer tokens",
                    filename="lora.png",
                    log=False,
                )
            )
    return Reply(
        title=f"Adapting {zero.model}",
        text=(
            "The same base model, asked two ways: zero-shot (the instruction alone) and few-shot (two solved "
            "examples first). Only the prompt changes, no weights. The table gives the cost of LoRA fine-tuning "
            "instead: only its low-rank matrices train; everything else stays frozen. r is their rank: each "
            "adapted weight matrix (d_out × d_in) gets two thin ones beside it, d_out × r and r × d_in, so the "
            "trainable count grows in proportion to r. At the end: both prompts exactly as the model reads them, "
            "with its greedy 3-token answer (the likeliest token at each step) in «…»."
            + (
                f"\nNothing was trained. {untrained} No weights changed, so there is no after-LoRA answer to "
                "compare; the table only counts what LoRA would train."
                if untrained
                else ""
            )
        ),
        fields=fields,
        table=Table(["LoRA on", "r", "trainable", "total", "share"], rows, align="lrrrr"),
        code=prompts_block(zero_prompt, zero.text, few_prompt, few.text),
        images=images,
        data={
            "model": zero.model,
            "zero_shot_prompt": zero_prompt,
            "few_shot_prompt": few_prompt,
            "zero_shot": zero.text,
            "few_shot": few.text,
            "prompt_ms": prompt_ms,
            "prompt_runs_ms": {name: [t * 1000 for t in spread.runs] for name, spread in timing.items()},
            "prompt_tokens": lengths,
            "lora": [row.__dict__ for row in lora.rows],
            "lora_run": run.__dict__ if run is not None else None,
            "trained": bool(run is not None and not run.refused),
        },
    )


LORA_RANK = 8
TRAINING_EXAMPLES = 16


def training_request(text: str, allow_cpu: bool) -> LoraTrain:
    """A LoRA run that teaches the zero-shot prompt to answer with the label word."""
    labelled = training_set()
    # Balanced: the first half of each label's sentences, interleaved.
    by_label = {label: [t for lab, t in labelled if lab == label] for label in ("positive", "negative")}
    pairs = [(label, by_label[label][i]) for i in range(TRAINING_EXAMPLES // 2) for label in by_label]
    examples = tuple((ZERO_SHOT.format(text=t), f" {label}") for label, t in pairs)
    return LoraTrain(ZERO_SHOT.format(text=text), examples, r=LORA_RANK, allow_cpu=allow_cpu)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(adapt)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)


@hookimpl
def register_options(register: Callable[[Text], None]) -> None:
    # [plugins.options.adapt] training: where `/adapt train:true` may run a LoRA run.
    register(
        Text(
            "training",
            "Where /adapt train:true may train: gpu (GPU workers only), always, or never",
            choices=("gpu", "always", "never"),
            default="gpu",
        )
    )
