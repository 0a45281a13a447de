"""The batching core: every scheduling rule of the inference service, written once.

Both backends (the local worker processes in :mod:`bot.inference.local`, Ray Serve
in :mod:`bot.inference.ray_backend`) are *transports*: they start and stop what
runs batches, say how many more batches they can take now, run a batch they are
handed and report what became of it. Everything else lives here, in the bot
process, on its event loop:

* **admission by time**: a request is refused with "busy, try again in N s" only
  when the work queued ahead of it could not be done before its deadline at the
  speed the service is measuring now (seconds of compute per request, per task,
  spread over the transport's parallel runners), or when ``max_queue`` (a
  memory bound) is reached. A class of 200 quick requests is queued, not refused.
* **fair queues**: one queue per (role, task, request type, batch key), a FIFO per
  user inside each, taken round-robin; across queues the next batch goes to the
  queue whose head user has the fewest requests running, then the user served
  least recently, then the role served least recently, then the oldest request.
  So one user's flood waits behind everyone else's next request (at most about
  one batch), and one role's burst does not starve another role.
* **the company heuristic**: a partial batch waits up to ``max_wait`` only when
  company is likely (a burst, or the askers of a batch just answered); a lone
  request goes at once.
* **deadlines**: a queued request whose deadline passes is answered there and then
  (with the transport's reason, e.g. "the model is still loading"), and a batch stops
  growing where its expected time (the measured seconds per request × its size, with a
  margin) would pass the earliest deadline in it, so a batch of slow generation never runs
  into the watchdog; a task not yet measured goes in a small first batch that measures it.
* **crash retries**: when a runner crashes on its own with several requests, each
  runs again alone, once, before anything else, so a poisonous request fails by itself.
* **request metrics**: outcomes, latency, queue wait, batch sizes, queue depth.

A transport reports back with :meth:`BatchingCore.finished`, :meth:`BatchingCore.lost`,
:meth:`BatchingCore.answer` and :meth:`BatchingCore.wake`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bot.config import Config
from bot.inference.metrics import ServiceMetrics
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, Request, WorkerDied
from bot.inference.service import InferenceClient

CRASHED_ALONE = (
    "The model worker stopped while running this request by itself, so it was not run again. "
    "If it happens again, please tell the bot's owner."
)
SHUTTING_DOWN = "The bot is shutting down."
# How much a new measurement of a task's seconds per request moves the estimate.
SMOOTHING = 0.3
# A task's first batch, before its speed is known: small, so that a slow task (generation, seconds
# per request) is measured within seconds rather than in a batch that may outlast its deadline.
FIRST_BATCH = 4
# A batch is planned to take at most 1 / PLAN_MARGIN of the time left to its earliest deadline:
# the measured speed is an average, and a busy machine runs slower than it.
PLAN_MARGIN = 1.5


@dataclass(eq=False)
class Pending:
    """One admitted request, from its submit until its future is answered."""

    id: int
    request: Request
    key: tuple[Any, ...]  # (role, task, request type, batch key): requests that may share a batch
    user: str | None
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float
    alone: bool = False  # run again by itself after a runner crashed with it in a batch
    sent: float = 0.0  # when its batch went to the transport

    @property
    def role(self) -> str | None:
        return type(self.request).role

    @property
    def task(self) -> str:
        return type(self.request).task


class FairQueue:
    """The requests of one (role, task, batch key): a FIFO per user, taken round-robin."""

    def __init__(self) -> None:
        self.users: OrderedDict[str | None, deque[Pending]] = OrderedDict()
        self.size = 0

    def push(self, pending: Pending, front: bool = False) -> None:
        queue = self.users.setdefault(pending.user, deque())
        if front:
            queue.appendleft(pending)
        else:
            queue.append(pending)
        self.size += 1

    def heads(self) -> Iterator[Pending]:
        return (queue[0] for queue in self.users.values())

    def oldest(self) -> float:
        return min(p.enqueued for p in self.heads())

    def __iter__(self) -> Iterator[Pending]:
        for queue in self.users.values():
            yield from queue

    def take(self, n: int, fits: Callable[[int, float], bool] | None = None) -> list[Pending]:
        """Up to ``n`` requests, one per user in turn; the next batch starts with the next user.

        ``fits(size, earliest deadline)`` may stop the batch early: a request joins only while the
        batch with it still fits (the first always joins).
        """
        batch: list[Pending] = []
        earliest = math.inf
        while len(batch) < n and self.users:
            user, queue = next(iter(self.users.items()))
            if batch and fits is not None and not fits(len(batch) + 1, min(earliest, queue[0].deadline)):
                break
            earliest = min(earliest, queue[0].deadline)
            batch.append(queue.popleft())
            if queue:
                self.users.move_to_end(user)
            else:
                del self.users[user]
        self.size -= len(batch)
        return batch

    def remove(self, pending: Pending) -> bool:
        queue = self.users.get(pending.user)
        if queue is None or pending not in queue:
            return False
        queue.remove(pending)
        if not queue:
            del self.users[pending.user]
        self.size -= 1
        return True

    def drop_finished(self, now: float) -> list[Pending]:
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


class Transport(abc.ABC):
    """Where batches run: the local worker pool or Ray Serve. No scheduling happens here."""

    @property
    @abc.abstractmethod
    def parallelism(self) -> int:
        """How many batches of one role can compute at the same time (workers, replicas)."""

    async def prepare(self, role: str | None) -> None:  # noqa: B027  (optional hook)
        """Called before a request of ``role`` is queued (start workers, deploy an application)."""

    @abc.abstractmethod
    def free(self, role: str | None) -> int:
        """How many more batches of ``role`` it can take right now."""

    @abc.abstractmethod
    def run(self, batch: list[Pending]) -> bool:
        """Start running ``batch`` (never blocks). False when nothing was taken (the slot is still free).

        Later, exactly one of ``core.finished``, ``core.lost`` or ``core.answer`` (per request)
        reports what became of each request.
        """

    def watch(self, now: float) -> float | None:
        """A periodic check of the runners (a watchdog); seconds until it is due again, or None."""
        return None

    def deadline_error(self, role: str | None) -> DeadlineExceeded:
        """What a request whose deadline passed while queued is told (the transport knows why)."""
        return DeadlineExceeded()


class BatchingCore:
    """Admission, fair queues, deadlines, batching and request metrics over one :class:`Transport`."""

    def __init__(
        self,
        transport: Transport,
        metrics: ServiceMetrics,
        *,
        max_queue: int,
        max_batch: int,
        max_wait_s: float,
        timeout_s: float,
        clock: Any = time.monotonic,
    ) -> None:
        self.transport = transport
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_wait = max_wait_s
        self.timeout = timeout_s
        self.clock = clock
        self.closing = False
        self._queues: dict[tuple[Any, ...], FairQueue] = {}
        self._alone: deque[Pending] = deque()  # run one per batch, before anything else
        self.waiting = 0  # queued, not yet sent
        self._running: Counter[str | None] = Counter()  # requests being computed, per user
        self._served_user: dict[str | None, int] = {}  # dispatch order number of each user's last batch
        self._served_role: dict[str | None, int] = {}
        self._dispatches = itertools.count(1)
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        # Measured compute seconds per request, per task (smoothed): what admission and the retry hint use.
        self.seconds_per_request: dict[str, float] = {}
        # The company heuristic's state (see _company_expected).
        self._last_arrival = -math.inf
        self._burst = False
        self._followers = 0
        self._followers_until = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the scheduling loop on the running event loop (idempotent)."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._schedule(), name="lmbot-batching-core")

    @property
    def started(self) -> bool:
        return self._loop_task is not None

    async def close(self) -> None:
        """Answer everything queued with "shutting down" and stop the loop."""
        self.closing = True
        for pending in list(self.queued()):
            self.answer(pending, False, InferenceError(SHUTTING_DOWN))
        self._queues.clear()
        self._alone.clear()
        self.waiting = 0
        self.metrics.queue_depth.set(0)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def wake(self) -> None:
        """Something changed (a runner is free, ready, or needs watching): schedule again."""
        self._wake.set()

    # ------------------------------------------------------------------ admission

    def backlog_s(self) -> float | None:
        """Seconds the queued work needs at the measured speed (None until a task was measured)."""
        if not self.seconds_per_request:
            return None
        known = self.seconds_per_request
        fallback = max(known.values())  # an unmeasured task: assume the slowest measured one
        total = sum(known.get(p.task, fallback) for p in self.queued())
        return total / max(1, self.transport.parallelism)

    def refusal(self, budget: float) -> float | None:
        """The retry hint if a request with ``budget`` seconds must be refused as busy now, else None.

        Busy means the work queued ahead of it would outlast its deadline: a request that is slow by
        itself is not refused (waiting would not help it), and neither is a long queue of quick work.
        """
        backlog = self.backlog_s()
        if self.waiting >= self.max_queue:
            return max(1.0, math.ceil(backlog if backlog is not None else self.waiting))
        if backlog is not None and backlog > budget:
            return max(1.0, math.ceil(backlog - budget))
        return None

    def retry_hint_if_full(self) -> float | None:
        return self.refusal(self.timeout)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: Request, *, timeout: float | None, user: str | None) -> Any:
        """Queue an admitted request and await its result."""
        task, role = type(request).task, type(request).role
        budget = timeout or self.timeout
        self.start()
        try:
            await self.transport.prepare(role)
        except InferenceError as exc:
            self.metrics.requests.labels(task, getattr(exc, "outcome", "error")).inc()
            raise
        hint = self.refusal(budget)
        if hint is not None:
            self.metrics.requests.labels(task, "busy").inc()
            raise Busy(hint)
        now = self.clock()
        self._burst = now - self._last_arrival < self.max_wait
        self._last_arrival = now
        self._followers = max(0, self._followers - 1)
        pending = Pending(
            id=next(self._ids),
            request=request,
            key=(role, task, type(request), request.batch_key()),
            user=user,
            future=asyncio.get_running_loop().create_future(),
            enqueued=now,
            deadline=now + budget,
        )
        self._queues.setdefault(pending.key, FairQueue()).push(pending)
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        self._wake.set()
        try:
            async with asyncio.timeout(budget):
                result = await pending.future
        except TimeoutError:
            self._forget(pending)
            self.metrics.requests.labels(task, "deadline").inc()
            raise self.transport.deadline_error(role) from None
        except asyncio.CancelledError:
            self._forget(pending)
            self.metrics.requests.labels(task, "cancelled").inc()
            raise
        except InferenceError as exc:
            self.metrics.requests.labels(task, "busy" if isinstance(exc, Busy) else type(exc).__name__).inc()
            raise
        self.metrics.requests.labels(task, "ok").inc()
        self.metrics.observe_latency(task, self.clock() - pending.enqueued)
        return result

    def queued(self) -> Iterator[Pending]:
        yield from self._alone
        for queue in self._queues.values():
            yield from queue

    def _forget(self, pending: Pending) -> None:
        """Remove a request that nobody awaits any more, if it is still queued."""
        if pending.alone and pending in self._alone:
            self._alone.remove(pending)
        else:
            queue = self._queues.get(pending.key)
            if queue is None or not queue.remove(pending):
                return
            if not queue.size:
                del self._queues[pending.key]
        self.waiting -= 1
        self.metrics.queue_depth.set(self.waiting)

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            delays = [d for d in (self.dispatch(now), self.transport.watch(now)) if d is not None]
            if not delays:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(delays))):
                        await self._wake.wait()

    def _expire(self, now: float) -> None:
        """Answer queued requests whose deadline passed (nobody else will)."""
        expired: list[Pending] = []
        for key in list(self._queues):
            queue = self._queues[key]
            expired += queue.drop_finished(now)
            if not queue.size:
                del self._queues[key]
        for pending in [p for p in self._alone if p.future.done() or p.deadline <= now]:
            self._alone.remove(pending)
            expired.append(pending)
        self.waiting -= len(expired)
        for pending in expired:
            if not pending.future.done():
                pending.future.set_exception(self.transport.deadline_error(pending.role))

    def dispatch(self, now: float) -> float | None:
        """Hand every due batch to a free runner; return seconds until a partial batch is due."""
        self._expire(now)
        next_due: float | None = None
        while True:
            if self._alone and self.transport.free(self._alone[0].role) > 0:
                pending = self._alone.popleft()
                self.waiting -= 1
                self._send([pending], now)
                continue
            best: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None
            company = self._company_expected(now)
            for key, queue in self._queues.items():
                if self.transport.free(key[0]) <= 0:
                    continue
                due = queue.oldest() + self.max_wait
                if queue.size < self.max_batch and due > now and company:
                    next_due = due - now if next_due is None else min(next_due, due - now)
                    continue
                score = min(self._priority(p) for p in queue.heads())
                if best is None or score < best[0]:
                    best = (score, key)
            if best is None:
                break
            key = best[1]
            queue = self._queues[key]
            measured = key[1] in self.seconds_per_request
            size = self.max_batch if measured else min(self.max_batch, FIRST_BATCH)
            batch = queue.take(size, self._fits_deadline(key[1], now))
            if not queue.size:
                del self._queues[key]
            self.waiting -= len(batch)
            self._send(batch, now)
        self.metrics.queue_depth.set(self.waiting)
        return next_due

    def _fits_deadline(self, task: str, now: float) -> Callable[[int, float], bool] | None:
        """Whether a batch of ``task`` of a size is expected to end before its earliest deadline.

        A batch runs on one runner, its requests one after another or padded together; at the
        measured seconds per request a batch of 64 slow ones (generation: seconds each) can
        outlast the deadline of requests that waited, and the watchdog would kill its worker
        mid-batch. So the batch stops growing where its expected time (with PLAN_MARGIN) would pass
        its earliest deadline; the rest go in the next batch (or get their deadline's answer, never
        computed). None until the task was measured (its first batch is FIRST_BATCH at most).
        """
        per_request = self.seconds_per_request.get(task)
        if per_request is None:
            return None
        return lambda size, earliest: now + PLAN_MARGIN * size * per_request <= earliest

    def _priority(self, pending: Pending) -> tuple[Any, ...]:
        """Lower goes first: fewest running for the user, user then role served least recently, oldest."""
        return (
            self._running[pending.user],
            self._served_user.get(pending.user, 0),
            self._served_role.get(pending.role, 0),
            pending.enqueued,
        )

    def _company_expected(self, now: float) -> bool:
        """Whether another request is likely to arrive within ``max_wait``.

        Waiting for company is worth it in a burst (the last two requests came less than
        ``max_wait`` apart) and just after a batch was answered, while its askers may be
        sending their next requests (clients that ask again at once arrive together). A
        lone request otherwise goes at once: waiting would only add ``max_wait`` and a
        timer wake-up to every answer of a quiet bot.
        """
        return self._burst or (self._followers > 0 and now < self._followers_until)

    def _send(self, batch: list[Pending], now: float) -> None:
        order = next(self._dispatches)
        for pending in batch:
            pending.sent = now
            self._running[pending.user] += 1
            self._served_user[pending.user] = order
            self.metrics.observe_queue_wait(pending.task, now - pending.enqueued)
        self._served_role[batch[0].role] = order
        if not self.transport.run(batch):
            self._release(batch)

    def _release(self, batch: Iterable[Pending]) -> None:
        for pending in batch:
            if self._running[pending.user] > 0:
                self._running[pending.user] -= 1
                if not self._running[pending.user]:
                    del self._running[pending.user]

    # ------------------------------------------------------------------ what transports report

    def answer(self, pending: Pending, ok: bool, value: Any) -> None:
        """Answer one request (if anyone still awaits it)."""
        if pending.future.done():
            return  # cancelled or timed out while it was computed
        if ok:
            pending.future.set_result(value)
        else:
            pending.future.set_exception(value)

    def finished(
        self, batch: list[Pending], outcomes: Iterable[tuple[int, bool, Any]], timing: dict[str, Any] | None = None
    ) -> None:
        """A batch came back: ``outcomes`` are ``(request id, ok, result or error)``; ``timing`` may
        hold ``sizes`` (requests per forward pass), ``compute_s``, ``load_s`` and ``busy_s`` (the
        runner's own time for the batch, less loads)."""
        timing = timing or {}
        self._release(batch)
        now = self.clock()
        by_id = {p.id: p for p in batch}
        answered = 0
        for request_id, ok, value in outcomes:
            pending = by_id.pop(request_id, None)
            if pending is not None:
                answered += 1
                self.answer(pending, ok, value)
        for pending in by_id.values():  # a runner bug: it skipped a request
            self.answer(pending, False, InferenceError("The model worker lost this request; try again."))
        if batch:
            task = batch[0].task
            for size in timing.get("sizes", []):
                self.metrics.batch_size.labels(task).observe(size)
            if timing.get("compute_s"):
                self.metrics.compute.labels(task).observe(timing["compute_s"])
            # The speed admission counts on: this batch's time in the runner, less any model load
            # (as the runner measured it, if it did: a batch sent to a starting worker waits there).
            busy = timing.get("busy_s")
            if busy is None:
                busy = now - max(p.sent for p in batch) - float(timing.get("load_s") or 0.0)
            if answered and busy > 0:
                per_request = busy / answered
                before = self.seconds_per_request.get(task)
                self.seconds_per_request[task] = (
                    per_request if before is None else (1 - SMOOTHING) * before + SMOOTHING * per_request
                )
        self.metrics.last_progress.set_to_current_time()
        if len(batch) > 1:  # askers of a batch that ask again arrive together: worth waiting for
            self._followers = len(batch)
            self._followers_until = now + 2 * self.max_wait
        self._wake.set()

    def failed(self, batch: list[Pending], error: InferenceError) -> None:
        """Every request of the batch fails with ``error`` (its runner is still fine)."""
        self._release(batch)
        for pending in batch:
            self.answer(pending, False, error)
        self._wake.set()

    def lost(self, batch: list[Pending], *, crashed: bool, reason: str | None = None) -> None:
        """The runner of ``batch`` died. ``crashed``: on its own (any request may be the cause), so each
        runs again alone, once; otherwise (killed from outside, stalled) each is told ``reason``."""
        self._release(batch)
        waiting = [p for p in batch if not p.future.done()]
        if not crashed or self.closing:
            for pending in waiting:
                pending.future.set_exception(WorkerDied(reason) if reason else WorkerDied())
        elif len(batch) == 1:
            for pending in waiting:
                pending.future.set_exception(WorkerDied(CRASHED_ALONE))  # nothing else to blame
        else:
            for pending in reversed(waiting):
                if pending.alone:
                    pending.future.set_exception(WorkerDied(CRASHED_ALONE))
                    continue
                pending.alone = True
                self._alone.appendleft(pending)
                self.waiting += 1
                self.metrics.requests_retried.inc()
            self.metrics.queue_depth.set(self.waiting)
        self._wake.set()

    def requeue(self, batch: list[Pending]) -> None:
        """The transport never ran ``batch`` (its runner was gone): it goes back to the queue's front."""
        self._release(batch)
        for pending in reversed(batch):
            if pending.future.done():
                continue
            if pending.alone:
                self._alone.appendleft(pending)
            else:
                self._queues.setdefault(pending.key, FairQueue()).push(pending, front=True)
            self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        self._wake.set()


class BatchedClient(InferenceClient, Transport):
    """An :class:`InferenceClient` whose requests go through a :class:`BatchingCore` to itself as transport.

    A backend subclasses this and implements the :class:`Transport` methods and the lifecycle.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        inf = config.inference
        self.core = BatchingCore(
            self,
            self.metrics,
            max_queue=inf.max_queue,
            max_batch=inf.max_batch_size,
            max_wait_s=inf.max_wait_ms / 1000,
            timeout_s=inf.request_timeout_s,
        )

    async def _submit(self, request: Request, *, timeout: float | None, user: str | None) -> Any:
        return await self.core.submit(request, timeout=timeout, user=user)

    def retry_hint_if_full(self) -> float | None:
        return self.core.retry_hint_if_full()
