"""``lmbot run`` and ``lmbot sync``: the client's life from start to a clean exit.

Exit codes (what a supervisor such as systemd acts on):

* 0 a clean stop (SIGTERM/SIGINT);
* 2 a setting only a person can fix (no token, a token Discord rejects): restarting
  would only repeat it, so the shipped systemd unit does not (``RestartPreventExitStatus=2``);
* 75 (``EX_TEMPFAIL``) Discord could not be reached within ``--attempts`` tries: a
  temporary failure, worth restarting later. By default ``lmbot run`` never gives up:
  it prints one line per failed try and tries again with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import discord

from bot.app import App
from bot.frontends.discord.client import LmbotClient

log = logging.getLogger(__name__)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 75
# What "Discord cannot be reached right now" looks like from discord.py: refused or dropped
# connections and timeouts (OSError, aiohttp), no gateway, Discord's own 5xx answers.
NETWORK_ERRORS = (OSError, aiohttp.ClientError, discord.GatewayNotFound, discord.DiscordServerError, TimeoutError)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0


def backoff_delays(first: float = BACKOFF_FIRST_S, most: float = BACKOFF_MAX_S) -> Iterator[float]:
    """1, 2, 4, ... seconds up to ``most``, each shortened by up to 10 % so restarted bots spread out."""
    delay = first
    while True:
        yield delay * random.uniform(0.9, 1.0)
        delay = min(most, delay * 2)


def network_reason(exc: BaseException) -> str:
    """One line saying why Discord could not be reached (no traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Retry:
    """Counts failed tries, says each in one line, and waits before the next (or gives up)."""

    def __init__(self, what: str, attempts: int, delays: Iterator[float], stop: asyncio.Event) -> None:
        self.what, self.attempts, self.delays, self.stop = what, attempts, delays, stop
        self.failed = 0

    async def after(self, exc: BaseException) -> bool:
        """True to try again; False when out of tries or asked to stop while waiting."""
        self.failed += 1
        reason = network_reason(exc)
        if self.attempts and self.failed >= self.attempts:
            _say(f"cannot reach Discord ({reason}); gave up after {self.failed} tries (exit {EXIT_UNREACHABLE})")
            return False
        delay = next(self.delays)
        _say(f"cannot reach Discord to {self.what} ({reason}); trying again in {delay:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        return not self.stop.is_set()


# discord.py's loggers that report a dropped gateway (and its reconnect) with a traceback attached.
RECONNECT_LOGGERS = ("discord.client", "discord.gateway", "discord.shard")
_RECONNECT_ERRORS = (*NETWORK_ERRORS, discord.ConnectionClosed, discord.HTTPException)
_tracebacks = logging.getLogger(__name__ + ".tracebacks")


class OneLineReconnects(logging.Filter):
    """Makes discord.py's reconnect records one line: its message and the reason, no traceback.

    discord.py logs every dropped gateway at WARNING/ERROR with the whole traceback of a network
    error (``Attempting a reconnect in 1.23s``); over a term of Wi-Fi blips that buries the log.
    The traceback still goes out, at DEBUG (``bot.frontends.discord.runner.tracebacks``).
    Records about anything other than a network error (a bug) keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or record.levelno < logging.WARNING or not isinstance(exc, _RECONNECT_ERRORS):
            return True
        message = record.getMessage()
        _tracebacks.debug("%s", message, exc_info=record.exc_info)
        record.msg, record.args = f"{message} ({network_reason(exc)})", None
        record.exc_info, record.exc_text = None, None
        return True


def one_line_reconnects() -> None:
    """Install :class:`OneLineReconnects` on discord.py's loggers (once)."""
    for name in RECONNECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineReconnects) for f in logger.filters):
            logger.addFilter(OneLineReconnects())


def _say(line: str) -> None:
    print(f"lmbot: {line}", file=sys.stderr, flush=True)


async def run_bot(
    app: App,
    token: str,
    client: LmbotClient | None = None,
    *,
    attempts: int = 0,
    delays: Iterator[float] | None = None,
    new_client: Callable[[App], LmbotClient] = LmbotClient,
) -> int:
    """Run until SIGTERM/SIGINT; see the module's docstring for the exit codes.

    ``attempts`` failed tries to reach Discord (0: never give up) end the run with exit 75.
    A try that fails before login completes throws its client away (discord.py's HTTP
    session is not reusable after a failed login) and the next uses ``new_client(app)``;
    once logged in, the same client connects again.
    """
    one_line_reconnects()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    logged_in: list[LmbotClient] = []
    shutting_down: list[asyncio.Future[None]] = []  # kept: a task nobody references may be collected

    def on_signal() -> None:
        stop.set()
        if logged_in:
            shutting_down.append(asyncio.ensure_future(logged_in[0].shutdown()))

    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals off the main thread
            loop.add_signal_handler(sig, on_signal)
            handled.append(sig)
    retry = _Retry("log in", attempts, delays or backoff_delays(), stop)
    try:
        while True:
            client = client or new_client(app)
            try:
                if not await _unless_stopped(client.login(token), stop):
                    await client.close()
                    return EXIT_OK
                break
            except discord.LoginFailure:
                await client.close()
                _say(f"Discord rejected the token in ${app.config.bot.token_env}.")
                return EXIT_USAGE
            except NETWORK_ERRORS as exc:
                await client.close()  # its HTTP session; nothing else has started before login completes
                client = None
                if not await retry.after(exc):
                    return EXIT_OK if stop.is_set() else EXIT_UNREACHABLE
            except discord.HTTPException as exc:
                await client.close()
                _say(f"Discord refused the login: {network_reason(exc)}")
                return EXIT_ERROR
        logged_in.append(client)
        if stop.is_set():
            return EXIT_OK
        retry.what = "connect to the gateway"
        while not client.is_closed():
            try:
                await client.connect(reconnect=True)  # once connected, discord.py reconnects by itself
            except NETWORK_ERRORS as exc:
                if client.is_closed() or not await retry.after(exc):
                    return EXIT_OK if stop.is_set() or client.is_closed() else EXIT_UNREACHABLE
        return EXIT_OK
    finally:
        for started in logged_in:
            await started.shutdown()  # a no-op when a signal already shut it down
            await started.close()
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _unless_stopped(step: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``step`` unless ``stop`` is set first (then cancel it): whether it completed."""
    task = asyncio.ensure_future(step)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises what the step raised
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *NETWORK_ERRORS, discord.HTTPException):
        await task
    return False


async def sync_now(
    app: App, token: str, guild_id: int | None, *, attempts: int = 5, delays: Iterator[float] | None = None
) -> int:
    """Log in over REST only, upload the command set, log out (tries ``attempts`` times to reach Discord)."""
    retry = _Retry("upload the commands", attempts, delays or backoff_delays(), asyncio.Event())
    while True:
        client = LmbotClient(app, serve=False)
        try:
            await client.login(token)
            synced = await client.sync_commands(force=True, guild_id=guild_id)
        except discord.LoginFailure:
            _say(f"Discord rejected the token in ${app.config.bot.token_env}.")
            return EXIT_USAGE
        except NETWORK_ERRORS as exc:
            if not await retry.after(exc):
                return EXIT_UNREACHABLE
            continue
        except discord.HTTPException as exc:
            _say(f"Discord refused the upload: {network_reason(exc)}")
            return EXIT_ERROR
        finally:
            await client.close()
        print(f"synced {len(app.registry.commands)} commands to {', '.join(synced)}")
        return EXIT_OK
