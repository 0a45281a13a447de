"""The Ray Serve backend on a real local Ray instance (run by tests/test_ray_backend.py).

This file is not collected on its own: test_ray_backend.py runs it with pytest
inside a fresh network namespace that has only a loopback interface, so every
Ray process can reach 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import App
from bot.inference.protocol import Busy, FillMask, NextToken, Score, WorkerDied
from bot.inference.ray_backend import ClusterConfigConflict, RayInferenceClient
from tests.conftest import make_config
from tests.fake_tasks import Slow, SlowNoModel, logged, until
from tests.scheduling_cases import CASES

PROMPTS = [f"Prompt {i} " + "word " * (i % 5) for i in range(12)]
TIMING_KEYS = {"seconds"}


@pytest.fixture(scope="module")
def all_models(tiny_gpt2, tiny_bert_mlm, tiny_bert_nsp, tiny_t5, tiny_classifier) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return {
        "causal_lm": tiny_gpt2,
        "masked_lm": tiny_bert_mlm,
        "nsp": tiny_bert_nsp,
        "seq2seq": tiny_t5,
        "classifier": tiny_classifier,
    }


@pytest.fixture(scope="module")
async def apps(cache_dir: Path, all_models: dict[str, Path]) -> AsyncIterator[tuple[App, App]]:
    """The same models behind the Ray backend and behind the local workers."""
    ray_app = App(make_config(cache_dir, all_models, backend="ray", ray_num_cpus=0.1))
    local_app = App(make_config(cache_dir, all_models))
    yield ray_app, local_app
    await local_app.close()
    await ray_app.close()


def without_timings(value: Any) -> Any:
    """The data with measured times left out (``seconds``, ``prompt_ms``, ...): only they may differ."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS and not k.endswith("_ms")}
    if isinstance(value, list | tuple):
        return [without_timings(v) for v in value]
    return value


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if dataclasses.is_dataclass(want):
        got, want = dataclasses.asdict(got), dataclasses.asdict(want)
    if isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


async def test_same_numbers_as_the_local_backend_batched(apps) -> None:  # type: ignore[no-untyped-def]
    ray_app, local_app = apps
    requests = [NextToken(p, k=5) for p in PROMPTS] + [Score(" Paris.", context="The capital of France is")]
    requests += [FillMask("The \x00MASK\x00 sat on the mat.", k=3)]
    on_ray = await asyncio.gather(*(ray_app.inference.submit(r) for r in requests))
    on_local = await asyncio.gather(*(local_app.inference.submit(r) for r in requests))
    for got, want in zip(on_ray, on_local, strict=True):
        assert_close(got, want)
    assert ray_app.inference.metrics.summary()["tasks"]["next_token"]["batch_size_mean"] > 1


COMMANDS = [
    '/nexttoken prompt:"The capital of France is" k:5',
    "/mask sentence:Paris is the [MASK] of France.",
    "/compare text:The cat sat on the mat.",
    "/ngram context:the cat",
    '/nsp sentence_a:"The cat sat." sentence_b:"It purred."',
    "/summarize text:A short paragraph about transformers and attention. max_length:6",
    "/sentiment text:What a wonderful day.",
    "/adapt text:Great product",
]


@pytest.mark.parametrize("line", COMMANDS)
async def test_every_model_backed_command_serves_on_ray(apps, line: str) -> None:  # type: ignore[no-untyped-def]
    ray_app, local_app = apps
    on_ray = await ray_app.execute_line(line)
    on_local = await local_app.execute_line(line)
    assert not on_ray.error, on_ray.text
    assert_close(without_timings(on_ray.data), without_timings(on_local.data))


async def test_complexity_runs_on_a_replica(apps) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    reply = await ray_app.execute_line("/complexity lengths:16,64 width:16")
    assert not reply.error and reply.data["lengths"] == [16, 64] and all(t > 0 for t in reply.data["attention_ms"])


async def test_killed_replica_is_a_clear_error_then_recovers(apps, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    client: RayInferenceClient = ray_app.inference
    (pid,) = await client.replica_pids("causal_lm")
    log = str(tmp_path / "calls.log")
    in_flight = asyncio.create_task(client.submit(Slow("x", seconds=30, log=log)))
    await asyncio.wait_for(until(logged(log, "start x")), 120)  # the replica is running it
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(WorkerDied, match="replacing it"):
        await in_flight
    # Noticed, not waited out: sooner than the 30 s the task would have run (how soon is a figure for bench/).
    assert time.monotonic() - killed_at < 30
    result = await client.submit(NextToken("After the crash", k=2), timeout=120)
    assert len(result.top) == 2
    assert (await client.replica_pids("causal_lm")) != [pid]


async def test_a_full_queue_is_busy_at_once_and_queued_requests_are_answered(apps, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    # Same deployment settings as the shared app (max_queue is the bot process's own), so this
    # client joins a running `_none` application or deploys the one the others would join.
    app = App(make_config(cache_dir, {}, backend="ray", ray_num_cpus=0.1, max_queue=1))
    try:
        assert await app.inference.submit(SlowNoModel("warm-up", seconds=0.0)) == "done warm-up"
        # Two batches in flight (two per replica), then one waits in this process's queue, and
        # the next is refused at once with a hint. Requests keep coming until one is refused.
        accepted: list[asyncio.Task[Any]] = []
        refused: BaseException | None = None
        for i in range(12):
            extra = asyncio.create_task(app.inference.submit(SlowNoModel(str(i), seconds=1.5)))
            await asyncio.sleep(0.1)
            if extra.done() and isinstance(extra.exception(), Busy):
                refused = extra.exception()
                break
            accepted.append(extra)
        assert isinstance(refused, Busy) and "try again" in str(refused)
        assert 3 <= len(accepted) < 12
        # Nothing accepted is lost.
        assert await asyncio.gather(*accepted) == [f"done {i}" for i in range(len(accepted))]
        assert app.inference.retry_hint_if_full() is None
    finally:
        await app.close()
    assert await ray_app.inference.submit(NextToken("Still served", k=2))


async def test_the_same_config_joins_the_running_application(apps, cache_dir: Path, all_models) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    (pid,) = await ray_app.inference.replica_pids("causal_lm")
    joiner = App(make_config(cache_dir, all_models, backend="ray", ray_num_cpus=0.1))
    try:
        assert await joiner.inference.replica_pids("causal_lm") == [pid]
        assert await joiner.inference.describe_app("causal_lm") == await ray_app.inference.describe_app("causal_lm")
        want = await ray_app.inference.submit(NextToken(PROMPTS[0], k=3))
        assert_close(await joiner.inference.submit(NextToken(PROMPTS[0], k=3)), want)
    finally:
        await joiner.close()
    # Closing the joiner left the application to the first app.
    assert await ray_app.inference.replica_pids("causal_lm") == [pid]
    assert len((await ray_app.inference.submit(NextToken("After the joiner left", k=2))).top) == 2


@pytest.mark.parametrize(
    ("setting", "value", "shown"),
    [
        ("max_batch_size", 7, "inference.max_batch_size: 64 there, 7 here"),
        ("max_new_tokens", 9, "inference.max_new_tokens: 64 there, 9 here"),
        ("ray_num_cpus", 0.2, "inference.ray_num_cpus: 0.1 there, 0.2 here"),
    ],
)
async def test_another_config_is_refused_naming_the_difference(  # type: ignore[no-untyped-def]
    apps, cache_dir: Path, all_models, setting: str, value: object, shown: str
) -> None:
    ray_app, _ = apps
    (pid,) = await ray_app.inference.replica_pids("causal_lm")
    inference = {"backend": "ray", "ray_num_cpus": 0.1, setting: value}
    other = App(make_config(cache_dir, all_models, **inference))
    try:
        with pytest.raises(ClusterConfigConflict) as refused:
            await other.inference.submit(NextToken("Hello", k=2))
        assert shown in str(refused.value) and "lmbot-causal_lm" in str(refused.value)
        assert str(refused.value).count(" there, ") == 1  # only what differs
        reply = await other.execute_line("/nexttoken prompt:Hello k:2")
        assert reply.error and "different config" in reply.text
    finally:
        await other.close()
    # Nothing was replaced: the same replica serves the first app.
    assert await ray_app.inference.replica_pids("causal_lm") == [pid]
    assert len((await ray_app.inference.submit(NextToken("Still the same", k=2))).top) == 2


async def test_batches_from_two_clients_merge_at_a_busy_replica(
    apps, cache_dir: Path, all_models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    other = App(make_config(cache_dir, all_models, backend="ray", ray_num_cpus=0.1))
    log = str(tmp_path / "calls.log")
    try:
        await other.inference.submit(NextToken("warm", k=2))
        busy = asyncio.create_task(ray_app.inference.submit(Slow("hold the replica", seconds=5.0, log=log)))
        await asyncio.wait_for(until(logged(log, "start hold the replica")), 120)  # the replica computes now
        # One request from each client arrives while the replica computes: its next run takes both.
        mine, theirs = await asyncio.gather(
            ray_app.inference.submit(NextToken(PROMPTS[1], k=3)), other.inference.submit(NextToken(PROMPTS[1], k=3))
        )
        assert_close(mine, theirs)
        assert await busy == "done hold the replica"
        assert ray_app.inference.breakdown(last=1)["batch_size_mean"] == 2
        assert other.inference.breakdown(last=1)["batch_size_mean"] == 2
        assert other.inference.breakdown(last=1)["replica_queue"] > 500  # it waited for the slow batch
    finally:
        await other.close()


async def test_breakdown_accounts_for_the_request_time(apps) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    client: RayInferenceClient = ray_app.inference
    for prompt in PROMPTS[:6]:
        await client.submit(NextToken(prompt, k=2))
    for trace in list(client._traces)[-6:]:
        enqueued, formed, arrived, picked, began, ended, forward, size, returned, done = trace
        # Every stage is a real interval, in order, on this host's clock.
        assert enqueued <= formed <= arrived <= picked <= began <= ended <= returned <= done
        assert 0 < forward <= ended - began and size == 1
    one = client.breakdown(last=1)
    parts = ["client_queue", "to_replica", "replica_queue", "thread_hop", "prepare", "forward"]
    parts += ["replica_return", "to_client"]
    assert math.isclose(sum(one[p] for p in parts), one["total"], rel_tol=1e-6)
    assert math.isclose(one["to_replica"] + one["to_client"], one["transport"], rel_tol=1e-6)
    assert one["forward"] > 0 and one["requests"] == 1
    status = await client.status()
    assert status["backend"] == "ray" and "causal_lm" in status["roles"] and status["breakdown_ms"]["forward"] > 0


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
async def test_the_scheduling_suite_on_ray(apps, case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same suite tests/test_service.py runs on the local workers (tests/scheduling_cases.py)."""
    ray_app, _ = apps
    client: RayInferenceClient = ray_app.inference
    max_batch, max_per_user = client.core.max_batch, client.max_per_user
    try:
        await case(client, tmp_path)
    finally:
        client.core.max_batch, client.max_per_user = max_batch, max_per_user
