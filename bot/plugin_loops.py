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
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from types import CodeType, FrameType
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

StallCallback = Callable[[str, str, float, bool], None]  # plugin, command, seconds, a new stall


_plugin_thread = threading.local()


def _mark_plugin_thread(plugin: str | None) -> None:
    _plugin_thread.plugin = plugin


def on_plugin_thread() -> bool:
    """Whether the calling thread runs a plugin's code (its loop, or its loop's ``asyncio.to_thread`` workers)."""
    return getattr(_plugin_thread, "plugin", None) is not None


class PluginExecutor(concurrent.futures.ThreadPoolExecutor):
    """A plugin loop's default executor (``asyncio.to_thread``): marked threads, daemon threads.

    Marked: the self-signal guard refuses ``os.kill`` and friends there as on the loop's thread.
    Daemon: a call that never returns is abandoned at exit, where ``ThreadPoolExecutor``'s own
    workers are joined (and would keep ``lmbot ask`` alive). A subclass only because asyncio's
    ``set_default_executor`` takes nothing else; its queue and threads are its own.
    """

    def __init__(self, plugin: str, max_workers: int | None = None) -> None:
        super().__init__(max_workers, f"lmbot-plugin-{plugin}-worker", _mark_plugin_thread, (plugin,))
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], Any, Any] | None]
        self._jobs = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle_workers = threading.Semaphore(0)
        self._closed = False
        self._guard = threading.Lock()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        with self._guard:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._jobs.put((future, fn, args, kwargs))
            if not self._idle_workers.acquire(timeout=0) and len(self._workers) < self._max_workers:
                worker = threading.Thread(
                    target=self._work, name=f"{self._thread_name_prefix}_{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
            return future

    def _work(self) -> None:
        _mark_plugin_thread(*self._initargs)
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the awaiting handler, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del job, future, fn, args, kwargs
            self._idle_workers.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._closed = True
            workers = list(self._workers)
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in workers:
            self._jobs.put(None)
        if wait:
            for worker in workers:
                worker.join()


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
        # A plugin's to_thread calls run on marked daemon threads of its own (see PluginExecutor).
        self.executor = PluginExecutor(plugin) if plugin is not None else None
        if self.executor is not None:
            self.loop.set_default_executor(self.executor)
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
        if self.request_stop():
            self.join(time.monotonic() + timeout)

    def request_stop(self) -> bool:
        """Ask the loop to stop, without waiting; False if it was not running or already asked."""
        if not self._started or self._stopping.is_set():
            return False
        self._stopping.set()
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.executor is not None:
            # Calls not started yet never will be; one still running is left to its daemon thread.
            self.executor.shutdown(wait=False, cancel_futures=True)
        return True

    def join(self, deadline: float) -> bool:
        """Wait until the thread ended or ``time.monotonic()`` passes ``deadline``; whether it ended."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning(
                "%s did not stop in time (a handler still blocks it, or its tasks did not end when cancelled); "
                "its daemon thread is left behind",
                self._thread.name,
            )
            return False
        return True

    def _run(self) -> None:
        _mark_plugin_thread(self.plugin)
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
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)  # a stuck call must not hold the exit
            else:
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


Culprit = tuple[str | None, str | None, str]  # the command, its plugin, where the thread is


def culprit(
    thread: threading.Thread,
    loop: asyncio.AbstractEventLoop,
    handlers: Mapping[CodeType, tuple[str, str]],
    running: Mapping[asyncio.Task[Any], tuple[str, str]],
) -> Culprit:
    """The command (and its plugin) whose code ``thread``, which runs ``loop``, is running now, and where.

    ``handlers``: each command's handler code; ``running``: the command each task runs. A frame of a
    handler names it; else the task the loop runs (code a handler started as a task of its own).
    """
    frame: FrameType | None = sys._current_frames().get(thread.ident or -1)
    where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"
    while frame is not None:
        if frame.f_code in handlers:
            return (*handlers[frame.f_code], where)
        frame = frame.f_back
    with contextlib.suppress(RuntimeError):
        task = asyncio.current_task(loop)
        named = running.get(task) if task is not None else None  # .get: the loop's thread edits it
        if named is not None:
            return (*named, where)
    return None, None, where


class PluginLoops:
    """One :class:`LoopThread` per plugin, started at the plugin's first command, and a watchdog.

    ``culprit_of``: the command a blocked loop's thread is running (see :func:`culprit`); without
    it, or when it finds none, the plugin's last submitted command is named.
    """

    def __init__(
        self,
        on_stall: StallCallback,
        *,
        stall_after_s: float = 1.0,
        probe_every_s: float = 0.25,
        culprit_of: Callable[[LoopThread], Culprit] | None = None,
    ) -> None:
        self.on_stall = on_stall
        self.stall_after_s = stall_after_s
        self.probe_every_s = probe_every_s
        self.culprit_of = culprit_of
        self._loops: dict[str, LoopThread] = {}
        # The command each plugin ran last, per plugin: named when no running command is found.
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

    def retire(self, plugin: str) -> bool:
        """Stop ``plugin``'s loop without waiting (``/reload``): its next command starts a fresh one.

        A handler stuck on the old loop keeps only the old (daemon) thread. Whether there was a loop.
        """
        with self._lock:
            loop = self._loops.pop(plugin, None)
        if loop is None:
            return False
        loop.request_stop()
        log.info("the event loop of plugin %s was retired; its next command starts a new one", plugin)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop every plugin loop (blocking, ``timeout`` for all together); a loop a handler still blocks
        is left to its daemon thread."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed.set()
            loops = list(self._loops.values())
        for loop in loops:  # every loop told first, so that they all wind down at once
            loop.request_stop()
        for loop in loops:
            loop.join(deadline)
        if self._watchdog is not None:
            self._watchdog.join(max(0.0, deadline - time.monotonic()))

    def _blame(self, plugin: str, loop: LoopThread) -> str:
        if self.culprit_of is not None:
            command, of_plugin, _ = self.culprit_of(loop)
            if command is not None and of_plugin == plugin:
                return command
        return self.last_command.get(plugin, "?")

    def _watch(self) -> None:
        """Probe every loop; a late probe means plugin code blocks that loop: report it once it ends."""
        # per loop (a retired plugin's new loop is another): probe, posted, plugin, command, warned
        blocked: dict[LoopThread, tuple[threading.Event, float, str, str, bool]] = {}
        while not self._closed.wait(self.probe_every_s):
            with self._lock:
                loops = {loop: plugin for plugin, loop in self._loops.items()}
            for gone in blocked.keys() - loops.keys():
                del blocked[gone]
            now = time.monotonic()
            for loop, plugin in loops.items():
                if loop not in blocked:
                    blocked[loop] = (loop.probe(), now, plugin, "?", False)
                    continue
                ran, posted, plugin, command, warned = blocked[loop]
                if ran.is_set():
                    del blocked[loop]
                    seconds = now - posted
                    if seconds >= self.stall_after_s:
                        command = command if warned else self._blame(plugin, loop)
                        log.warning(
                            "/%s (plugin %s) blocked its event loop for %.1f s in all", command, plugin, seconds
                        )
                        self.on_stall(plugin, command, seconds, not warned)
                elif not warned and now - posted >= self.stall_after_s:
                    command = self._blame(plugin, loop)
                    log.warning(
                        "/%s (plugin %s) has blocked its event loop for %.1f s: handlers must not block; use "
                        "asyncio.to_thread for slow code. Only this plugin's commands wait.",
                        command,
                        plugin,
                        now - posted,
                    )
                    self.on_stall(plugin, command, now - posted, True)
                    blocked[loop] = (ran, posted, plugin, command, True)


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
