"""A real PostgreSQL server for tests, started from Debian's `postgresql` package.

`scripts/install.sh --test` installs the package (apt) when it is missing. The server runs from a
private folder in /tmp, as an unprivileged user when the tests run as root (PostgreSQL refuses
root), and listens only on a Unix socket in that folder: nothing else on the machine can reach
it, and concurrent test runs cannot collide on a port. Tests that need it are skipped, with the
reason, where it cannot start.

Use the fixtures by importing them into a test module: ``from tests.postgres import postgres_url``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PORT = 5432  # names the socket file in the private folder; no TCP port is opened
SUPERUSER = "lmbot"


def _bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: Debian keeps them out of PATH, one folder per major version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    folder: Path
    bin_dir: Path
    run_as: str | None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.folder}&port={PORT}&user={SUPERUSER}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, user=self.run_as, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> str | None:
        """Start the server; None when it runs, else why it cannot."""
        data = self.folder / "data"
        made = self._run(
            str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if made.returncode != 0:
            return f"initdb failed: {(made.stderr or made.stdout).strip()[-300:]}"
        return self.resume()

    def resume(self) -> str | None:
        """Start the server on its existing data folder (after :meth:`stop`); None when it runs."""
        data = self.folder / "data"
        options = f"-k {self.folder} -p {PORT} -c listen_addresses= -c fsync=off -c synchronous_commit=off"
        started = self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        if started.returncode != 0:
            log = (
                (self.folder / "server.log").read_text(errors="replace")
                if (self.folder / "server.log").exists()
                else ""
            )
            return f"pg_ctl start failed: {(started.stderr or started.stdout or log).strip()[-300:]}"
        return None

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``mode``: pg_ctl's; "fast" as an operator's restart does, data kept)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (it is a dependency of lmbot: run scripts/install.sh --test)")
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (scripts/install.sh --test installs Debian's postgresql package)")
    run_as = None
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        try:
            account = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to run PostgreSQL as")
        run_as = "nobody"
    folder = Path(tempfile.mkdtemp(prefix="lmbot-pg-"))
    if run_as is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = PostgresServer(folder, bin_dir, run_as)
    problem = server.start()
    if problem is not None:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not start here: {problem}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A URL of a fresh, empty database for one test."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        # A natural-language collation, as production servers have ("amy" sorts before "Zed"):
        # the store must not depend on the server's C locale for its order.
        admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'")
    yield postgres_server.url(name)
    with contextlib.suppress(Exception), psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
