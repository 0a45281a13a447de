"""The batching core: every scheduling rule of the inference service, written once.

Both backends (the local worker processes in :mod:`bot.inference.local`, Ray Serve
in :mod:`bot.inference.ray_backend`) are *transports*: they start and stop what
runs batches, say how many more batches they can take now, run a batch they are
handed and report what became of it. Everything else lives here, in the bot
process, on its event loop:

* **admission by time**: a request is refused with "busy, try again in N s" only
  when it could not be answered before its deadline: the queued work with it, in
  the batches the core will form, spread over the transport's parallel runners,
  timed by each task's measured :class:`BatchCost` (a fixed cost per batch plus a
  cost per request), or when ``max_queue`` (a memory bound) is reached. A class of
  200 quick requests is queued, not refused. A task not yet measured is admitted
  for its first batch plus what a cautious guess (:data:`UNTIMED_GUESS_S`) allows.
* **early busy**: once the measured speed shows that a queued request cannot be
  answered before its deadline, it is told "busy, try again in N s" at once, not
  at its deadline.
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
  growing where its expected time (the task's measured batch cost at that size, with a
  margin) would pass the earliest deadline in it, so a batch of slow generation never runs
  into the watchdog; a task not yet measured goes in a small first batch that measures it,
  and its batches then grow at most RAMP times the largest measured so far.
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
# How much a new measurement of a task's batch time moves the estimate (the weight of older ones
# decays by 1 - SMOOTHING per new batch).
SMOOTHING = 0.3
# With one batch size seen, how a batch's time splits is unknown: this share of it is assumed to
# grow with the batch's size, the rest fixed (a forward pass or a generation step costs much the
# same for one request as for several). The second size seen replaces the guess by a fit.
PER_REQUEST_SHARE = 0.5
# A task never measured: seconds per request assumed beyond its first batch when admitting (a
# cautious bound for a forward pass on a slow CPU; generation that is slower is told "busy" early
# once its first batch has measured it).
UNTIMED_GUESS_S = 0.5
# A task's first batch, before its speed is known: small, so that a slow task (generation, seconds
# per request) is measured within seconds rather than in a batch that may outlast its deadline.
FIRST_BATCH = 4
# A measured task's next batch is at most this many times the largest batch it was measured at:
# a time measured on small batches says little about a batch ten times larger (generation on a
# CPU grows nearly in proportion, a forward pass far less), so batches grow as the fit learns.
RAMP = 8
# A batch is planned to take at most 1 / PLAN_MARGIN of the time left to its earliest deadline:
# the measured speed is an average, and a busy machine runs slower than it.
PLAN_MARGIN = 1.5
# A queued request is told "busy" early only if it would be late even at this many times the
# measured speed (an average, partly of batches run on a busier machine): never on a near miss.
SHED_MARGIN = 1.1


class BatchCost:
    """A task's time for a batch of ``n``: ``fixed + per_request × n``, fit to the batches it ran.

    An exponentially weighted least-squares line through the observed (size, seconds) pairs, so
    that seconds per request measured on lone requests (or a small first batch) are not taken for
    the cost of a request in a full batch, which is several times less for a batched forward pass.
    """

    def __init__(self) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self.fixed = 0.0
        self.per_request = 0.0
        self.largest = 0  # the largest batch measured
        self.fitted = False  # the line is fit to two sizes or more (else PER_REQUEST_SHARE's guess)

    def observe(self, size: int, seconds: float) -> None:
        self.largest = max(self.largest, size)
        decay = 1 - SMOOTHING
        self._w = decay * self._w + 1
        self._n = decay * self._n + size
        self._t = decay * self._t + seconds
        self._nn = decay * self._nn + size * size
        self._nt = decay * self._nt + size * seconds
        mean_n, mean_t = self._n / self._w, self._t / self._w
        spread = self._nn / self._w - mean_n * mean_n
        if spread > 1e-9 * max(1.0, mean_n * mean_n):
            slope = (self._nt / self._w - mean_n * mean_t) / spread
            if slope > 0 and mean_t - slope * mean_n >= 0:
                self.per_request, self.fixed, self.fitted = slope, mean_t - slope * mean_n, True
                return
            if slope > 0:  # the line passes below zero for small batches: no fixed cost
                self.per_request, self.fixed, self.fitted = self._nt / self._nn, 0.0, True
                return
        # One size seen (or a noisy fit): split the mean time by PER_REQUEST_SHARE.
        self.per_request = PER_REQUEST_SHARE * mean_t / max(mean_n, 1.0)
        self.fixed = (1 - PER_REQUEST_SHARE) * mean_t

    def seconds(self, size: int) -> float:
        """Expected seconds for a batch of ``size`` requests."""
        return self.fixed + self.per_request * size


@dataclass
class _PlannedBatch:
    """A batch in :meth:`BatchingCore.projection`: its requests, start (seconds from now) and runner."""

    members: list[Pending]
    start: float
    runner: int
    earliest: float  # the earliest deadline in it
    index: int  # how many batches of its key were planned before it


UNTIMED = BatchCost()
UNTIMED.per_request = UNTIMED_GUESS_S


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
        # Measured batch time per task: what admission, early busy, the retry hint and batch plans use.
        self.costs: dict[str, BatchCost] = {}
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

    def projection(self, extra: Pending | None = None, *, admitting: bool = False) -> list[tuple[Pending, float]]:
        """Each queued request (and ``extra``) with the seconds from now until it is expected answered.

        The queue is walked oldest first (a burst's requests come from different users, whom the
        fair queues take round-robin), each request joining its key's open batch until the batch is
        full (:meth:`batch_limit` for the key's first batch, then ``max_batch``) or would outlast its
        earliest deadline as the core plans it; the batches go to the
        transport's runners in the order they were opened, each to the runner free first, and take
        their task's :class:`BatchCost`. Batches running now are not counted (their runners are
        assumed free): the projection errs towards answering, never towards "busy".

        ``admitting``: for admission, a task measured at one batch size only is assumed to take
        no longer for a larger batch than for the largest it was measured at (:meth:`_admission_cost`).
        """
        now = self.clock()
        waiting = sorted(self.queued(), key=lambda p: p.enqueued)
        if extra is not None:
            waiting.append(extra)
        runners = [0.0] * max(1, self.transport.parallelism)
        batches: list[_PlannedBatch] = []
        open_batch: dict[tuple[Any, ...], _PlannedBatch] = {}
        cost_of = self._admission_cost if admitting else self._cost
        for pending in waiting:
            cost = cost_of(pending.task)
            measured = pending.task in self.costs
            current = open_batch.get(pending.key)
            if current is not None and not pending.alone:
                size = len(current.members) + 1
                limit = self.max_batch if current.index else self.batch_limit(pending.task)
                earliest = min(current.earliest, pending.deadline)
                fits = not measured or now + current.start + PLAN_MARGIN * cost.seconds(size) <= earliest
                if size <= limit and fits:
                    current.members.append(pending)
                    current.earliest = earliest
                    runners[current.runner] = max(runners[current.runner], current.start + cost.seconds(size))
                    continue
            runner = runners.index(min(runners))
            index = current.index + 1 if current is not None else 0
            planned = _PlannedBatch([pending], runners[runner], runner, pending.deadline, index)
            runners[runner] = planned.start + cost.seconds(1)
            batches.append(planned)
            if not pending.alone:
                open_batch[pending.key] = planned
        return [
            (p, batch.start + cost_of(p.task).seconds(len(batch.members))) for batch in batches for p in batch.members
        ]

    def batch_limit(self, task: str) -> int:
        """The largest batch of ``task`` to send now: FIRST_BATCH until it was measured, then growing by RAMP."""
        cost = self.costs.get(task)
        return min(self.max_batch, FIRST_BATCH if cost is None else max(FIRST_BATCH, RAMP * cost.largest))

    def _cost(self, task: str) -> BatchCost:
        """The task's measured cost, or the cautious guess for a task never measured."""
        return self.costs.get(task, UNTIMED)

    def _admission_cost(self, task: str) -> BatchCost:
        """The cost admission counts on: the measured fit, or for a task measured at one batch size
        only, a batch of any size as quick as the largest measured.

        How such a task's time grows with the batch is a guess (PER_REQUEST_SHARE) until a second
        size is measured, and generation batches far better than that guess: refusing on it told a
        class's /sample "busy" by the dozen while the service could answer them (issue 20). The
        guess still sizes the batches (caution against the watchdog); a request admitted on the
        optimistic side hears "busy" early (:meth:`_shed`) as soon as the fit shows it cannot make
        its deadline, a batch or two later.
        """
        cost = self.costs.get(task)
        if cost is None or cost.fitted:
            return self._cost(task)
        optimistic = BatchCost()
        optimistic.fixed = cost.seconds(cost.largest)
        optimistic.largest = cost.largest
        return optimistic

    def refusal(self, budget: float, extra: Pending | None = None) -> float | None:
        """The retry hint if a request with ``budget`` seconds must be refused as busy now, else None.

        Busy means that, behind the work queued ahead of it and batched as the core will batch it,
        it could not be answered within ``budget``: a request that is slow by itself is not refused
        (waiting would not help it), and neither is a long queue of quick work.
        """
        if self.waiting >= self.max_queue:
            finish = max((end for _, end in self.projection()), default=0.0)
            return max(1.0, math.ceil(finish if finish else self.waiting))
        if extra is None or not self.waiting:
            return None
        if extra.task not in self.costs and sum(1 for p in self.queued() if p.key == extra.key) < FIRST_BATCH:
            return None  # an untimed task's first batch measures it
        own = dict(self.projection(extra, admitting=True))[extra]
        if own > budget and self._cost(extra.task).seconds(1) < budget:
            return max(1.0, math.ceil(own - budget))
        return None

    def retry_hint_if_full(self) -> float | None:
        """The retry hint for a request of the busiest queue's kind now (the front end's pre-check)."""
        if self.waiting >= self.max_queue:
            return self.refusal(self.timeout)
        answered = self.projection()
        if not answered:
            return None
        last, _ = max(answered, key=lambda item: item[1])
        probe = Pending(0, last.request, last.key, None, last.future, self.clock(), math.inf)
        return self.refusal(self.timeout, probe)

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
        now = self.clock()
        pending = Pending(
            id=next(self._ids),
            request=request,
            key=(role, task, type(request), request.batch_key()),
            user=user,
            future=asyncio.get_running_loop().create_future(),
            enqueued=now,
            deadline=now + budget,
        )
        hint = self.refusal(budget, pending)
        if hint is not None:
            self.metrics.requests.labels(task, "busy").inc()
            raise Busy(hint)
        self._burst = now - self._last_arrival < self.max_wait
        self._last_arrival = now
        self._followers = max(0, self._followers - 1)
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
        self._shed(now)
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
            batch = queue.take(self.batch_limit(key[1]), self._fits_deadline(key[1], now))
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
        cost = self.costs.get(task)
        if cost is None:
            return None
        return lambda size, earliest: now + PLAN_MARGIN * cost.seconds(size) <= earliest

    def _shed(self, now: float) -> None:
        """Tell queued requests "busy" at once when the measured speed shows their deadline cannot be met.

        Only requests of a task measured at two batch sizes or more are told (a guess never
        refuses anyone already queued),
        not one slower by itself than its budget (waiting would not help it, as at admission),
        and only those that would be late even if the work ran SHED_MARGIN times faster than
        measured (a request that may well be answered is never sent away); the hint is how late
        each would have been at the measured speed, when the work ahead of a retry will have shrunk.
        """
        if not self.costs or not self.waiting:
            return
        late = [
            (p, end)
            for p, end in self.projection()
            if p.task in self.costs
            and self.costs[p.task].fitted  # a split guessed from one batch size sends nobody away
            and not p.alone
            and now + end / SHED_MARGIN > p.deadline
            and self.costs[p.task].seconds(1) < p.deadline - p.enqueued  # else a retry would not help
        ]
        for pending, end in late:
            self._forget(pending)
            if not pending.future.done():
                pending.future.set_exception(Busy(max(1.0, math.ceil(now + end - pending.deadline))))

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
                self.costs.setdefault(task, BatchCost()).observe(answered, busy)
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
