"""The local backend: worker processes on this host, fed by a dynamic batching queue.

The bot process keeps a bounded queue per (role, task, batch key) and hands
batches to worker processes, one batch per idle worker: a batch goes out when
it is full or when its oldest request has waited ``max_wait_ms``. Keeping the
queue here (not in the workers) makes deadlines, cancellation and worker
crashes exact: the client always knows which requests a worker holds. Workers
split batches further by padded tokens.

Fair share: within a queue, requests are taken round-robin by user, so one
user's burst does not fill every batch; across queues, a user with nothing
running goes before one whose requests are already being computed.

Faults: a worker that dies is replaced at once. Killed from outside (SIGKILL: an
operator, the kernel's out-of-memory killer), its requests are answered with a
retry message. Crashed on its own while running a batch (a segfault, an abort,
an exit), one of its requests may be the cause: each is run again alone, once,
so a poisonous request fails by itself and the others are answered. A watchdog
kills and replaces a worker whose batch runs ``watchdog_margin_s`` past its
requests' last deadline (stopped, hung, or stuck in a task nobody waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import pickle
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bot.config import Config
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, Request, WorkerDied
from bot.inference.service import InferenceClient
from bot.inference.settings import WorkerSettings
from bot.topics import ModelRole

log = logging.getLogger(__name__)

# Loading a model may mean downloading it first; the watchdog gives a load this much longer.
LOAD_ALLOWANCE_S = 600.0
STALLED = "The model worker stopped responding and was restarted; try again."
UNSENDABLE = "This request cannot be sent to a model worker (it cannot be pickled): a bug in the plugin that made it."
CRASHED_ALONE = (
    "The model worker stopped while running this request by itself, so it was not run again. "
    "If it happens again, please tell the bot's owner."
)


@dataclass(eq=False)
class _Pending:
    id: int
    request: Request
    key: tuple[Any, ...]
    user: str | None
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float
    alone: bool = False  # run again by itself after a worker crashed with it in a batch


class _FairQueue:
    """The requests of one (role, task, batch key): a FIFO per user, taken round-robin."""

    def __init__(self) -> None:
        self.users: OrderedDict[str | None, deque[_Pending]] = OrderedDict()
        self.size = 0

    def push(self, pending: _Pending) -> None:
        self.users.setdefault(pending.user, deque()).append(pending)
        self.size += 1

    def heads(self) -> Iterator[_Pending]:
        return (queue[0] for queue in self.users.values())

    def oldest(self) -> float:
        return min(p.enqueued for p in self.heads())

    def take(self, n: int) -> list[_Pending]:
        """Up to ``n`` requests, one per user in turn; the next batch starts with the next user."""
        batch: list[_Pending] = []
        while len(batch) < n and self.users:
            user, queue = next(iter(self.users.items()))
            batch.append(queue.popleft())
            if queue:
                self.users.move_to_end(user)
            else:
                del self.users[user]
        self.size -= len(batch)
        return batch

    def remove(self, pending: _Pending) -> bool:
        queue = self.users.get(pending.user)
        if queue is None or pending not in queue:
            return False
        queue.remove(pending)
        if not queue:
            del self.users[pending.user]
        self.size -= 1
        return True

    def drop_finished(self, now: float) -> list[_Pending]:
        """Remove requests at the head of each user's FIFO that expired or nobody awaits."""
        dropped = []
        for user in list(self.users):
            queue = self.users[user]
            while queue and (queue[0].future.done() or queue[0].deadline <= now):
                dropped.append(queue.popleft())
            if not queue:
                del self.users[user]
        self.size -= len(dropped)
        return dropped


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any
    conn: Connection
    in_flight: list[_Pending] | None = None
    batch_id: int = 0
    batch_deadline: float = 0.0  # the last deadline among the requests of the batch in flight
    loaded_at: float = 0.0  # when a model load during the batch in flight finished
    ready_at: float = 0.0  # when it reported ready (imported torch, preloaded models)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    device: str = ""
    lost: bool = False
    stalled: bool = False  # killed by the watchdog
    loading: str | None = None  # the role it is loading (or downloading) right now


class LocalInferenceClient(InferenceClient):
    """Worker processes on this host, fed by a dynamic batching queue."""

    def __init__(self, config: Config, roles: dict[str, ModelRole]) -> None:
        super().__init__(config)
        inf = config.inference
        self.settings = WorkerSettings.from_config(config, roles)
        self.log_level = config.bot.log_level
        self.n_workers = inf.workers
        self.max_queue = inf.max_queue
        self.max_batch = inf.max_batch_size
        self.max_wait = inf.max_wait_ms / 1000
        self.watchdog_margin = inf.watchdog_margin_s
        self.metrics_port = inf.metrics_port
        self._queues: dict[tuple[Any, ...], _FairQueue] = {}
        self._alone: deque[_Pending] = deque()  # run one per batch, before anything else
        self._waiting = 0
        self._ids = itertools.count(1)
        self._workers: list[_Worker] = []
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._done_rate = 0.0  # completions per second, smoothed; feeds the Busy retry hint
        self._last_done = time.monotonic()
        self._status_waiters: dict[int, asyncio.Future[Any]] = {}
        self._crash_streak = 0
        self._mp = multiprocessing.get_context("spawn")  # fork is unsafe with torch threads
        # Whether a partial batch should wait max_wait for company (see _company_expected).
        self._last_arrival = -math.inf
        self._burst = False
        self._followers = 0  # requests just answered whose askers may be about to ask again
        self._followers_until = 0.0

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
        for pending in self._queued():
            if not pending.future.done():
                pending.future.set_exception(InferenceError("The bot is shutting down."))
        self._queues.clear()
        self._alone.clear()
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

    async def _submit(self, request: Request, *, timeout: float | None, user: str | None) -> Any:
        if self._scheduler is None:
            await self.start()  # workers start on first use, so commands without models stay instant
        task = type(request).task
        if self._waiting >= self.max_queue:
            self.metrics.requests.labels(task, "busy").inc()
            raise Busy(self._retry_hint())
        now = time.monotonic()
        self._burst = now - self._last_arrival < self.max_wait
        self._last_arrival = now
        self._followers = max(0, self._followers - 1)
        pending = _Pending(
            id=next(self._ids),
            request=request,
            key=(type(request).role, task, type(request), request.batch_key()),
            user=user,
            future=self._loop.create_future(),
            enqueued=now,
            deadline=now + (timeout or self.timeout),
        )
        self._queues.setdefault(pending.key, _FairQueue()).push(pending)
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

    def _queued(self) -> Iterator[_Pending]:
        yield from self._alone
        for queue in self._queues.values():
            for user_queue in queue.users.values():
                yield from user_queue

    def _forget(self, pending: _Pending) -> None:
        """Remove a request that nobody awaits any more, if it is still queued."""
        if pending.alone and pending in self._alone:
            self._alone.remove(pending)
        else:
            queue = self._queues.get(pending.key)
            if queue is None or not queue.remove(pending):
                return
            if not queue.size:
                del self._queues[pending.key]
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
            delays = [d for d in (self._dispatch(), self._watch()) if d is not None]
            if not delays:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delays)):
                        await self._wake.wait()

    def _expire(self, now: float) -> None:
        """Answer queued requests whose deadline passed (nobody else will)."""
        expired: list[_Pending] = []
        for key in list(self._queues):
            queue = self._queues[key]
            expired += queue.drop_finished(now)
            if not queue.size:
                del self._queues[key]
        for pending in [p for p in self._alone if p.future.done() or p.deadline <= now]:
            self._alone.remove(pending)
            expired.append(pending)
        self._waiting -= len(expired)
        for pending in expired:
            if not pending.future.done():
                pending.future.set_exception(self._deadline_error(type(pending.request).role))

    def _dispatch(self) -> float | None:
        """Send batches to idle workers; return how long until a partial batch is due."""
        now = time.monotonic()
        self._expire(now)
        next_due: float | None = None
        idle = [w for w in self._workers if w.in_flight is None and not w.lost]
        # Requests per user being computed now: a user with none goes first.
        running = Counter(p.user for w in self._workers for p in w.in_flight or ())
        while idle:
            if self._alone:
                pending = self._alone.popleft()
                self._waiting -= 1
                worker = idle.pop(0)
                if not self._send(worker, [pending], now):
                    idle.insert(0, worker)
                continue
            best: tuple[tuple[int, float], tuple[Any, ...]] | None = None
            company = self._company_expected(now)
            for key, queue in self._queues.items():
                due = queue.oldest() + self.max_wait
                if queue.size < self.max_batch and due > now and company:
                    next_due = due - now if next_due is None else min(next_due, due - now)
                    continue
                score = min((running[p.user], p.enqueued) for p in queue.heads())
                if best is None or score < best[0]:
                    best = (score, key)
            if best is None:
                break
            key = best[1]
            queue = self._queues[key]
            batch = queue.take(self.max_batch)
            if not queue.size:
                del self._queues[key]
            self._waiting -= len(batch)
            running.update(p.user for p in batch)
            worker = idle.pop(0)
            if not self._send(worker, batch, now):
                idle.insert(0, worker)
        self.metrics.queue_depth.set(self._waiting)
        return next_due

    def _company_expected(self, now: float) -> bool:
        """Whether another request is likely to arrive within ``max_wait``.

        Waiting for company is worth it in a burst (the last two requests came less than
        ``max_wait`` apart) and just after a batch was answered, while its askers may be
        sending their next requests (clients that ask again at once arrive together). A
        lone request otherwise goes at once: waiting would only add ``max_wait`` and a
        timer wake-up to every answer of a quiet bot (8 ms at concurrency 1 here).
        """
        return self._burst or (self._followers > 0 and now < self._followers_until)

    def _send(self, worker: _Worker, batch: list[_Pending], now: float) -> bool:
        """Send ``batch`` to ``worker``; False when nothing was sent (the worker is still idle)."""
        task = type(batch[0].request).task
        for pending in batch:
            self.metrics.queue_wait.labels(task).observe(now - pending.enqueued)
        # Each request travels pickled on its own, so one that cannot be pickled here, or
        # unpickled in the worker, fails alone.
        items = []
        for pending in list(batch):
            try:
                items.append((pending.id, pickle.dumps(pending.request, pickle.HIGHEST_PROTOCOL), pending.deadline))
            except Exception:
                log.exception("a %s request cannot be pickled", type(pending.request).__name__)
                batch.remove(pending)
                if not pending.future.done():
                    pending.future.set_exception(InferenceError(UNSENDABLE))
        if not batch:
            return False
        worker.batch_id += 1
        worker.in_flight = batch
        worker.batch_deadline = max(p.deadline for p in batch)
        worker.loaded_at = 0.0
        try:
            worker.conn.send(("batch", worker.batch_id, items))
        except (OSError, ValueError):
            # The worker is gone and never saw this batch: it goes back in the queue.
            worker.in_flight = None
            for pending in batch:
                self._requeue(pending)
            self._on_lost(worker)
        return True

    def _requeue(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        if pending.alone:
            self._alone.appendleft(pending)
        else:
            self._queues.setdefault(pending.key, _FairQueue()).push(pending)
        self._waiting += 1

    # ------------------------------------------------------------------ watchdog

    def _watch(self) -> float | None:
        """Kill workers whose batch overran its deadline; return seconds until the next check is due."""
        now = time.monotonic()
        soonest: float | None = None
        for worker in list(self._workers):
            if worker.lost or worker.in_flight is None:
                continue
            # A batch sent before the worker was ready, or one that loads a model first, waits
            # for that: the clock starts when the worker is ready or the model loaded.
            limit = max(worker.batch_deadline, worker.ready_at, worker.loaded_at) + self.watchdog_margin
            if worker.loading is not None or not worker.ready.is_set():
                limit += LOAD_ALLOWANCE_S
            if now >= limit:
                self._stall(worker, now - worker.batch_deadline)
            else:
                soonest = limit - now if soonest is None else min(soonest, limit - now)
        return soonest

    def _stall(self, worker: _Worker, overdue: float) -> None:
        log.error(
            "worker %d (pid %s) is stuck: its batch is %.1f s past its deadline; killing and replacing it",
            worker.index,
            worker.process.pid,
            overdue,
        )
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
                message = worker.conn.recv()
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
            self._wake.set()  # the watchdog's next check moves
            self._crash_streak = 0
        elif kind == "status":
            waiter = self._status_waiters.pop(message[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message[2])
        elif kind == "loading":
            worker.loading = message[1]
        elif kind == "loaded":
            worker.loading = None
            worker.loaded_at = time.monotonic()
            self._wake.set()  # the watchdog's next check moves
        elif kind == "done":
            worker.loading = None
            self._on_done(worker, message[1], message[2], message[3])

    def _on_unreadable(self, worker: _Worker) -> None:
        """An answer from ``worker`` could not be read: its batch fails instead of waiting forever."""
        if worker.lost:
            return
        for pending in worker.in_flight or []:
            if not pending.future.done():
                pending.future.set_exception(
                    InferenceError("The model's answer could not be read (a bug in the task's result type).")
                )
        worker.in_flight = None
        self._wake.set()

    def _on_done(self, worker: _Worker, batch_id: int, outcomes: list[tuple[int, bool, Any]], timing: dict) -> None:
        if batch_id != worker.batch_id:  # its batch was already given up (its answer was unreadable)
            log.warning("worker %d answered an old batch %d", worker.index, batch_id)
            return
        batch = worker.in_flight or []
        worker.in_flight = None
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
        if len(batch) > 1:  # askers of a batch that ask again arrive together: worth waiting for
            self._followers = len(batch)
            self._followers_until = now + 2 * self.max_wait
        self._wake.set()

    def _on_lost(self, worker: _Worker) -> None:
        if worker.lost:
            return
        worker.lost = True
        worker.loading = None
        batch = worker.in_flight or []
        worker.in_flight = None
        self._answer_lost_batch(worker, batch)
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
        self._wake.set()

    def _answer_lost_batch(self, worker: _Worker, batch: list[_Pending]) -> None:
        """Answer (or run again) the requests a worker held when it died."""
        waiting = [p for p in batch if not p.future.done()]
        if not waiting:
            return
        code = worker.process.exitcode
        if worker.stalled:
            reason: str | None = STALLED
        elif self._closing or code is None or code == -signal.SIGKILL:
            # Killed from outside (an operator, the kernel's out-of-memory killer): not these requests' doing.
            reason = WorkerDied().args[0]
        elif len(batch) == 1:
            reason = CRASHED_ALONE  # it crashed with nothing else to blame
        else:
            reason = None
        if reason is not None:
            for pending in waiting:
                pending.future.set_exception(WorkerDied(reason))
            return
        # The worker crashed on its own with several requests: any one may be the cause. Each runs
        # again alone, once, so a poisonous request fails by itself and the others are answered.
        log.warning("running the %d requests of the crashed worker's batch again, one at a time", len(waiting))
        for pending in reversed(waiting):
            if pending.alone:
                pending.future.set_exception(WorkerDied(CRASHED_ALONE))
                continue
            pending.alone = True
            self._requeue(pending)
            self.metrics.requests_retried.inc()
        self.metrics.queue_depth.set(self._waiting)

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
