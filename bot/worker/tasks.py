"""The inference tasks, and the helpers a plugin's own task may use.

A task is a pure function of ``(model, tokenizer, batch)``: it takes a list of
requests of one type and returns one result per request, in order. It holds no
state, so any backend (the local workers, Ray Serve) can call it. Batching must
not change a number: causal LMs are padded on the left with explicit position
ids, so every row sees exactly the positions it would see alone.

This module runs in model workers only (it imports torch). A plugin imports it
inside its task function, never at the top of its module (the bot process loads
the plugin module; see docs/writing-a-plugin.md). Its public API, ``__all__``:

Helpers for a plugin's own task:

* :func:`token_bytes`: each token's own bytes (a token that holds part of a character
  decodes to U+FFFD alone; its bytes come from the vocabulary);
* :func:`document_start_id`: the token a text is scored after when it has no context;
* :func:`left_padded`: a batch of texts tokenized and padded on the left, on the model's device;
* :func:`position_ids`: position ids that count real tokens only, so left padding does not
  shift them (pass them to a causal LM's forward to get the numbers a text gets alone).

Built-in tasks a plugin's task may call on its own batch (each returns the result
dataclasses of :mod:`bot.inference.protocol`): :func:`next_token`, :func:`generate`,
:func:`seq2seq`, :func:`classify`, :func:`embed`, :func:`score`.

Everything else here (names starting with ``_``, :data:`TASKS`, :func:`find_task`) is the
worker's own and may change.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bot.inference.offline import byte_level_alphabet
from bot.inference.protocol import (
    MASK,
    Classify,
    ClassifyResult,
    Embed,
    EmbedResult,
    FillMask,
    FillMaskResult,
    Generate,
    GenerateResult,
    MaskFill,
    NextToken,
    NextTokenResult,
    Score,
    ScoreResult,
    Seq2Seq,
    TokenProb,
)
from bot.worker.engines import engine_of

__all__ = [
    "classify",
    "document_start_id",
    "embed",
    "generate",
    "left_padded",
    "next_token",
    "position_ids",
    "score",
    "seq2seq",
    "token_bytes",
]

LN2 = math.log(2)


@functools.cache
def _accepts(model_type: Any, name: str) -> bool:
    return name in inspect.signature(model_type.forward).parameters


def left_padded(tokenizer: Any, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for ``texts``, padded on the left, on ``device``."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _causal_forward(model: Any, enc: dict[str, torch.Tensor], keep: int | None) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions when ``keep`` is None)."""
    engine = engine_of(model)
    if engine is not None and keep is not None:
        # The role's faster engine (verified against this model when it was built).
        return engine.logits(enc, keep)
    kwargs: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if _accepts(model.__class__, "position_ids"):
        kwargs["position_ids"] = position_ids(enc["attention_mask"])
    if keep is not None and _accepts(model.__class__, "logits_to_keep"):
        # Skips the vocabulary projection for every position but the last ones.
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    return (logits if keep is None else logits[:, -keep:, :]).float()


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each token's own bytes.

    Decoding a token alone gives U+FFFD when it holds only part of a character (byte-level
    BPE splits 東 into several tokens); its bytes then come from the vocabulary entry itself:
    GPT-2-style byte characters, or SentencePiece's ``<0xE6>`` byte tokens.
    """
    alphabet = byte_level_alphabet()
    out = []
    for token_id in ids:
        text = tokenizer.decode([int(token_id)])
        if "\ufffd" not in text:
            out.append(text.encode("utf-8"))
            continue
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif isinstance(piece, str) and piece and all(ch in alphabet for ch in piece):
            out.append(bytes(alphabet[ch] for ch in piece))
        else:
            out.append(text.encode("utf-8"))
    return out


def _top(tokenizer: Any, probs: torch.Tensor, k: int) -> list[TokenProb]:
    values, ids = torch.topk(probs, min(k, probs.shape[-1]))
    id_list = [int(i) for i in ids.tolist()]
    return [
        TokenProb(i, tokenizer.decode([i]), float(v), raw)
        for v, i, raw in zip(values.tolist(), id_list, token_bytes(tokenizer, id_list), strict=True)
    ]


def _real_ids(enc: dict[str, torch.Tensor], row: int) -> list[int]:
    return enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()


def next_token(model: Any, tokenizer: Any, batch: Sequence[NextToken]) -> list[NextTokenResult]:
    enc = left_padded(tokenizer, [r.text for r in batch], model.device)
    last = _causal_forward(model, enc, keep=1)[:, -1, :]
    results = []
    for row, request in enumerate(batch):
        # float64: float32 rounds a tiny probability to 0 and a top one short of 1 to 1 (at low temperatures).
        logp = torch.log_softmax(last[row].double() / request.temperature, dim=-1)
        probs = logp.exp()
        entropy = float(torch.special.entr(probs).sum()) / LN2
        ids = _real_ids(enc, row)
        results.append(
            NextTokenResult(
                model="",
                prompt_ids=ids,
                prompt_tokens=[tokenizer.decode([i]) for i in ids],
                top=_top(tokenizer, logp.exp(), request.k),
                entropy_bits=entropy,
                prompt_raw=token_bytes(tokenizer, ids),
            )
        )
    return results


def fill_mask(model: Any, tokenizer: Any, batch: Sequence[FillMask]) -> list[FillMaskResult]:
    texts = [r.text.replace(MASK, tokenizer.mask_token) for r in batch]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    logits = model(**enc).logits.float()
    results = []
    for row, request in enumerate(batch):
        ids = _real_ids(enc, row)
        positions = [p for p, i in enumerate(ids) if i == tokenizer.mask_token_id]
        masks = [MaskFill(p, _top(tokenizer, logits[row, p].softmax(-1), request.k)) for p in positions]
        results.append(FillMaskResult("", tokenizer.mask_token, tokenizer.convert_ids_to_tokens(ids), masks))
    return results


def _strip_padding(tokenizer: Any, ids: list[int]) -> list[int]:
    stop = {tokenizer.pad_token_id, tokenizer.eos_token_id} - {None}
    while ids and ids[-1] in stop:
        ids.pop()
    return ids


def generate(model: Any, tokenizer: Any, batch: Sequence[Generate]) -> list[GenerateResult]:
    first = batch[0]
    texts = [r.text for r in batch]
    if first.chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    enc = left_padded(tokenizer, texts, model.device)
    options: dict[str, Any] = {"max_new_tokens": first.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if first.temperature > 0:
        torch.manual_seed(first.seed)  # batch_key keeps a sampled request alone, so the seed is its own
        options.update(do_sample=True, temperature=first.temperature, top_k=0, top_p=1.0)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = model.generate(**enc, **options)
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    return [
        GenerateResult("", tokenizer.decode(_strip_padding(tokenizer, ids), skip_special_tokens=True), ids)
        for ids in new
    ]


def seq2seq(model: Any, tokenizer: Any, batch: Sequence[Seq2Seq]) -> list[GenerateResult]:
    enc = tokenizer([r.text for r in batch], return_tensors="pt", padding=True)
    # Only what an encoder-decoder takes (a WordPiece tokenizer also emits token_type_ids).
    enc = {k: enc[k].to(model.device) for k in ("input_ids", "attention_mask")}
    out = model.generate(**enc, max_new_tokens=batch[0].max_new_tokens, do_sample=False, num_beams=1)
    return [
        GenerateResult("", tokenizer.decode(ids, skip_special_tokens=True), _strip_padding(tokenizer, ids))
        for ids in out.tolist()
    ]


def classify(model: Any, tokenizer: Any, batch: Sequence[Classify]) -> list[ClassifyResult]:
    enc = tokenizer([r.text for r in batch], return_tensors="pt", padding=True)
    probs = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float().softmax(-1)
    labels = [model.config.id2label[i] for i in range(probs.shape[-1])]
    return [ClassifyResult("", labels, p.tolist()) for p in probs]


def embed(model: Any, tokenizer: Any, batch: Sequence[Embed]) -> list[EmbedResult]:
    enc = tokenizer([r.text for r in batch], return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return [EmbedResult("", v.tolist()) for v in vectors]


def document_start_id(tokenizer: Any) -> int:
    """The token a text is scored after when it has no context.

    GPT-2- and SmolLM-style vocabularies separate training documents with
    ``<|endoftext|>``; chat models often declare ``<|im_start|>`` as their
    BOS, after which ordinary prose is very unlikely, so the separator wins.
    """
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # A missing token maps to the unknown id; converting back tells the two apart.
    if isinstance(separator, int) and tokenizer.convert_ids_to_tokens(separator) == "<|endoftext|>":
        return separator
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def score(model: Any, tokenizer: Any, batch: Sequence[Score]) -> list[ScoreResult]:
    start = document_start_id(tokenizer)
    rows, text_lengths = [], []
    for request in batch:
        context = tokenizer(request.context, add_special_tokens=False)["input_ids"] if request.context else [start]
        text = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        rows.append(context + text)
        text_lengths.append(len(text))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    # With left padding every text ends at the last column, so only the last
    # (longest text + 1) positions' logits are needed.
    keep = max(text_lengths) + 1
    logp = torch.log_softmax(
        _causal_forward(model, {"input_ids": input_ids, "attention_mask": attention_mask}, keep), -1
    )
    results = []
    for row, n in enumerate(text_lengths):
        targets = input_ids[row, width - n :]
        predicted = logp[row, keep - n - 1 : keep - 1]
        values = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
        results.append(ScoreResult("", [tokenizer.decode([int(t)]) for t in targets], values))
    return results


TASKS: dict[str, Callable[[Any, Any, Sequence[Any]], list[Any]]] = {
    "next_token": next_token,
    "fill_mask": fill_mask,
    "generate": generate,
    "seq2seq": seq2seq,
    "classify": classify,
    "embed": embed,
    "score": score,
}


def find_task(name: str) -> Callable[[Any, Any, Sequence[Any]], list[Any]]:
    """A built-in task by name, or ``"package.module:function"`` for one defined elsewhere."""
    if name in TASKS:
        return TASKS[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise KeyError(f"unknown inference task {name!r}")
    import importlib

    return getattr(importlib.import_module(module), attr)
