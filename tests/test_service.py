"""The inference service for real: worker processes, batching, faults.

Every test here talks to real worker processes through the asyncio client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers

from bot.inference.client import LocalInferenceClient
from bot.inference.protocol import (
    Busy,
    DeadlineExceeded,
    FillMask,
    InputTooLong,
    NextToken,
    NoModelForRole,
    WorkerDied,
)
from tests.conftest import ROLES
from tests.fake_tasks import OomAboveOne, Slow, logged, raised_at_once, until
from tests.scheduling_cases import CASES, a_cancelled_request_leaves_the_queue, an_expired_request_is_never_computed

PROMPTS = [f"Prompt number {i} " + "word " * (i % 7) for i in range(24)]


async def started(config) -> LocalInferenceClient:  # type: ignore[no-untyped-def]
    client = LocalInferenceClient(config, ROLES)
    await client.start()
    await client.wait_ready()
    return client


async def test_batched_results_equal_alone_and_reference(causal_service, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    together = await asyncio.gather(*(causal_service.submit(NextToken(p, k=5)) for p in PROMPTS))
    sizes = causal_service.metrics.summary()["tasks"]["next_token"]
    assert sizes["batch_size_mean"] > 1  # they really were batched
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    for prompt, batched in zip(PROMPTS[:6], together, strict=False):
        alone = await causal_service.submit(NextToken(prompt, k=5))
        with torch.no_grad():
            probs = torch.softmax(model(**tok(prompt, return_tensors="pt")).logits[0, -1], -1)
        want = torch.topk(probs, 5)
        assert [t.id for t in batched.top] == [t.id for t in alone.top] == want.indices.tolist()
        for b, a, w in zip(batched.top, alone.top, want.values.tolist(), strict=True):
            assert abs(b.prob - w) < 1e-5 and abs(a.prob - w) < 1e-5


async def test_queue_full_fails_at_once_with_retry_hint(config_factory, tiny_gpt2: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = str(tmp_path / "calls.log")
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_queue=2, max_batch_size=1))
    try:
        running = [asyncio.create_task(client.submit(Slow("0", seconds=1.0, log=log)))]
        await until(logged(log, "start 0"))  # in the worker
        running += [asyncio.create_task(client.submit(Slow(str(i), seconds=0.1))) for i in (1, 2)]
        await until(lambda: client.core.waiting == 2)  # two queued: the queue is full
        refused = raised_at_once(client.submit(Slow("late")))  # refused without waiting for anything
        assert isinstance(refused, Busy)
        assert not running[0].done()
        assert refused.retry_after >= 1
        assert "try again in" in str(refused)
        assert [r for r in await asyncio.gather(*running)] == ["done 0", "done 1", "done 2"]
    finally:
        await client.close()


async def test_expired_request_is_dropped_without_computing(config_factory, tiny_gpt2: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_batch_size=1))
    try:
        await an_expired_request_is_never_computed(client, tmp_path)  # also run on Ray (tests/ray_suite.py)
    finally:
        await client.close()


async def test_cancelled_request_is_removed(config_factory, tiny_gpt2: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_batch_size=1))
    try:
        await a_cancelled_request_leaves_the_queue(client, tmp_path)  # also run on Ray (tests/ray_suite.py)
    finally:
        await client.close()


async def test_killed_worker_fails_in_flight_and_is_restarted(config_factory, tiny_gpt2: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = await started(config_factory({"causal_lm": tiny_gpt2}))
    try:
        log = str(tmp_path / "calls.log")
        in_flight = [asyncio.create_task(client.submit(Slow(str(i), seconds=30, log=log))) for i in range(3)]
        await until(lambda: logged(log, "start 0")() and client.core.waiting == 0)  # all three in the worker
        (pid,) = client.worker_pids()
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for task in in_flight:
            with pytest.raises(WorkerDied, match="restarted"):
                await task
        # Noticed, not waited out: sooner than the 30 s the tasks would have run (how soon is a figure for bench/).
        assert time.monotonic() - killed_at < 30
        result = await client.submit(NextToken("The next request works", k=3))
        assert len(result.top) == 3
        assert client.worker_pids() and client.worker_pids()[0] != pid
        assert client.metrics.summary()["worker_restarts"] == 1
    finally:
        await client.close()


async def test_out_of_memory_batch_is_split_in_halves(config_factory, tiny_gpt2: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "oom.log"
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_wait_ms=200))
    try:
        results = await asyncio.gather(*(client.submit(OomAboveOne(str(i), log=str(log))) for i in range(4)))
        assert sorted(results) == ["ok 0", "ok 1", "ok 2", "ok 3"]
        sizes = [int(line.split()[1]) for line in log.read_text().splitlines()]
        assert sizes == [4, 2, 1, 1, 2, 1, 1]
    finally:
        await client.close()


async def test_input_limits_give_clear_errors(config_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_input_chars=100, max_input_tokens=10))
    try:
        with pytest.raises(InputTooLong, match="101 characters long; the limit is 100"):
            await client.submit(NextToken("x" * 101))
        with pytest.raises(InputTooLong, match="tokens long; the limit is 10"):
            await client.submit(NextToken("one two three four five six seven eight nine ten eleven"))
        ok, too_long = await asyncio.gather(
            client.submit(NextToken("short")),
            client.submit(NextToken("a b c d e f g h i j k l m")),
            return_exceptions=True,
        )
        assert not isinstance(ok, Exception) and isinstance(too_long, InputTooLong)
    finally:
        await client.close()


async def test_role_without_offline_weights_names_the_config_key(causal_service) -> None:  # type: ignore[no-untyped-def]
    started_at = time.monotonic()
    with pytest.raises(NoModelForRole) as info:
        await causal_service.submit(FillMask("Paris is the [MASK] of France."))
    assert "set `models.masked_lm` in config.toml" in str(info.value)
    assert "\n" not in str(info.value)
    assert time.monotonic() - started_at < 10  # no waiting on an unreachable hub


async def loaded_roles(client: LocalInferenceClient) -> set[str]:
    (worker,) = (await client.status())["workers"]
    return set(worker["models"])


async def test_models_load_lazily_once_and_share_the_budget(config_factory, tiny_gpt2, tiny_bert_mlm) -> None:  # type: ignore[no-untyped-def]
    roles = {"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm}
    client = await started(config_factory(roles, memory_budget_mb=100))
    try:
        assert await loaded_roles(client) == set()  # nothing until a request needs it
        await client.submit(NextToken("hi"))
        first = (await client.status())["workers"][0]["models"]["causal_lm"]["load_s"]
        await client.submit(NextToken("again"))
        assert (await client.status())["workers"][0]["models"]["causal_lm"]["load_s"] == first  # loaded once
        await client.submit(FillMask("a \x00MASK\x00 b"))
        assert await loaded_roles(client) == {"causal_lm", "masked_lm"}  # both fit in 100 MB
    finally:
        await client.close()


async def test_least_recently_used_model_is_unloaded_past_the_budget(config_factory, tiny_gpt2, tiny_bert_mlm) -> None:  # type: ignore[no-untyped-def]
    # Each tiny model is a few MB, so a 1 MB budget holds only the one in use.
    client = await started(config_factory({"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm}, memory_budget_mb=1))
    try:
        await client.submit(NextToken("hi"))
        assert await loaded_roles(client) == {"causal_lm"}
        await client.submit(FillMask("a \x00MASK\x00 b"))
        assert await loaded_roles(client) == {"masked_lm"}
        result = await client.submit(NextToken("hi"))  # reloaded on demand, same answer
        assert await loaded_roles(client) == {"causal_lm"}
        assert result.top
    finally:
        await client.close()


async def test_a_deadline_while_workers_start_says_so(config_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    client = LocalInferenceClient(config_factory({"causal_lm": tiny_gpt2}), ROLES)
    await client.start()  # spawning a worker and importing torch takes far longer than the deadline below
    try:
        with pytest.raises(DeadlineExceeded, match="The model workers are still starting"):
            await client.submit(Slow("early"), timeout=0.05)
        await client.wait_ready()
        assert await client.submit(Slow("ready")) == "done ready"
    finally:
        await client.close()


class StillClock:
    """The batching core's clock, moved only by the test: on it, time passes when the test says so.

    A request answered while it stands still did not wait ``max_wait`` for company (a wait
    that would never end), whatever the load on the machine."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def test_a_lone_request_does_not_wait_for_company_a_burst_does(config_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    """max_wait is spent only when company is likely: a burst, or askers of a batch asking again."""
    max_wait = 0.5
    client = await started(config_factory({"causal_lm": tiny_gpt2}, max_wait_ms=int(max_wait * 1000)))

    def sample(name: str) -> float:
        return client.metrics.registry.get_sample_value(f"lmbot_{name}", {"task": "next_token"}) or 0.0

    try:
        await client.submit(NextToken("load the model first", k=1))
        clock = StillClock()
        client.core.clock = clock
        for _ in range(3):  # a quiet bot: asks more than max_wait apart on the core's clock
            clock.now += max_wait + 0.1
            before = sample("queue_wait_seconds_sum"), sample("batch_size_count"), sample("batch_size_sum")
            # Answered while the clock stands still: it went at once (waiting for company never ends).
            await asyncio.wait_for(client.submit(NextToken("The capital of France is", k=3)), 120)
            after = sample("queue_wait_seconds_sum"), sample("batch_size_count"), sample("batch_size_sum")
            assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (0.0, 1, 1)

        # Four at once wait for each other: nothing goes until max_wait has passed, then one batch.
        clock.now += max_wait + 0.1
        batches, requests = sample("batch_size_count"), sample("batch_size_sum")
        waited = sample("queue_wait_seconds_sum")
        asks = [asyncio.create_task(client.submit(NextToken(p, k=3))) for p in PROMPTS[:4]]
        await asyncio.wait_for(until(lambda: client.core.waiting == 4), 60)
        assert not any(a.done() for a in asks) and sample("batch_size_count") == batches
        clock.now += max_wait
        await asyncio.wait_for(asyncio.gather(*asks), 120)
        assert (sample("batch_size_count") - batches, sample("batch_size_sum") - requests) == (1, 4)
        assert sample("queue_wait_seconds_sum") - waited == pytest.approx(4 * max_wait)  # each waited max_wait
    finally:
        await client.close()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
async def test_the_scheduling_suite_on_local_workers(causal_service, case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The suite tests/ray_suite.py runs on Ray Serve too (tests/scheduling_cases.py)."""
    max_batch, max_per_user = causal_service.core.max_batch, causal_service.max_per_user
    try:
        await case(causal_service, tmp_path)
    finally:
        causal_service.core.max_batch, causal_service.max_per_user = max_batch, max_per_user
