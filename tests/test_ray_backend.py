"""Runs tests/ray_suite.py against a real local Ray instance, loopback only.

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


def test_ray_backend_suite_in_a_loopback_only_namespace() -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    prefix = _loopback_only_prefix()
    if prefix is None:
        pytest.skip("cannot make a loopback-only network namespace here (unshare -n needs root)")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ray_suite.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
