"""Helpers that run in other processes for the score-store tests (imported by spawned children)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

USERS = 5
SHARED_QUESTIONS = 60  # both processes answer these: each user's answer must count once
OWN_QUESTIONS = 20  # each process alone answers these
BATCH = 4
RETRIES = 50  # sends of one refused answer before it counts as lost


def plan(process: int) -> list[tuple[str, str, bool]]:
    """(user, question, correct) answers one process sends, shared ones first in opposite orders."""
    shared = [f"shared.{q}" for q in range(SHARED_QUESTIONS)]
    if process % 2:
        shared.reverse()
    own = [f"own{process}.{q}" for q in range(OWN_QUESTIONS)]
    return [(f"u{u}", q, (u + len(q)) % 3 != 0) for q in shared + own for u in range(USERS)]


def answer_from_process(spec: str, process: int, barrier: Any, results: Any) -> None:
    """Send this process's answers through the bot's own store, a few at a time, from the same moment."""
    from plugins._scores import ScoresUnavailable, open_store

    async def run() -> tuple[int, int]:
        store = open_store(spec)
        await store.score("warm-up", "nobody")  # connect and create tables before the race starts
        barrier.wait(timeout=60)
        counted = failed = 0
        answers = plan(process)
        for start in range(0, len(answers), BATCH):
            batch = answers[start : start + BATCH]
            # A refusal ("busy, try again") wrote nothing: the answer is sent again, as a student
            # would press again, at once (no sleep). Only an answer refused every time is lost.
            for _ in range(RETRIES):
                outcomes = await asyncio.gather(
                    *(store.record("race", user, user.upper(), question, correct) for user, question, correct in batch),
                    return_exceptions=True,
                )
                refused = []
                for answer, outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, ScoresUnavailable):
                        refused.append(answer)
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        counted += outcome[0]
                batch = refused
                if not batch:
                    break
            failed += len(batch)
        return counted, failed

    results.put((process, *asyncio.run(run())))


HOLD_SQLITE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""

HOLD_POSTGRES = """
import psycopg, sys
with psycopg.connect(sys.argv[1]) as db:
    db.execute("LOCK TABLE quiz_answers IN ACCESS EXCLUSIVE MODE")
    print("locked", flush=True)
    sys.stdin.readline()
    db.rollback()
"""


def lock_holder_command(spec: str) -> list[str]:
    """A process that locks the quiz database, says "locked", and lets go at a line on stdin."""
    script = HOLD_POSTGRES if spec.startswith("postgresql://") else HOLD_SQLITE
    return [sys.executable, "-c", script, spec]
