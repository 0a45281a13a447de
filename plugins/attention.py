"""Beyond topic "Transformers vs RNNs": the attention weights of a real model for a short text.

The causal LM's map is a triangle (a token sees only itself and what came before); a masked
LM, where one is available, looks both ways. Fused attention kernels (sdpa, flash) never
form the weights, so the worker switches the served model to eager attention for the call:
the numbers are exactly those of an eager forward with ``output_attentions=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from bot import (
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    NoModelForRole,
    Reply,
    Request,
    Table,
    Text,
    UserError,
    command,
    hookimpl,
)
from bot.charts import heatmap, render, show_bytes
from bot.render import plural, probability

# Attention compares every token with every token: 40 tokens are 1,600 weights per head,
# about what a heatmap can still label legibly.
MAX_TOKENS = 40
TOP = 5  # tokens listed for the last token


@dataclass(frozen=True)
class Attention(Request):
    """Attention weights of the causal LM for ``text``: one head of one layer, or averages.

    ``layer`` and ``head`` count from 1; ``None`` averages over every layer / every head.
    """

    text: str
    layer: int | None = None
    head: int | None = None
    max_tokens: int = MAX_TOKENS
    task: ClassVar[str] = "plugins.attention:attention_weights"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(frozen=True)
class MaskedAttention(Attention):
    """The same, through the masked LM (it attends in both directions)."""

    role: ClassVar[str] = "masked_lm"


@dataclass(frozen=True)
class AttentionWeights:
    model: str
    pieces: list[str]  # the tokenizer's own pieces (``##ing``, ``[CLS]``, ``Ġcat``)
    raw: list[bytes]  # each token's bytes (a byte-level BPE token may be part of a character)
    special: list[bool]  # [CLS], [SEP], <|endoftext|> ...
    weights: list[list[float]]  # weights[i][j]: how much token i attends to token j; each row sums to 1
    layers: int
    heads: int
    problem: str = ""  # why nothing was computed (too long, no such layer); shown to the user


def _problem(request: Attention, tokens: int, layers: int, heads: int) -> str:
    if tokens > request.max_tokens:
        return (
            f"That text is {tokens} tokens; /attention shows at most {request.max_tokens}, because every token "
            f"is compared with every other ({request.max_tokens}² = {request.max_tokens**2:,} weights per head). "
            "Try a shorter text."
        )
    if request.layer is not None and request.layer > layers:
        return f"This model has {layers} layers: `layer` must be 1 to {layers}."
    if request.head is not None and request.head > heads:
        return f"This model has {heads} heads per layer: `head` must be 1 to {heads}."
    return ""


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run the model with eager attention (which forms the weights), then switch back."""
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_weights(model: Any, tokenizer: Any, batch: Sequence[Attention]) -> list[AttentionWeights]:
    """Runs in the worker: one padded forward for the batch, weights cut back to each text's tokens.

    Causal models are padded on the left with explicit position ids (as the built-in tasks
    do), masked models on the right; padded keys get weight 0, so each text's weights are
    those it gets alone.
    """
    import torch

    from bot.worker.tasks import token_bytes

    causal = not isinstance(batch[0], MaskedAttention)
    layers, heads = int(model.config.num_hidden_layers), int(model.config.num_attention_heads)
    ids = [list(tokenizer(r.text)["input_ids"]) for r in batch]
    results: list[AttentionWeights | None] = [None] * len(batch)
    live = []
    for index, (request, row) in enumerate(zip(batch, ids, strict=True)):
        problem = _problem(request, len(row), layers, heads)
        if problem:
            results[index] = AttentionWeights("", [], [], [], [], layers, heads, problem)
        else:
            live.append(index)
    if live:
        width = max(len(ids[i]) for i in live)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows, masks = [], []
        for i in live:
            gap = width - len(ids[i])
            rows.append([pad] * gap + ids[i] if causal else ids[i] + [pad] * gap)
            masks.append([0] * gap + [1] * len(ids[i]) if causal else [1] * len(ids[i]) + [0] * gap)
        input_ids = torch.tensor(rows, device=model.device)
        attention_mask = torch.tensor(masks, device=model.device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if causal and "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with eager_attention(model):
            out = model(**kwargs, output_attentions=True)
        if not out.attentions:
            for i in live:
                problem = "This model does not report its attention weights."
                results[i] = AttentionWeights("", [], [], [], [], layers, heads, problem)
        else:
            maps = torch.stack([a.float() for a in out.attentions])  # layers × batch × heads × width × width
            specials = set(tokenizer.all_special_ids)
            for b, i in enumerate(live):
                request, n = batch[i], len(ids[i])
                chosen = maps[:, b]
                if request.layer is not None:
                    chosen = chosen[request.layer - 1 : request.layer]
                if request.head is not None:
                    chosen = chosen[:, request.head - 1 : request.head]
                grid = chosen.mean(dim=(0, 1))
                grid = grid[width - n :, width - n :] if causal else grid[:n, :n]
                results[i] = AttentionWeights(
                    model="",
                    pieces=[str(p) for p in tokenizer.convert_ids_to_tokens(ids[i])],
                    raw=token_bytes(tokenizer, ids[i]),
                    special=[t in specials for t in ids[i]],
                    weights=grid.tolist(),
                    layers=layers,
                    heads=heads,
                )
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- the command


def labels(result: AttentionWeights) -> list[str]:
    """Token labels: special tokens and WordPiece continuations as the tokenizer writes them,
    everything else from its bytes (⟨hex⟩ for part of a character)."""
    return [
        piece if special or piece.startswith("##") else show_bytes(raw)
        for piece, raw, special in zip(result.pieces, result.raw, result.special, strict=True)
    ]


def what_is_shown(result: AttentionWeights, layer: int | None, head: int | None) -> str:
    if layer is not None and head is not None:
        return f"layer {layer} of {result.layers}, head {head} of {result.heads}"
    if layer is not None:
        return f"layer {layer} of {result.layers}, average of its {plural(result.heads, 'head')}"
    return f"average of all {plural(result.layers, 'layer')} × {plural(result.heads, 'head')}"


def looks_ahead(weights: list[list[float]]) -> float:
    """The average share of a token's attention that goes to tokens after it."""
    n = len(weights)
    return sum(sum(row[i + 1 :]) for i, row in enumerate(weights)) / n if n else 0.0


def short(model: str) -> str:
    return model.split(" (")[0][:40]


def panel_title(result: AttentionWeights, layer: int | None, head: int | None, how: str) -> str:
    which = f"layer {layer} head {head}" if head is not None else f"layer {layer}" if layer is not None else "average"
    return f"{short(result.model)}, {which}\n{how}"


@command(
    "attention",
    "Which tokens each token looks at: a real model's attention weights",
    topic="transformers-vs-rnns",
    options=[
        Text("text", f"A short text (at most {MAX_TOKENS} tokens)", max_length=300),
        Integer("layer", "Which layer (1 = first; default: the average of all layers)", required=False, min_value=1),
        Integer("head", "Which head of that layer (default: the average of its heads)", required=False, min_value=1),
    ],
)
async def attention(ctx: Context, text: str, layer: int | None, head: int | None) -> Reply:
    if head is not None and layer is None:
        raise UserError("A head belongs to one layer: give `layer` too (e.g. `layer:1 head:1`).")
    causal = await ctx.inference.submit(Attention(text, layer, head))
    if causal.problem:
        raise UserError(causal.problem)
    causal_labels = labels(causal)
    n = len(causal_labels)
    last = causal.weights[-1]
    ranked = sorted(range(n), key=lambda j: -last[j])[:TOP]
    panels = [(panel_title(causal, layer, head, "causal, looks back only"), causal_labels, causal.weights, True)]
    fields = [
        Field("causal LM", f"{causal.model}: {what_is_shown(causal, layer, head)}", inline=False),
        Field("tokens", str(n)),
    ]
    data: dict[str, Any] = {
        "causal": {
            "model": causal.model,
            "tokens": causal_labels,
            "weights": causal.weights,
            "layers": causal.layers,
            "heads": causal.heads,
            "last_token_top": [{"position": j + 1, "token": causal_labels[j], "weight": last[j]} for j in ranked],
        },
        "layer": layer,
        "head": head,
    }
    lines = [
        "Each row is one token; its colours show how it spreads its attention (each row sums to 1). "
        "The causal model's grey triangle is the future: a token never sees what comes after it.",
        f"The last token “{causal_labels[-1]}” attends most to "
        + ", ".join(f"“{causal_labels[j]}” ({probability(last[j])})" for j in ranked[:3])
        + ".",
    ]
    if n > 2 and ranked[0] == 0:
        lines.append(
            "Much of the weight lands on the first token: models use it as a resting place (an “attention sink”) "
            "when nothing else needs looking at."
        )
    if head is None:
        lines.append(
            "Averages blur the picture: pick one head with `layer:` and `head:` (single heads often do one "
            "job, such as looking at the previous token)."
        )

    try:
        masked: AttentionWeights | None = await ctx.inference.submit(MaskedAttention(text, layer, head))
    except NoModelForRole:
        masked = None
        lines.append("No masked LM is available here (offline), so only the causal side is shown.")
        data["masked"] = None
    if masked is not None and masked.problem:
        lines.append(f"Masked LM: {masked.problem}")
        data["masked"] = {"problem": masked.problem}
    elif masked is not None:
        masked_labels = labels(masked)
        ahead = looks_ahead(masked.weights)
        title = panel_title(masked, layer, head, "masked, looks both ways")
        panels.append((title, masked_labels, masked.weights, False))
        fields.append(Field("masked LM", f"{masked.model}: {what_is_shown(masked, layer, head)}", inline=False))
        lines.append(
            f"The masked LM lets every token look both ways: on average {ahead:.0%} of a token's attention goes "
            f"to tokens after it (the causal model: {looks_ahead(causal.weights):.0%})."
        )
        data["masked"] = {
            "model": masked.model,
            "tokens": masked_labels,
            "weights": masked.weights,
            "layers": masked.layers,
            "heads": masked.heads,
            "looks_ahead": ahead,
        }
    chart = await render(
        heatmap, panels, colorbar="attention weight (square-root colour scale)", filename="attention.png"
    )
    rows = [[str(j + 1), causal_labels[j], f"{last[j]:.3f}"] for j in ranked]
    return Reply(
        title=f"Attention: {what_is_shown(causal, layer, head)}",
        text="\n".join(lines),
        fields=fields,
        table=Table(["position", f"last token {causal_labels[-1][:20]} attends to", "weight"], rows, align="rlr"),
        images=[chart],
        data=data,
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(attention)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
    register("masked_lm")
