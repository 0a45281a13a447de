"""`lmbot` end to end in subprocesses: exit codes, JSON, images, console."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugin_fixtures import BROKEN_IMPORT, install_plugin


def run(args: list[str], cwd: Path, stdin: str | None = None, extra_path: Path | None = None, timeout: int = 180):  # type: ignore[no-untyped-def]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def workdir(tmp_path: Path, cache_dir: Path) -> Path:
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[bot]\nlog_level = "WARNING"\n', encoding="utf-8"
    )
    return tmp_path


def test_ask_help_and_plugins(workdir: Path) -> None:
    done = run(["ask", "/help"], workdir)
    assert done.returncode == 0, done.stderr
    assert "/nexttoken prompt:<text>" in done.stdout
    done = run(["ask", "/plugins", "--json"], workdir)
    assert done.returncode == 0
    body = json.loads(done.stdout)
    assert body["ok"] is True
    assert {"core", "nexttoken"} <= {p["name"] for p in body["data"]["plugins"]}


def test_lmbot_plugins_lists_every_builtin(workdir: Path) -> None:
    done = run(["plugins"], workdir)
    assert done.returncode == 0
    builtins = [p.stem for p in (Path(__file__).parent.parent / "plugins").glob("[a-z]*.py")]
    assert builtins
    for name in builtins:
        assert name in done.stdout


def test_exit_codes(workdir: Path) -> None:
    usage = run(["ask", "/nexttoken k:3"], workdir)
    assert usage.returncode == 2
    assert "needs `prompt`" in usage.stderr and "Usage: /nexttoken prompt:<text>" in usage.stderr
    bad_input = run(["ask", "/nexttoken prompt:hello k:99"], workdir)
    assert bad_input.returncode == 1
    assert "`k` must be at most 25" in bad_input.stdout
    (workdir / "bad.toml").write_text("[inference]\nworkers = 0\n")
    config = run(["ask", "/help", "--config", "bad.toml"], workdir)
    assert config.returncode == 2
    assert (
        config.stderr.strip()
        == "lmbot: bad.toml: `inference.workers`: input should be greater than or equal to 1 (got 0)"
    )


def test_plugin_broken_on_import_is_listed_while_others_answer(workdir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "lmbot_broken_cli", BROKEN_IMPORT)
    done = run(["plugins"], workdir, extra_path=site)
    assert done.returncode == 0
    line = next(line for line in done.stdout.splitlines() if "lmbot_broken_cli" in line)
    assert "failed: RuntimeError: this plugin is broken on purpose" in line
    assert run(["ask", "/help"], workdir, extra_path=site).returncode == 0


def test_console_reads_piped_commands(workdir: Path) -> None:
    done = run(["console"], workdir, stdin="/help command:nexttoken\n/nexttoken k:3\n/nope\n")
    assert done.returncode == 0
    assert "/nexttoken prompt:<text>" in done.stdout
    assert "needs `prompt`" in done.stdout
    assert "There is no /nope command" in done.stdout


def test_ask_nexttoken_on_the_offline_model(workdir: Path, smollm_dir: Path) -> None:
    """The README's main job: the packaged causal LM, offline, through the service."""
    done = run(["ask", "/nexttoken prompt:The capital of France is k:5", "--json"], workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    body = json.loads(done.stdout)
    top = body["data"]["top"]
    assert top[0]["token"] == " Paris"
    assert abs(top[0]["prob"] - 0.7725) < 0.01
    assert "SmolLM2" in body["data"]["model"]
    assert body["buttons"][0] == {"label": "+ ␣Paris", "command": '/nexttoken prompt:"The capital of France is Paris"'}
    image = workdir / body["images"][0]
    assert image.read_bytes().startswith(b"\x89PNG")


def test_a_model_backed_answer_leaves_the_terminal_quiet(workdir: Path, smollm_dir: Path) -> None:
    """No loading bars, INFO lines or library warnings around an answer; -v shows the logs."""
    (workdir / "config.toml").write_text(
        (workdir / "config.toml").read_text().replace('log_level = "WARNING"', 'log_level = "INFO"'), encoding="utf-8"
    )
    done = run(["ask", "/adapt text:great product"], workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    verbose = run(["ask", "-v", "/nexttoken prompt:hello"], workdir)
    assert verbose.returncode == 0
    assert "loaded SmolLM2" in verbose.stderr


def test_json_answers_usage_and_config_errors_as_json(workdir: Path) -> None:
    usage = run(["ask", "--json", "/nexttoken k:3"], workdir)
    assert usage.returncode == 2 and usage.stderr == ""
    body = json.loads(usage.stdout)
    assert body["ok"] is False and body["usage_error"] is True and "needs `prompt`" in body["text"]
    (workdir / "bad.toml").write_text("[inference]\nworkers = 0\n")
    config = run(["ask", "--json", "/help", "--config", "bad.toml"], workdir)
    assert config.returncode == 2
    assert "`inference.workers`" in json.loads(config.stdout)["text"]


def test_a_metrics_port_in_use_is_one_line_for_run_and_no_matter_for_ask(workdir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = (workdir / "config.toml").read_text()
        (workdir / "config.toml").write_text(
            config.replace("[inference]\n", f"[inference]\nmetrics_port = {port}\n"), encoding="utf-8"
        )
        done = subprocess.run(
            [sys.executable, "-m", "bot.cli", "run"],
            cwd=workdir,
            env=dict(os.environ, LMBOT_DISCORD_TOKEN="x"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"lmbot: config.toml: `inference.metrics_port`: port {port} on 127.0.0.1 is already in use "
            "(another lmbot? pick a free port or 0 to turn metrics off)"
        ]
        assert run(["ask", "/tokenize text:hello"], workdir).returncode == 0


def test_processes_tests_start_are_loopback_only(tmp_path: Path) -> None:
    # Checked by inspection: trying a real outside address would send a packet if the guard were broken.
    code = "import socket; print(getattr(socket.socket.connect, 'guarded', False))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


def test_console_presses_buttons_by_number(workdir: Path) -> None:
    done = run(["console"], workdir, stdin="/topic name:nsp\n2\n2\n9\n")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "[1] Try it   → /topic try:nsp" in out and "[2] Quiz me  → /quiz topic:nsp" in out
    assert "→ /quiz topic:nsp\nQuiz: Next sentence prediction" in out  # 2 pressed "Quiz me"
    # 2 answered B: the answer carries the question's signed token and the letter.
    assert re.search(r"→ /quiz answer:nsp\.\d+\.[\w-]+\.[\w-]+\.B\n.*: (Correct!|Not quite)", out)
    assert "There is no button 9; the last reply has 3." in out  # the answer's own buttons
