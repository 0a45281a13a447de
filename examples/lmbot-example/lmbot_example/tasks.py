"""The worker side of the plugin: runs in a model worker process, never in the bot.

The bot process imports this module's name only (the request's ``task`` string) and never the
module itself; torch is still imported inside the function, so that importing the module
anywhere stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmbot_example import RepeatedTokens, RepeatResult


def draw_tokens(tokenizer: Any, vocabulary: int, length: int, seed: int) -> list[int]:
    """``length`` ordinary token ids (no special tokens), drawn from a seeded generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    while len(ids) < length:
        draw = int(torch.randint(0, vocabulary, (1,), generator=generator))
        if draw not in special:
            ids.append(draw)
    return ids


def repeated_tokens(model: Any, tokenizer: Any, batch: Sequence[RepeatedTokens]) -> list[RepeatResult]:
    """Each request's random tokens twice in a row, and the model's loss on every token.

    One forward pass per request: the sequences are short (at most 128 tokens) and each
    request draws its own, so there is nothing to gain from padding them into one batch.
    """
    import torch

    # Ids the tokenizer can decode and the model has an embedding for.
    vocabulary = min(len(tokenizer), int(model.get_input_embeddings().weight.shape[0]))
    results = []
    for request in batch:
        ids = draw_tokens(tokenizer, vocabulary, request.length, request.seed)
        sequence = torch.tensor([ids + ids], device=model.device)
        logits = model(input_ids=sequence).logits[0].float()
        # Position i predicts token i + 1; the very first token has nothing before it to go on.
        logp = torch.log_softmax(logits[:-1], dim=-1)
        loss = -logp.gather(-1, sequence[0, 1:, None]).squeeze(-1)
        nats = loss.tolist()
        results.append(
            RepeatResult(
                model="",  # the worker fills in the served model's label
                ids=ids,
                tokens=[tokenizer.decode([i]) for i in ids],
                first_nats=nats[: request.length - 1],
                second_nats=nats[request.length - 1 :],
                vocabulary=vocabulary,
            )
        )
    return results
