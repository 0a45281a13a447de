"""Shards (issue 15): several bot processes against one fake Discord, each answering its own guilds.

Discord sends the events of guild ``g`` to shard ``(g >> 22) % shard_count`` only;
the fake does the same, so an interaction is answered only if the process that
runs its shard answers it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ConfigError, parse_config
from tests.discord_harness import Harness, harness_for
from tests.fake_discord import APP_ID, GUILD_ID, FakeDiscord

ROOT = Path(__file__).resolve().parent.parent
# Guild ids whose shard, of two, is 0 and 1: Discord takes the shard from the id's timestamp bits.
GUILD_ON = {0: GUILD_ID, 1: GUILD_ID + (1 << 22)}


@pytest.fixture
async def harness(monkeypatch, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    async for h in harness_for(monkeypatch, tmp_path, tiny_gpt2, []):
        yield h


def bot_config(path: Path, cache: Path, model: Path, shard_id: int) -> Path:
    path.write_text(
        f"""
[bot]
log_level = "INFO"

[discord]
shard_count = 2
shard_ids = [{shard_id}]
cooldown_s = 0.0

[inference]
offline = "always"
cache_dir = "{cache}"

[models]
causal_lm = "{model}"

[plugins.options.study]
quiz_db = "{cache / "quiz.sqlite3"}"
"""
    )
    return path


async def start_bot(fake: FakeDiscord, config: Path, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "LMBOT_DISCORD_TOKEN": "fake-token"}
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.discord_process",
            fake.api,
            fake.gateway_url,
            "run",
            "--config",
            str(config),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


async def test_two_bot_processes_each_answer_their_own_shard_and_sync_once(tmp_path: Path, tiny_gpt2: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    bots: list[asyncio.subprocess.Process] = []
    logs = [tmp_path / f"shard{i}.log" for i in range(2)]
    try:
        for shard_id in (1, 0):  # the one that does not sync starts first: it must still never upload
            # Separate caches: neither process can skip the upload because of what the other wrote.
            config = bot_config(tmp_path / f"shard{shard_id}.toml", tmp_path / f"cache{shard_id}", tiny_gpt2, shard_id)
            bots.append(await start_bot(fake, config, logs[shard_id]))
        try:
            await fake.wait_shards({0, 1}, timeout=180)
        except TimeoutError:
            raise AssertionError("\n".join(log.read_text() for log in logs)) from None
        assert sorted(fake.identified) == [(0, 2), (1, 2)]  # each process identified with its own shard

        tokens = {
            shard: [await fake.interact("help", guild_id=GUILD_ON[shard], user_id=9000 + i) for i in range(3)]
            for shard in (0, 1)
        }
        for shard, sent in tokens.items():
            for token in sent:
                assert fake.delivered[token] == shard  # routed to that shard's connection only
        await fake.wait_for(
            lambda calls: all(
                any(t in c.path and "webhooks" in c.path and c.method == "POST" for c in calls)
                for sent in tokens.values()
                for t in sent
            ),
            timeout=180,
        )
        for sent in tokens.values():
            for token in sent:
                answer = [c for c in fake.calls if token in c.path and "webhooks" in c.path][-1]
                assert answer.body["embeds"][0]["title"] == "Commands"
        # The command set was uploaded once, by the process that runs shard 0.
        assert [c.path for c in fake.calls_to("/commands", "PUT")] == [f"/api/v10/applications/{APP_ID}/commands"]
    finally:
        for bot in bots:
            if bot.returncode is None:
                bot.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(bot.wait(), 120) for bot in bots]
        await fake.stop()
    assert codes == [0, 0], "\n".join(log.read_text() for log in logs)
    assert "the process that runs shard 0 syncs the commands" in logs[1].read_text()


async def test_auto_runs_every_shard_discord_recommends_in_one_process(harness: Harness) -> None:
    harness.fake.recommended_shards = 2
    client = await harness.start()  # shard_count = "auto" (the default)
    await harness.fake.wait_shards({0, 1}, timeout=120)
    assert sorted(harness.fake.identified) == [(0, 2), (1, 2)] and client.shard_count == 2
    for shard, guild in GUILD_ON.items():
        token = await harness.fake.interact("help", guild_id=guild, user_id=9100 + shard)
        assert harness.fake.delivered[token] == shard
        assert (await harness.answer(token))[-1].body["embeds"][0]["title"] == "Commands"
    assert len(harness.fake.calls_to("/commands", "PUT")) == 1


async def test_a_process_without_shard_0_never_uploads_commands(harness: Harness) -> None:
    client = await harness.start(shard_count=2, shard_ids=[1])
    assert harness.fake.identified == [(1, 2)] and not client.owns_sync
    assert not harness.fake.calls_to("/commands", "PUT")
    assert client.app.publish_commands is None  # /sync and /reload have nothing to publish here
    token = await harness.fake.interact("help", guild_id=GUILD_ON[1])
    assert (await harness.answer(token))[-1].body["embeds"][0]["title"] == "Commands"
    with pytest.raises(LookupError):  # shard 0 runs nowhere: Discord would not send this process its guilds
        await harness.fake.interact("help", guild_id=GUILD_ON[0])


@pytest.mark.parametrize(
    ("discord", "message"),
    [
        ({"shard_ids": [0]}, "`discord.shard_ids`: naming shard_ids needs a number"),
        ({"shard_count": 2, "shard_ids": [2]}, "`discord.shard_ids`: shard ids run from 0 to 1"),
        (
            {"shard_count": 0},
            '`discord.shard_count`: must be a number of shards from 1 to 10000, or "auto"',
        ),
        ({"shard_count": 2, "shard_ids": [1, 1]}, "`discord.shard_ids`: a shard id is repeated"),
    ],
)
def test_shard_settings_are_checked(discord: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^test: " + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"discord": discord}, source="test")
