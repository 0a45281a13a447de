"""/attention, /sample and /surprise through the front ends: the real discord.py client
against the fake Discord, and the console reading piped commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fake_discord import GUILD_ID
from tests.test_cli import run
from tests.test_discord import Harness, harness  # noqa: F401  (harness: the fixture)


async def followup(harness: Harness, token: str) -> Any:  # noqa: F811
    """The followup that answered ``token``; the first answer waits for workers and models to start."""

    def answered(calls: list) -> bool:
        return any(token in c.path and c.method in ("POST", "PATCH") and "webhooks" in c.path for c in calls)

    await harness.fake.wait_for(answered, timeout=240)
    return [c for c in harness.fake.calls if token in c.path][-1]


async def test_the_three_commands_on_discord(harness: Harness, tiny_bert_mlm: Path) -> None:  # noqa: F811
    harness.models = {**harness.models, "masked_lm": tiny_bert_mlm}
    await harness.start(plugins=[], guild_ids=[GUILD_ID])
    synced = {c["name"]: c for c in harness.fake.calls_to("/commands", "PUT")[0].body}
    assert [o["name"] for o in synced["sample"]["options"]] == ["prompt", "temperature", "top_k", "top_p", "n", "seed"]
    assert [o["name"] for o in synced["attention"]["options"]] == ["text", "layer", "head"]
    assert [o["name"] for o in synced["surprise"]["options"]] == ["text", "ngram"]

    token = await harness.fake.interact("attention", {"text": "The cat sat on the mat.", "layer": 1})
    answer = await followup(harness, token)
    embed = answer.body["embeds"][0]
    assert embed["title"].startswith("Attention: layer 1 of 2")
    assert "masked LM lets every token look both ways" in embed["description"]
    assert embed["image"]["url"] == "attachment://attention.png"
    assert answer.files[0][0] == "attention.png" and answer.files[0][1].startswith(b"\x89PNG")

    token = await harness.fake.interact("surprise", {"text": "The cat sat on the purple mat.", "ngram": True})
    answer = await followup(harness, token)
    embed = answer.body["embeds"][0]
    assert "```ansi\n" in embed["description"] and "\x1b[" in embed["description"]  # coloured by surprisal
    assert answer.files[0][0] == "surprise.png"

    token = await harness.fake.interact("sample", {"prompt": "@everyone the cat", "n": 2, "seed": 5})
    answer = await followup(harness, token)
    assert answer.body["allowed_mentions"] == {"parse": []}
    assert "@everyone" not in str(answer.body["embeds"])  # escaped wherever a mention could parse
    embed = answer.body["embeds"][0]
    assert [f["name"] for f in embed["fields"] if f["name"].startswith("sample ")] == ["sample 1", "sample 2"]
    assert any(f["name"] == "seed" and f["value"].startswith("5 ") for f in embed["fields"])
    assert answer.files[0][0] == "sample.png"


def test_the_three_commands_in_the_console(tmp_path: Path, cache_dir: Path, tiny_gpt2: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[models]\ncausal_lm = "{tiny_gpt2}"\n'
        '[bot]\nlog_level = "WARNING"\n',
        encoding="utf-8",
    )
    lines = [
        "/attention text:Hello there",
        "/sample prompt:Hello n:1 seed:3",
        '/surprise text:"Hello there"',
        "/attention text:Hi head:1",
    ]
    done = run(["console"], tmp_path, stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Attention: average of all 2 layers × 2 heads" in out
    assert "No masked LM is available here (offline), so only the causal side is shown." in out
    assert "Sampling: temperature 1, top-k 50, top-p 0.9" in out and "sample 1:" in out
    assert "Surprise: tiny-gpt2 · fp32, " in out and "reads your text" in out and "Perplexity" in out
    assert "A head belongs to one layer: give `layer` too" in out
    assert out.count("[image] ") == 3
