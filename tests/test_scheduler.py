"""The batching core in-process, with a fake transport and a fake clock: milliseconds per test.

The fake transport records each batch it is handed and holds it until the test
finishes it, so every assertion is about the order and shape of batches and the
answers, never about how long anything took on this machine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.inference.metrics import ServiceMetrics, summarize
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, Request, WorkerDied
from bot.inference.scheduler import (
    CRASHED_ALONE,
    FIRST_BATCH,
    PLAN_MARGIN,
    RAMP,
    BatchingCore,
    Pending,
    Transport,
)


@dataclass(frozen=True)
class Ask(Request):
    text: str
    key: str = ""  # requests with different keys never share a batch
    task: ClassVar[str] = "ask"

    def texts(self) -> list[str]:
        return [self.text]

    def batch_key(self) -> tuple[Any, ...]:
        return (self.key,)


@dataclass(frozen=True)
class OtherRole(Ask):
    task: ClassVar[str] = "other"
    role: ClassVar[str | None] = "masked_lm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransport(Transport):
    """Runs nothing: holds each batch until the test finishes it."""

    def __init__(self, runners: int = 1) -> None:
        self.runners = runners
        self.running: list[list[Pending]] = []
        self.batches: list[list[str]] = []  # the texts of every batch handed over, in order
        self.core: BatchingCore

    @property
    def parallelism(self) -> int:
        return self.runners

    def free(self, role: str | None) -> int:
        return self.runners - len(self.running)

    def run(self, batch: list[Pending]) -> bool:
        self.running.append(batch)
        self.batches.append([p.request.texts()[0] for p in batch])  # type: ignore[attr-defined]
        return True

    def deadline_error(self, role: str | None) -> DeadlineExceeded:
        return DeadlineExceeded("still loading (the fake says)")

    def finish(self, index: int = 0, after: float = 0.0, clock: FakeClock | None = None) -> list[str]:
        """Answer the ``index``-th running batch ``after`` fake seconds after it was sent."""
        batch = self.running.pop(index)
        if clock is not None:
            clock.now += after
        self.core.finished(
            batch, [(p.id, True, f"done {p.request.texts()[0]}") for p in batch], {"sizes": [len(batch)]}
        )
        return [p.request.texts()[0] for p in batch]


def make_core(
    runners: int = 1, max_queue: int = 256, max_batch: int = 4, max_wait_s: float = 0.0, timeout_s: float = 60.0
) -> tuple[BatchingCore, FakeTransport, FakeClock]:
    transport, clock = FakeTransport(runners), FakeClock()
    core = BatchingCore(
        transport,
        ServiceMetrics(),
        max_queue=max_queue,
        max_batch=max_batch,
        max_wait_s=max_wait_s,
        timeout_s=timeout_s,
        clock=clock,
    )
    transport.core = core
    return core, transport, clock


async def settle() -> None:
    """Let the core's loop and every submit run until nothing is left to do now (no clock involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


def ask(core: BatchingCore, text: str, user: str | None = None, key: str = "", **kw: Any) -> asyncio.Task[Any]:
    return asyncio.create_task(core.submit(Ask(text, key), timeout=kw.get("timeout"), user=user))


async def test_a_lone_request_goes_at_once_a_burst_forms_full_batches() -> None:
    core, transport, _ = make_core(max_batch=4, max_wait_s=3600.0)  # waiting for company would never end
    first = ask(core, "lone")
    await settle()
    assert transport.batches == [["lone"]]  # not held for max_wait
    burst = [ask(core, f"b{i}") for i in range(9)]
    await settle()
    assert transport.batches == [["lone"]]  # the only runner is busy: all nine wait
    transport.finish()
    await settle()
    assert transport.batches[1] == ["b0", "b1", "b2", "b3"]  # a full batch goes without waiting
    transport.finish()
    await settle()
    assert transport.batches[2] == ["b4", "b5", "b6", "b7"]
    transport.finish()
    await settle()
    assert len(transport.batches) == 3  # "b8" alone waits for company: a burst is on
    core.max_wait = 0.0  # its wait is over
    core.wake()
    await settle()
    assert transport.batches[3] == ["b8"]
    transport.finish()
    assert await first == "done lone"
    assert await asyncio.gather(*burst) == [f"done b{i}" for i in range(9)]
    await core.close()


async def test_a_flood_from_one_user_waits_behind_another_users_request() -> None:
    """Issue 20 item 3: another user's request waits at most one batch behind a flood."""
    core, transport, _ = make_core(max_batch=4)
    hog = [ask(core, f"hog{i}", user="hog", key=f"k{i}") for i in range(16)]  # each its own batch
    await settle()
    other = ask(core, "other", user="student", key="k-other")
    await settle()
    assert transport.batches == [["hog0"]]
    transport.finish()
    await settle()
    assert transport.batches[1] == ["other"]  # right after the batch that was running
    while transport.running:
        transport.finish()
        await settle()
    assert await other == "done other"
    assert [await h for h in hog] == [f"done hog{i}" for i in range(16)]

    # In one queue, users take turns inside each batch.
    core2, transport2, _ = make_core(max_batch=4)
    hogs = [ask(core2, f"h{i}", user="hog") for i in range(8)]
    await settle()
    late = [ask(core2, name, user=name) for name in ("bob", "carol")]
    await settle()
    transport2.finish()
    await settle()
    assert transport2.batches[0] == ["h0", "h1", "h2", "h3"]  # the hog alone until the others came
    assert transport2.batches[1] == ["h4", "bob", "carol", "h5"]
    while transport2.running:
        transport2.finish()
        await settle()
    await asyncio.gather(*hogs, *late)
    await core.close()
    await core2.close()


async def test_a_burst_of_one_role_does_not_starve_another_role() -> None:
    core, transport, _ = make_core(max_batch=2)
    flood = [ask(core, f"a{i}", user=f"u{i}") for i in range(7)]
    await settle()
    masked = asyncio.create_task(core.submit(OtherRole("m"), timeout=None, user="v"))
    await settle()
    transport.finish()  # a0
    await settle()
    transport.finish()  # a1, a2: the full batch formed before the other role's request was seen
    await settle()
    assert ["m"] in transport.batches[:3]
    while transport.running:
        transport.finish()
        await settle()
    await asyncio.gather(*flood, masked)
    await core.close()


async def test_admission_is_sized_to_the_measured_throughput() -> None:
    """Issue 20 item 2: busy only when the work ahead cannot be done before the deadline."""
    core, transport, clock = make_core(max_batch=64, timeout_s=60.0)
    warm = ask(core, "warm")
    await settle()
    transport.finish(after=0.05, clock=clock)  # one request took 50 ms: the first measurement
    assert await warm == "done warm"
    # A class of 200 at once: about 10 s of work at 50 ms each, well within 60 s: none is busy.
    runner = ask(core, "running")
    await settle()
    klass = [ask(core, f"s{i}", user=f"student{i}") for i in range(200)]
    await settle()
    assert core.waiting == 200 and not any(t.done() for t in klass)
    assert core.retry_hint_if_full() is None
    while transport.running:
        transport.finish(after=0.05 * len(transport.running[0]), clock=clock)
        await settle()
    assert await asyncio.gather(runner, *klass) == ["done running"] + [f"done s{i}" for i in range(200)]

    # Slow work: 2 s per request measured, a 10 s budget. Four queued ahead and its own 2 s is 10 s:
    # the fifth is admitted; with five ahead (12 s), the sixth could not be answered in time: refused
    # at once, told when the work ahead will have shrunk enough.
    slow, transport2, clock2 = make_core(max_batch=1, timeout_s=10.0)
    first = ask(slow, "first")
    await settle()
    transport2.finish(after=2.0, clock=clock2)
    await first
    holding = ask(slow, "holding")  # runs (not queued)
    await settle()
    admitted = [ask(slow, f"q{i}") for i in range(5)]
    await settle()
    assert slow.waiting == 5 and not any(t.done() for t in admitted)
    with pytest.raises(Busy) as busy:
        await slow.submit(Ask("one too many"), timeout=None, user=None)
    assert busy.value.retry_after == 2  # answered 12 s from now for a 10 s budget
    assert "try again in 2 s" in str(busy.value)
    assert slow.retry_hint_if_full() == 2
    patient = ask(slow, "patient", timeout=30.0)  # a longer deadline: queued behind them, not refused
    await settle()
    assert not patient.done() and slow.waiting == 6
    while transport2.running:
        transport2.finish(after=1.5, clock=clock2)
        await settle()
    want = ["done holding"] + [f"done q{i}" for i in range(5)] + ["done patient"]
    assert await asyncio.gather(holding, *admitted, patient) == want
    await core.close()
    await slow.close()


async def test_admission_after_lone_requests_counts_a_full_batchs_cost_per_request() -> None:
    """Issue 20 (item 1): a warm-up answered alone (0.5 s for a batch of one) must not make a class
    look 0.5 s per request: most of a forward pass's time is the same for one request as for 64.
    At 0.5 s per request, 200 would be 100 s of work for a 60 s budget (about 80 told busy); as
    batches of 64 with a fixed cost they fit. Then the batches the class ran (64 and 8, each
    0.2 s + 0.01 s per request) replace the guess by a fit, and batch plans use it."""
    core, transport, clock = make_core(max_batch=64, timeout_s=60.0)
    warm = ask(core, "warm")
    await settle()
    transport.finish(after=0.5, clock=clock)
    assert await warm == "done warm"
    klass = [ask(core, f"s{i}", user=f"student{i}") for i in range(200)]
    await settle()
    assert core.waiting + sum(len(b) for b in transport.running) == 200
    assert not any(t.done() for t in klass)  # none busy
    while transport.running:
        transport.finish(after=0.2 + 0.01 * len(transport.running[0]), clock=clock)
        await settle()
    assert await asyncio.gather(*klass) == [f"done s{i}" for i in range(200)]
    assert [len(b) for b in transport.batches] == [1, RAMP, 64, 64, 64]  # grows as it is measured
    cost = core.costs["ask"]
    assert cost.seconds(64) == pytest.approx(0.2 + 0.64, rel=0.05)  # the fit, not 64 × 0.5 s
    assert cost.seconds(1) < 0.5
    await core.close()


@pytest.mark.parametrize(
    ("fixed_s", "per_request_s", "all_answered"),
    [(2.5, 0.1, True), (5.0, 1.25, False)],
    ids=["generation-that-batches-well", "generation-that-batches-badly"],
)
async def test_a_task_measured_at_one_size_is_admitted_on_what_was_measured(
    fixed_s: float, per_request_s: float, all_answered: bool
) -> None:
    """Issue 20 (the /sample burst): one request measured alone (3 s of generation) says nothing
    of how a batch of 64 grows. Refusing a class on a guessed split told dozens "busy" that the
    service then answered; now every one is admitted, and once a second batch size has measured
    the task, whoever cannot make the 60 s deadline hears "busy" at once (never at the deadline),
    and the rest are answered."""
    core, transport, clock = make_core(max_batch=64, timeout_s=60.0)
    warm = ask(core, "warm")
    await settle()
    transport.finish(after=3.0, clock=clock)
    assert await warm == "done warm"
    start = clock.now
    klass = [ask(core, f"s{i}", user=f"student{i}") for i in range(200)]
    await settle()
    assert not any(t.done() for t in klass)  # none refused on a guess
    while transport.running:
        transport.finish(after=fixed_s + per_request_s * len(transport.running[0]), clock=clock)
        await settle()
    answered = [t for t in klass if t.exception() is None]
    told_busy = [t for t in klass if isinstance(t.exception(), Busy)]
    assert len(answered) + len(told_busy) == 200  # nobody waited for the deadline's answer
    assert clock.now - start <= 60  # every answer (busy included) came by the 60 s deadline
    if all_answered:
        assert len(answered) == 200
    else:
        # Each batch as large as still fits its deadline: the most this speed allows, not a guess's.
        assert FIRST_BATCH < len(answered) < 200 and told_busy
    await core.close()


async def test_a_slow_untimed_task_tells_the_unreachable_busy_early() -> None:
    """Issue 20 (item 2): 200 of a task never measured, whose batches turn out slow (generation:
    5 s + 1.25 s per request). Admission is cautious (a first batch plus what UNTIMED_GUESS_S
    allows), and once two batches have measured the task, every queued request that cannot be
    answered before its deadline hears "busy, try again in N s" at once, not 60 s later."""
    core, transport, clock = make_core(max_batch=64, timeout_s=60.0)
    start = clock.now
    klass = [ask(core, f"s{i}", user=f"student{i}") for i in range(200)]
    await settle()
    refused = [t for t in klass if t.done()]
    assert FIRST_BATCH < 200 - len(refused) < 200 and refused  # cautious, not all, not only a batch
    for task in refused:
        with pytest.raises(Busy):
            await task
    assert transport.batches == [[f"s{i}" for i in range(FIRST_BATCH)]]  # small: it measures the task
    transport.finish(after=5.0 + 1.25 * FIRST_BATCH, clock=clock)
    await settle()
    # One batch size measured: how its time splits is still a guess, and a guess sends nobody away.
    assert not [t for t in klass if t.done() and t not in refused and t.exception() is not None]
    assert len(transport.running) == 1  # the next batch measures a second size
    second = len(transport.running[0])
    transport.finish(after=5.0 + 1.25 * second, clock=clock)
    await settle()
    told = [t for t in klass if t.done() and t not in refused and t.exception() is not None]
    assert told, "the unreachable were not told early"
    for task in told:
        assert isinstance(task.exception(), Busy) and task.exception().retry_after >= 1  # type: ignore[union-attr]
    # Heard as soon as two batch sizes measured the task, before the 60 s deadline.
    assert clock.now - start == pytest.approx(10.0 + 5.0 + 1.25 * second) and clock.now - start < 50
    deadline = 0
    while transport.running:
        transport.finish(after=5.0 + 1.25 * len(transport.running[0]), clock=clock)
        await settle()
    for task in klass:
        if task not in refused and task not in told:
            try:
                assert (await task).startswith("done")
            except DeadlineExceeded:
                deadline += 1
    answered = 200 - len(refused) - len(told) - deadline
    assert answered > FIRST_BATCH and deadline <= 2  # nearly everyone kept was answered in time
    await core.close()


async def test_a_batch_is_never_planned_past_its_earliest_deadline() -> None:
    """Issue 20 (c): slow generation (2 s per request measured) that waited 80 s of a 100 s budget
    goes in batches planned to end by the deadline (with PLAN_MARGIN), not in one of 64, so the
    watchdog never meets them; those that cannot fit are answered at their deadline, never computed.
    Before the task was measured, its first batch is small (FIRST_BATCH): it measures the speed."""
    core, transport, clock = make_core(max_batch=64)

    def finish(busy_s: float) -> None:
        batch = transport.running.pop(0)
        core.finished(batch, [(p.id, True, f"done {p.request.texts()[0]}") for p in batch], {"busy_s": busy_s})

    first = [ask(core, f"w{i}", user=f"early{i}") for i in range(FIRST_BATCH + 2)]
    await settle()
    assert transport.batches == [[f"w{i}" for i in range(FIRST_BATCH)]]  # unmeasured: a small batch
    finish(busy_s=2.0 * FIRST_BATCH)
    await settle()
    finish(busy_s=2.0 * 2)
    assert await asyncio.gather(*first) == [f"done w{i}" for i in range(FIRST_BATCH + 2)]
    assert core.costs["ask"].seconds(1) == pytest.approx(2.0) and core.costs["ask"].fixed == pytest.approx(0.0)
    holding = ask(core, "holding")
    await settle()
    waiting = [ask(core, f"g{i}", user=f"student{i}", timeout=100.0) for i in range(20)]
    await settle()
    assert core.waiting == 20
    clock.now += 70.0  # the holding batch ran long: 30 s of the queued requests' budget are left
    finish(busy_s=2.0)
    await settle()
    assert await holding == "done holding"
    planned = int(30.0 / (2.0 * PLAN_MARGIN))  # 10 with the margin of 1.5
    assert 1 <= planned < 15 and transport.batches[-1] == [f"g{i}" for i in range(planned)]
    clock.now += 2.0 * planned  # it took as long as measured
    finish(busy_s=2.0 * planned)
    await settle()
    second = int((30.0 - 2.0 * planned) / (2.0 * PLAN_MARGIN))  # 3 in the 10 s left
    assert transport.batches[-1] == [f"g{i}" for i in range(planned, planned + second)]
    # Issue 20 (early busy): the 10 s left hold that batch (6 s), then at best g13 and g14 one by
    # one (2 s each, ending 8 s and 10 s from now); g15.. would end 12 s or later even at
    # SHED_MARGIN times the measured speed: they hear "busy" now, 10 s before their deadline.
    done = planned + second
    reachable = done + 2
    for shed in waiting[reachable:]:
        assert shed.done()
        with pytest.raises(Busy) as busy:
            await shed
        assert busy.value.retry_after >= 1
    assert not any(t.done() for t in waiting[done:reachable])
    clock.now += 30.0 - 2.0 * planned
    finish(busy_s=2.0 * second)
    await settle()
    assert await asyncio.gather(*waiting[:done]) == [f"done g{i}" for i in range(done)]
    for late in waiting[done:reachable]:  # never sent: the plan kept its margin, then time was up
        with pytest.raises(DeadlineExceeded):
            await late
    assert not transport.running and len(transport.batches) == 5  # the late ones were never sent
    await core.close()


async def test_max_queue_is_still_a_hard_bound_with_a_hint() -> None:
    core, transport, _ = make_core(max_queue=2, max_batch=1)
    running = ask(core, "running")
    await settle()
    queued = [ask(core, "q1"), ask(core, "q2")]
    await settle()
    with pytest.raises(Busy) as busy:
        await core.submit(Ask("late"), timeout=None, user=None)
    assert busy.value.retry_after >= 1 and "try again in" in str(busy.value)
    assert not running.done()  # refused at once, while the work ahead is still running
    while transport.running:
        transport.finish()
        await settle()
    assert await asyncio.gather(running, *queued) == ["done running", "done q1", "done q2"]
    assert core.retry_hint_if_full() is None
    await core.close()


async def test_an_expired_request_is_answered_with_the_transports_reason_and_never_sent() -> None:
    core, transport, clock = make_core(max_batch=1)
    blocker = ask(core, "blocker")
    doomed = ask(core, "doomed", timeout=5.0)
    await settle()
    clock.now += 6.0
    core.wake()
    await settle()
    with pytest.raises(DeadlineExceeded, match="still loading"):
        await doomed
    transport.finish()
    await blocker
    await settle()
    assert transport.batches == [["blocker"]]  # the expired one never reached a runner
    assert core.metrics.summary()["queue_depth"] == 0
    await core.close()


async def test_a_cancelled_request_leaves_the_queue() -> None:
    core, transport, _ = make_core(max_batch=1)
    blocker = ask(core, "blocker")
    doomed = ask(core, "cancelled")
    await settle()
    assert core.metrics.summary()["queue_depth"] == 1
    doomed.cancel()
    await settle()
    assert core.metrics.summary()["queue_depth"] == 0 and core.waiting == 0
    transport.finish()
    await blocker
    await settle()
    assert transport.batches == [["blocker"]]
    await core.close()


async def test_a_crashed_batch_runs_again_one_by_one_and_the_culprit_fails_alone() -> None:
    core, transport, _ = make_core(max_batch=4)
    texts = ["a", "poison", "b"]
    first = ask(core, "first")
    await settle()
    tasks = [ask(core, t) for t in texts]
    await settle()
    transport.finish()
    await settle()
    crashed = transport.running.pop(0)
    assert [p.request.texts()[0] for p in crashed] == texts  # type: ignore[attr-defined]
    core.lost(crashed, crashed=True)
    await settle()
    for _ in texts:  # each alone, in order, before anything else
        batch = transport.running.pop(0)
        assert len(batch) == 1
        if batch[0].request.texts()[0] == "poison":  # type: ignore[attr-defined]
            core.lost(batch, crashed=True)
        else:
            transport.running.insert(0, batch)
            transport.finish()
        await settle()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == "done a" and results[2] == "done b"
    assert isinstance(results[1], WorkerDied) and str(results[1]) == CRASHED_ALONE
    assert core.metrics.summary()["requests_retried"] == 3
    await first
    await core.close()


async def test_a_killed_runner_fails_its_batch_with_the_reason_and_close_answers_the_queue() -> None:
    core, transport, _ = make_core(max_batch=1)
    running = ask(core, "running")
    queued = ask(core, "queued")
    await settle()
    transport.runners = 0  # the runner is being replaced: nothing more is sent
    core.lost(transport.running.pop(0), crashed=False, reason="stopped responding; restarted")
    with pytest.raises(WorkerDied, match="restarted"):
        await running
    await settle()
    assert transport.batches == [["running"]]
    await core.close()
    with pytest.raises(InferenceError, match="shutting down"):
        await queued


async def test_percentiles_are_measurements_not_bucket_bounds() -> None:
    """Issue 24 item 6: p50 = p95 = 10000 ms were bucket bounds; they are measured values now."""
    metrics = ServiceMetrics()
    measured = [0.7, 0.75, 0.8, 5.2, 0.76]
    for seconds in measured:
        metrics.observe_latency("next_token", seconds)
        metrics.observe_queue_wait("next_token", seconds / 10)
    row = metrics.summary()["tasks"]["next_token"]
    assert row["request_seconds_p50"] == pytest.approx(0.76)  # the median itself, not the 1 s bucket bound
    assert 0.8 < row["request_seconds_p95"] < 5.2  # between the two largest measurements, not 10 s
    assert row["queue_wait_seconds_p50"] == pytest.approx(0.076)
    # The same figures from a running bot's /metrics text.
    parsed = summarize(text_string_to_metric_families(metrics.prometheus_text().decode()))
    assert parsed["tasks"]["next_token"]["request_seconds_p50"] == pytest.approx(0.76)
    assert parsed["tasks"]["next_token"]["request_seconds_p95"] == pytest.approx(row["request_seconds_p95"])
