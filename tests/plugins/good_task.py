"""A plugin with a worker task of its own, written as docs/plugins.md says."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import Command, Context, Integer, Reply, Request, Text, command, hookimpl, plugin_options, task_name


@dataclass(frozen=True)
class TokenCount:
    model: str  # filled in by the worker with the served model's label
    tokens: list[str]
    vocabulary: int


def count_tokens(model: Any, tokenizer: Any, batch: Sequence[CountTokens]) -> list[TokenCount]:
    """Runs in a model worker: one result per request, in order."""
    import torch  # inside the task: the bot process never imports torch

    results = []
    for request in batch:
        ids = tokenizer(request.text)["input_ids"]
        with torch.inference_mode():
            vocabulary = int(model.get_input_embeddings().weight.shape[0])
        results.append(TokenCount("", [tokenizer.decode([i]) for i in ids], vocabulary))
    return results


@dataclass(frozen=True)
class CountTokens(Request):
    text: str
    task: ClassVar[str] = task_name(count_tokens)

    def texts(self) -> list[str]:
        return [self.text]


@command(
    "counttokens",
    "Count the tokens of a text",
    options=[
        Text("text", "Any text"),
        Integer("show", "How many tokens to list", min_value=1, max_value=50, default=5),
    ],
)
async def counttokens(ctx: Context, text: str, show: int) -> Reply:
    result: TokenCount = await ctx.inference.submit(CountTokens(text))
    greeting = plugin_options(ctx, "good_task")["greeting"]
    listed = " ".join(result.tokens[:show])
    return Reply(
        f"{greeting} {len(result.tokens)} tokens: {listed}",
        data={"model": result.model, "tokens": result.tokens, "vocabulary": result.vocabulary},
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(counttokens)


@hookimpl
def register_models(register: Callable[[str], None]) -> None:
    register("causal_lm")


@hookimpl
def register_options(register: Callable[[Text], None]) -> None:
    register(Text("greeting", "What the reply starts with", default="Counted:", max_length=40))
