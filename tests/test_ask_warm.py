"""`lmbot ask` and the warm lmbot it leaves behind (bot/frontends/ask.py), end to end in subprocesses.

Every test gives the warm lmbot a private runtime folder (XDG_RUNTIME_DIR) and stops it,
and its workers, when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bot import Reply
from bot.config import ConfigError, parse_config
from bot.frontends import ask
from tests.plugin_helpers import causal_reference

PROMPT = "The capital of France is"
ASK = f'/nexttoken prompt:"{PROMPT}" k:5'


class Bench:
    """A working folder with its config, a runtime folder, and the warm lmbots started there."""

    def __init__(self, root: Path, cache_dir: Path, model: Path) -> None:
        self.dir = root / "work"
        self.dir.mkdir()
        self.run_dir = root / "run"
        self.run_dir.mkdir()
        self.cache_dir = cache_dir
        self.model = model
        self.keep_alive = "120"
        self.extra_env: dict[str, str] = {}
        self.write_config()

    def write_config(self, extra: str = "") -> None:
        (self.dir / "config.toml").write_text(
            f'[inference]\ncache_dir = "{self.cache_dir}"\noffline = "always"\n{extra}'
            f'[models]\ncausal_lm = "{self.model}"\n',
            encoding="utf-8",
        )

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            LMBOT_ASK_KEEP_ALIVE_S=self.keep_alive,
            XDG_RUNTIME_DIR=str(self.run_dir),
            PYTHONIOENCODING="utf-8",
            **self.extra_env,
        )

    def ask(self, *args: str, timeout: int = 180, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # -P as the `lmbot` script: the working folder is not on sys.path.
            [sys.executable, "-P", "-m", "bot.frontends.cli", "ask", *args],
            cwd=cwd or self.dir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "bot.frontends.cli", "ask", *args],
            cwd=self.dir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def folder(self) -> Path:
        return self.run_dir / f"lmbot-{os.getuid()}"

    def logs(self) -> str:
        return "".join(p.read_text(encoding="utf-8") for p in sorted(self.folder.glob("ask-*.log")))

    def sockets(self) -> list[Path]:
        return sorted(self.folder.glob("ask-*.sock"))

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"warm lmbot (\d+) listening", self.logs())]

    def answered(self) -> int:
        return len(re.findall(r"answered /", self.logs()))

    def stop_all(self) -> None:
        self.ask("--stop", timeout=60)
        # Any warm lmbot of this test, logged or not (one may still be waiting for the lock):
        # it leads its own session, and its workers are in that group too.
        mark = f"XDG_RUNTIME_DIR={self.run_dir}".encode()
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                ours = proc.name.isdigit() and b"bot.frontends.ask" in (proc / "cmdline").read_bytes()
                if ours and mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.killpg(int(proc.name), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for init to reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(check: Callable[[], object], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(0.1)


@pytest.fixture
def bench(tmp_path: Path, cache_dir: Path, tiny_gpt2: Path) -> Iterator[Bench]:
    b = Bench(tmp_path, cache_dir, tiny_gpt2)
    yield b
    b.stop_all()


def top(done: subprocess.CompletedProcess[str]) -> list[tuple[int, float]]:
    assert done.returncode == 0, done.stderr[-2000:]
    return [(t["id"], t["prob"]) for t in json.loads(done.stdout)["data"]["top"]]


def test_the_ask_after_a_model_ask_is_answered_warm_with_the_same_numbers(bench: Bench, tiny_gpt2: Path) -> None:
    cold = bench.ask("--json", ASK)
    wait_for(bench.pids)  # the first ask needed a model: it left a warm lmbot
    assert bench.answered() == 0
    warm = bench.ask("--json", ASK)
    assert bench.answered() == 1, bench.logs()
    assert top(warm) == top(cold)
    want = torch.topk(causal_reference(tiny_gpt2, PROMPT), 5)
    assert [i for i, _ in top(warm)] == want.indices.tolist()
    assert [p for _, p in top(warm)] == pytest.approx(want.values.tolist(), abs=1e-5)
    # Images land in the asker's folder, named relative to it as a cold ask names them.
    image = json.loads(warm.stdout)["images"][0]
    assert not Path(image).is_absolute() and (bench.dir / image).read_bytes().startswith(b"\x89PNG")

    # Text, usage errors and exit codes are the same as in a cold ask.
    text = bench.ask(ASK)
    assert text.returncode == 0 and text.stdout.startswith("Next token") and "\x1b[" not in text.stdout
    usage = bench.ask("/nexttoken k:3")
    assert usage.returncode == 2 and "needs `prompt`" in usage.stderr and usage.stdout == ""
    bad = bench.ask("/nexttoken prompt:hello k:99")
    assert bad.returncode == 1
    assert bench.answered() == 4
    assert len(bench.pids()) == 1

    # Two asks at once are both answered.
    together = [bench.popen("--json", ASK) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in together]
    assert all(p.returncode == 0 for p in together), outs
    assert [json.loads(o)["data"]["top"][0]["id"] for o, _ in outs] == [want.indices[0].item()] * 2
    assert bench.answered() == 6

    (pid,) = bench.pids()
    stopped = bench.ask("--stop")
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped the warm lmbot (pid {pid})"
    wait_for(lambda: not alive(pid), 30)
    assert bench.sockets() == []
    assert bench.ask("--stop").stdout.strip() == "no warm lmbot was running"


def test_asks_that_leave_no_warm_lmbot(bench: Bench) -> None:
    """No model needed, --cold, -v (the logs are wanted) or keep-alive 0: nothing stays behind."""
    for args in (["/help"], ["--cold", ASK], ["-v", ASK]):
        done = bench.ask(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    bench.keep_alive = "0"
    assert bench.ask(ASK).returncode == 0
    # An ask that leaves a warm lmbot creates its log before it exits.
    assert not bench.folder.exists() or list(bench.folder.glob("ask-*.log")) == []


def test_a_changed_setting_replaces_the_warm_lmbot(bench: Bench) -> None:
    bench.ask(ASK)
    wait_for(bench.pids)
    (old,) = bench.pids()
    bench.write_config("max_new_tokens = 32\n")  # any change to the effective config
    changed = bench.ask("--json", ASK)
    assert changed.returncode == 0, changed.stderr[-2000:]
    wait_for(lambda: not alive(old), 30)
    wait_for(lambda: [p for p in bench.pids() if p != old])
    assert bench.answered() == 0  # the stale one answered nothing; the asker did
    again = bench.ask("--json", ASK)
    assert top(again) == top(changed) and bench.answered() == 1


def test_a_variable_a_plugin_declared_replaces_the_warm_lmbot(bench: Bench) -> None:
    """The score store's plugins declare libpq's PG* login (register_environment): a warm lmbot
    started under another login is replaced; a variable nobody declared changes nothing."""
    bench.ask(ASK)
    wait_for(bench.pids)
    (old,) = bench.pids()
    declared = json.loads((bench.sockets()[0].with_name(bench.sockets()[0].name + ".env")).read_text())
    assert "PG*" in declared
    bench.extra_env = {"SOME_TOOL_SETTING": "1"}
    assert bench.ask("--json", ASK).returncode == 0
    assert bench.pids() == [old] and bench.answered() == 1  # answered warm
    bench.extra_env = {"PGHOST": "elsewhere.example"}
    changed = bench.ask("--json", ASK)
    assert changed.returncode == 0, changed.stderr[-2000:]
    wait_for(lambda: not alive(old), 30)
    wait_for(lambda: [p for p in bench.pids() if p != old])  # and the asker left one of its own


def test_a_dead_warm_lmbot_never_loses_an_ask(bench: Bench) -> None:
    first = bench.ask("--json", ASK)
    wait_for(bench.pids)
    (pid,) = bench.pids()
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 30)
    assert bench.sockets()  # the socket file of a killed process stays behind
    after = bench.ask("--json", ASK)
    assert top(after) == top(first) and after.stderr == ""  # answered here, as quietly
    wait_for(lambda: [p for p in bench.pids() if p != pid])


def test_a_package_named_bot_in_the_working_folder_changes_nothing(bench: Bench) -> None:
    """The warm lmbot starts with -P: the asker's folder is not on its import path."""
    (bench.dir / "bot").mkdir()
    (bench.dir / "bot" / "__init__.py").write_text("raise SystemExit('the wrong bot package')\n")
    first = bench.ask("--json", ASK)
    wait_for(bench.pids)
    assert top(bench.ask("--json", ASK)) == top(first) and bench.answered() == 1


async def until(check: Callable[[], object]) -> None:
    while not check():  # noqa: ASYNC110 - polling what another thread or a file shows
        await asyncio.sleep(0.01)


async def test_a_stopping_warm_lmbot_finishes_the_asks_it_took_and_takes_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    config = parse_config({"inference": {"cache_dir": str(tmp_path / "cache")}})
    paths = ask.warm_paths(config)
    assert paths is not None
    release, closed = asyncio.Event(), asyncio.Event()

    class SlowApp:
        inference = SimpleNamespace()  # no load_role: nothing to preload
        registry = SimpleNamespace(environment=set())  # no plugin declares a variable

        async def execute_line(self, line: str) -> Reply:
            await release.wait()
            return Reply(text=f"done: {line}")

        async def close(self) -> None:
            closed.set()

    server = ask.WarmServer(config, "stamp", keep_alive=60, paths=paths)
    with open(paths.lock, "a") as lock:  # noqa: ASYNC230 - a lock file, opened once
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the warm lmbot's process holds it
        running = asyncio.create_task(server.run(SlowApp(), []))  # type: ignore[arg-type]
        await until(paths.socket.exists)
        request = ask.AskRequest("/slow", as_json=False, out_dir=str(tmp_path), colour=False)
        taken = asyncio.create_task(asyncio.to_thread(ask.ask_warm, config, request, paths, "stamp"))
        await until(lambda: server.in_flight)
        said = await asyncio.to_thread(ask.stop_warm, paths, 0)
        assert said == f"the warm lmbot (pid {os.getpid()}) stops once the asks it is answering are done"
        await until(lambda: not paths.socket.exists())
        # A later ask is not taken (its asker answers it), and the app stays open meanwhile.
        assert await asyncio.to_thread(ask.ask_warm, config, request, paths, "stamp") is None
        assert not closed.is_set()
        release.set()
        answer = await taken
        assert answer is not None and answer.rc == 0 and answer.stdout.startswith("done: /slow")
        await running
        assert closed.is_set()


def test_an_idle_warm_lmbot_stops_itself(bench: Bench) -> None:
    bench.keep_alive = "2"
    bench.ask(ASK)
    wait_for(bench.pids)
    (pid,) = bench.pids()
    wait_for(lambda: not alive(pid), 60)
    assert "no ask for" in bench.logs() and bench.sockets() == []


def test_keep_alive_settings_are_checked(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    bench.keep_alive = "soon"
    done = bench.ask(ASK)
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "lmbot: LMBOT_ASK_KEEP_ALIVE_S: must be a number of seconds from 0 to 86400 (got 'soon')"
    )
    with pytest.raises(ConfigError, match="ask.keep_alive_s"):
        parse_config({"ask": {"keep_alive_s": -1}})
    monkeypatch.delenv(ask.KEEP_ALIVE_ENV, raising=False)
    assert ask.keep_alive_s(parse_config({})) == 300
    assert ask.keep_alive_s(parse_config({"ask": {"keep_alive_s": 0}})) == 0


def test_the_fingerprint_follows_what_answers_depend_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    config = parse_config({"inference": {"cache_dir": str(cache_dir)}})
    monkeypatch.chdir(tmp_path)
    base = ask.fingerprint(config)
    assert ask.fingerprint(config) == base
    assert ask.fingerprint(parse_config({"inference": {"cache_dir": str(cache_dir), "threads": 1}})) != base
    monkeypatch.setenv("LMBOT_ENGINE", "torch")
    assert ask.fingerprint(config) != base
    monkeypatch.delenv("LMBOT_ENGINE")
    # Another folder is the same setting (each ask names its folder)...
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ask.fingerprint(config) == base
    # ...unless the config names a relative path, which each folder resolves to its own file.
    relative = parse_config({"inference": {"cache_dir": str(cache_dir)}, "models": {"causal_lm": "./my-model"}})
    assert ask.relative_config_values(relative) == ["./my-model"]
    here = ask.fingerprint(relative)
    monkeypatch.chdir(tmp_path)
    assert ask.fingerprint(relative) != here
    assert ask.relative_config_values(config) == []  # the defaults name no relative path


def test_no_warm_lmbot_in_a_folder_others_may_enter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    config = parse_config({})
    paths = ask.warm_paths(config)
    assert paths is not None and paths.socket.parent == tmp_path / f"lmbot-{os.getuid()}"
    assert paths.socket.parent.stat().st_mode & 0o777 == 0o700
    paths.socket.parent.chmod(0o777)
    assert ask.warm_paths(config) is None


def test_asks_from_two_folders_share_one_warm_lmbot(bench: Bench) -> None:
    """A second folder with the same settings is answered by the same warm lmbot; its images land there."""
    first = bench.ask("--json", ASK)
    wait_for(bench.pids)
    (pid,) = bench.pids()
    other = bench.dir.parent / "other"
    other.mkdir()
    (other / "config.toml").write_text((bench.dir / "config.toml").read_text(), encoding="utf-8")
    there = bench.ask("--json", ASK, cwd=other)
    assert top(there) == top(first) and bench.answered() == 1, bench.logs()
    image = json.loads(there.stdout)["images"][0]
    assert not Path(image).is_absolute() and (other / image).read_bytes().startswith(b"\x89PNG")
    again = bench.ask("--json", ASK)  # and the first folder still has it
    assert top(again) == top(first) and bench.answered() == 2 and bench.pids() == [pid] and alive(pid)


def test_an_edited_topic_toml_is_shown_on_the_next_ask(bench: Bench) -> None:
    """Data files are part of the fingerprint: a lecturer's edit is the next ask's answer (issue 23)."""
    # The lmbot processes run a copy of lmbot's code and data, and the edit below is the copy's: the
    # checkout's own file stays as it is for the tests running beside this one (and a second run).
    checkout, source = Path(ask.__file__).resolve().parents[2], bench.dir.parent / "source"
    for package in ("bot", "plugins"):
        shutil.copytree(checkout / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    bench.extra_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH")) if p)
    topic = source / "plugins" / "data" / "topics" / "ngrams.toml"
    original = topic.read_bytes()
    bench.ask(ASK)
    wait_for(bench.pids)
    before = bench.ask("--json", "/topic name:ngrams")
    assert bench.answered() == 1, bench.logs()  # answered warm
    title = json.loads(before.stdout)["title"]
    assert "LLMs vs classical statistical models" in title
    topic.write_bytes(original.replace(b'title = "LLMs vs classical', b'title = "Edited: LLMs vs classical', 1))
    after = bench.ask("--json", "/topic name:ngrams")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["title"] == title.replace("LLMs vs classical", "Edited: LLMs vs classical")
