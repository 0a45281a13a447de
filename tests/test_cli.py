"""`lmbot` end to end in subprocesses: exit codes, JSON, images, console."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.plugin_fixtures import BROKEN_IMPORT, install_plugin


def run(args: list[str], cwd: Path, stdin: str | None = None, extra_path: Path | None = None, timeout: int = 180):  # type: ignore[no-untyped-def]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def workdir(tmp_path: Path, cache_dir: Path) -> Path:
    # Quiz scores in the test's folder: no test writes to the user's ~/.local/share/lmbot.
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[bot]\nlog_level = "WARNING"\n'
        f'[plugins.options.study]\nquiz_db = "{tmp_path / "quiz.sqlite3"}"\n',
        encoding="utf-8",
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
    assert done.returncode == 1  # a CI job or deploy script notices
    assert done.stderr.strip().splitlines()[-1] == "lmbot: 1 plugin(s) failed to load: lmbot_broken_cli"
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


def test_a_metrics_port_in_use_is_one_line_and_the_bot_runs_on_without_metrics(
    workdir: Path, held_port: Callable[[], int]
) -> None:
    import socket

    from tests.test_startup_network import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = (workdir / "config.toml").read_text()
        (workdir / "config.toml").write_text(
            config.replace("[inference]\n", f"[inference]\nmetrics_port = {port}\n"), encoding="utf-8"
        )
        # The real `lmbot run`, Discord at a closed port: past the port check it goes on to log in
        # (exit 75 after its one try), where a taken port used to stop it with exit 2.
        done = cli(["run", "--attempts", "1"], workdir, held_port())
        assert done.returncode == 75, done.stderr[-3000:]
        said = [line for line in done.stderr.splitlines() if f"{port}" in line]
        assert said == [
            f"lmbot: warning: config.toml: `inference.metrics_port`: port {port} on 127.0.0.1 is already in use "
            "(another lmbot?); running without /metrics (pick a free port, or 0 to turn metrics off)"
        ]
        assert "cannot reach Discord" in done.stderr and "Traceback" not in done.stderr
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


def test_a_reader_that_goes_away_gets_no_traceback(workdir: Path) -> None:
    """`lmbot ask "/help" | head -3`: the pipe is closed before lmbot writes; it exits quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the answer is written
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "ask", "/help"],
        cwd=workdir,
        env=env,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=180,
    )
    os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


def test_no_color_and_terminals_decide_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.frontends.cli import colour_wanted

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert colour_wanted(Terminal()) is True
    assert colour_wanted(open(os.devnull, "w")) is False  # noqa: SIM115
    monkeypatch.setenv("NO_COLOR", "1")
    assert colour_wanted(Terminal()) is False
    monkeypatch.setenv("NO_COLOR", "")  # https://no-color.org: only a non-empty value counts
    assert colour_wanted(Terminal()) is True


def test_no_color_reaches_the_answer_on_a_terminal(workdir: Path) -> None:
    import pty

    def answer(extra: dict[str, str]) -> bytes:
        main_fd, child_fd = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        env.update(HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **extra)
        done = subprocess.run(
            [sys.executable, "-m", "bot.frontends.cli", "ask", "/tokenize text:unbelievable"],
            cwd=workdir,
            env=env,
            stdout=child_fd,
            stderr=subprocess.PIPE,
            timeout=180,
        )
        os.close(child_fd)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(main_fd, 1 << 16):
                out += chunk
        os.close(main_fd)
        assert done.returncode == 0, done.stderr
        return out

    assert b"\x1b[" in answer({})
    assert b"\x1b[" not in answer({"NO_COLOR": "1"})


async def test_no_images_saves_no_files_and_images_land_in_the_askers_folder(tmp_path: Path) -> None:
    """--no-images; and an ask names its own folder, so one warm lmbot serves asks from several."""
    from bot import Image, Reply
    from bot.frontends import ask

    class OneChart:
        async def execute_line(self, line: str) -> Reply:
            return Reply(text="a chart", images=[Image("chart.png", b"\x89PNG fake")])

    elsewhere = tmp_path / "elsewhere"
    request = ask.AskRequest("/chart", True, "lmbot-out", False, save_images=False, cwd=str(elsewhere))
    answer = await ask.answer_line(OneChart(), request)  # type: ignore[arg-type]
    assert json.loads(answer.stdout)["images"] == [] and not (elsewhere / "lmbot-out").exists()
    elsewhere.mkdir()
    request = ask.AskRequest("/chart", True, "lmbot-out", False, cwd=str(elsewhere))
    (shown,) = json.loads((await ask.answer_line(OneChart(), request)).stdout)["images"]  # type: ignore[arg-type]
    assert shown.startswith("lmbot-out/chart-") and (elsewhere / shown).read_bytes() == b"\x89PNG fake"


def test_every_subcommand_help_has_a_description_and_examples() -> None:
    from bot.frontends.cli import HELP, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(HELP)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert HELP[name][1].split(". ")[0][:40] in " ".join(text.split()), name
        assert "examples:\n  lmbot " in text or "examples:\n  LMBOT_" in text, name


def test_lmbot_models_fits_the_terminal(workdir: Path) -> None:
    wide = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "models"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="400"),
    )
    narrow = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "models"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="80"),
    )
    assert wide.returncode == narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in wide.stdout.splitlines()) > 80  # the table as columns
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert "role: causal_lm" in narrow.stdout and "runs as: " in narrow.stdout


def _interrupt_a_cold_ask(workdir: Path) -> tuple[int, str, bytes]:
    """Start a cold ``lmbot ask`` on a terminal, send the terminal's interrupt once its worker has
    imported torch, and return its exit status, what the terminal showed and its stdout."""
    import pty

    main_fd, child_fd = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.frontends.cli", "ask", "/nexttoken prompt:hello"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=child_fd,
        start_new_session=True,
    )
    os.close(child_fd)
    seen = b""
    while b"lmbot: answering" not in seen:
        seen += os.read(main_fd, 1 << 16)

    def worker_has_torch() -> bool:
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                if (
                    b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
                    and "torch" in Path(f"/proc/{child}/maps").read_text()
                ):
                    return True
        return False

    deadline = time.monotonic() + 120
    while not worker_has_torch():  # the worker is past its start-up: the SIGINT it ignores is the real case
        assert time.monotonic() < deadline and proc.poll() is None, "no worker started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    status = proc.wait(120)
    with contextlib.suppress(OSError):
        while chunk := os.read(main_fd, 1 << 16):
            seen += chunk
    os.close(main_fd)
    assert proc.stdout is not None
    return status, seen.decode(), proc.stdout.read()


def test_ctrl_c_during_a_cold_ask_is_one_line(workdir: Path, smollm_dir: Path) -> None:
    """Ctrl-C while the model loads: the terminal's interrupt reaches lmbot and its worker (one process
    group); lmbot says one line, the worker (which ignores SIGINT) prints nothing. The status line
    appears on a terminal meanwhile. The model can load and answer between the worker's import of
    torch and the interrupt's arrival (a cached model, a busy machine): then the case in point did
    not happen, and it is tried again."""
    for _ in range(3):
        status, text, stdout = _interrupt_a_cold_ask(workdir)
        if status != 0:
            break
        assert "Traceback" not in text, text[-3000:]  # answered before the interrupt: try again
    assert status == 130, text[-3000:]
    assert stdout == b""
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    after = text.split("\x1b[K")[-1]  # what follows the erased status line
    assert after.strip() == "lmbot: interrupted", text[-3000:]
