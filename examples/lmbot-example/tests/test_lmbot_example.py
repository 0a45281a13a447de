"""The example plugin, tested as its author would: with lmbot's testing kit (bot.testing), on the
kit's tiny random GPT-2 and on the real offline SmolLM2, against transformers' own numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from bot.config import ConfigError
from bot.testing import assert_fits_discord, installed_plugin

LN2 = math.log(2)


def reference_nats(folder: Path, ids: list[int]) -> list[float]:
    """Each token's loss, computed directly with transformers on the same ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    sequence = torch.tensor([ids + ids])
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return (-logp.gather(-1, sequence[0, 1:, None]).squeeze(-1)).tolist()


def test_the_installed_package_is_found_by_its_entry_point() -> None:
    plugin, name = installed_plugin("example")
    assert name == "example"
    assert plugin.__name__ == "lmbot_example"


async def test_it_loads_with_no_errors(lmbot_app) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app(installed_plugin("example"))
    listing = await app.ask("/plugins")
    row = next(p for p in listing.data["plugins"] if p["name"] == "example")
    assert (row["status"], row["error"], row["commands"]) == ("loaded", "", ["induction"])


async def test_surprise_equals_transformers_on_the_same_tokens(lmbot_app, lmbot_models) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app(installed_plugin("example"), models={"causal_lm": lmbot_models.tiny_gpt2})
    reply = await app.ask("/induction length:12 seed:5")
    assert not reply.error, reply.text
    assert_fits_discord(reply)
    ids = reply.data["ids"]
    assert len(ids) == 12 and len(set(ids)) > 1
    expected = [n / LN2 for n in reference_nats(lmbot_models.tiny_gpt2, ids)]
    got = reply.data["first"] + reply.data["second"]
    assert got == pytest.approx(expected, abs=1e-4)
    assert reply.data["first_mean"] == pytest.approx(sum(expected[:11]) / 11, abs=1e-4)
    # The same positions (2..12) in both copies: like with like.
    assert reply.data["second_mean"] == pytest.approx(sum(expected[12:]) / 11, abs=1e-4)
    assert reply.data["model"]  # the worker put the model's label in the result
    tokenizer = transformers.AutoTokenizer.from_pretrained(lmbot_models.tiny_gpt2)
    assert reply.data["vocabulary"] == len(tokenizer)
    assert reply.data["uniform"] == pytest.approx(math.log2(len(tokenizer)))
    assert reply.data["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert reply.images and reply.images[0].data.startswith(b"\x89PNG")
    # The same seed draws the same tokens; another seed draws others.
    assert (await app.ask("/induction length:12 seed:5")).data["ids"] == ids
    assert (await app.ask("/induction length:12 seed:6")).data["ids"] != ids


async def test_the_unit_option_switches_to_nats(lmbot_app, lmbot_models) -> None:  # type: ignore[no-untyped-def]
    models = {"causal_lm": lmbot_models.tiny_gpt2}
    bits = await lmbot_app(installed_plugin("example"), models=models).ask("/induction length:6")
    nats_app = lmbot_app(installed_plugin("example"), models=models, options={"example": {"unit": "nats"}})
    nats = await nats_app.ask("/induction length:6")
    assert nats.data["unit"] == "nats" and "nats per token" in nats.text
    assert nats.data["second"] == pytest.approx([b * LN2 for b in bits.data["second"]], abs=1e-5)
    with pytest.raises(ConfigError, match=r"`plugins\.options\.example\.unit`: must be one of: bits, nats"):
        lmbot_app(installed_plugin("example"), options={"example": {"unit": "decibels"}})


@pytest.mark.parametrize(
    ("line", "message"),
    [("/induction length:3", "`length` must be at least 4"), ("/induction length:65", "`length` must be at most 64")],
)
async def test_out_of_range_lengths_get_a_short_answer(lmbot_app, line: str, message: str) -> None:  # type: ignore[no-untyped-def]
    reply = await lmbot_app(installed_plugin("example")).ask(line, owner=False)
    assert reply.error and message in reply.text


async def test_the_study_card_and_its_quiz(lmbot_app) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app(installed_plugin("example"), "plugins.study")
    card = await app.ask("/topic name:in-context-copying")
    assert not card.error and card.title == "Copying from context"
    assert_fits_discord(card)
    assert "Quiz me" in [b.label for b in card.buttons]
    question = await app.ask("/quiz topic:in-context-copying")
    assert question.data["question"].startswith("in-context-copying.")
    assert len(app.registry.topics["in-context-copying"].quiz) == 5


async def test_the_real_model_copies_the_repeat(lmbot_app, lmbot_models) -> None:  # type: ignore[no-untyped-def]
    """The card's claim, on SmolLM2: the second copy is far less surprising than the first."""
    assert lmbot_models.smollm2.is_dir()  # converted once, kept between sessions, linked into the app's cache
    app = lmbot_app(installed_plugin("example"))  # no model named: the packaged offline one
    reply = await app.ask("/induction length:48 seed:2")
    assert not reply.error, reply.text
    assert "SmolLM2" in reply.data["model"]
    assert reply.data["second_mean"] < reply.data["first_mean"] / 3
