"""``lmbot run`` and ``lmbot sync``: the client's life from start to a clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import discord

from bot.app import App
from bot.discord_frontend.client import LmbotClient

log = logging.getLogger(__name__)
EXIT_OK, EXIT_USAGE = 0, 2


async def run_bot(app: App, token: str, client: LmbotClient | None = None) -> int:
    """Run until SIGTERM/SIGINT or disconnect; exit 0 after a clean shutdown, 2 on a bad token."""
    client = client or LmbotClient(app)
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals off the main thread
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(client.shutdown()))
            handled.append(sig)
    try:
        await client.start(token)
    except discord.LoginFailure:
        print(f"lmbot: Discord rejected the token in ${app.config.bot.token_env}.", file=sys.stderr)
        await app.close()
        return EXIT_USAGE
    finally:
        if not client.is_closed():
            await client.shutdown()
        for sig in handled:
            loop.remove_signal_handler(sig)
    return EXIT_OK


async def sync_now(app: App, token: str, guild_id: int | None) -> int:
    """Log in over REST only, upload the command set, log out."""
    client = LmbotClient(app, serve=False)
    try:
        await client.login(token)
        synced = await client.sync_commands(force=True, guild_id=guild_id)
    except discord.LoginFailure:
        print(f"lmbot: Discord rejected the token in ${app.config.bot.token_env}.", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await client.close()
    print(f"synced {len(app.registry.commands)} commands to {', '.join(synced)}")
    return EXIT_OK
