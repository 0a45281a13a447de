"""``lmbot`` as its own process, with discord.py pointed at a fake Discord on 127.0.0.1.

    python -m tests.discord_process API_URL GATEWAY_URL run --config bot.toml

Everything but the two base URLs (and a resolver that reaches loopback only) is
the real ``lmbot run``: the CLI, the config file, the sharded client, SIGTERM.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import discord
import yarl

from bot.frontends import cli
from bot.frontends.discord.client import LmbotClient
from tests.fake_discord import LoopbackOnlyResolver


def main(argv: list[str]) -> int:
    api, gateway, *lmbot_args = argv
    discord.http.Route.BASE = api
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
    original = LmbotClient.__init__

    def loopback_only(self: LmbotClient, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("connector", aiohttp.TCPConnector(resolver=LoopbackOnlyResolver()))
        kwargs.setdefault("guild_ready_timeout", 0.05)  # the fake sends no guilds: don't wait 2 s for them
        original(self, *args, **kwargs)

    LmbotClient.__init__ = loopback_only  # type: ignore[method-assign]
    return cli.main(lmbot_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
