"""Beyond topic "What is a language model": the logit lens, and knock-outs.

The logit lens reads the model's running hidden state (the residual stream) after each layer
through the model's own final norm and output layer, as if the model had to answer there: the
table shows how the guess for the next token forms layer by layer. A knock-out switches off one
attention head, or one layer's attention or MLP, and shows how the next-token distribution moves
(top-k before and after, and the KL divergence in bits): attention as a cause, not only a picture.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bot import (
    Command,
    Context,
    Field,
    Integer,
    ModelRole,
    Reply,
    Request,
    Table,
    Text,
    UserError,
    command,
    hookimpl,
)
from bot.charts import line_chart, probability_grid, render, show_bytes
from bot.render import plural, probability

MAX_TOKENS = 64  # one forward; the lens reads only the last position
TOP = 3  # tokens per layer in the table
CANDIDATES = 5  # the final answer's rivals in the layer × candidate chart
KNOCKOUTS = ("none", "attention", "mlp", "head")
MAX_ROWS = 13  # table rows a Discord reply shows; every layer is in the data
LN2 = math.log(2)
LENS_LINE = (
    "Logit lens: after each layer the model's running hidden state (the residual stream, which every layer "
    "adds its output to) is sent through the model's own final norm and output layer early, as if the model "
    "had to answer there. Layer 0 is the token embeddings, before any layer; the last layer is the real answer."
)
KL_LINE = (
    "KL divergence (in bits): how much the knocked-out distribution differs from the real one, weighted by the "
    "real one; 0 means no change, 1 bit is as much as halving the probability of everything the model expects."
)


@dataclass(frozen=True)
class Lens(Request):
    """The logit lens at the last position of ``text``; optionally with one part switched off.

    ``knockout`` is ``"none"``, ``"attention"`` or ``"mlp"`` (all of ``layer``'s sublayer output
    set to zero) or ``"head"`` (head ``head`` of ``layer``: its slice of the attention output is
    zeroed before the output projection). ``layer`` and ``head`` count from 1.
    """

    text: str
    k: int = TOP
    knockout: str = "none"
    layer: int | None = None
    head: int | None = None
    max_tokens: int = MAX_TOKENS
    task: ClassVar[str] = "plugins.lens:logit_lens"

    def texts(self) -> list[str]:
        return [self.text]

    def batch_key(self) -> tuple[Any, ...]:
        return (self.knockout, self.layer, self.head)  # one set of hooks per forward


@dataclass(frozen=True)
class Guess:
    id: int
    raw: bytes
    prob: float


@dataclass(frozen=True)
class LensResult:
    model: str
    layers: int
    heads: int
    prompt_raw: list[bytes] = field(default_factory=list)
    rows: list[list[Guess]] = field(default_factory=list)  # rows[l]: top-k after layer l (0: embeddings)
    answer: Guess | None = None  # the model's real top next token (last layer)
    answer_probs: list[float] = field(default_factory=list)  # its probability at each layer
    candidates: list[Guess] = field(default_factory=list)  # the model's final top CANDIDATES next tokens
    candidate_probs: list[list[float]] = field(default_factory=list)  # [layer][c]: their probability through the lens
    knocked_rows: list[list[Guess]] = field(default_factory=list)  # the lens with the knock-out
    knocked_answer_probs: list[float] = field(default_factory=list)
    before: list[Guess] = field(default_factory=list)  # real next-token top-k
    after: list[Guess] = field(default_factory=list)  # with the knock-out
    answer_after: float | None = None  # the real answer's probability with the knock-out
    kl_bits: float | None = None  # KL(before || after)
    problem: str = ""
    tied_embeddings: bool = False  # the model's config ties its input and output embeddings


# --------------------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class Parts:
    """Where a decoder-only model keeps what the lens and the knock-outs need."""

    layers: Sequence[Any]
    norm: Any
    head: Any
    attention: Callable[[Any], Any]  # layer -> its attention module
    mlp: Callable[[Any], Any]  # layer -> its MLP module
    out_projection: Callable[[Any], Any]  # attention module -> the linear layer that mixes its heads


def parts(model: Any) -> Parts | None:
    """The layers, final norm and output layer of a Llama-style or GPT-2-style model (None otherwise)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None:
        return None

    def attention(layer: Any) -> Any:
        return getattr(layer, "self_attn", None) or getattr(layer, "attn", None)

    def out_projection(module: Any) -> Any:
        return getattr(module, "o_proj", None) or getattr(module, "c_proj", None)

    return Parts(list(layers), norm, head, attention, lambda layer: getattr(layer, "mlp", None), out_projection)


def _first(output: Any) -> Any:
    """A layer's hidden states: Llama-style layers return them alone, GPT-2-style ones first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, acting only in the thread that wraps it (in any other it does nothing).

    A module hook belongs to the shared model, not to one forward: while it is registered it
    runs in every forward of that model, whichever thread runs it. The worker builds a role's
    faster engine in a background thread (``bot.worker.engines``: an ONNX export and a
    verification forward on the same model), so without this a lens hook recorded that forward
    too (its batch of 3 probe texts in the middle of a batch of 1: "stack expects each tensor
    to be equal size"), and a knock-out switched off part of the model for it as well.
    """
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return scoped


def _zero_output(_module: Any, _inputs: Any, output: Any) -> Any:
    """A forward hook that makes a sublayer add nothing to the residual stream."""
    if isinstance(output, tuple):
        return (output[0] * 0, *output[1:])
    return output * 0


@contextmanager
def knocked_out(model: Any, found: Parts, request: Lens) -> Iterator[None]:
    """The model with the request's part switched off, for the duration of the block and in this
    thread only (another thread's forward of the same model meanwhile sees it whole)."""
    with ExitStack() as stack:
        if request.knockout != "none" and request.layer is not None:
            layer = found.layers[request.layer - 1]
            if request.knockout == "attention":
                handle = found.attention(layer).register_forward_hook(this_thread_only(_zero_output))
            elif request.knockout == "mlp":
                handle = found.mlp(layer).register_forward_hook(this_thread_only(_zero_output))
            else:
                assert request.head is not None
                heads = int(model.config.num_attention_heads)
                projection = found.out_projection(found.attention(layer))
                first = request.head - 1

                def zero_head(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
                    # The input of the output projection is the heads' outputs side by side.
                    mixed = inputs[0].clone()
                    size = mixed.shape[-1] // heads
                    mixed[..., first * size : (first + 1) * size] = 0
                    return (mixed, *inputs[1:])

                handle = projection.register_forward_pre_hook(this_thread_only(zero_head))
            stack.callback(handle.remove)
        yield


def _problem(request: Lens, tokens: int, layers: int, heads: int, found: Parts | None) -> str:
    if found is None:
        return "/lens knows Llama- and GPT-2-style models; this model keeps its layers elsewhere."
    if tokens == 0:
        return "That text gives the model no tokens to read."
    if tokens > request.max_tokens:
        return f"That text is {tokens} tokens; /lens reads at most {request.max_tokens}. Try a shorter one."
    if request.knockout == "none":
        return ""
    if request.layer is None:
        return f"Say which layer to switch off: `layer:1` to `layer:{layers}`."
    if request.layer > layers:
        return f"This model has {layers} layers: `layer` must be 1 to {layers}."
    if request.knockout == "head":
        if request.head is None:
            return f"Say which head to switch off: `head:1` to `head:{heads}`."
        if request.head > heads:
            return f"This model has {heads} heads per layer: `head` must be 1 to {heads}."
        if found.out_projection(found.attention(found.layers[0])) is None:
            return "This model's attention has no output projection that /lens can find, so a head cannot be cut."
    return ""


def _lens_forward(model: Any, found: Parts, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Log-probabilities at the last position through the lens after every layer (layers+1 × batch
    × vocab), and the model's own final log-probabilities there (batch × vocab)."""
    import torch

    # captured[0]: what the first layer reads; captured[n]: layer n's output. Kept by index and
    # each written once, so a stray call can never shift or mix the rows.
    captured: list[Any] = [None] * (len(found.layers) + 1)

    def keep(index: int, hidden: Any) -> None:
        if captured[index] is not None:
            raise RuntimeError(f"/lens: layer {index} ran twice in one forward; the lens reads each layer once")
        captured[index] = hidden[:, -1]

    def stream_in(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # What the first layer reads: the embeddings (with position embeddings, where the model adds them).
        keep(0, args[0] if args else kwargs["hidden_states"])

    def layer_out(index: int) -> Callable[[Any, Any, Any], None]:
        return lambda _module, _inputs, output: keep(index, _first(output))

    handles = [found.layers[0].register_forward_pre_hook(this_thread_only(stream_in), with_kwargs=True)]
    try:
        for n, layer in enumerate(found.layers, start=1):
            handles.append(layer.register_forward_hook(this_thread_only(layer_out(n))))
        logits = model(**kwargs).logits[:, -1].double()
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n, hidden in enumerate(captured) if hidden is None]
    if missing:
        raise RuntimeError(f"/lens: the forward never reached layer(s) {missing}")
    # The last layer's output through the norm and head is the model's own answer (checked below).
    stream = torch.stack(captured)  # (layers + 1) × batch × hidden
    # Softmax in float64: in float32 a top token with 1e-15 left for the rest reads exactly 1 (100%,
    # certain) beside rivals at 1 in 10^15, and tiny ones round to 0.
    lens = found.head(found.norm(stream)).double()
    return torch.log_softmax(lens, dim=-1), torch.log_softmax(logits, dim=-1)


def _top(tokenizer: Any, logp: Any, k: int) -> list[Guess]:
    import torch

    from bot.worker.tasks import token_bytes

    values, ids = torch.topk(logp, k)
    id_list = [int(i) for i in ids.tolist()]
    return [
        Guess(i, raw, math.exp(v))
        for i, raw, v in zip(id_list, token_bytes(tokenizer, id_list), values.tolist(), strict=True)
    ]


def probabilities(logprobs: Any) -> list[float]:
    """exp of float32 log-probabilities, in float64: far down the lens (the embeddings, early layers)
    a float32 exp rounds a probability like 1e-50 to 0, which would read as "impossible"."""
    return [math.exp(v) for v in logprobs.tolist()]


def logit_lens(model: Any, tokenizer: Any, batch: Sequence[Lens]) -> list[LensResult]:
    """Runs in the worker: one left-padded forward for the batch (position ids count real tokens
    only, so each text gets the numbers it gets alone), and one more with the knock-out, if any."""
    import torch

    from bot.worker.tasks import token_bytes

    found = parts(model)
    layers, heads = int(model.config.num_hidden_layers), int(model.config.num_attention_heads)
    # The same tokens /nexttoken reads, so the last layer here is /nexttoken's distribution.
    ids = [list(tokenizer(r.text)["input_ids"]) for r in batch]
    results: list[LensResult] = [LensResult("", layers, heads)] * len(batch)
    live = []
    for index, (request, row) in enumerate(zip(batch, ids, strict=True)):
        problem = _problem(request, len(row), layers, heads, found)
        if problem:
            results[index] = LensResult("", layers, heads, problem=problem)
        else:
            live.append(index)
    if not live or found is None:
        return results
    width = max(len(ids[i]) for i in live)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in live], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in live], device=model.device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    lens, final = _lens_forward(model, found, kwargs)
    request = batch[live[0]]  # batch_key: every request here has the same knock-out
    knocked_lens = knocked_final = None
    if request.knockout != "none":
        with knocked_out(model, found, request):
            knocked_lens, knocked_final = _lens_forward(model, found, kwargs)
    for b, i in enumerate(live):
        r = batch[i]
        answer = int(final[b].argmax())
        candidates = _top(tokenizer, final[b], CANDIDATES)
        result = LensResult(
            model="",
            layers=layers,
            heads=heads,
            prompt_raw=token_bytes(tokenizer, ids[i]),
            rows=[_top(tokenizer, lens[layer, b], r.k) for layer in range(layers + 1)],
            answer=_top(tokenizer, final[b], 1)[0],
            answer_probs=probabilities(lens[:, b, answer]),
            candidates=candidates,
            candidate_probs=[probabilities(row) for row in lens[:, b, [g.id for g in candidates]]],
            before=_top(tokenizer, final[b], r.k),
            tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
        )
        if knocked_lens is not None and knocked_final is not None:
            p, q = final[b], knocked_final[b]
            kl = float((p.exp() * (p - q)).sum()) / LN2
            result = LensResult(
                **{
                    **result.__dict__,
                    "knocked_rows": [_top(tokenizer, knocked_lens[layer, b], r.k) for layer in range(layers + 1)],
                    "knocked_answer_probs": probabilities(knocked_lens[:, b, answer]),
                    "after": _top(tokenizer, q, r.k),
                    "answer_after": math.exp(float(q[answer])),
                    "kl_bits": max(0.0, kl),
                }
            )
        results[i] = result
    return results


# --------------------------------------------------------------------------- the command


def label(guess: Guess) -> str:
    return show_bytes(guess.raw)


def settles_at(rows: Sequence[Sequence[Guess]], answer: Guess) -> int:
    """The first layer from which the final answer is the lens's top guess at every later layer."""
    start = len(rows) - 1
    for layer in range(len(rows) - 1, -1, -1):
        if rows[layer][0].id != answer.id:
            break
        start = layer
    return start


def shown_layers(count: int, settled: int) -> list[int]:
    """The layers the table shows: all when they fit, else evenly spread ones plus the first,
    the last and the one where the answer settles (every layer is in the reply's data)."""
    if count <= MAX_ROWS:
        return list(range(count))
    step = (count - 1) / (MAX_ROWS - 2)
    return sorted({0, count - 1, settled, *(round(i * step) for i in range(MAX_ROWS - 1))})


def what_was_cut(knockout: str, layer: int | None, head: int | None) -> str:
    if knockout == "attention":
        return f"layer {layer}'s attention (everything it adds to the residual stream set to 0)"
    if knockout == "mlp":
        return f"layer {layer}'s MLP (everything it adds to the residual stream set to 0)"
    return f"head {head} of layer {layer} (its part of the attention output set to 0 before the heads are mixed)"


def echo_line(result: LensResult) -> str | None:
    """Why layer 0's top guess is the last input token, when the model's config says it ties its
    input and output embeddings (a token's embedding read back through the output layer points at
    that same token): a plain line so the 100% is not read as a prediction. None otherwise."""
    if not (result.tied_embeddings and result.rows and result.prompt_raw):
        return None
    top = result.rows[0][0]
    if top.raw != result.prompt_raw[-1]:
        return None
    return (
        f"The embeddings row only echoes the last input token “{label(top)}”: {short(result.model)} ties its input "
        "and output embeddings (tie_word_embeddings in its config, one matrix for both), so a token's own "
        "embedding read through the output layer points back at that token. It is not a prediction."
    )


def guesses(items: Sequence[Guess]) -> str:
    return ", ".join(f"“{label(g)}” {probability(g.prob)}" for g in items)


def short(model: str) -> str:
    return model.split(" (")[0][:40]


def headers(answer: str, knockout: str) -> list[str]:
    """The table's headings: with a knock-out, its rows are the unchanged model's (said so), and one
    more column holds the answer's probability with the knock-out."""
    if knockout == "none":
        return ["layer", f"top {TOP} next tokens through the lens", f"P({answer[:12]})"]
    return ["layer", f"unchanged model: top {TOP} through the lens", f"P({answer[:12]})", "P, knocked out"]


@command(
    "lens",
    "Logit lens: what each layer would predict next; switch off a head or a layer and watch",
    topic="language-model",
    options=[
        Text("prompt", f"A text to continue (at most {MAX_TOKENS} tokens)", max_length=400),
        Text(
            "knockout",
            "Switch off part of one layer: none, attention, mlp or head",
            default="none",
            choices=KNOCKOUTS,
            max_length=10,
        ),
        Integer("layer", "The layer to switch off (1 = first)", required=False, min_value=1),
        Integer("head", "With knockout:head, which head of that layer (1 = first)", required=False, min_value=1),
    ],
)
async def lens(ctx: Context, prompt: str, knockout: str, layer: int | None, head: int | None) -> Reply:
    if knockout == "none" and (layer is not None or head is not None):
        raise UserError("`layer` and `head` choose what to switch off: add `knockout:attention`, `mlp` or `head`.")
    if knockout != "head" and head is not None:
        raise UserError("`head` needs `knockout:head` (attention and mlp switch off a whole sublayer).")
    result: LensResult = await ctx.inference.submit(Lens(prompt, knockout=knockout, layer=layer, head=head))
    if result.problem:
        raise UserError(result.problem)
    assert result.answer is not None
    answer = label(result.answer)
    count = len(result.rows)
    settled = settles_at(result.rows, result.answer)
    rows = [
        [
            "embeddings" if n == 0 else str(n),
            " · ".join(f"{label(g)[:14]} {probability(g.prob)}" for g in result.rows[n]),
            probability(result.answer_probs[n]),
        ]
        for n in shown_layers(count, settled)
    ]
    lines = [
        LENS_LINE,
        f"The model's answer after the last layer: “{answer}” ({probability(result.answer.prob)}). "
        "Through the lens it is "
        + (
            "the top guess only at the last layer."
            if settled == count - 1
            else f"the top guess from layer {settled} on."
            if settled > 0
            else "already the top guess at the embeddings."
        ),
    ]
    if (echo := echo_line(result)) is not None:
        lines.append(echo)
    if count > MAX_ROWS:
        lines.append(f"The table shows {len(rows)} of the {count} rows (all are in the data).")
    fields = [
        Field(
            "model", f"{result.model}: {plural(result.layers, 'layer')} × {plural(result.heads, 'head')}", inline=False
        )
    ]
    series = [(f"P(“{answer[:20]}”) through the lens", list(range(count)), result.answer_probs, "o-")]
    data: dict[str, Any] = {
        "model": result.model,
        "layers": result.layers,
        "heads": result.heads,
        "answer": {"id": result.answer.id, "token": answer, "prob": result.answer.prob},
        "answer_probs": result.answer_probs,
        "settles_at": settled,
        "lens": [[{"id": g.id, "token": label(g), "prob": g.prob} for g in row] for row in result.rows],
        "knockout": knockout,
        "layer": layer,
        "head": head,
    }
    if knockout != "none" and result.kl_bits is not None and result.answer_after is not None:
        cut = what_was_cut(knockout, layer, head)
        lines += [
            f"Switched off: {cut}. The answer “{answer}” went from {probability(result.answer.prob)} to "
            f"{probability(result.answer_after)}; the distribution moved by {result.kl_bits:.3f} bits (KL divergence).",
            KL_LINE,
        ]
        lines.append(
            "The table is the unchanged model's, layer by layer; its last column is the answer's probability "
            "through the lens with the knock-out."
        )
        for row, n in zip(rows, shown_layers(count, settled), strict=True):
            row.append(probability(result.knocked_answer_probs[n]))
        fields += [
            Field("top next tokens, unchanged model", guesses(result.before)[:1024], inline=False),
            Field("with the knock-out", guesses(result.after)[:1024], inline=False),
            Field("KL divergence", f"{result.kl_bits:.3f} bits"),
        ]
        series.append(
            (f"the same, {knockout} of layer {layer} off", list(range(count)), result.knocked_answer_probs, "s--")
        )
        data.update(
            {
                "before": [{"id": g.id, "token": label(g), "prob": g.prob} for g in result.before],
                "after": [{"id": g.id, "token": label(g), "prob": g.prob} for g in result.after],
                "answer_after": result.answer_after,
                "kl_bits": result.kl_bits,
                "knocked_answer_probs": result.knocked_answer_probs,
                "knocked_lens": [
                    [{"id": g.id, "token": label(g), "prob": g.prob} for g in row] for row in result.knocked_rows
                ],
            }
        )
    data["candidates"] = [{"id": g.id, "token": label(g), "prob": g.prob} for g in result.candidates]
    data["candidate_probs"] = result.candidate_probs
    images = [
        await render(
            probability_grid,
            ["embeddings" if n == 0 else f"layer {n}" for n in range(count)],
            [label(g) for g in result.candidates],
            result.candidate_probs,
            # This grid is always the model as it is; only the second chart shows the knock-out. Said
            # early, so the picture's alt text (the title's first 100 characters) says it too.
            title=f"{short(result.model)}{'' if knockout == 'none' else ', unchanged (no knock-out)'}: the final top "
            f"{len(result.candidates)} next tokens through the lens, layer by layer"
            + ("" if knockout == "none" else "; the knock-out is in the second chart"),
            row_name="after layer (top: embeddings; bottom: the model's real answer)",
            column_name=f"the model's final top {len(result.candidates)} next tokens (first: its answer)",
            filename="lens.png",
        )
    ]
    if knockout != "none":
        images.append(
            await render(
                line_chart,
                series,
                title=f"{short(result.model)}: the final answer “{answer[:20]}”, layer by layer",
                xlabel="layer (0 = embeddings)",
                ylabel="probability through the lens",
                filename="lens-knockout.png",
                log=False,
            )
        )
    return Reply(
        title=f"Logit lens: {short(result.model)} layer by layer",
        text="\n".join(lines),
        table=Table(headers(answer, knockout), rows, align="llr" if knockout == "none" else "llrr"),
        fields=fields,
        images=images,
        data=data,
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(lens)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("causal_lm")
