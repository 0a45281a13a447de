"""The local backend: worker processes on this host, a transport of the batching core.

Scheduling (admission, fair queues, deadlines, batching, crash retries) is the
batching core's (:mod:`bot.inference.scheduler`); this module only runs the
batches it is handed, one per idle worker, and reports what became of them.
Keeping the queue in the bot process (not in the workers) makes deadlines,
cancellation and worker crashes exact: the client always knows which requests a
worker holds. Workers split batches further by padded tokens.

Workers start lazily: on the first request (or :meth:`LocalInferenceClient.wait_ready`,
:meth:`~LocalInferenceClient.load_role`, :meth:`~LocalInferenceClient.spawn_workers`),
so a bot whose commands never need a model never starts one.

Faults: a worker that dies is replaced at once. Killed from outside (SIGKILL: an
operator, the kernel's out-of-memory killer), its requests are answered with a
retry message. Crashed on its own while running a batch (a segfault, an abort,
an exit), the core runs each of its requests again alone, once. A watchdog kills
and replaces a worker whose batch runs ``watchdog_margin_s`` past its requests'
last deadline (stopped, hung, or stuck in a task nobody waits for), and one that
loads a model but stops sending its loading heartbeat for :attr:`load_silence_s`
(``3 × watchdog_margin_s``, at least 10 s: a SIGSTOP during a load) or loads for
longer than :data:`LOAD_ALLOWANCE_S` (a hung download). "Still loading" is said
only while a load is alive by that measure.

Answers are read at the boundary with an unpickler that refuses torch and numpy
objects, so a task's result can never import torch into the bot process (workers
check results are plain data first, see :func:`bot.worker.process.plain_data_problem`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bot.config import Config
from bot.inference.protocol import DeadlineExceeded, InferenceError, WorkerDied
from bot.inference.scheduler import BatchedClient, Pending
from bot.inference.settings import STARTING, WorkerSettings
from bot.topics import ModelRole

log = logging.getLogger(__name__)

# Loading a model may mean downloading it first; a load may take this long in all.
LOAD_ALLOWANCE_S = 600.0
# How much longer than the heartbeat silence a new worker may take to send its first heartbeat.
START_GRACE_S = 5.0
STALLED = "The model worker stopped responding and was restarted; try again."
UNSENDABLE = "This request cannot be sent to a model worker (it cannot be pickled): a bug in the plugin that made it."
UNREADABLE = "The model's answer could not be read (a bug in the task's result type)."
# Modules whose objects never cross into the bot process (it must not import them).
REFUSED_MODULES = ("torch", "numpy")


class BoundaryUnpickler(pickle.Unpickler):
    """Unpickles a worker's message, refusing any torch or numpy object (it would import them here)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".", 1)[0] in REFUSED_MODULES:
            raise pickle.UnpicklingError(f"a worker sent a {module}.{name} object; results must be plain data")
        return super().find_class(module, name)


def read_message(conn: Connection) -> Any:
    """One message from a worker's pipe, through :class:`BoundaryUnpickler`."""
    return BoundaryUnpickler(io.BytesIO(conn.recv_bytes())).load()


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any
    conn: Connection
    in_flight: list[Pending] | None = None
    batch_id: int = 0
    batch_deadline: float = 0.0  # the last deadline among the requests of the batch in flight
    loaded_at: float = 0.0  # when a model load during the batch in flight finished
    ready_at: float = 0.0  # when it reported ready (imported torch, preloaded models)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    device: str = ""
    lost: bool = False
    stalled: bool = False  # killed by the watchdog
    loading: str | None = None  # the role it is loading (or downloading) right now
    loading_since: float = 0.0
    load_beat: float = 0.0  # its last "still loading" heartbeat


SPAWNED_HOOK_ENV = "LMBOT_TEST_WORKER_SPAWNED"


def _spawned_hook(pid: int | None) -> None:
    """Tests only: write a started worker's pid to the FIFO ``$LMBOT_TEST_WORKER_SPAWNED`` names.

    Lets a test interrupt ``lmbot ask`` exactly while a worker starts, by an event and not a sleep.
    """
    where = os.environ.get(SPAWNED_HOOK_ENV)
    if where:
        with contextlib.suppress(OSError), open(where, "w") as fifo:
            fifo.write(f"{pid}\n")


class LocalInferenceClient(BatchedClient):
    """Worker processes on this host: the transport the batching core hands batches to."""

    def __init__(self, config: Config, roles: dict[str, ModelRole]) -> None:
        super().__init__(config)
        inf = config.inference
        self.settings = WorkerSettings.from_config(config, roles)
        self.log_level = config.bot.log_level
        self.n_workers = inf.workers
        self.watchdog_margin = inf.watchdog_margin_s
        # A loading worker sends a heartbeat every second; this much silence means it is stopped.
        self.load_silence_s = max(10.0, 3 * inf.watchdog_margin_s)
        self.metrics_port = inf.metrics_port
        self._workers: list[_Worker] = []
        self._started = False
        self._spawned = False
        self._status_waiters: dict[int, asyncio.Future[Any]] = {}
        self._tokens = iter(range(1, 1 << 62))
        self._crash_streak = 0
        self._mp = multiprocessing.get_context("spawn")  # fork is unsafe with torch threads

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the scheduling core (and the metrics endpoint); workers start on first use."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self.core.start()
        if self.metrics_port:
            self.metrics.serve(self.metrics_port)

    def spawn_workers(self) -> None:
        """Start the worker processes now (the first request that needs one does it otherwise)."""
        if self._spawned or self._closing:
            return
        self._spawned = True
        for index in range(self.n_workers):
            self._workers.append(self._spawn(index))

    async def prepare(self, role: str | None) -> None:
        await self.start()
        self.spawn_workers()

    async def wait_ready(self, timeout: float = 120) -> None:
        """Start the workers if need be and wait until each has started (imported torch, preloaded models)."""
        await self.start()
        self.spawn_workers()
        async with asyncio.timeout(timeout):
            while True:  # a worker lost meanwhile is waited for as its replacement
                starting = [w for w in self._workers if not w.ready.is_set()]
                if not starting:
                    return
                live = [w for w in starting if not w.lost]
                if live:
                    await asyncio.gather(*(w.ready.wait() for w in live))
                else:
                    await asyncio.sleep(0.05)  # its replacement is about to be spawned

    async def close(self) -> None:
        self._closing = True
        await self.core.close()
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(("stop",))
        deadline = time.monotonic() + 5
        for worker in self._workers:
            await asyncio.to_thread(worker.process.join, max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2)
            with contextlib.suppress(OSError):
                worker.conn.close()
        self._workers.clear()
        self.metrics.workers_alive.set(0)

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if not w.lost and w.process.is_alive()]

    def _spawn(self, index: int) -> _Worker:
        from bot.worker import process as worker_module

        parent, child = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=worker_module.main,
            args=(child, self.settings, self.log_level),
            name=f"lmbot-worker-{index}",
            daemon=True,
        )
        # Ctrl-C is the parent's to handle (it stops the workers). A terminal sends it to the whole
        # process group, so a worker still starting (the interpreter importing lmbot and torch, before
        # its own SIG_IGN) would die with a traceback: it starts with SIGINT ignored (kept through fork
        # and exec). A Ctrl-C in the few milliseconds start() takes is lost; the next one is not.
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main else None
        try:
            process.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()  # so that the worker's death closes the pipe and the reader sees EOF at once
        _spawned_hook(process.pid)
        worker = _Worker(index, process, parent)
        # Its start is watched like a load from now: its first heartbeat comes once the interpreter
        # has started and imported lmbot, which START_GRACE_S allows for on a busy machine.
        now = time.monotonic()
        worker.loading, worker.loading_since, worker.load_beat = STARTING, now, now + START_GRACE_S
        threading.Thread(target=self._read, args=(worker,), name=f"lmbot-reader-{index}", daemon=True).start()
        self.metrics.workers_alive.set(sum(1 for w in self._workers if not w.lost) + 1)
        return worker

    # ------------------------------------------------------------------ the transport

    @property
    def parallelism(self) -> int:
        return max(1, self.n_workers)

    def _idle(self) -> list[_Worker]:
        return [w for w in self._workers if w.in_flight is None and not w.lost]

    def free(self, role: str | None) -> int:
        return len(self._idle())

    def run(self, batch: list[Pending]) -> bool:
        """Send ``batch`` to an idle worker; False when nothing was sent (the worker is still idle)."""
        worker = self._idle()[0]
        # Each request travels pickled on its own, so one that cannot be pickled here, or
        # unpickled in the worker, fails alone.
        items = []
        for pending in list(batch):
            try:
                items.append((pending.id, pickle.dumps(pending.request, pickle.HIGHEST_PROTOCOL), pending.deadline))
            except Exception:
                log.exception("a %s request cannot be pickled", type(pending.request).__name__)
                batch.remove(pending)
                self.core.failed([pending], InferenceError(UNSENDABLE))
        if not batch:
            return True  # each was answered
        worker.batch_id += 1
        worker.in_flight = batch
        worker.batch_deadline = max(p.deadline for p in batch)
        worker.loaded_at = 0.0
        try:
            worker.conn.send(("batch", worker.batch_id, items))
        except (OSError, ValueError):
            # The worker is gone and never saw this batch: it goes back in the queue.
            worker.in_flight = None
            self.core.requeue(batch)
            self._on_lost(worker)
        return True

    def deadline_error(self, role: str | None) -> DeadlineExceeded:
        """Say why when the wait was a model loading for the first time (a download, maybe)."""
        alive = [w for w in self._workers if not w.lost]
        if role is not None and any(w.loading == role for w in alive):
            return DeadlineExceeded(
                f"The `{role}` model is still loading (the first use may download it); try again in a minute."
            )
        if alive and not any(w.ready.is_set() for w in alive):
            return DeadlineExceeded("The model workers are still starting; try again in a few seconds.")
        return DeadlineExceeded()

    # ------------------------------------------------------------------ watchdog

    def watch(self, now: float) -> float | None:
        """Kill workers whose batch overran its deadline or whose load went silent; seconds until the next check."""
        soonest: float | None = None
        for worker in list(self._workers):
            if worker.lost:
                continue
            if worker.loading is not None:
                # A load is watched by its heartbeat (a stopped worker sends none) and its allowance.
                limit = min(worker.load_beat + self.load_silence_s, worker.loading_since + LOAD_ALLOWANCE_S)
                if now >= limit:
                    what = "start" if worker.loading == STARTING else f"{worker.loading} model load"
                    self._stall(worker, f"its {what} went silent {now - worker.load_beat:.1f} s ago")
                    continue
                soonest = limit - now if soonest is None else min(soonest, limit - now)
                continue
            if worker.in_flight is None:
                continue
            # A batch sent before the worker was ready, or one that loaded a model first, waits
            # for that: the clock starts when the worker is ready or the model loaded.
            limit = max(worker.batch_deadline, worker.ready_at, worker.loaded_at) + self.watchdog_margin
            if not worker.ready.is_set():
                limit += LOAD_ALLOWANCE_S
            if now >= limit:
                self._stall(worker, f"its batch is {now - worker.batch_deadline:.1f} s past its deadline")
            else:
                soonest = limit - now if soonest is None else min(soonest, limit - now)
        return soonest

    def _stall(self, worker: _Worker, why: str) -> None:
        log.error("worker %d (pid %s) is stuck: %s; killing and replacing it", worker.index, worker.process.pid, why)
        worker.stalled = True
        self.metrics.worker_stalls.inc()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.process.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
        self._on_lost(worker)

    # ------------------------------------------------------------------ worker messages

    def _read(self, worker: _Worker) -> None:
        """Reader thread: one per worker, so a dead worker is noticed the moment its pipe closes."""
        while True:
            try:
                message = read_message(worker.conn)
            except (EOFError, OSError):
                break
            except Exception:  # an answer that cannot be unpickled here; the worker is still fine
                log.exception("could not read a message from worker %d", worker.index)
                self._call(self._on_unreadable, worker)
                continue
            self._call(self._on_message, worker, message)
        # Reap the process, so its exit code tells a crash from a kill.
        with contextlib.suppress(Exception):
            worker.process.join(2)
        self._call(self._on_lost, worker)

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed at shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        if worker.lost:
            return  # a late message from a worker already given up (killed by the watchdog)
        kind = message[0]
        if kind == "ready":
            worker.device = message[2]
            worker.ready.set()
            worker.ready_at = time.monotonic()
            self.core.wake()  # the watchdog's next check moves
            self._crash_streak = 0
        elif kind == "status":
            waiter = self._status_waiters.pop(message[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message[2])
        elif kind == "loading":  # sent when a load starts, then every second while it runs
            now = time.monotonic()
            if worker.loading != message[1]:
                worker.loading, worker.loading_since = message[1], now
                self.core.wake()  # the watchdog now watches the load
            worker.load_beat = now
        elif kind == "loaded":
            worker.loading = None
            worker.loaded_at = time.monotonic()
            self.core.wake()  # the watchdog's next check moves
        elif kind == "done":
            worker.loading = None
            self._on_done(worker, message[1], message[2], message[3])

    def _on_unreadable(self, worker: _Worker) -> None:
        """An answer from ``worker`` could not be read: its batch fails instead of waiting forever."""
        if worker.lost:
            return
        batch = worker.in_flight or []
        worker.in_flight = None
        self.core.failed(batch, InferenceError(UNREADABLE))

    def _on_done(self, worker: _Worker, batch_id: int, outcomes: list[tuple[int, bool, Any]], timing: dict) -> None:
        if batch_id != worker.batch_id:  # its batch was already given up (its answer was unreadable)
            log.warning("worker %d answered an old batch %d", worker.index, batch_id)
            return
        batch = worker.in_flight or []
        worker.in_flight = None
        self.core.finished(batch, outcomes, timing)

    def _on_lost(self, worker: _Worker) -> None:
        if worker.lost:
            return
        worker.lost = True
        worker.loading = None
        batch = worker.in_flight or []
        worker.in_flight = None
        code = worker.process.exitcode
        if worker.stalled:
            self.core.lost(batch, crashed=False, reason=STALLED)
        else:
            # Killed from outside (an operator, the kernel's out-of-memory killer): not these requests' doing.
            killed = self._closing or code is None or code == -signal.SIGKILL
            if batch and not killed and len(batch) > 1:
                log.warning("running the %d requests of the crashed worker's batch again, one at a time", len(batch))
            self.core.lost(batch, crashed=not killed)
        for waiter in self._status_waiters.values():
            if not waiter.done():
                waiter.set_exception(WorkerDied())
        if self._closing:
            return
        log.error("worker %d (pid %s) died (exit code %s); starting a new one", worker.index, worker.process.pid, code)
        self.metrics.worker_restarts.inc()
        with contextlib.suppress(OSError):
            worker.conn.close()
        # A worker that dies before it is ready would likely die again at once: back off.
        if worker.ready.is_set():
            delay = 0.0
        else:
            self._crash_streak += 1
            delay = min(30.0, 0.5 * 2**self._crash_streak)
        self._loop.call_later(delay, self._replace, worker)

    def _replace(self, worker: _Worker) -> None:
        if self._closing:
            return
        position = self._workers.index(worker)
        self._workers[position] = self._spawn(worker.index)
        self.metrics.workers_alive.set(sum(1 for w in self._workers if not w.lost))
        self.core.wake()

    # ------------------------------------------------------------------ control

    async def _control(self, worker: _Worker, message: tuple[Any, ...], timeout: float) -> Any:
        """Send a control message (answered in order with the batches) and await its answer."""
        token = next(self._tokens)
        waiter = self._loop.create_future()
        self._status_waiters[token] = waiter
        try:
            worker.conn.send((message[0], token, *message[1:]))
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            self._status_waiters.pop(token, None)

    async def status(self) -> dict[str, Any]:
        workers = []
        for worker in self._workers:
            info: dict[str, Any] = {"pid": worker.process.pid, "alive": not worker.lost, "device": worker.device}
            if not worker.lost and worker.ready.is_set():
                try:
                    info["models"] = await self._control(worker, ("status",), timeout=5)
                except (TimeoutError, OSError, ValueError):
                    info["models"] = "unknown (busy)"
            workers.append(info)
        return {"workers": workers, "queue_depth": self.core.waiting}

    async def load_role(self, role: str, timeout: float = 600) -> dict[str, Any]:
        """Load ``role``'s model in every worker now (what its first request would do)."""
        await self.wait_ready()
        answers = [await self._control(w, ("load", role), timeout) for w in self._workers if not w.lost]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers[0]
