"""What one user, one input or one stuck process can do to the service: nothing lasting.

Every test that needs workers talks to real worker processes through the asyncio
client: a stopped (SIGSTOP) worker is replaced by the watchdog, a request that
fails or crashes a worker fails alone, each user gets a bounded, fair share.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.app import App
from bot.commands import Context, User
from bot.config import Config
from bot.inference.client import InferenceClient, LocalInferenceClient, create_client
from bot.inference.protocol import (
    DeadlineExceeded,
    InferenceError,
    InputTooLong,
    InvalidText,
    ModelFailed,
    NextToken,
    NoModelForRole,
    Score,
    TaskNotFound,
    TooCostly,
    TooManyRequests,
    WorkerDied,
)
from bot.inference.ray_backend import RayInferenceClient
from bot.inference.settings import STARTING
from tests.conftest import ROLES, examples, make_config
from tests.fake_tasks import (
    Answers,
    CarriesUnreadable,
    Costly,
    CrashOnPoison,
    MisspelledTask,
    Picky,
    Recorded,
    Slow,
    Smuggles,
    Sneaky,
    Unreadable,
    logged,
    raised_at_once,
    until,
)

# Where the SIGSTOP tests write how long recovery took (the figure for the README).
FIGURES = os.environ.get("LMBOT_FAULT_FIGURES", "")


async def started(config: Config) -> LocalInferenceClient:
    client = LocalInferenceClient(config, ROLES)
    await client.start()
    await client.wait_ready(timeout=240)
    return client


def outcome_count(client: InferenceClient, task: str, outcome: str) -> int:
    return int(client.metrics.summary()["tasks"].get(task, {}).get("errors", {}).get(outcome, 0))


def service_figure(client: InferenceClient, name: str) -> int:
    return int(client.metrics.summary().get(name, 0))


def record_figure(name: str, seconds: float) -> None:
    print(f"{name}: {seconds:.1f} s")
    if FIGURES:
        with open(FIGURES, "a", encoding="utf-8") as f:
            f.write(json.dumps({name: round(seconds, 2)}) + "\n")


# --------------------------------------------------------------------------- admission (no workers)


def local_and_ray(config: Config) -> list[InferenceClient]:
    """Both backends, unstarted: admission refuses before anything starts."""
    return [LocalInferenceClient(config, ROLES), RayInferenceClient(config, ROLES)]


def nothing_started(client: InferenceClient) -> bool:
    if isinstance(client, LocalInferenceClient):
        return client.worker_pids() == []
    assert isinstance(client, RayInferenceClient)
    return not client._started


@pytest.mark.parametrize(
    "request_",
    [
        NextToken("caf\udce9"),
        NextToken("\ud800"),
        Score(" fine", context="lone \udfff surrogate"),
    ],
)
async def test_unreadable_text_is_refused_up_front(config_factory, request_) -> None:  # type: ignore[no-untyped-def]
    for client in local_and_ray(config_factory()):
        refused = raised_at_once(client.submit(request_))  # before anything is queued or started
        assert isinstance(refused, InvalidText)
        message = str(refused)
        assert "U+D" in message and "remove it and try again" in message and "\n" not in message
        assert refused.ephemeral
        assert nothing_started(client)
        assert outcome_count(client, request_.task, "invalid_text") == 1


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.lists(st.one_of(st.characters(), surrogates), max_size=40).map("".join)


ADMISSION_ONLY = LocalInferenceClient(make_config(Path("/nonexistent-cache")), ROLES)  # never started


@settings(max_examples=examples(200), deadline=None)
@given(text=any_text)
def test_admission_refuses_exactly_the_text_that_is_not_utf8(text: str) -> None:
    client = ADMISSION_ONLY
    unreadable = any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
    if unreadable:
        with pytest.raises(InvalidText):
            client.admit(NextToken(text))
    else:
        client.admit(NextToken(text))  # admitted: nothing raised


async def test_cost_budget_is_checked_before_queueing(config_factory) -> None:  # type: ignore[no-untyped-def]
    for client in local_and_ray(config_factory(max_request_cost=1e6)):
        assert client.max_request_cost == 1e6
        assert client.for_user("someone").max_request_cost == 1e6
        with pytest.raises(TooCostly) as info:
            await client.submit(Costly("big", macs=3e6))
        assert "3e+06" in str(info.value) and "1e+06" in str(info.value) and "smaller" in str(info.value)
        with pytest.raises(TooCostly):
            await client.submit(Costly("unknown", macs=math.nan))
        with pytest.raises(InputTooLong, match="the limit is 2,000"):
            await client.submit(NextToken("x" * 2001))
        assert nothing_started(client)
        assert outcome_count(client, Costly.task, "too_costly") == 2


def test_every_backend_shares_one_admission() -> None:
    # Ray implements only its own queueing; submit and admission are the shared ones.
    for backend in (LocalInferenceClient, RayInferenceClient):
        assert issubclass(backend, InferenceClient)
        assert backend.submit is InferenceClient.submit
        assert backend.admit is InferenceClient.admit
    assert isinstance(create_client(make_config(Path("/nonexistent")), ROLES), LocalInferenceClient)


# --------------------------------------------------------------------------- per-user share and fairness


@pytest.fixture(scope="module")
async def shared_app(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[App]:
    config = make_config(
        cache_dir, {"causal_lm": tiny_gpt2}, max_per_user=6, max_batch_size=4, max_request_cost=1e6, max_wait_ms=20
    )
    app = App(config, builtins=False, entry_points=False)
    assert isinstance(app.inference, LocalInferenceClient)
    await app.inference.start()
    await app.inference.wait_ready(timeout=240)
    yield app
    await app.close()


def person(app: App, name: str) -> Context:
    return Context(User(name, name), app, transport="test")


async def test_one_user_cannot_hold_more_than_their_share(shared_app: App) -> None:
    alice, bob = person(shared_app, "alice"), person(shared_app, "bob")
    assert alice.inference.max_request_cost == 1e6
    running = [asyncio.create_task(alice.inference.submit(Slow(f"alice {i}", seconds=1.0))) for i in range(6)]
    await until(lambda: shared_app.inference._per_user["alice"] == 6)  # all six submitted
    refused = raised_at_once(alice.inference.submit(Slow("one too many")))
    assert isinstance(refused, TooManyRequests)
    assert str(refused) == "You have 6 requests waiting; try again when they finish."
    # Others are not affected: another user, and code that submits with no user.
    assert await bob.inference.submit(Slow("bob")) == "done bob"
    assert await shared_app.inference.submit(Slow("no user")) == "done no user"
    assert sorted(await asyncio.gather(*running)) == sorted(f"done alice {i}" for i in range(6))
    assert await alice.inference.submit(Slow("alice again")) == "done alice again"  # her share is back
    assert outcome_count(shared_app.inference, Slow.task, "user_share") == 1
    with pytest.raises(TooCostly):
        await alice.inference.submit(Costly("too big", macs=2e6))
    assert await alice.inference.submit(Costly("fits", macs=5e5)) == "done fits"


async def test_a_burst_from_one_user_does_not_fill_the_batches(shared_app: App, tmp_path: Path) -> None:
    log = tmp_path / "batches.log"
    started_log = str(tmp_path / "blocker.log")
    blocker = asyncio.create_task(shared_app.inference.submit(Slow("blocker", seconds=1.5, log=started_log)))
    await until(logged(started_log, "start blocker"))  # the worker is busy: everything below waits in one queue
    hog, bob, carol = (person(shared_app, name) for name in ("hog", "bob", "carol"))
    burst = [hog.inference.submit(Recorded(f"hog{i}", log=str(log))) for i in range(6)]
    others = [who.inference.submit(Recorded(who.user.id, log=str(log))) for who in (bob, carol)]
    await asyncio.gather(blocker, *burst, *others)
    batches = [line.split() for line in log.read_text().splitlines()]
    # Users take turns: the first batch serves bob and carol beside the hog, not four of the hog's.
    assert batches[0] == ["hog0", "bob", "carol", "hog1"]
    assert [name for batch in batches for name in batch if name.startswith("hog")] == [f"hog{i}" for i in range(6)]


# --------------------------------------------------------------------------- one input fails alone


@pytest.fixture(scope="module")
async def poison_client(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[LocalInferenceClient]:
    # Deadlines leave room for two worker restarts on a slow, shared machine.
    client = await started(
        make_config(cache_dir, {"causal_lm": tiny_gpt2}, max_wait_ms=50, max_batch_size=16, request_timeout_s=200)
    )
    yield client
    await client.close()


async def test_a_task_error_fails_only_the_request_at_fault(poison_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "picky.log"
    (pid,) = poison_client.worker_pids()
    texts = [f"fine {i}" for i in range(7)]
    texts.insert(3, "poison")
    # Measured once alone first, as a running bot's tasks are: an unmeasured task's first batch is
    # kept small (scheduler.FIRST_BATCH), and this test wants the eight together.
    assert await poison_client.submit(Picky("warm up", log=str(log))) == "ok warm up"
    warm = len(log.read_text().splitlines())
    results = await asyncio.gather(
        *(poison_client.submit(Picky(t, log=str(log))) for t in texts), return_exceptions=True
    )
    for text, result in zip(texts, results, strict=True):
        if text == "poison":
            assert isinstance(result, ModelFailed) and "error id" in str(result)
        else:
            assert result == f"ok {text}"
    sizes = [int(line.split()[1]) for line in log.read_text().splitlines()[warm:]]
    assert sizes[0] == 8 and sizes.count(1) >= 1  # run together first, then split down to the culprit
    assert poison_client.worker_pids() == [pid]  # no worker was harmed


async def test_unreadable_text_reaching_a_worker_fails_alone(poison_client) -> None:  # type: ignore[no-untyped-def]
    (pid,) = poison_client.worker_pids()
    requests = [Sneaky(f"fine {i}") for i in range(5)] + [Sneaky("sneaky", bot_pid=os.getpid())]
    results = await asyncio.gather(*(poison_client.submit(r) for r in requests), return_exceptions=True)
    assert results[:5] == [f"done fine {i}" for i in range(5)]
    assert isinstance(results[5], InvalidText) and "U+DCE9" in str(results[5])
    assert poison_client.worker_pids() == [pid]


async def test_a_request_the_worker_cannot_unpickle_fails_alone(poison_client) -> None:  # type: ignore[no-untyped-def]
    (pid,) = poison_client.worker_pids()
    batch = [CarriesUnreadable("a"), CarriesUnreadable("bad", payload=Unreadable(os.getpid())), CarriesUnreadable("b")]
    results = await asyncio.gather(*(poison_client.submit(r) for r in batch), return_exceptions=True)
    assert results[0] == "done a" and results[2] == "done b"
    assert "cannot read this request" in str(results[1]) and "error id" in str(results[1])
    assert poison_client.worker_pids() == [pid]


async def test_a_crash_is_pinned_on_the_request_that_caused_it(poison_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "crash.log"
    restarts = service_figure(poison_client, "worker_restarts")
    texts = ["fine0", "fine1", "poison", "fine2", "fine3", "fine4"]
    assert await poison_client.submit(CrashOnPoison("warm", log=str(log))) == "ok warm"  # measured, as above
    warm = len(log.read_text().splitlines())
    results = await asyncio.gather(
        *(poison_client.submit(CrashOnPoison(t, log=str(log))) for t in texts), return_exceptions=True
    )
    for text, result in zip(texts, results, strict=True):
        if text == "poison":
            assert isinstance(result, WorkerDied) and "was not run again" in str(result)
        else:
            assert result == f"ok {text}", result
    batches = [line.split()[1:] for line in log.read_text().splitlines()[warm:]]
    assert batches[0] == texts  # they crashed together once ...
    # ... then each ran alone
    assert sorted(b[0] for b in batches[1:]) == sorted(texts) and all(len(b) == 1 for b in batches[1:])
    assert service_figure(poison_client, "worker_restarts") == restarts + 2  # the culprit crashed it twice, no more
    assert service_figure(poison_client, "requests_retried") == len(texts)
    assert await poison_client.submit(Slow("after")) == "done after"


async def test_answers_the_bot_cannot_read_fail_their_batch_at_once(poison_client) -> None:  # type: ignore[no-untyped-def]
    (pid,) = poison_client.worker_pids()
    started_at = time.monotonic()
    with pytest.raises(InferenceError, match="answer could not be read"):
        await poison_client.submit(Answers("x", mode="unreadable", bot_pid=os.getpid()))
    with pytest.raises(InferenceError, match="Plugin error 7: the plugin says no"):
        await poison_client.submit(Answers("y", mode="plugin-error"))
    assert time.monotonic() - started_at < 30  # answered, not left to the 200 s deadline
    assert await poison_client.submit(Answers("z")) == "ok z"
    assert poison_client.worker_pids() == [pid]


# --------------------------------------------------------------------------- distinct replies


@dataclass(frozen=True)
class NoSuchModule(Slow):
    task: ClassVar[str] = "tests.no_such_module:slow"


async def test_task_not_found_and_model_not_loaded_say_different_things(
    config_factory, tiny_gpt2: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_gpt2, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    client = await started(config_factory({"causal_lm": broken}))
    try:
        with pytest.raises(TaskNotFound) as typo:
            await client.submit(MisspelledTask("x"))
        assert "`tests.fake_tasks:slwo`" in str(typo.value) and "bug in the plugin" in str(typo.value)
        assert "could not be loaded" not in str(typo.value)
        with pytest.raises(TaskNotFound, match="there is no module `tests.no_such_module`"):
            await client.submit(NoSuchModule("x"))
        with pytest.raises((ModelFailed, NoModelForRole)) as load:
            await client.submit(NextToken("hello"))
        assert "`causal_lm` model" in str(load.value) and "task" not in str(load.value)
    finally:
        await client.close()


# --------------------------------------------------------------------------- the watchdog


async def first_success(client: LocalInferenceClient, make: Callable[[int], Any], limit: float) -> float | None:
    """Keep asking until a request is answered; the time it took, or None within ``limit`` seconds."""
    started_at = time.monotonic()
    attempt = 0
    while time.monotonic() - started_at < limit:
        attempt += 1
        try:
            await client.submit(make(attempt), timeout=20)
            return time.monotonic() - started_at
        except (DeadlineExceeded, WorkerDied):
            await asyncio.sleep(0.2)
    return None


async def stall_seen(client: LocalInferenceClient) -> float:
    """When the watchdog killed a worker (polled)."""
    while True:
        if service_figure(client, "worker_stalls") >= 1:
            return time.monotonic()
        await asyncio.sleep(0.05)


async def test_a_stopped_only_worker_is_replaced(config_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    client = await started(
        config_factory({"causal_lm": tiny_gpt2}, request_timeout_s=2.0, watchdog_margin_s=1.0, max_batch_size=4)
    )
    (pid,) = client.worker_pids()
    try:
        assert await client.submit(Slow("warm"), timeout=120) == "done warm"  # the model is loaded
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        killed = asyncio.create_task(stall_seen(client))
        stuck = await asyncio.gather(*(client.submit(Slow(f"stuck {i}")) for i in range(6)), return_exceptions=True)
        assert all(isinstance(r, DeadlineExceeded) for r in stuck), stuck
        took = await first_success(client, lambda i: Slow(f"probe {i}"), limit=200)
        assert took is not None, "the stopped worker was never replaced"
        back_at = time.monotonic()
        killed_at = await killed
        # The watchdog waits for the batch's deadline (2 s) plus the margin (1 s), no less; how much
        # longer it took on this machine is the benchmark's figure (recorded below), not a test.
        assert killed_at - stopped_at >= 2.0 + 1.0
        record_figure("sigstop_one_worker_detected_s", killed_at - stopped_at)
        record_figure("sigstop_one_worker_recovery_s", back_at - stopped_at)
        (new_pid,) = client.worker_pids()
        assert new_pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped, not left stopped
        assert service_figure(client, "worker_stalls") == 1 and service_figure(client, "worker_restarts") == 1
        answers = await asyncio.gather(*(client.submit(Slow(f"after {i}")) for i in range(8)))
        assert answers == [f"done after {i}" for i in range(8)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await client.close()


async def test_a_stopped_worker_of_two_is_replaced_while_the_other_serves(
    config_factory, tiny_gpt2: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "pids.log"
    client = await started(
        config_factory(
            {"causal_lm": tiny_gpt2}, workers=2, request_timeout_s=3.0, watchdog_margin_s=1.0, max_batch_size=1
        )
    )
    pids = client.worker_pids()
    try:
        # Both workers load the model (one request each), so that short deadlines below measure serving only.
        warm = [client.submit(Slow(f"warm {i}", seconds=0.5, log=str(log)), timeout=120) for i in range(2)]
        assert await asyncio.gather(*warm) == ["done warm 0", "done warm 1"]
        assert {int(line.rsplit("pid=", 1)[1]) for line in log.read_text().splitlines()} == set(pids)
        stopped = pids[0]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # While it is stopped, the other worker answers: at most the one batch sent to the stopped one fails.
        answers = []
        for i in range(6):
            with contextlib.suppress(DeadlineExceeded):
                answers.append(await client.submit(Slow(f"meanwhile {i}", seconds=0.1)))
        assert len(answers) >= 5
        # Then both workers serve again, neither of them the stopped one.
        round_ = 0
        seen: set[int] = set()
        while time.monotonic() - stopped_at < 200:
            round_ += 1
            results = await asyncio.gather(
                *(client.submit(Slow(f"r{round_}.{i}", seconds=0.5, log=str(log)), timeout=60) for i in range(2)),
                return_exceptions=True,
            )
            lines = [line for line in log.read_text().splitlines() if line.startswith(f"start r{round_}.")]
            seen = {int(line.rsplit("pid=", 1)[1]) for line in lines}
            if all(isinstance(r, str) for r in results) and len(seen) == 2:
                break
        assert len(seen) == 2 and stopped not in seen, "the stopped worker stayed out of rotation"
        record_figure("sigstop_one_of_two_workers_recovery_s", time.monotonic() - stopped_at)
        assert service_figure(client, "worker_stalls") == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], signal.SIGCONT)
        await client.close()


# --------------------------------------------------------------------------- a worker stopped while it loads


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("frozen_in", ["causal_lm", STARTING], ids=["model-load", "worker-start"])
async def test_a_worker_stopped_while_it_loads_is_replaced(config_factory, tiny_gpt2: Path, frozen_in: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 25 item 1: loading is watched like running. A worker frozen (SIGSTOP) the moment it
    says it loads a model (or starts: imports torch, preloads) stops sending its loading heartbeat:
    it is killed and replaced, the request it held is told so (not "still loading" for ten
    minutes), and the next request is served."""
    client = LocalInferenceClient(config_factory({"causal_lm": tiny_gpt2}, watchdog_margin_s=1.0), ROLES)
    frozen: list[int] = []
    on_message = client._on_message

    def stop_when_loading(worker: Any, message: tuple[Any, ...]) -> None:
        if message == ("loading", frozen_in) and not frozen:
            os.kill(worker.process.pid, signal.SIGSTOP)  # frozen in the middle of its load
            frozen.append(worker.process.pid)
        on_message(worker, message)

    client._on_message = stop_when_loading  # type: ignore[method-assign]
    try:
        with pytest.raises(WorkerDied, match="stopped responding and was restarted"):
            await client.submit(Slow("held during the load"), timeout=300)
        (pid,) = frozen
        assert service_figure(client, "worker_stalls") == 1
        await until(lambda: not alive(pid))  # killed and reaped, not left stopped
        assert await client.submit(Slow("after"), timeout=300) == "done after"
        (new_pid,) = client.worker_pids()
        assert new_pid != pid
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await client.close()


# --------------------------------------------------------------------------- results are plain data


@pytest.mark.parametrize(
    ("kind", "named"),
    [("tensor", "a torch.Tensor"), ("nested", "a numpy.ndarray at the result['probs']"), ("object", "Opaque")],
)
async def test_a_result_that_is_not_plain_data_fails_naming_the_task(poison_client, kind: str, named: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 25 item 5: checked in the worker, before pickling; the worker lives on."""
    (pid,) = poison_client.worker_pids()
    with pytest.raises(ModelFailed) as info:
        await poison_client.submit(Smuggles(kind))
    assert "tests.fake_tasks:smuggles" in str(info.value) and named in str(info.value)
    assert "plain data" in str(info.value)
    assert await poison_client.submit(Smuggles("plain")) == {"top": [1, 2], "probs": [0.5, 0.25], "label": "plain"}
    assert poison_client.worker_pids() == [pid]


def test_the_boundary_refuses_torch_and_numpy_objects_whatever_the_worker_sends() -> None:
    import pickle

    import numpy
    import torch

    from bot.inference.local import BoundaryUnpickler

    for smuggled in (torch.zeros(2), numpy.zeros(2), {"deep": [numpy.float32(1.0)]}):
        with pytest.raises(pickle.UnpicklingError, match="results must be plain data"):
            BoundaryUnpickler(io.BytesIO(pickle.dumps(("done", 1, [(1, True, smuggled)], {})))).load()
    plain = ("done", 1, [(1, True, {"top": [1.0]})], {})
    assert BoundaryUnpickler(io.BytesIO(pickle.dumps(plain))).load() == plain


NO_TORCH_IN_THE_BOT = """
import asyncio, json, sys
from bot.config import parse_config
from bot.inference.local import LocalInferenceClient
from bot.inference.registry import BUILTIN_ROLES
from tests.fake_tasks import Smuggles

async def main():
    config = parse_config(json.loads(sys.argv[1]), source="test")
    client = LocalInferenceClient(config, {r.name: r for r in BUILTIN_ROLES})
    outcomes = {}
    try:
        for kind in ("tensor", "nested", "plain"):
            try:
                outcomes[kind] = "answered: " + repr(await client.submit(Smuggles(kind), timeout=240))
            except Exception as exc:
                outcomes[kind] = type(exc).__name__ + ": " + str(exc)
    finally:
        await client.close()
    print(json.dumps({"outcomes": outcomes, "heavy": sorted({"torch", "numpy"} & set(sys.modules))}))

asyncio.run(main())
"""


def test_a_task_returning_a_tensor_never_brings_torch_into_the_bot_process(cache_dir: Path) -> None:
    """Issue 25 item 5: before, the tensor was unpickled in the bot (torch imported, printed as "tensor(...)")."""
    config = {
        "inference": {"cache_dir": str(cache_dir), "offline": "always"},
        "bot": {"log_level": "WARNING"},
    }
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_IN_THE_BOT, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["outcomes"]["tensor"].startswith("ModelFailed: The task tests.fake_tasks:smuggles returned a torch")
    assert result["outcomes"]["nested"].startswith("ModelFailed: ") and "numpy.ndarray" in result["outcomes"]["nested"]
    assert "'label': 'plain'" in result["outcomes"]["plain"]
