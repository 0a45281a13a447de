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
from bot.inference.ray_backend import RayInferenceClient
from tests.conftest import make_config
from tests.fake_tasks import Slow, SlowNoModel

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
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
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


async def test_killed_replica_is_a_clear_error_then_recovers(apps) -> None:  # type: ignore[no-untyped-def]
    ray_app, _ = apps
    client: RayInferenceClient = ray_app.inference
    (pid,) = await client.replica_pids("causal_lm")
    in_flight = asyncio.create_task(client.submit(Slow("x", seconds=30)))
    await asyncio.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerDied, match="replacing it"):
        await in_flight
    assert time.monotonic() - started < 5
    result = await client.submit(NextToken("After the crash", k=2), timeout=120)
    assert len(result.top) == 2
    assert (await client.replica_pids("causal_lm")) != [pid]


async def test_backpressure_becomes_busy(cache_dir: Path, tiny_gpt2: Path) -> None:
    app = App(
        make_config(cache_dir, {"causal_lm": tiny_gpt2}, backend="ray", ray_num_cpus=0.1, max_queue=1, max_batch_size=1)
    )
    try:
        # 8 requests may be ongoing on the replica and 1 may queue; past that, a request is refused
        # at once. When the router learns of the replica depends on Ray's timing, so extra requests
        # keep coming until one is refused, each given 0.3 s to be turned away.
        # A served request first: the router must know the (re)deployed replica before the burst,
        # or requests wait for it and are all turned away together, not one by one.
        assert await app.inference.submit(SlowNoModel("warm-up", seconds=0.0)) == "done warm-up"
        running = [asyncio.create_task(app.inference.submit(SlowNoModel(str(i), seconds=3.0))) for i in range(9)]
        await asyncio.sleep(1.0)
        refused: BaseException | None = None
        for attempt in range(12):
            extra = asyncio.create_task(app.inference.submit(SlowNoModel(f"extra {attempt}", seconds=3.0)))
            running.append(extra)
            await asyncio.sleep(0.3)
            if extra.done() and isinstance(extra.exception(), Busy):
                refused = extra.exception()
                break
        assert isinstance(refused, Busy) and "try again" in str(refused)
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        await app.close()
