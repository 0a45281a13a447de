"""Quiz scores in a SQLite file or on a PostgreSQL server, behind one small async interface.

``[plugins.options.study] quiz_db`` is a path (SQLite, one bot process or a few on one host) or a
``postgresql://`` URL (several bot processes or hosts sharing one leaderboard). Both keep the same
rows and answer the same questions: a user's first answer to a question in a scope counts, and
the primary key makes that hold when answers from several processes arrive at the same moment.

Storage never holds up the rest of the bot. Every call runs on this module's own small thread
pool (never asyncio's shared default executor, which commands such as /tokenize use), waits at
most a second or two for a lock, and fails with :class:`ScoresUnavailable`, whose message a
student can read; the reason for the operator goes to the log. A database that cannot be used
(locked, corrupt, read-only, full disk, server down) is never written to, repaired or replaced.

The module's name starts with ``_``: the plugin host skips it, it is the study plugin's helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

DEFAULT_DB = "~/.local/share/lmbot/quiz.sqlite3"
# How long one call may wait for a lock another connection or process holds.
BUSY_TIMEOUT_S = 1.5
# A call that has waited this long in the storage pool's queue gives up before it starts.
CALL_DEADLINE_S = 3.0
# Last resort for a call stuck in the driver (a network file system, a server that stopped answering).
CALL_GUARD_S = 10.0
STORAGE_THREADS = 4
KEY_BYTES = 32
# After the key cannot be read, questions are signed with this process's own key for a while.
KEY_RETRY_S = 30.0

BUSY = "the score database is busy right now; try again in a minute"
BROKEN = "the score database is not working right now (the bot's log says why)"

T = TypeVar("T")


class ScoresUnavailable(Exception):
    """Scores could not be read or written; ``str()`` is a clause a student can read."""


def _storage_pool() -> ThreadPoolExecutor:
    # One pool for every store in the process, created on first use, kept across plugin reloads
    # (this module is not reloaded with the study plugin).
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=STORAGE_THREADS, thread_name_prefix="lmbot-scores")
        return _POOL


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


class Backend(ABC):
    """One database. Methods run on a storage thread and take the monotonic time by which they
    must give up waiting for locks; any exception means "not done" (nothing half-written)."""

    #: what the log calls it (never a password)
    description: str

    @abstractmethod
    def key(self, deadline: float) -> bytes:
        """The secret that signs quiz questions, created with the tables on first use."""

    @abstractmethod
    def record(
        self, deadline: float, scope: str, user: str, name: str, question: str, correct: bool
    ) -> tuple[bool, int, int]:
        """Store an answer; (whether it counted, right answers, answers) for the user in the scope."""

    @abstractmethod
    def score(self, deadline: float, scope: str, user: str) -> tuple[int, int]:
        """(right answers, answers) of a user in a scope."""

    @abstractmethod
    def leaderboard(self, deadline: float, scope: str, limit: int) -> list[tuple[str, int, int]]:
        """(name, right, answered) for the best users of a scope: most right first, then fewest
        answers, then name."""

    def is_busy(self, exc: BaseException) -> bool:
        """Whether a failure is another connection holding a lock (worth trying again soon)."""
        return False


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0.05:
        raise TimeoutError("waited too long for the storage pool")
    return left


@contextlib.contextmanager
def _held(lock: threading.Lock, deadline: float) -> Iterator[None]:
    """A lock taken within the call's deadline: threads queued behind a first use that waits on a
    locked database give up in time too."""
    if not lock.acquire(timeout=_remaining(deadline)):
        raise TimeoutError("waited too long for another thread's first use of the database")
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- SQLite

SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS quiz_answers (
        scope TEXT NOT NULL,
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        question TEXT NOT NULL,
        correct INTEGER NOT NULL,
        answered_at REAL NOT NULL,
        PRIMARY KEY (scope, user_id, question)
    )""",
    "CREATE TABLE IF NOT EXISTS quiz_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret BLOB NOT NULL)",
)
# Scores kept by earlier versions (table `answers`, one row per guild or transport): a server's
# rows stay in its scope; direct-message and console rows, which shared one board, become each
# user's own scope, as they are now.
SQLITE_MIGRATE = """
    INSERT OR IGNORE INTO quiz_answers (scope, user_id, name, question, correct, answered_at)
    SELECT CASE WHEN guild GLOB '[0-9]*' THEN guild ELSE guild || ':' || user END,
           user, name, question, correct, at
    FROM answers
"""
# The columns of each table lmbot reads, to recognise a file that some other program (or a
# different version) made before anything is written to it.
SQLITE_COLUMNS = {
    "quiz_answers": ("scope", "user_id", "name", "question", "correct", "answered_at"),
    "quiz_key": ("id", "secret"),
    "answers": ("guild", "user", "name", "question", "correct", "at"),
}
SCORE_SQL = "SELECT COALESCE(SUM(correct), 0), COUNT(*) FROM quiz_answers WHERE scope = {p} AND user_id = {p}"
BOARD_SQL = (
    "SELECT MAX(name {c}), SUM(correct) AS right_answers, COUNT(*) AS answered FROM quiz_answers "
    "WHERE scope = {p} GROUP BY user_id "
    "ORDER BY right_answers DESC, answered ASC, MAX(name {c}), user_id {c} LIMIT {p}"
)


class SQLiteBackend(Backend):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"SQLite file {path}"
        self._ready = False
        self._ready_lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self, deadline: float, *, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction: committed on success, rolled back on any error."""
        self._prepare(deadline)
        db = sqlite3.connect(self.path, timeout=min(BUSY_TIMEOUT_S, _remaining(deadline)), isolation_level=None)
        try:
            # With WAL, NORMAL syncs at checkpoints only: commits stay fast when several processes
            # write, and a crash can lose the last answers but never corrupt the file.
            db.execute("PRAGMA synchronous=NORMAL")
            # IMMEDIATE takes the write lock up front (waiting at most the busy timeout), so the
            # transaction never fails half-way because another writer got in first.
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _prepare(self, deadline: float) -> None:
        """Create the file, tables and key once; never touch a file that is not a database."""
        if self._ready:
            return
        with _held(self._ready_lock, deadline):
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=min(BUSY_TIMEOUT_S, _remaining(deadline)), isolation_level=None)
            try:
                # Read before anything is written: a file that is not a database, or one whose
                # tables of these names another program made, is left exactly as it was.
                _check_tables(db)
                # Readers do not block the writer (the mode is kept in the file; a no-op once set).
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    for statement in SQLITE_SCHEMA:
                        db.execute(statement)
                    if "quiz_answers" not in tables and "answers" in tables:
                        db.execute(SQLITE_MIGRATE)
                    db.execute("INSERT OR IGNORE INTO quiz_key VALUES (1, ?)", (os.urandom(KEY_BYTES),))
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()
            self._ready = True

    def key(self, deadline: float) -> bytes:
        with self._connect(deadline, write=False) as db:
            (secret,) = db.execute("SELECT secret FROM quiz_key WHERE id = 1").fetchone()
        return bytes(secret)

    def record(
        self, deadline: float, scope: str, user: str, name: str, question: str, correct: bool
    ) -> tuple[bool, int, int]:
        with self._connect(deadline, write=True) as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO quiz_answers VALUES (?, ?, ?, ?, ?, ?)",
                (scope, user, name, question, int(correct), time.time()),
            )
            counted = cursor.rowcount == 1
            right, total = db.execute(SCORE_SQL.format(p="?"), (scope, user)).fetchone()
        return counted, int(right), int(total)

    def score(self, deadline: float, scope: str, user: str) -> tuple[int, int]:
        with self._connect(deadline, write=False) as db:
            right, total = db.execute(SCORE_SQL.format(p="?"), (scope, user)).fetchone()
        return int(right), int(total)

    def leaderboard(self, deadline: float, scope: str, limit: int) -> list[tuple[str, int, int]]:
        with self._connect(deadline, write=False) as db:
            rows = db.execute(BOARD_SQL.format(p="?", c="COLLATE BINARY"), (scope, limit)).fetchall()
        return [(str(name), int(right), int(total)) for name, right, total in rows]

    def is_busy(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _check_tables(db: sqlite3.Connection) -> None:
    """Raise if a table lmbot uses exists with other columns than lmbot's."""
    for table, expected in SQLITE_COLUMNS.items():
        columns = tuple(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
        if columns and columns != expected:
            raise sqlite3.DatabaseError(
                f"table {table} has the columns ({', '.join(columns)}), not lmbot's ({', '.join(expected)}): "
                "quiz_db names a database that another program uses; point it at a file of its own"
            )


# --------------------------------------------------------------------------- PostgreSQL

PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS quiz_answers (
        scope TEXT NOT NULL,
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        question TEXT NOT NULL,
        correct INTEGER NOT NULL,
        answered_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, user_id, question)
    )""",
    "CREATE TABLE IF NOT EXISTS quiz_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret BYTEA NOT NULL)",
)
# Serialises the first-use CREATE TABLEs of several bot processes (concurrent CREATE TABLE IF
# NOT EXISTS can fail on PostgreSQL's catalogue); any fixed number works, this one spells "lmbq".
PG_SCHEMA_LOCK = 0x6C6D6271


def is_postgres_url(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """A connection URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresBackend(Backend):
    def __init__(self, url: str) -> None:
        self.url = url
        self.description = f"PostgreSQL {redact_url(url)}"
        self._ready = False
        self._ready_lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self, deadline: float) -> Iterator[Any]:
        """A connection for one transaction (committed on success), closed afterwards."""
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("quiz_db is a PostgreSQL URL, but psycopg is not installed") from None
        # libpq counts connect_timeout in whole seconds, at least 2.
        connect_timeout = max(2, round(_remaining(deadline)))
        with psycopg.connect(self.url, connect_timeout=connect_timeout) as db:
            self._prepare(db, deadline)
            self._bound(db, deadline)
            yield db

    @staticmethod
    def _bound(db: Any, deadline: float) -> None:
        """Bound lock waits and statements in the transaction this starts."""
        wait_ms = int(min(BUSY_TIMEOUT_S, _remaining(deadline)) * 1000)
        db.execute(f"SET LOCAL lock_timeout = {wait_ms}")
        db.execute(f"SET LOCAL statement_timeout = {wait_ms + 1000}")

    def _prepare(self, db: Any, deadline: float) -> None:
        """Create the tables and key once, committed before any other thread may use them."""
        if self._ready:
            return
        with _held(self._ready_lock, deadline):
            if self._ready:
                return
            self._bound(db, deadline)
            db.execute("SELECT pg_advisory_xact_lock(%s)", (PG_SCHEMA_LOCK,))
            for statement in PG_SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO quiz_key VALUES (1, %s) ON CONFLICT (id) DO NOTHING", (os.urandom(KEY_BYTES),))
            db.commit()
            self._ready = True

    def key(self, deadline: float) -> bytes:
        with self._connect(deadline) as db:
            row = db.execute("SELECT secret FROM quiz_key WHERE id = 1").fetchone()
        return bytes(row[0])

    def record(
        self, deadline: float, scope: str, user: str, name: str, question: str, correct: bool
    ) -> tuple[bool, int, int]:
        with self._connect(deadline) as db:
            cursor = db.execute(
                "INSERT INTO quiz_answers VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (scope, user, name, question, int(correct), time.time()),
            )
            counted = cursor.rowcount == 1
            right, total = db.execute(SCORE_SQL.format(p="%s"), (scope, user)).fetchone()
        return counted, int(right), int(total)

    def score(self, deadline: float, scope: str, user: str) -> tuple[int, int]:
        with self._connect(deadline) as db:
            right, total = db.execute(SCORE_SQL.format(p="%s"), (scope, user)).fetchone()
        return int(right), int(total)

    def leaderboard(self, deadline: float, scope: str, limit: int) -> list[tuple[str, int, int]]:
        # COLLATE "C": names sort by code point, as in SQLite, whatever the server's locale.
        with self._connect(deadline) as db:
            rows = db.execute(BOARD_SQL.format(p="%s", c='COLLATE "C"'), (scope, limit)).fetchall()
        return [(str(name), int(right), int(total)) for name, right, total in rows]

    def is_busy(self, exc: BaseException) -> bool:
        # 55P03 lock_not_available (lock_timeout), 57014 query_canceled (statement_timeout).
        return getattr(exc, "sqlstate", None) in ("55P03", "57014")


# --------------------------------------------------------------------------- the store


class ScoreStore:
    """A backend used from the event loop: calls run on the storage pool, bounded in time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # Signs questions while the database's key cannot be read; answers to them check out in
        # this process only.
        self.local_key = os.urandom(KEY_BYTES)
        self.key_problem = ""
        self._key: bytes | None = None
        self._key_retry_at = 0.0

    async def _call(self, what: str, method: Callable[..., T], *args: Any) -> T:
        deadline = time.monotonic() + CALL_DEADLINE_S
        future = asyncio.get_running_loop().run_in_executor(_storage_pool(), self._run, what, method, deadline, *args)
        try:
            return await asyncio.wait_for(future, CALL_GUARD_S)
        except TimeoutError:
            log.error("quiz scores: %s on %s did not finish in %.0f s", what, self.backend.description, CALL_GUARD_S)
            raise ScoresUnavailable(BUSY) from None

    def _run(self, what: str, method: Callable[..., T], deadline: float, *args: Any) -> T:
        try:
            return method(deadline, *args)
        except Exception as exc:
            busy = isinstance(exc, TimeoutError) or self.backend.is_busy(exc)
            log.warning("quiz scores: %s on %s failed: %s: %s", what, self.backend.description, type(exc).__name__, exc)
            raise ScoresUnavailable(BUSY if busy else BROKEN) from exc

    async def key(self) -> bytes | None:
        """The database's signing key, or None when it cannot be read now (kept once read)."""
        if self._key is None and time.monotonic() >= self._key_retry_at:
            try:
                self._key = await self._call("reading the quiz key", self.backend.key)
            except ScoresUnavailable as exc:
                self.key_problem = str(exc)
                self._key_retry_at = time.monotonic() + KEY_RETRY_S
        return self._key

    async def record(self, scope: str, user: str, name: str, question: str, correct: bool) -> tuple[bool, int, int]:
        return await self._call("saving an answer", self.backend.record, scope, user, name, question, correct)

    async def score(self, scope: str, user: str) -> tuple[int, int]:
        return await self._call("reading a score", self.backend.score, scope, user)

    async def leaderboard(self, scope: str, limit: int = 10) -> list[tuple[str, int, int]]:
        return await self._call("reading the leaderboard", self.backend.leaderboard, scope, limit)


_stores: dict[str, ScoreStore] = {}
_stores_lock = threading.Lock()


def open_store(spec: str) -> ScoreStore:
    """The store for a ``quiz_db`` setting (a path, ``~`` allowed, or a PostgreSQL URL), one per process."""
    spec = spec.strip()
    with _stores_lock:
        store = _stores.get(spec)
        if store is None:
            backend: Backend = (
                PostgresBackend(spec) if is_postgres_url(spec) else SQLiteBackend(Path(os.path.expanduser(spec)))
            )
            store = _stores[spec] = ScoreStore(backend)
        return store
