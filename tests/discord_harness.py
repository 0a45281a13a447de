"""The real discord.py client, run by ``run_bot`` as ``lmbot run`` runs it, against tests/fake_discord.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
import yarl

from bot.app import App
from bot.frontends.discord.client import LmbotClient
from bot.frontends.discord.runner import run_bot
from tests.conftest import make_config
from tests.fake_discord import Call, FakeDiscord, LoopbackOnlyResolver


class Harness:
    def __init__(
        self, fake: FakeDiscord, cache: Path, models: dict[str, Path], plugins: list[tuple[object, str]]
    ) -> None:
        self.fake, self.cache, self.models, self.plugins = fake, cache, models, plugins
        self.client: LmbotClient | None = None
        self.task: asyncio.Task[int] | None = None

    async def start(
        self, plugins: list[tuple[object, str]] | None = None, *, bot: dict[str, Any] | None = None, **settings: Any
    ) -> LmbotClient:
        """Start the bot; ``settings`` are ``[discord]`` keys, ``inference`` a dict of ``[inference]`` keys."""
        config = make_config(self.cache, self.models, **settings.pop("inference", {}))
        if settings:
            config = config.model_copy(update={"discord": config.discord.model_copy(update=settings)})
        if bot:
            config = config.model_copy(update={"bot": config.bot.model_copy(update=bot)})
        app = App(config, extra_plugins=plugins if plugins is not None else self.plugins)
        self.fake.ready.clear()
        connector = aiohttp.TCPConnector(resolver=LoopbackOnlyResolver())
        self.client = LmbotClient(app, connector=connector, guild_ready_timeout=0.05)
        self.task = asyncio.create_task(run_bot(app, "fake-token", self.client))
        ready = asyncio.create_task(self.fake.ready.wait())
        done, _ = await asyncio.wait({ready, self.task}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            raise RuntimeError(f"the bot stopped while starting: {self.task.result()}")
        assert ready in done, "the bot never identified"
        return self.client

    async def stop(self) -> int:
        assert self.client is not None and self.task is not None
        await self.client.shutdown()
        return await asyncio.wait_for(self.task, 120)

    async def answer(self, token: str) -> list[Call]:
        """Every call about interaction ``token``, once it has been answered (followup or immediate reply)."""

        def answered(calls: list[Call]) -> bool:
            return any(
                token in c.path and c.method in ("POST", "PATCH") and "webhooks" in c.path for c in calls
            ) or any(token in c.path and "callback" in c.path and c.body["type"] == 4 for c in calls)

        await self.fake.wait_for(answered)
        return [c for c in self.fake.calls if token in c.path]

    def first_response_s(self, token: str) -> float:
        """Seconds from the interaction's dispatch to its first response (defer or immediate reply)."""
        callback = next(c for c in self.fake.calls if token in c.path and "callback" in c.path)
        return callback.at - self.fake.sent[token]


async def harness_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gpt2: Path, plugins: list[tuple[object, str]]
) -> AsyncIterator[Harness]:
    """A fixture body: a fake Discord that discord.py is pointed at, and a harness for the bot."""
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    h = Harness(fake, tmp_path / "cache", {"causal_lm": tiny_gpt2}, plugins)
    yield h
    if h.task is not None and not h.task.done():
        await h.stop()
    await fake.stop()
