"""The suite stays off the user's own data, and two copies of it can run at once on one machine."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

from plugins._scores import DEFAULT_DB
from tests.conftest import SESSION_HOME, USER_CACHE


def test_home_is_the_sessions_own_in_this_process_and_the_ones_it_starts() -> None:
    account_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert Path.home() == SESSION_HOME != account_home
    # The quiz's default database, the one an `lmbot` with no quiz_db set writes to.
    assert Path(os.path.expanduser(DEFAULT_DB)).is_relative_to(SESSION_HOME)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.path.expanduser('~')); print(os.environ['XDG_DATA_HOME'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.split() == [str(SESSION_HOME), str(SESSION_HOME / ".local" / "share")]


def test_the_model_cache_is_still_the_shared_one() -> None:
    """Converted models and ONNX exports are kept between runs: ~/.cache is the user's, linked."""
    assert Path(os.path.expanduser("~/.cache/lmbot")).resolve() == USER_CACHE / "lmbot"
    assert Path(os.environ["XDG_CACHE_HOME"]) == USER_CACHE
