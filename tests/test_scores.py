"""Quiz score storage: one set of tests on SQLite and on a real PostgreSQL server.

Same leaderboard semantics on both; answers from two processes at once lose nothing; a database
that is locked, full, corrupt, read-only or down costs a student one clear line (their answer and
its explanation are still shown), slows nothing else, and is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import plugins._scores as scores_module
from bot.app import App
from bot.commands import Context, User
from plugins._scores import ScoresUnavailable, open_store, redact_url
from tests import score_writers, study_fixtures
from tests.conftest import make_config
from tests.fake_tasks import until
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def quiz_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh score database: a SQLite path, or a PostgreSQL URL on the test server."""
    if request.param == "sqlite":
        return str(tmp_path / "scores" / "quiz.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


def rows_of(spec: str) -> list[tuple[Any, ...]]:
    """Every stored answer, read directly with the driver (not through the store)."""
    query = "SELECT scope, user_id, name, question, correct FROM quiz_answers ORDER BY scope, user_id, question"
    if spec.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(spec) as db:
            return [tuple(r) for r in db.execute(query).fetchall()]
    with contextlib.closing(sqlite3.connect(spec)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return db.execute(query).fetchall()


# --------------------------------------------------------------------------- semantics


async def test_first_answers_count_and_the_board_orders_them(quiz_db: str) -> None:
    store = open_store(quiz_db)
    assert await store.record("g1", "u1", "Ann", "t.0", True) == (True, 1, 1)
    assert await store.record("g1", "u1", "Ann", "t.0", False) == (False, 1, 1)  # only the first answer counts
    assert await store.record("g1", "u1", "Ann", "t.1", False) == (True, 1, 2)
    await store.record("g1", "u2", "amy", "t.0", True)
    await store.record("g1", "u3", "Zed", "t.0", True)
    await store.record("g1", "u4", "cy", "t.0", False)
    await store.record("g2", "u4", "cy", "t.0", True)  # another scope: its own board
    board = await store.leaderboard("g1")
    # Most right first, then fewer answers, then the name by code point ("Zed" before "amy"),
    # whatever the server's locale (the test server's databases sort "amy" first by default).
    if quiz_db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(quiz_db) as db:
            assert db.execute("SELECT 'amy' < 'Zed'").fetchone() == (True,)
    assert board == [("Zed", 1, 1), ("amy", 1, 1), ("Ann", 1, 2), ("cy", 0, 1)]
    assert await store.leaderboard("g1", limit=2) == board[:2]
    assert await store.leaderboard("g2") == [("cy", 1, 1)]
    assert await store.score("g1", "u1") == (1, 2)
    assert await store.score("g1", "nobody") == (0, 0)
    assert await store.leaderboard("empty") == []
    # The signing key is made once and is the same for every reader (another process included).
    key = await store.key()
    assert key is not None and len(key) == 32
    scores_module._stores.pop(quiz_db.strip())
    assert await open_store(quiz_db).key() == key


def test_answers_sent_twice_at_once_count_once(quiz_db: str) -> None:
    backend = open_store(quiz_db).backend

    def answer(i: int) -> bool:
        # 20 users answer two questions each, and every answer is sent twice at the same moment.
        deadline = time.monotonic() + 30
        return backend.record(deadline, "g", f"u{i % 20}", f"user{i % 20}", f"q{i // 40}", True)[0]

    with ThreadPoolExecutor(8) as pool:
        counted = list(pool.map(answer, range(80)))
    assert sum(counted) == 40
    assert len(rows_of(quiz_db)) == 40


def test_two_processes_answering_at_once_lose_no_score(quiz_db: str) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=score_writers.answer_from_process, args=(quiz_db, n, barrier, results)) for n in (0, 1)
    ]
    for process in processes:
        process.start()
    outcomes = {}
    for _ in processes:
        process_index, counted, failed = results.get(timeout=240)
        outcomes[process_index] = (counted, failed)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    # A refusal under load ("busy, try again") is sent again until it is taken: none gave up.
    assert [failed for _, failed in outcomes.values()] == [0, 0]
    users, shared, own = score_writers.USERS, score_writers.SHARED_QUESTIONS, score_writers.OWN_QUESTIONS
    assert sum(counted for counted, _ in outcomes.values()) == users * (shared + 2 * own)  # each answer once
    stored = [row for row in rows_of(quiz_db) if row[0] == "race"]
    assert len(stored) == users * (shared + 2 * own)
    expected = {(u, q) for p in (0, 1) for u, q, _ in score_writers.plan(p)}
    assert {(row[1], row[3]) for row in stored} == expected


# The schema of today's main (no version table: version 1), frozen here as that version wrote it.
MAIN_SQLITE = (
    """CREATE TABLE quiz_answers (scope TEXT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
       question TEXT NOT NULL, correct INTEGER NOT NULL, answered_at REAL NOT NULL,
       PRIMARY KEY (scope, user_id, question))""",
    "CREATE TABLE quiz_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret BLOB NOT NULL)",
)
MAIN_POSTGRES = (
    """CREATE TABLE quiz_answers (scope TEXT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
       question TEXT NOT NULL, correct INTEGER NOT NULL, answered_at DOUBLE PRECISION NOT NULL,
       PRIMARY KEY (scope, user_id, question))""",
    "CREATE TABLE quiz_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret BYTEA NOT NULL)",
)


def write_as_main(spec: str, answers: list[tuple[str, str, str, str, int, float]], secret: bytes) -> None:
    """A store as today's main leaves it: its two tables, some answers and its key."""
    if spec.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(spec) as db:
            for statement in MAIN_POSTGRES:
                db.execute(statement)
            db.cursor().executemany("INSERT INTO quiz_answers VALUES (%s, %s, %s, %s, %s, %s)", answers)
            db.execute("INSERT INTO quiz_key VALUES (1, %s)", (secret,))
        return
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(spec)) as db, db:
        for statement in MAIN_SQLITE:
            db.execute(statement)
        db.executemany("INSERT INTO quiz_answers VALUES (?, ?, ?, ?, ?, ?)", answers)
        db.execute("INSERT INTO quiz_key VALUES (1, ?)", (secret,))


def schema_version(spec: str) -> int:
    query = "SELECT version FROM lmbot_schema"
    if spec.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(spec) as db:
            return int(db.execute(query).fetchone()[0])
    with contextlib.closing(sqlite3.connect(spec)) as db:
        return int(db.execute(query).fetchone()[0])


async def test_an_upgrade_from_main_keeps_every_score_and_the_key(quiz_db: str) -> None:
    answers = [(f"g{n % 3}", f"u{n % 7}", f"name{n % 7}", f"t.{n}", n % 2, 1_700_000_000.0 + n) for n in range(60)]
    secret = os.urandom(32)
    write_as_main(quiz_db, answers, secret)
    before = rows_of(quiz_db)
    store = open_store(quiz_db)
    assert await store.key() == secret  # questions asked before the upgrade can still be answered
    assert rows_of(quiz_db) == before
    assert schema_version(quiz_db) == scores_module.SCHEMA_VERSION
    for scope in ("g0", "g1", "g2"):
        mine = [a for a in answers if a[0] == scope]
        for user in {a[1] for a in mine}:
            theirs = [a for a in mine if a[1] == user]
            assert await store.score(scope, user) == (sum(a[4] for a in theirs), len(theirs))
    # The new tables work on the upgraded store, and an answer counts as before.
    await store.open_round("r1", "g0", "u1", "The capital of France is", time.time() + 30)
    assert await store.guess("r1", "u1", "name1", " Paris") == "counted"
    right, total = await store.score("g0", "u1")
    assert await store.record("g0", "u1", "name1", "t.new", True) == (True, right + 1, total + 1)
    # Opened again (another process, a restart): nothing migrates twice.
    scores_module._stores.pop(quiz_db.strip())
    assert await open_store(quiz_db).round_info("r1") is not None
    assert schema_version(quiz_db) == scores_module.SCHEMA_VERSION


async def test_a_store_from_a_newer_lmbot_is_refused_and_left_alone(quiz_db: str) -> None:
    store = open_store(quiz_db)
    await store.record("g", "u", "n", "t.0", True)
    query = "UPDATE lmbot_schema SET version = 99"
    if quiz_db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(quiz_db) as db:
            db.execute(query)
    else:
        with contextlib.closing(sqlite3.connect(quiz_db)) as db, db:
            db.execute(query)
    scores_module._stores.pop(quiz_db.strip())
    with pytest.raises(ScoresUnavailable, match="not working"):
        await open_store(quiz_db).score("g", "u")
    assert schema_version(quiz_db) == 99 and len(rows_of(quiz_db)) == 1


async def test_a_round_takes_one_guess_per_player_while_open(quiz_db: str) -> None:
    store = open_store(quiz_db)
    await store.open_round("r", "g", "starter", "Once upon a", time.time() + 30)
    assert await store.guess("r", "u1", "Ann", " time") == "counted"
    assert await store.guess("r", "u1", "Ann", " day") == "again"
    assert await store.guess("nope", "u1", "Ann", " day") == "closed"
    assert await store.open_rounds("g") == ["r"]
    assert await store.close_round("r") == [("u1", "Ann", " time")]
    assert await store.close_round("r") is None  # exactly one caller reveals it
    assert await store.guess("r", "u2", "Bo", " time") == "closed"
    await store.score_round("r", [("u1", 12.5)])
    info = await store.round_info("r")
    assert info is not None and (info[:3], info[4]) == (("g", "starter", "Once upon a"), "revealed")
    assert await store.round_board("g") == [("u1", "Ann", 12.5, 1)]
    assert await store.round_board("g", since=time.time() + 60) == []
    assert await store.round_board("other") == []


async def test_fifty_players_guessing_in_the_same_second_are_recorded_once(quiz_db: str) -> None:
    store = open_store(quiz_db)
    await store.open_round("crowd", "g", "starter", "The cat sat on the", time.time() + 30)
    go = asyncio.Event()

    async def player(n: int) -> list[str]:
        await go.wait()  # all 50 start together; each presses twice, as an impatient player does
        outcomes = []
        for _ in range(2):
            for _ in range(20):  # "busy, try again": pressed again at once
                try:
                    outcomes.append(await store.guess("crowd", f"u{n}", f"player{n}", f" mat{n}"))
                    break
                except ScoresUnavailable:
                    continue
        return outcomes

    tasks = [asyncio.create_task(player(n)) for n in range(50)]
    go.set()
    outcomes = await asyncio.gather(*tasks)
    assert sorted(outcomes) == sorted([["counted", "again"]] * 50)
    guesses = await store.close_round("crowd")
    assert guesses is not None and sorted(g[0] for g in guesses) == sorted(f"u{n}" for n in range(50))
    assert all(guess == f" mat{user[1:]}" for user, _, guess in guesses)


def test_logs_never_show_a_database_password() -> None:
    assert redact_url("postgresql://quiz:s3cret@db.example:5433/lmbot") == "postgresql://quiz:***@db.example:5433/lmbot"
    assert "s3cret" not in open_store("postgresql://quiz:s3cret@db.example/lmbot").backend.description


# --------------------------------------------------------------------------- faults


def guild_context(app: App, user: str = "7", guild: str = "4242") -> Context:
    return Context(user=User(user, f"student{user}"), app=app, guild_id=guild, transport="discord")


@contextlib.contextmanager
def lock_held_by_another_process(spec: str) -> Iterator[None]:
    holder = subprocess.Popen(
        score_writers.lock_holder_command(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.write("\n")
            holder.stdin.close()
        holder.wait(timeout=30)


class DiskFullConnection(sqlite3.Connection):
    """SQLite as it answers when the disk is full: every INSERT fails with SQLITE_FULL."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.lstrip().upper().startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


@contextlib.contextmanager
def disk_full(spec: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if spec.startswith("postgresql://"):
        import psycopg

        # The error PostgreSQL raises when it cannot extend a table file (SQLSTATE 53100).
        with psycopg.connect(spec, autocommit=True) as db:
            db.execute(
                "CREATE FUNCTION disk_is_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; "
                "END $$"
            )
            db.execute("CREATE TRIGGER disk_is_full BEFORE INSERT ON quiz_answers EXECUTE FUNCTION disk_is_full()")
        try:
            yield
        finally:
            with psycopg.connect(spec, autocommit=True) as db:
                db.execute("DROP TRIGGER disk_is_full ON quiz_answers")
        return
    real_connect = sqlite3.connect
    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=DiskFullConnection, **kw))
        yield


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Lose root's right to write anywhere (root ignores directory permissions)."""
    if os.geteuid() != 0:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextlib.contextmanager
def read_only_directory(spec: str) -> Iterator[None]:
    folder = Path(spec).parent
    folder.chmod(0o555)
    try:
        with unprivileged():
            yield
    finally:
        folder.chmod(0o755)


def write_garbage(path: str) -> None:
    Path(path).write_bytes(b"this is not a database \x00\xff\xfe" * 300)


def file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


FAULTS = [
    ("sqlite", "locked"),
    ("sqlite", "locked before first use"),
    ("sqlite", "disk full"),
    ("sqlite", "read-only directory"),
    ("sqlite", "corrupt file"),
    ("postgresql", "locked"),
    ("postgresql", "disk full"),
    ("postgresql", "server down"),
]


@pytest.fixture
def fault_db(request: pytest.FixtureRequest) -> Iterator[str]:
    backend, fault = request.param
    if backend == "postgresql":
        if fault == "server down":  # a socket folder with no server in it
            folder = tempfile.mkdtemp(prefix="lmbot-nopg-")
            yield f"postgresql:///quiz?host={folder}&port=5432&user=lmbot"
            shutil.rmtree(folder)
            return
        yield str(request.getfixturevalue("postgres_url"))
        return
    # A folder that an unprivileged user can reach (the read-only case drops root's rights).
    folder = Path(tempfile.mkdtemp(prefix="lmbot-quiz-"))
    folder.chmod(0o755)
    (folder / "db").mkdir(mode=0o755)
    yield str(folder / "db" / "quiz.sqlite3")
    (folder / "db").chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture
async def fixture_app(cache_dir: Path) -> AsyncIterator[Any]:
    apps: list[App] = []

    def build(spec: str) -> App:
        config = make_config(cache_dir, plugin_options={"study": {"quiz_db": spec}})
        app = App(config, extra_plugins=[(study_fixtures, "study-fixtures")])
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.close()


@pytest.mark.parametrize("fault_db", FAULTS, indirect=True, ids=[f"{b}-{f}" for b, f in FAULTS])
async def test_a_storage_fault_costs_one_clear_line_and_harms_nothing(
    fault_db: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fixture_app: Any
) -> None:
    _backend, fault = request.node.callspec.params["fault_db"]
    spec = fault_db
    if fault == "corrupt file":
        write_garbage(spec)
    before: list[tuple[Any, ...]] | None = None
    if fault not in ("corrupt file", "server down", "locked before first use"):
        store = open_store(spec)
        await store.record("4242", "1", "earlier", "old.0", True)
        await store.record("4242", "2", "earlier2", "old.0", False)
        before = rows_of(spec)
    original_bytes = file_bytes(spec) if fault == "corrupt file" else b""
    app = fixture_app(spec)
    ctx = guild_context(app)
    faults = {
        "locked": lambda: lock_held_by_another_process(spec),
        # A new file in SQLite's default (rollback) journal mode, locked for writing: readers wait too.
        "locked before first use": lambda: lock_held_by_another_process(spec),
        "disk full": lambda: disk_full(spec, monkeypatch),
        "read-only directory": lambda: read_only_directory(spec),
    }
    with faults.get(fault, contextlib.nullcontext)():
        asked = await app.execute("quiz", {"topic": study_fixtures.MULTI}, ctx)
        assert not asked.error and asked.buttons
        question = study_fixtures.QUESTIONS[int(asked.data["question"].rsplit(".", 1)[1])]
        started = time.monotonic()
        answered = await app.execute("quiz", {"answer": asked.buttons[0].value}, ctx)
        waited = time.monotonic() - started
        # The student gets the verdict, the explanation and one line saying the score was not kept.
        assert not answered.error and answered.data["saved"] is False and answered.data["counted"] is False
        assert answered.title and answered.title.startswith("student7: ")
        assert question.why in answered.text
        note = answered.text.splitlines()[-1]
        assert note.startswith("Your answer was not saved: the score database is"), note
        assert "Traceback" not in answered.text and spec not in answered.text
        assert waited < 8, waited
        # The rest of the bot answers as usual; the leaderboard answers in words either way.
        card = await app.execute("topic", {"name": study_fixtures.MULTI}, ctx)
        assert not card.error and card.title == "Fixture: several options"
        board = await app.execute("quiz", {"leaderboard": True}, ctx)
        assert not board.error or board.text.startswith("The scores cannot be read right now: the score database is")
    if fault == "corrupt file":
        assert file_bytes(spec) == original_bytes  # never "repaired" or replaced
    if before is not None:
        assert rows_of(spec) == before  # intact, and nothing half-written
    if fault not in ("corrupt file", "server down"):
        # Once the fault is gone, answers count again.
        again = await app.execute("quiz", {"topic": study_fixtures.MULTI}, ctx)
        saved = await app.execute("quiz", {"answer": again.buttons[0].value}, ctx)
        assert saved.data["saved"] is True


async def test_a_locked_database_slows_nothing_else(
    quiz_db: str, fixture_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported case: answers blocked on a lock filled the shared thread pool, so /tokenize
    waited ~30 s. Storage has its own pool: /tokenize answers while every answer still waits."""
    await open_store(quiz_db).record("4242", "1", "earlier", "old.0", True)  # tables exist
    app = fixture_app(quiz_db)
    warm = await app.execute_line('/tokenize text:"warm up"')  # loads the encoding once
    assert not warm.error
    # The answers wait on the lock for as long as the test holds it, not the usual 1.5 s, so that
    # "/tokenize did not wait for them" is an order of events, on a loaded machine too.
    for name in ("BUSY_TIMEOUT_S", "CALL_DEADLINE_S", "CALL_GUARD_S"):
        monkeypatch.setattr(scores_module, name, 600.0)
    # More answers than asyncio's default pool has threads, on any machine.
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    contexts = [guild_context(app, user=str(100 + n)) for n in range(count)]
    asked = [await app.execute("quiz", {"topic": study_fixtures.MULTI}, ctx) for ctx in contexts]
    with lock_held_by_another_process(quiz_db):
        answering = asyncio.gather(
            *(app.execute("quiz", {"answer": a.buttons[0].value}, ctx) for a, ctx in zip(asked, contexts, strict=True))
        )
        # Every storage thread holds an answer waiting on the lock, and more answers queue behind them.
        await asyncio.wait_for(until(storage_pool_is_full), 120)
        tokenized = await asyncio.wait_for(app.execute_line('/tokenize text:"hello world"'), 120)
        assert not tokenized.error
        assert not answering.done() and storage_pool_is_full()  # answered while the answers all still wait
    # Once the lock is let go, every answer is taken.
    answers = await answering
    assert all(not a.error and a.data["saved"] is True for a in answers), [a.text for a in answers]


def storage_pool_is_full() -> bool:
    """All of the score store's threads are taken and work is queued for them."""
    pool = scores_module._POOL
    return pool is not None and len(pool._threads) == scores_module.STORAGE_THREADS and pool._work_queue.qsize() > 0


async def test_an_unavailable_store_says_so_in_words() -> None:
    """A store call that fails answers with a clause a student can read; the reason goes to the log."""
    store = open_store("/dev/null/lmbot/quiz.sqlite3")  # its folder cannot be made
    with pytest.raises(ScoresUnavailable, match="not working right now"):
        await store.record("s", "u", "n", "q", True)
    assert await store.key() is None and "not working" in store.key_problem


async def test_scores_kept_by_earlier_versions_carry_over(tmp_path: Path) -> None:
    """The old table kept one board per server and one shared by every direct message: server rows
    stay on their server's board, direct-message and console rows move to each person's own."""
    path = tmp_path / "quiz.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE answers (guild TEXT NOT NULL, user TEXT NOT NULL, name TEXT NOT NULL, question TEXT NOT NULL,"
            " correct INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (guild, user, question))"
        )
        db.executemany(
            "INSERT INTO answers VALUES (?, ?, ?, ?, ?, 0)",
            [
                ("4242", "1", "Ann", "t.0", 1),
                ("discord", "7", "Dee", "t.0", 1),
                ("discord", "8", "Eve", "t.0", 0),
                ("console", "local", "console", "t.1", 1),
            ],
        )
    store = open_store(str(path))
    assert await store.leaderboard("4242") == [("Ann", 1, 1)]
    assert await store.leaderboard("discord:7") == [("Dee", 1, 1)]
    assert await store.leaderboard("discord:8") == [("Eve", 0, 1)]
    assert await store.leaderboard("console:local") == [("console", 1, 1)]
    assert await store.leaderboard("discord") == []
    assert await store.record("discord:7", "7", "Dee", "t.0", False) == (False, 1, 1)  # answered before
