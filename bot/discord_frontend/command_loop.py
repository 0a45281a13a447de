"""Plugin code on its own event loop, so that it can never delay Discord's acknowledgements.

Discord drops an interaction that gets no first response within 3 s. The
discord.py client acknowledges (defers, or refuses at once) on its own loop;
command handlers and the inference client run on this loop, in a thread of
its own, and the client hands each command over with
``run_coroutine_threadsafe``. A handler that blocks (``time.sleep`` in an
async function, CPU work without ``asyncio.to_thread``) then delays other
commands' answers but never their acknowledgements, and a watchdog thread
notices the stall and names the command and plugin in the log and in
``/plugins``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import threading
import time
from collections.abc import Coroutine
from types import CodeType, FrameType
from typing import Any, TypeVar

from bot.app import App

log = logging.getLogger(__name__)
T = TypeVar("T")


class CommandLoop:
    """An event loop in a daemon thread, with a watchdog that measures how late it runs."""

    def __init__(self, app: App, *, stall_after_s: float = 1.0, probe_every_s: float = 0.1) -> None:
        self.app = app
        self.stall_after_s = stall_after_s
        self.probe_every_s = probe_every_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="lmbot-commands", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="lmbot-commands-watchdog", daemon=True)
        self._stopping = threading.Event()
        self._started = False

    @property
    def running(self) -> bool:
        return self._started and self._thread.is_alive()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._thread.start()
        self._watchdog.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the command loop and await its result from the caller's loop.

        Cancelling the caller cancels the coroutine on the command loop too.
        """
        if not self.running:
            coro.close()
            raise RuntimeError("the command loop is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread (a blocking call: run it with ``asyncio.to_thread``)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self._watchdog.join(timeout)
        if self._thread.is_alive():
            log.warning("the command loop did not stop within %.0f s: a handler is still blocking it", timeout)

    # ------------------------------------------------------------------ the loop's thread

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
            except BaseException:  # SystemExit / KeyboardInterrupt from a task that plugin code started
                log.exception("plugin code raised out of the command loop; the loop keeps running")
            if self._stopping.is_set():
                break
        try:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending, timeout=5))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        except BaseException:
            log.exception("could not tidy up the command loop")
        finally:
            self.loop.close()

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        """Post a no-op to the loop every ``probe_every_s``; a late one means something blocks it."""
        while not self._stopping.wait(self.probe_every_s):
            ran = threading.Event()
            posted = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(ran.set)
            except RuntimeError:  # the loop is closed
                return
            if ran.wait(self.stall_after_s):
                continue
            command, plugin, where = self._culprit()
            log.warning(
                "%s has blocked the command loop for %.1f s (at %s): handlers must not block; "
                "use asyncio.to_thread for slow code. Acknowledgements are unaffected, other answers wait.",
                _name(command, plugin),
                time.monotonic() - posted,
                where,
            )
            while not ran.wait(0.1):
                if self._stopping.is_set():
                    return
            seconds = time.monotonic() - posted
            log.warning("%s blocked the command loop for %.1f s in all", _name(command, plugin), seconds)
            if plugin is not None and command is not None:
                self.app.record_stall(plugin, command, seconds)

    def _culprit(self) -> tuple[str | None, str | None, str]:
        """The command (and its plugin) whose code the loop's thread is running now, and where."""
        frame: FrameType | None = sys._current_frames().get(self._thread.ident or -1)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"
        handlers: dict[CodeType, tuple[str, str]] = {}
        for cmd in list(self.app.registry.commands.values()):
            code = getattr(inspect.unwrap(cmd.handler), "__code__", None)
            if code is not None:
                handlers[code] = (cmd.name, cmd.plugin)
        while frame is not None:
            if frame.f_code in handlers:
                return (*handlers[frame.f_code], where)
            frame = frame.f_back
        # Code the handler started as a task of its own: the command that task belongs to, if any.
        with contextlib.suppress(RuntimeError):
            task = asyncio.current_task(self.loop)
            running = self.app.running.get(task) if task is not None else None  # .get: the loop's thread edits it
            if running is not None:
                return (*running, where)
        return None, None, where


def _name(command: str | None, plugin: str | None) -> str:
    return f"/{command} (plugin {plugin})" if command else "code outside any command"
