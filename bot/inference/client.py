"""The asyncio side of the inference service.

Plugins call :meth:`InferenceClient.submit` with a request and await its
result. The local backend keeps a bounded queue per (role, task, batch key) in
the bot process and hands batches to worker processes, one batch per idle
worker: a batch goes out when it is full or when its oldest request has waited
``max_wait_ms``. Keeping the queue here (not in the workers) makes deadlines,
cancellation and worker crashes exact: the client always knows which requests
a worker holds. Workers split batches further by padded tokens.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bot.config import Config
from bot.inference.metrics import ServiceMetrics
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, InputTooLong, Request, WorkerDied
from bot.inference.settings import WorkerSettings
from bot.topics import ModelRole

log = logging.getLogger(__name__)


class InferenceClient(abc.ABC):
    """What plugins and front ends use; every backend implements it."""

    metrics: ServiceMetrics

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def submit(self, request: Request, *, timeout: float | None = None) -> Any:
        """Run ``request`` and return its result, or raise an :class:`InferenceError`."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def retry_hint_if_full(self) -> float | None:
        """Seconds to suggest waiting when a new request would be refused as busy, else None."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """Workers and the models they hold."""


@dataclass(eq=False)
class _Pending:
    id: int
    request: Request
    key: tuple[Any, ...]
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any
    conn: Connection
    in_flight: list[_Pending] | None = None
    batch_id: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    device: str = ""
    lost: bool = False
    loading: str | None = None  # the role it is loading (or downloading) right now


class LocalInferenceClient(InferenceClient):
    """Worker processes on this host, fed by a dynamic batching queue."""

    def __init__(self, config: Config, roles: dict[str, ModelRole]) -> None:
        inf = config.inference
        self.settings = WorkerSettings.from_config(config, roles)
        self.log_level = config.bot.log_level
        self.n_workers = inf.workers
        self.max_queue = inf.max_queue
        self.max_batch = inf.max_batch_size
        self.max_wait = inf.max_wait_ms / 1000
        self.timeout = inf.request_timeout_s
        self.max_chars = inf.max_input_chars
        self.metrics = ServiceMetrics()
        self.metrics_port = inf.metrics_port
        self._queues: OrderedDict[tuple[Any, ...], deque[_Pending]] = OrderedDict()
        self._waiting = 0
        self._ids = itertools.count(1)
        self._workers: list[_Worker] = []
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._done_rate = 0.0  # completions per second, smoothed; feeds the Busy retry hint
        self._last_done = time.monotonic()
        self._status_waiters: dict[int, asyncio.Future[Any]] = {}
        self._crash_streak = 0
        self._mp = multiprocessing.get_context("spawn")  # fork is unsafe with torch threads

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._scheduler is not None:
            return
        self._loop = asyncio.get_running_loop()
        for index in range(self.n_workers):
            self._workers.append(self._spawn(index))
        self._scheduler = asyncio.create_task(self._schedule(), name="lmbot-inference-scheduler")
        if self.metrics_port:
            self.metrics.serve(self.metrics_port)

    async def wait_ready(self, timeout: float = 120) -> None:
        """Wait until every worker has started (imported torch, preloaded models)."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(w.ready.wait() for w in self._workers))

    async def close(self) -> None:
        self._closing = True
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(InferenceError("The bot is shutting down."))
        self._queues.clear()
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
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
        from bot.inference import worker as worker_module

        parent, child = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=worker_module.main,
            args=(child, self.settings, self.log_level),
            name=f"lmbot-worker-{index}",
            daemon=True,
        )
        process.start()
        child.close()  # so that the worker's death closes the pipe and the reader sees EOF at once
        worker = _Worker(index, process, parent)
        threading.Thread(target=self._read, args=(worker,), name=f"lmbot-reader-{index}", daemon=True).start()
        self.metrics.workers_alive.set(sum(1 for w in self._workers if not w.lost) + 1)
        return worker

    # ------------------------------------------------------------------ submit

    async def submit(self, request: Request, *, timeout: float | None = None) -> Any:
        if self._closing:
            raise InferenceError("The bot is shutting down.")
        if self._scheduler is None:
            await self.start()  # workers start on first use, so commands without models stay instant
        task = type(request).task
        chars = sum(len(t) for t in request.texts())
        if chars > self.max_chars:
            self.metrics.requests.labels(task, "too_long").inc()
            raise InputTooLong(f"That text is {chars:,} characters long; the limit is {self.max_chars:,}.")
        if self._waiting >= self.max_queue:
            self.metrics.requests.labels(task, "busy").inc()
            raise Busy(self._retry_hint())
        now = time.monotonic()
        pending = _Pending(
            id=next(self._ids),
            request=request,
            key=(type(request).role, task, type(request), request.batch_key()),
            future=self._loop.create_future(),
            enqueued=now,
            deadline=now + (timeout or self.timeout),
        )
        self._queues.setdefault(pending.key, deque()).append(pending)
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._wake.set()
        try:
            async with asyncio.timeout_at(self._loop.time() + (pending.deadline - now)):
                result = await pending.future
        except TimeoutError:
            self._forget(pending)
            self.metrics.requests.labels(task, "deadline").inc()
            raise self._deadline_error(type(request).role) from None
        except asyncio.CancelledError:
            self._forget(pending)
            self.metrics.requests.labels(task, "cancelled").inc()
            raise
        except InferenceError as exc:
            self.metrics.requests.labels(task, type(exc).__name__).inc()
            raise
        self.metrics.requests.labels(task, "ok").inc()
        self.metrics.latency.labels(task).observe(time.monotonic() - pending.enqueued)
        return result

    def _deadline_error(self, role: str | None) -> DeadlineExceeded:
        """Say why when the wait was a model loading for the first time (a download, maybe)."""
        alive = [w for w in self._workers if not w.lost]
        if role is not None and any(w.loading == role for w in alive):
            return DeadlineExceeded(
                f"The `{role}` model is still loading (the first use may download it); try again in a minute."
            )
        if alive and not any(w.ready.is_set() for w in alive):
            return DeadlineExceeded("The model workers are still starting; try again in a few seconds.")
        return DeadlineExceeded()

    def _forget(self, pending: _Pending) -> None:
        """Remove a request that nobody awaits any more, if it is still queued."""
        queue = self._queues.get(pending.key)
        if queue is not None and pending in queue:
            queue.remove(pending)
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    def retry_hint_if_full(self) -> float | None:
        return self._retry_hint() if self._waiting >= self.max_queue else None

    def _retry_hint(self) -> float:
        rate = self._done_rate or 1.0
        return max(1.0, math.ceil(self._waiting / rate))

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            delay = self._dispatch()
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _dispatch(self) -> float | None:
        """Send batches to idle workers; return how long until a partial batch is due."""
        now = time.monotonic()
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and (queue[0].future.done() or queue[0].deadline <= now):
                expired = queue.popleft()
                self._waiting -= 1
                if not expired.future.done():
                    expired.future.set_exception(self._deadline_error(type(expired.request).role))
            if not queue:
                del self._queues[key]
        next_due: float | None = None
        idle = [w for w in self._workers if w.in_flight is None and not w.lost]
        while idle and self._queues:
            # Serve the queue whose oldest request has waited longest.
            key, queue = min(self._queues.items(), key=lambda kv: kv[1][0].enqueued)
            due = queue[0].enqueued + self.max_wait
            if len(queue) < self.max_batch and due > now:
                next_due = due - now
                break
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            if not queue:
                del self._queues[key]
            self._waiting -= len(batch)
            self._send(idle.pop(0), batch, now)
        self.metrics.queue_depth.set(self._waiting)
        return next_due

    def _send(self, worker: _Worker, batch: list[_Pending], now: float) -> None:
        worker.batch_id += 1
        worker.in_flight = batch
        task = type(batch[0].request).task
        for pending in batch:
            self.metrics.queue_wait.labels(task).observe(now - pending.enqueued)
        try:
            worker.conn.send(("batch", worker.batch_id, [(p.id, p.request, p.deadline) for p in batch]))
        except (OSError, ValueError):
            self._on_lost(worker)

    # ------------------------------------------------------------------ worker messages

    def _read(self, worker: _Worker) -> None:
        """Reader thread: one per worker, so a dead worker is noticed the moment its pipe closes."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable result; the worker is still fine
                log.exception("could not read a message from worker %d", worker.index)
                continue
            self._call(self._on_message, worker, message)
        self._call(self._on_lost, worker)

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed at shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.device = message[2]
            worker.ready.set()
            self._crash_streak = 0
        elif kind == "status":
            waiter = self._status_waiters.pop(message[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message[2])
        elif kind == "loading":
            worker.loading = message[1]
        elif kind == "done":
            worker.loading = None
            self._on_done(worker, message[1], message[2], message[3])

    def _on_done(self, worker: _Worker, batch_id: int, outcomes: list[tuple[int, bool, Any]], timing: dict) -> None:
        batch = worker.in_flight or []
        worker.in_flight = None
        if batch_id != worker.batch_id:
            log.warning("worker %d answered an old batch %d", worker.index, batch_id)
        by_id = {p.id: p for p in batch}
        task = type(batch[0].request).task if batch else "?"
        for size in timing.get("sizes", []):
            self.metrics.batch_size.labels(task).observe(size)
        if timing.get("compute_s"):
            self.metrics.compute.labels(task).observe(timing["compute_s"])
        for request_id, ok, value in outcomes:
            pending = by_id.pop(request_id, None)
            if pending is None or pending.future.done():
                continue  # cancelled or timed out while the worker was computing
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)
        for pending in by_id.values():  # a worker bug: it skipped a request
            if not pending.future.done():
                pending.future.set_exception(InferenceError("The model worker lost this request; try again."))
        self.metrics.last_progress.set_to_current_time()
        now = time.monotonic()
        elapsed = max(now - self._last_done, 1e-3)
        self._last_done = now
        self._done_rate = 0.8 * self._done_rate + 0.2 * (len(outcomes) / elapsed)
        self._wake.set()

    def _on_lost(self, worker: _Worker) -> None:
        if worker.lost:
            return
        worker.lost = True
        worker.loading = None
        for pending in worker.in_flight or []:
            if not pending.future.done():
                pending.future.set_exception(WorkerDied())
        worker.in_flight = None
        for waiter in self._status_waiters.values():
            if not waiter.done():
                waiter.set_exception(WorkerDied())
        if self._closing:
            return
        code = worker.process.exitcode
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
        self._wake.set()

    # ------------------------------------------------------------------ control

    async def _control(self, worker: _Worker, message: tuple[Any, ...], timeout: float) -> Any:
        """Send a control message (answered in order with the batches) and await its answer."""
        token = next(self._ids)
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
        return {"workers": workers, "queue_depth": self._waiting}

    async def load_role(self, role: str, timeout: float = 600) -> dict[str, Any]:
        """Load ``role``'s model in every worker now (what its first request would do)."""
        if self._scheduler is None:
            await self.start()
        await self.wait_ready()
        answers = [await self._control(w, ("load", role), timeout) for w in self._workers if not w.lost]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers[0]


def create_client(config: Config, roles: dict[str, ModelRole]) -> InferenceClient:
    """The backend named by ``inference.backend``."""
    if config.inference.backend == "ray":
        from bot.inference.ray_backend import RayInferenceClient

        return RayInferenceClient(config, roles)
    return LocalInferenceClient(config, roles)
