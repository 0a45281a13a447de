"""Shared checks for plugin tests (``assert_fits_discord`` lives in the kit, bot.testing)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from bot.testing import assert_fits_discord as assert_fits_discord


def causal_reference(path: Path, prompt: str, temperature: float = 1.0) -> torch.Tensor:
    """Next-token probabilities computed directly with transformers, one prompt, no batching."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
    return torch.softmax(logits / temperature, -1)
