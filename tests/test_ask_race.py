"""Two ``lmbot ask`` racing to leave a warm lmbot behind: exactly one starts, and both asks
that follow are answered by it (bot/frontends/ask.py: the asker takes the lock and hands it to its child)."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Config
from bot.frontends import ask
from tests.conftest import make_config


def warm_children() -> list[int]:
    """This process's children that run ``python -m bot.ask`` (warm lmbots, starting or serving)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"bot.frontends.ask" in cmdline:
            found.append(int(entry.name))
    return found


def until(attempt: Callable[[], ask.Answer | None], limit_s: float = 120) -> ask.Answer:
    """``attempt()`` again until it gives an answer (the warm lmbot listens once its app is up)."""
    deadline = time.monotonic() + limit_s
    while (answer := attempt()) is None:
        assert time.monotonic() < deadline, "the warm lmbot never listened"
        time.sleep(0.05)
    return answer


@pytest.fixture
def config(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    config = make_config(cache_dir, {})
    yield config
    paths = ask.warm_paths(config)
    assert paths is not None
    ask.stop_warm(paths, wait_s=60)


def test_two_asks_racing_start_exactly_one_warm_lmbot_and_both_are_answered(config: Config) -> None:
    paths = ask.warm_paths(config)
    assert paths is not None
    stamp = ask.fingerprint(config)
    go = threading.Barrier(2)

    def leave_warm() -> None:
        go.wait(30)
        ask.start_warm(config, stamp, [], keep_alive=120, paths=paths)

    racers = [threading.Thread(target=leave_warm) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert len(warm_children()) == 1  # the loser started nothing (it used to start one that waited 30 s)
    for line in ("/help", "/tokenize text:hello"):
        request = ask.AskRequest(line, as_json=False, out_dir="out", colour=False, save_images=False, cwd=".")
        answer = until(functools.partial(ask.ask_warm, config, request, paths, stamp))  # None until it listens
        assert answer.rc == 0 and answer.stdout, answer
    assert len(warm_children()) == 1


def test_an_ask_that_finds_the_lock_taken_but_not_yet_named_starts_nothing(config: Config) -> None:
    """The racer that lost reads the lock file between the winner's truncate and its write: an
    empty file is a winner still writing, not other settings, so the loser waits for the name."""
    import fcntl

    paths = ask.warm_paths(config)
    assert paths is not None
    stamp = ask.fingerprint(config)
    with open(paths.lock, "a+", encoding="utf-8") as winner:
        fcntl.flock(winner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        winner.truncate(0)
        winner.flush()

        def name_it() -> None:
            winner.write(stamp)
            winner.flush()

        naming = threading.Timer(0.3, name_it)  # the winner's write, after the loser's first read
        naming.start()
        try:
            ask.start_warm(config, stamp, [], keep_alive=120, paths=paths)
            assert warm_children() == []  # it used to read "" as other settings and start its own
        finally:
            naming.join()
