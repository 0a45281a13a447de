"""The hub path users' hosts take by default, against a fake hub on 127.0.0.1.

``lmbot models fetch`` downloads with a progress bar, ``lmbot models`` then says the
model is downloaded, and the bot answers from the download with the hub unplugged.
Without a fetch, the first request downloads inside the worker; if that outlasts
the request's deadline the reply says the model is still loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.fake_hub import FakeHub
from tests.plugin_helpers import causal_reference

REPO = "lmbot-test/tiny-gpt2"


def lmbot(args: list[str], cwd: Path, hub_url: str, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(cwd / "hf"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONIOENCODING="utf-8")
    env["COLUMNS"] = "1000"  # `lmbot models` as one row a line, whatever width the test run has
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def write_config(folder: Path, cache_dir: Path, timeout_s: float = 60) -> Path:
    (folder / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "auto"\nrequest_timeout_s = {timeout_s}\n'
        f'[models]\ncausal_lm = "{REPO}"\n[bot]\nlog_level = "WARNING"\n',
        encoding="utf-8",
    )
    return folder


def assert_top3_equal_reference(stdout: str, model_folder: Path) -> None:
    data = json.loads(stdout)["data"]
    want = torch.topk(causal_reference(model_folder, "hello"), 3)
    assert [t["id"] for t in data["top"]] == want.indices.tolist()
    assert [t["prob"] for t in data["top"]] == pytest.approx(want.values.tolist(), abs=1e-5)


def test_fetch_shows_progress_then_the_bot_runs_from_the_download_offline(
    tmp_path: Path, cache_dir: Path, tiny_gpt2: Path
) -> None:
    workdir = write_config(tmp_path, cache_dir)
    with FakeHub({REPO: tiny_gpt2}) as hub:
        before = lmbot(["models"], workdir, hub.url)
        assert "hub, not downloaded yet" in before.stdout.split("causal_lm", 1)[1].splitlines()[0]
        fetched = lmbot(["models", "fetch", "causal_lm"], workdir, hub.url)
        assert fetched.returncode == 0, fetched.stderr
        assert f"causal_lm: fetching {REPO}" in fetched.stdout and "causal_lm: ready in" in fetched.stdout
        assert "Fetching" in fetched.stderr and "100%" in fetched.stderr  # the progress bar
        assert "HTTP Request" not in fetched.stderr  # per-request logging would bury it
        assert any(path.endswith("/model.safetensors") for path in hub.downloads())
        listed = lmbot(["models"], workdir, hub.url)
        assert "hub, downloaded" in listed.stdout.split("causal_lm", 1)[1].splitlines()[0]
        served = len(hub.requests)
        # The hub is still up but the bot is told it is offline: it must not ask it anything.
        answer = lmbot(["ask", "--json", "/nexttoken prompt:hello k:3"], workdir, hub.url, offline=True)
        assert answer.returncode == 0, answer.stderr
        assert len(hub.requests) == served
    assert_top3_equal_reference(answer.stdout, tiny_gpt2)


def test_first_use_downloads_in_the_worker(tmp_path: Path, cache_dir: Path, tiny_gpt2: Path) -> None:
    workdir = write_config(tmp_path, cache_dir)
    with FakeHub({REPO: tiny_gpt2}) as hub:
        answer = lmbot(["ask", "--json", "/nexttoken prompt:hello k:3"], workdir, hub.url)
        assert answer.returncode == 0, answer.stderr
        assert any(path.endswith("/model.safetensors") for path in hub.downloads())
    assert_top3_equal_reference(answer.stdout, tiny_gpt2)


def test_a_download_longer_than_the_deadline_is_explained(tmp_path: Path, cache_dir: Path, tiny_gpt2: Path) -> None:
    # Long enough for the worker to start (torch import) on a busy machine, far shorter than the download.
    workdir = write_config(tmp_path, cache_dir, timeout_s=10)
    with FakeHub({REPO: tiny_gpt2}, slow_files={"model.safetensors": 30}) as hub:
        answer = lmbot(["ask", "/nexttoken prompt:hello"], workdir, hub.url)
    assert answer.returncode == 1
    assert "The `causal_lm` model is still loading (the first use may download it)" in answer.stdout
    assert "Traceback" not in answer.stderr


def test_fetch_errors_are_one_line_each(
    tmp_path: Path, cache_dir: Path, tiny_gpt2: Path, held_port: Callable[[], int]
) -> None:
    workdir = write_config(tmp_path, cache_dir)
    with FakeHub({"someone-else/model": tiny_gpt2}) as hub:
        missing = lmbot(["models", "fetch", "causal_lm"], workdir, hub.url)
    assert missing.returncode == 1
    lines = [line for line in missing.stderr.splitlines() if line.startswith("causal_lm:")]
    assert len(lines) == 1 and f"could not fetch {REPO}" in lines[0]

    down = lmbot(["models", "fetch", "causal_lm"], workdir, f"http://127.0.0.1:{held_port()}")
    assert down.returncode == 1
    assert "the Hugging Face hub cannot be reached from here" in down.stderr

    unknown = lmbot(["models", "fetch", "no_such_role"], workdir, f"http://127.0.0.1:{held_port()}")
    assert unknown.returncode == 2 and "unknown role 'no_such_role' (roles: causal_lm," in unknown.stderr
