"""Each plugin's handlers on an event loop of their own, so that one plugin cannot stall another.

A handler that blocks (``time.sleep`` in an async function, CPU work without
``asyncio.to_thread``, an endless loop) holds only its own plugin's loop: its
own later commands wait (and get the command deadline's answer), every other
plugin's commands and the front end's loop go on. One watchdog thread posts a
no-op to every running plugin loop; a loop that does not run it within
``stall_after_s`` is blocked, and the plugin, the command and the seconds are
reported to ``on_stall`` (the app's :meth:`~bot.app.App.record_stall`, shown by
``/plugins`` and ``/stats``).

Why threads and not processes: handlers share the app (registry, config, the
inference client) and return rich :class:`~bot.commands.Reply` objects; a thread
keeps that cheap. A thread cannot be killed, so a handler that never returns
keeps its thread, but nothing else waits for it.

Signals: plugin code runs only on these threads, never on the main thread that
handles an operator's Ctrl-C or SIGTERM. Python cannot tell who sent a signal
once it arrives (and blocking the signals to read the sender with
``sigwaitinfo`` would be inherited by every worker process), so the guard is at
the sending end instead: on a plugin thread, ``os.kill``/``os.killpg`` aimed at
the bot's own process (or its process group), ``signal.raise_signal``,
``signal.pthread_kill`` and ``_thread.interrupt_main`` raise ``PermissionError``
(:func:`guard_self_signals`), so that command answers with an error id and the
bot runs on. A real operator's signal comes from outside and is untouched. It
stops careless code, not a determined one (``ctypes`` can reach ``kill(2)``).
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

StallCallback = Callable[[str, str, float, bool], None]  # plugin, command, seconds, a new stall


_plugin_thread = threading.local()


def _refuse(what: str) -> None:
    if getattr(_plugin_thread, "plugin", None) is not None:
        raise PermissionError(f"plugin {_plugin_thread.plugin} may not signal the bot's own process ({what})")


def _own(pid: int) -> bool:
    return pid in (0, os.getpid(), -os.getpgrp()) or pid == -1


@functools.cache
def guard_self_signals() -> None:
    """Refuse, on plugin threads only, every way of signalling the bot's own process (once per process)."""
    real_kill, real_killpg = os.kill, os.killpg
    real_raise, real_pthread_kill, real_interrupt = signal.raise_signal, signal.pthread_kill, _thread.interrupt_main

    def kill(pid: int, sig: int, /) -> None:
        if sig != 0 and _own(pid):
            _refuse(f"os.kill({pid}, {sig})")
        real_kill(pid, sig)

    def killpg(pgid: int, sig: int, /) -> None:
        if sig != 0 and pgid in (0, os.getpgrp()):
            _refuse(f"os.killpg({pgid}, {sig})")
        real_killpg(pgid, sig)

    def raise_signal(sig: int, /) -> None:
        _refuse(f"signal.raise_signal({sig})")
        real_raise(sig)

    def pthread_kill(thread_id: int, sig: int, /) -> None:
        if sig != 0:
            _refuse(f"signal.pthread_kill(..., {sig})")
        real_pthread_kill(thread_id, sig)

    def interrupt_main(signum: int = signal.SIGINT, /) -> None:
        _refuse("_thread.interrupt_main()")
        real_interrupt(signal.Signals(signum))

    os.kill, os.killpg, signal.raise_signal, signal.pthread_kill = kill, killpg, raise_signal, pthread_kill
    _thread.interrupt_main = interrupt_main


class LoopThread:
    """An asyncio event loop running in a daemon thread of its own (``plugin``: the plugin whose code it runs)."""

    def __init__(self, name: str, plugin: str | None = None) -> None:
        self.plugin = plugin
        if plugin is not None:
            guard_self_signals()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = threading.Event()
        self._started = False

    @property
    def running(self) -> bool:
        return self._started and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on this loop (from any thread); cancelling the future cancels the task."""
        if not self.running:
            coro.close()
            raise RuntimeError(f"the loop {self._thread.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop and await its result from the caller's loop.

        Cancelling the caller cancels the coroutine here too.
        """
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread (blocking: from a loop, use ``asyncio.to_thread``)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %.0f s: a handler is still blocking it", self._thread.name, timeout)

    def _run(self) -> None:
        _plugin_thread.plugin = self.plugin
        asyncio.set_event_loop(self.loop)
        while True:
            try:
                self.loop.run_forever()
            except BaseException:  # SystemExit / KeyboardInterrupt from a task that plugin code started
                log.exception("plugin code raised out of %s; the loop keeps running", self._thread.name)
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
            log.exception("could not tidy up %s", self._thread.name)
        finally:
            self.loop.close()

    def probe(self) -> threading.Event:
        """An event the loop sets when it next runs its callbacks (set at once if the loop is closed)."""
        ran = threading.Event()
        try:
            self.loop.call_soon_threadsafe(ran.set)
        except RuntimeError:
            ran.set()
        return ran


class PluginLoops:
    """One :class:`LoopThread` per plugin, started at the plugin's first command, and a watchdog."""

    def __init__(self, on_stall: StallCallback, *, stall_after_s: float = 1.0, probe_every_s: float = 0.25) -> None:
        self.on_stall = on_stall
        self.stall_after_s = stall_after_s
        self.probe_every_s = probe_every_s
        self._loops: dict[str, LoopThread] = {}
        # The command each plugin ran last, per plugin: named when its loop is found blocked.
        self.last_command: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None

    def for_plugin(self, plugin: str) -> LoopThread:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the app is closed")
            loop = self._loops.get(plugin)
            if loop is None:
                loop = self._loops[plugin] = LoopThread(f"lmbot-plugin-{plugin}", plugin)
                loop.start()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="lmbot-plugin-watchdog", daemon=True)
                self._watchdog.start()
            return loop

    def submit(self, plugin: str, command: str, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` (``/command`` of ``plugin``) on the plugin's own loop."""
        try:
            loop = self.for_plugin(plugin)
        except RuntimeError:
            coro.close()
            raise
        self.last_command[plugin] = command
        return loop.submit(coro)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every plugin loop (blocking); a loop a handler still blocks is left to its daemon thread."""
        with self._lock:
            self._closed.set()
            loops = list(self._loops.values())
        for loop in loops:
            loop.stop(timeout)
        if self._watchdog is not None:
            self._watchdog.join(timeout)

    def _watch(self) -> None:
        """Probe every loop; a late probe means plugin code blocks that loop: report it once it ends."""
        blocked: dict[str, tuple[threading.Event, float, str, bool]] = {}  # plugin -> probe, posted, command, warned
        while not self._closed.wait(self.probe_every_s):
            with self._lock:
                loops = dict(self._loops)
            now = time.monotonic()
            for plugin, loop in loops.items():
                if plugin not in blocked:
                    blocked[plugin] = (loop.probe(), now, self.last_command.get(plugin, "?"), False)
                    continue
                ran, posted, command, warned = blocked[plugin]
                if ran.is_set():
                    del blocked[plugin]
                    seconds = now - posted
                    if seconds >= self.stall_after_s:
                        log.warning(
                            "/%s (plugin %s) blocked its event loop for %.1f s in all", command, plugin, seconds
                        )
                        self.on_stall(plugin, command, seconds, not warned)
                elif not warned and now - posted >= self.stall_after_s:
                    log.warning(
                        "/%s (plugin %s) has blocked its event loop for %.1f s: handlers must not block; use "
                        "asyncio.to_thread for slow code. Only this plugin's commands wait.",
                        command,
                        plugin,
                        now - posted,
                    )
                    self.on_stall(plugin, command, now - posted, True)
                    blocked[plugin] = (ran, posted, command, True)


class OnLoop:
    """A view of an object that lives on ``home`` (the inference client): its coroutine methods,
    called from a plugin's loop, run on ``home`` and are awaited from the caller's loop.

    Everything else (metrics, limits, plain methods) is the object's own attribute.
    """

    def __init__(self, target: Any, home: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._home = home

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not asyncio.iscoroutinefunction(value):
            return value
        home = self._home

        async def on_home(*args: Any, **kwargs: Any) -> Any:
            coro = value(*args, **kwargs)
            try:
                if asyncio.get_running_loop() is home:
                    return await coro
            except RuntimeError:
                pass
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))

        return on_home
