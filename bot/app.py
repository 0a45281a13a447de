"""The running bot, whatever the front end: config, plugins, registry, inference.

Front ends call :meth:`App.execute` (typed values, e.g. from Discord) or
:meth:`App.execute_line` (console syntax). Both always return a
:class:`~bot.commands.Reply`, within the command deadline: a handler's exception
becomes a short reply with an error id, and the traceback goes to the log only.
That includes ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, a
``CancelledError`` it raises itself and any other ``BaseException``: one
plugin's command cannot stop the bot. Each plugin's handlers run on the
plugin's own event loop (:mod:`bot.plugin_loops`): a handler that blocks delays
only its own plugin's commands, and is named in ``/plugins`` and ``/stats``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from bot import core
from bot.commands import Command, CommandError, Context, Reply, User
from bot.config import Config, check_paths, check_roles
from bot.inference.client import InferenceClient, create_client
from bot.inference.registry import BUILTIN_ROLES
from bot.parsing import UsageError, parse_line
from bot.plugin_loops import Culprit, LoopThread, OnLoop, PluginLoops, culprit, on_plugin_thread
from bot.plugins import PluginHost, PluginRecord, Registry, check_plugin_config

log = logging.getLogger(__name__)


def new_error_id() -> str:
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class LoopStall:
    """A plugin's command that blocked the event loop it ran on (``/plugins`` shows it)."""

    command: str  # the last command of the plugin that blocked
    count: int
    longest_s: float
    last_s: float

    def describe(self) -> str:
        times = "once" if self.count == 1 else f"{self.count} times"
        return f"blocked the event loop {times} (longest {self.longest_s:.1f} s, last in /{self.command})"


class App:
    def __init__(
        self,
        config: Config,
        *,
        extra_plugins: Iterable[tuple[object, str]] = (),
        builtins: bool = True,
        entry_points: bool = True,
    ) -> None:
        self.config = config
        self.host = PluginHost(disabled=config.plugins.disabled, builtin_roles=BUILTIN_ROLES)
        self.host.add(core, "core", source="core")
        if builtins:
            self.host.load_builtins()
        if entry_points:
            self.host.load_entry_points()
        for plugin, name in extra_plugins:
            self.host.add(plugin, name)
        self.registry: Registry = self.host.build_registry()
        check_roles(config, set(self.registry.roles))
        check_paths(config)
        check_plugin_config(config, self.host, self.registry)
        self.inference: InferenceClient = create_client(config, self.registry.roles)
        # Set by a front end that publishes commands somewhere (Discord): re-publish them.
        self.publish_commands: Callable[[], Awaitable[list[str]]] | None = None
        # Commands running now, by the task that runs them, and plugins whose handlers blocked their loop.
        self.running: dict[asyncio.Task[Any], tuple[str, str]] = {}
        self.stalls: dict[str, LoopStall] = {}
        self._stalls_lock = threading.Lock()
        self.plugin_loops = PluginLoops(self.record_stall, culprit_of=self.culprit_on)
        # The front end's loop, where the inference client lives: model requests made on a plugin's
        # loop are sent there. Recorded at the first command run outside any plugin's thread.
        self.home_loop: asyncio.AbstractEventLoop | None = None

    @property
    def plugin_records(self) -> list[PluginRecord]:
        return list(self.host.records.values())

    def reload_plugin(self, name: str) -> PluginRecord:
        """Reload one plugin and rebuild the registry; on a conflict the old registry stays."""
        try:
            record = self.host.reload(name)
            self.registry = self.host.build_registry()
        finally:
            # A handler stuck on the plugin's loop would hold every later command: the next one gets a new loop.
            self.plugin_loops.retire(name)
        return record

    def local_context(self) -> Context:
        """The console's user: whoever runs the process owns the bot."""
        return Context(user=User("local", "console", is_owner=True), app=self, transport="console")

    def inference_view(self, user: str, home: asyncio.AbstractEventLoop | None) -> Any:
        """``ctx.inference`` for ``user``; requests made on a plugin's loop go to ``home``, the client's loop."""
        for_user = getattr(self.inference, "for_user", None)
        service = for_user(user) if for_user is not None else self.inference
        return service if home is None else OnLoop(service, home)

    def record_stall(self, plugin: str, command: str, seconds: float, new: bool = True) -> None:
        """Note that ``/command`` of ``plugin`` blocked its event loop for ``seconds`` (any thread may call).

        ``new=False`` updates the length of the stall last noted (one still going on when it was).
        """
        with self._stalls_lock:
            old = self.stalls.get(plugin)
            count, longest = (old.count, old.longest_s) if old else (0, 0.0)
            self.stalls[plugin] = LoopStall(command, count + int(new or not old), max(longest, seconds), seconds)

    def culprit_on(self, loop: LoopThread) -> Culprit:
        """The command ``loop``'s thread runs now, its plugin, and where (:func:`~bot.plugin_loops.culprit`)."""
        handlers: dict[CodeType, tuple[str, str]] = {}
        for cmd in list(self.registry.commands.values()):
            code = getattr(inspect.unwrap(cmd.handler), "__code__", None)
            if code is not None:
                handlers[code] = (cmd.name, cmd.plugin)
        return culprit(loop.thread, loop.loop, handlers, self.running)

    async def execute(self, name: str, values: dict[str, Any], ctx: Context) -> Reply:
        """Run ``/name`` and return its Reply, whatever the handler does.

        The handler runs on its plugin's own loop (:class:`~bot.plugin_loops.PluginLoops`; the
        core's trusted commands run here), under the command deadline
        (``bot.command_timeout_s``): past it the caller is answered and the handler abandoned.
        """
        cmd = self.registry.commands.get(name)
        if cmd is None:
            return Reply.failure(f"There is no /{name} command. Try /help.")
        if cmd.owner_only and not ctx.user.is_owner:
            return Reply.failure(f"/{name} is for the bot's owners only.")
        task = asyncio.current_task()
        if task is not None:
            self.running[task] = (name, cmd.plugin)
        # The front end's loop, where the inference client lives; a command a handler runs (a card's
        # "Try it", or execute_line without a ctx) runs on a plugin's loop but keeps the same home.
        here = asyncio.get_running_loop()
        if not on_plugin_thread() and (self.home_loop is None or self.home_loop.is_closed()):
            self.home_loop = here
        ctx = dataclasses.replace(ctx, home_loop=ctx.home_loop or self.home_loop or here)
        deadline = self.config.bot.command_timeout_s
        try:
            if cmd.plugin == "core":
                work: asyncio.Future[Reply] = asyncio.ensure_future(self._invoke(cmd, ctx, values))
            else:
                try:
                    handed = self.plugin_loops.submit(cmd.plugin, name, self._invoke(cmd, ctx, values))
                except RuntimeError:  # the app is closing
                    return Reply.failure("The bot is shutting down; try again in a minute.")
                work = asyncio.wrap_future(handed)
            try:
                # shield: at the deadline this side answers at once; the handler is cancelled without waiting
                # for it (a blocked loop runs the cancellation only once it is free).
                return await asyncio.wait_for(asyncio.shield(work), deadline)
            except TimeoutError:
                work.cancel()
                log.warning("/%s (plugin %s) passed its %.0f s deadline; abandoned", name, cmd.plugin, deadline)
                return Reply.failure(
                    f"/{name} took longer than {deadline:.0f} s, so it was stopped. Please try again later.",
                    error_kind="CommandTimeout",
                )
            except asyncio.CancelledError:
                work.cancel()  # the caller gave up (a shutdown): the handler stops too
                raise
        finally:
            if task is not None:
                self.running.pop(task, None)

    async def _invoke(self, cmd: Command, ctx: Context, values: dict[str, Any]) -> Reply:
        """The handler's call, where it runs: every exception it raises becomes a reply."""
        started = time.monotonic()
        task = asyncio.current_task()
        if task is not None:  # on the plugin's loop: the watchdog names the command this task runs
            self.running[task] = (cmd.name, cmd.plugin)
        try:
            reply = await cmd.invoke(ctx, values)
            if not isinstance(reply, Reply):
                raise TypeError(f"/{cmd.name} returned {type(reply).__name__}, not a Reply")
            return reply
        except CommandError as exc:
            return Reply.failure(str(exc), ephemeral=exc.ephemeral, error_kind=type(exc).__name__)
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt, GeneratorExit, a CancelledError the handler raised itself:
            # a plugin cannot stop the bot, nor leave its caller without an answer. Only a cancellation of
            # this very task (the deadline, a shutdown) goes on as one.
            current = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and current is not None and current.cancelling():
                raise
            error_id = new_error_id()
            log.error(
                "error %s in /%s (plugin %s) after %.1f s",
                error_id,
                cmd.name,
                cmd.plugin,
                time.monotonic() - started,
                exc_info=exc,
            )
            return Reply.failure(
                f"Something went wrong in /{cmd.name} (error id {error_id}). Other commands still work.",
                error_kind="PluginError",
                error_id=error_id,
            )
        finally:
            if task is not None:
                self.running.pop(task, None)

    async def execute_text(self, name: str, texts: dict[str, str], ctx: Context) -> Reply:
        """Run a command from option text, converted as the console would (a pressed button)."""
        cmd = self.registry.commands.get(name)
        if cmd is None:
            return Reply.failure(f"There is no /{name} command. Try /help.")
        try:
            values = cmd.convert(texts)
        except CommandError as exc:
            return Reply.failure(str(exc), error_kind=type(exc).__name__)
        return await self.execute(name, values, ctx)

    async def execute_line(self, line: str, ctx: Context | None = None) -> Reply:
        """Parse a console line and run it. A malformed line raises :class:`UsageError`."""
        try:
            cmd, values = parse_line(line, self.registry.commands)
        except UsageError:
            raise
        except CommandError as exc:  # a value that does not fit its option: the user's input, not syntax
            return Reply.failure(str(exc), error_kind=type(exc).__name__)
        return await self.execute(cmd.name, values, ctx or self.local_context())

    async def close(self) -> None:
        """Stop the plugins' loops (5 s for all), then the inference service, whatever the loops did."""
        try:
            await asyncio.to_thread(self.plugin_loops.close)
        finally:
            await self.inference.close()
