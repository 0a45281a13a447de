"""Several bot processes on one Ray cluster (run by tests/test_ray_backend.py).

Like tests/ray_suite.py, this file is not collected on its own: it runs inside a
loopback-only network namespace. The test starts a Ray cluster of its own (a head
process that calls ``ray.init`` and waits), then real bot processes
(tests/ray_bot_process.py) that join it through ``inference.ray_address``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAD = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.shutdown()
"""


# Ray's token authentication with a token of this module's own (not ~/.ray/auth_token, which
# other Ray users of this host share): the head requires it, and a bot process joining by
# address sends it only when told to (RAY_AUTH_MODE=token), as a real deployment must.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray cluster on 127.0.0.1 that outlives every bot process of the module; its GCS address."""
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        cwd=ROOT,
        env={**os.environ, **AUTH},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert head.stdout is not None and head.stdin is not None
    address = head.stdout.readline().strip()
    assert address, "the Ray head did not start"
    yield address
    head.stdin.close()  # the head shuts Ray down and exits
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


class BotProcess:
    """A bot process answering JSON commands (tests/ray_bot_process.py)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_bot_process", json.dumps(config)],
            cwd=ROOT,
            env={**os.environ, **AUTH},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read(timeout=120).get("ready")

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        assert got and got[0], f"no answer from bot process {self.process.pid} within {timeout} s"
        answer: dict[str, Any] = json.loads(got[0])
        return answer

    def ask(self, op: str, timeout: float = 300, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.ask("close")["ok"]
            self.process.wait(timeout=60)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def bot_config(cluster: str, cache_dir: Path, tiny_gpt2: Path) -> Iterator[Any]:
    processes: list[BotProcess] = []

    def start(**inference: Any) -> BotProcess:
        config = {
            "inference": {
                "backend": "ray",
                "ray_address": cluster,
                "ray_num_cpus": 0.1,
                "offline": "always",
                "cache_dir": str(cache_dir),
                # What these tests check is sharing, not speed: on a machine a second copy of the suite
                # loads, the Ray application took 105 s to be ready, past the default 60 s deadline.
                "request_timeout_s": 240,  # within ask()'s 300 s read
                **inference,
            },
            "models": {"causal_lm": str(tiny_gpt2)},
            "bot": {"log_level": "WARNING", "output_dir": str(cache_dir / "out")},
            "plugins": {"options": {"study": {"quiz_db": str(cache_dir / f"quiz-{len(processes)}.sqlite3")}}},
        }
        process = BotProcess(config)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.process.poll() is None:
            process.kill()


def started_together(start: Any, count: int, **inference: Any) -> list[BotProcess]:
    """``count`` bot processes started at the same moment (their first deployments race)."""
    found: list[BotProcess] = []
    threads = [threading.Thread(target=lambda: found.append(start(**inference))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == count
    return found


def ask_together(processes: list[BotProcess], op: str, **fields: Any) -> list[dict[str, Any]]:
    answers: dict[int, dict[str, Any]] = {}

    def one(index: int) -> None:
        answers[index] = processes[index].ask(op, **fields)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(processes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [answers[i] for i in range(len(processes))]


def lmbot_apps(start: Any) -> list[str]:
    """The lmbot applications on the cluster, seen by a process that deploys nothing."""
    observer = start()
    try:
        return [app for app in observer.ask("apps")["apps"] if app.startswith("lmbot-")]
    finally:
        observer.close()


def test_two_bot_processes_share_one_application(bot_config: Any) -> None:
    first, second = started_together(bot_config, 2)
    # Their first requests race to deploy: the registry lets one deploy and the other join.
    answers = ask_together([first, second], "ask", prompt="The capital of France is")
    assert all(a["ok"] for a in answers), answers
    assert answers[0]["top"] == answers[1]["top"]
    (pid,) = first.ask("pids", role="causal_lm")["pids"]
    assert second.ask("pids", role="causal_lm")["pids"] == [pid]
    assert (
        first.ask("describe", role="causal_lm")["fingerprint"]
        == second.ask("describe", role="causal_lm")["fingerprint"]
    )

    # A process with another config is refused, naming what differs; the running application stays.
    other = bot_config(max_batch_size=7)
    refused = other.ask("ask", prompt="Hello")
    assert not refused["ok"] and refused["error"] == "ClusterConfigConflict", refused
    assert "inference.max_batch_size: 64 there, 7 here" in refused["message"]
    assert "never replaced" in refused["message"]
    other.close()
    assert first.ask("pids", role="causal_lm")["pids"] == [pid]

    # The first one closing leaves the application to the second.
    first.close()
    again = second.ask("ask", prompt="The capital of France is")
    assert again["ok"] and again["top"] == answers[1]["top"]
    assert second.ask("pids", role="causal_lm")["pids"] == [pid]
    assert lmbot_apps(bot_config) == ["lmbot-causal_lm"]

    # The last one out deletes it.
    second.close()
    assert lmbot_apps(bot_config) == []


def test_a_killed_process_does_not_keep_the_application(bot_config: Any) -> None:
    crashed, survivor = started_together(bot_config, 2)
    first = crashed.ask("ask", prompt="Hello there")
    assert first["ok"], first
    assert survivor.ask("ask", prompt="Hello there")["ok"]
    assert survivor.ask("holders", app="lmbot-causal_lm")["holders"] == 2
    crashed.kill()  # no close(): its hold goes once Ray marks its job dead
    # A hang guard: Ray marks a killed job dead in seconds, slower on a loaded machine.
    deadline = time.monotonic() + 240
    while survivor.ask("holders", app="lmbot-causal_lm")["holders"] != 1:
        assert time.monotonic() < deadline, "the killed process still holds the application"
        time.sleep(1)
    assert survivor.ask("ask", prompt="Still here")["ok"]
    survivor.close()
    assert lmbot_apps(bot_config) == []
