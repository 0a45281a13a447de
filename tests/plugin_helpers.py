"""Shared checks for plugin tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from bot.commands import Reply

# Discord's limits (content, embed title, field value, fields per embed).
CONTENT, TITLE, FIELD_VALUE, FIELDS = 2000, 256, 1024, 25


def assert_fits_discord(reply: Reply) -> None:
    assert isinstance(reply, Reply)
    assert len(reply.text) <= CONTENT
    assert reply.title is None or len(reply.title) <= TITLE
    assert len(reply.fields) <= FIELDS
    for field in reply.fields:
        assert 0 < len(field.value) <= FIELD_VALUE, field
    for image in reply.images:
        assert image.data.startswith(b"\x89PNG")


def causal_reference(path: Path, prompt: str, temperature: float = 1.0) -> torch.Tensor:
    """Next-token probabilities computed directly with transformers, one prompt, no batching."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return torch.softmax(logits / temperature, -1)
