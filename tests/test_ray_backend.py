"""Runs the Ray suites against real local Ray instances, loopback only.

tests/ray_suite.py: one bot process's client on a Ray it starts itself;
tests/ray_shared_suite.py: several bot processes sharing one Ray cluster.

Ray picks the machine's network address for its processes unless none exists,
so the suite runs inside a new network namespace with only ``lo`` (``unshare -n``,
which needs root or user namespaces). Where that is impossible the tests are
skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _loopback_only_prefix() -> list[str] | None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return None
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"] if probe.returncode == 0 else None


def _run_suite(suite: str, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    prefix = _loopback_only_prefix()
    if prefix is None:
        pytest.skip("cannot make a loopback-only network namespace here (unshare -n needs root)")
    # Ray's memory monitor kills workers when the whole host is nearly full: on a shared test
    # machine that is other jobs' memory, not this suite's.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", RAY_memory_monitor_refresh_ms="0")
    # Its own pytest temp folder: the default one is shared with (and cleaned by) other runs.
    basetemp = f"--basetemp={tmp_path / 'suite'}"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", basetemp, suite]
    done = subprocess.run([*prefix, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def test_ray_backend_suite_in_a_loopback_only_namespace(tmp_path: Path) -> None:
    _run_suite("tests/ray_suite.py", tmp_path)


def test_bot_processes_sharing_a_ray_cluster_in_a_loopback_only_namespace(tmp_path: Path) -> None:
    _run_suite("tests/ray_shared_suite.py", tmp_path)
