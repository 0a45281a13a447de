"""The fault benchmark (bench/faults.py) runs end to end in its quick mode, on the tiny GPT-2.

Not a performance test: it keeps the benchmark from rotting as the service, the
plugins and the storage change, and checks the one figure that holds on any
machine, however loaded: every request gets a reply (nothing lost).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"baseline", "kill", "sigstop", "sigstop-forever", "poison", "overflow", "slow-flood", "locked-db"}
SIGNAL_ONLY = {"baseline", "kill", "sigstop", "sigstop-forever"}  # faults that send no requests of their own


@pytest.mark.timeout(1200)
def test_fault_benchmark_quick_mode_answers_every_request(tiny_gpt2: Path, cache_dir: Path) -> None:
    command = [sys.executable, "bench/faults.py", "--quick", "--model", str(tiny_gpt2), "--cache-dir", str(cache_dir)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.strip().splitlines()
    figures = json.loads(lines[-1])

    assert set(figures["scenarios"]) == SCENARIOS
    assert figures["lost"] == 0, run.stdout
    for name, scenario in figures["scenarios"].items():
        assert scenario["lost"] == 0, (name, scenario)
        ordinary = scenario["kinds"]["ordinary"]
        assert ordinary["sent"] > 0 and ordinary["ok"] > 0, (name, ordinary)
        for kind, row in scenario["kinds"].items():
            # Every request is counted once: answered ok, failed with a reason, or lost.
            assert row["sent"] == row["ok"] + row["failed"] + row["lost"], (name, kind, row)
            assert sum(row["failed_by_reason"].values()) == row["failed"], (name, kind, row)
        # The fault's own traffic was sent (and, as lost is 0, answered) too.
        assert len(scenario["kinds"]) > 1 or name in SIGNAL_ONLY, (name, scenario)

    poison = figures["scenarios"]["poison"]["kinds"]["poison"]
    # Lone surrogates, control characters and 5,000 characters are refused as bad input by both commands.
    assert poison["failed_by_reason"].get("bad input", 0) >= 8, poison
    locked = figures["scenarios"]["locked-db"]["kinds"]
    assert locked["quiz answers (after)"]["ok"] == locked["quiz answers (after)"]["sent"] > 0, locked
    # The printed table names every scenario.
    table = "\n".join(lines[:-1])
    for name in SCENARIOS:
        assert f"== {name}:" in table
