"""Ctrl-C in the first second of a cold ``lmbot ask``, while its worker starts: one line, exit 130.

A terminal's Ctrl-C goes to the whole process group: the ask and the worker it has just started
(still importing lmbot and torch). The test interrupts exactly then: the ask writes each started
worker's pid to a FIFO (``LMBOT_TEST_WORKER_SPAWNED``) and the test sends SIGINT to the group on
reading it, an event rather than a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from bot.inference.local import SPAWNED_HOOK_ENV


def test_ctrl_c_while_the_worker_starts_is_one_line_and_exit_130(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[bot]\nlog_level = "WARNING"\n',
        encoding="utf-8",
    )
    fifo = tmp_path / "spawned"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # read-write: the ask's open never waits, no EOF between
    try:
        ask = subprocess.Popen(
            [sys.executable, "-m", "bot.frontends.cli", "ask", "--cold", "/nexttoken prompt:The capital of France is"],
            cwd=tmp_path,
            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **{SPAWNED_HOOK_ENV: str(fifo)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        try:
            readable, _, _ = select.select([reader], [], [], 120)
            assert readable, "the ask never started a worker"
            worker = int(os.read(reader, 64).split()[0])
            assert os.getpgid(worker) == ask.pid  # the worker is in the group a terminal's Ctrl-C reaches
            os.killpg(ask.pid, signal.SIGINT)
            out, err = ask.communicate(timeout=120)
        finally:
            if ask.poll() is None:
                ask.kill()
                ask.communicate()
    finally:
        os.close(reader)
    assert ask.returncode == 130, err[-3000:]
    said = err.strip().splitlines()
    assert said[-1] == "lmbot: interrupted" and "Traceback" not in err, err[-3000:]
    # Besides it, at most the status line of a first use ("converting the packaged model ..."): no worker
    # died of the Ctrl-C and was replaced, and nothing was logged as an error.
    assert all(line.startswith("lmbot: converting") for line in said[:-1]), err[-3000:]
    assert out == ""
