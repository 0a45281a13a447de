"""Study material: /topic shows a topic's card, /quiz asks its questions and keeps scores.

Cards and questions are registered by each topic's own plugin (see ``Topic``);
this plugin only presents them. Scores live in SQLite, per server:
``[plugins.options.study] quiz_db = "path"`` (default ``~/.local/share/lmbot/quiz.sqlite3``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bot import (
    Boolean,
    Button,
    Command,
    CommandError,
    Context,
    Field,
    Reply,
    Table,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)
from bot.parsing import parse_options, split_command
from bot.topics import QuizQuestion

DEFAULT_DB = "~/.local/share/lmbot/quiz.sqlite3"
LETTERS = "ABCDE"
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    guild TEXT NOT NULL,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    question TEXT NOT NULL,
    correct INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (guild, user, question)
)
"""


_init_lock = threading.Lock()
_initialised: set[Path] = set()


class Scores:
    """Quiz answers in SQLite. Only a user's first answer to a question counts, and the
    primary key makes that hold even when two answers arrive at the same moment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction (committed on success), closed afterwards."""
        with _init_lock:
            if self.path not in _initialised:
                # Once per file: switching the journal mode needs the database to itself.
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db, db:
                    db.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                    db.execute(SCHEMA)
                _initialised.add(self.path)
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            yield db

    def record(self, guild: str, user: str, name: str, question: str, correct: bool) -> bool:
        """Store an answer; False if this user already answered this question here."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (guild, user, name, question, int(correct), time.time()),
            )
            return cursor.rowcount == 1

    def score(self, guild: str, user: str) -> tuple[int, int]:
        with self._connect() as db:
            row = db.execute(
                "SELECT COALESCE(SUM(correct), 0), COUNT(*) FROM answers WHERE guild = ? AND user = ?", (guild, user)
            ).fetchone()
        return int(row[0]), int(row[1])

    def leaderboard(self, guild: str, limit: int = 10) -> list[tuple[str, int, int]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT MAX(name), SUM(correct) AS right, COUNT(*) FROM answers WHERE guild = ? "
                "GROUP BY user ORDER BY right DESC, COUNT(*) ASC, MAX(name) LIMIT ?",
                (guild, limit),
            ).fetchall()
        return [(name, int(right), int(total)) for name, right, total in rows]


def scores_for(ctx: Context) -> Scores:
    options = ctx.config.plugins.options.get("study", {})
    return Scores(Path(os.path.expanduser(str(options.get("quiz_db", DEFAULT_DB)))))


def find_topic(ctx: Context, name: str) -> Topic:
    topics: dict[str, Topic] = ctx.app.registry.topics
    wanted = name.strip().lower()
    for topic in topics.values():
        if wanted in (topic.slug, topic.title.lower()):
            return topic
    matches = [t for t in topics.values() if wanted in t.slug or wanted in t.title.lower()]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(topics))
    raise UserError(f"No topic called “{name.strip()[:40]}”. Topics: {known}.")


@command(
    "topic",
    "A study card: the key idea, a table, a command to try, questions to discuss",
    options=[Text("name", "The topic (leave out to list them all)", required=False, max_length=60)],
)
async def topic(ctx: Context, name: str | None) -> Reply:
    topics = sorted(ctx.app.registry.topics.values(), key=lambda t: t.order)
    if not name:
        rows = [[str(n), t.slug, t.title, t.try_command.split(" ")[0]] for n, t in enumerate(topics, 1)]
        return Reply(
            title="Course topics",
            text="Open one with `/topic name:<name>`; test yourself with `/quiz`.",
            table=Table(["#", "name", "topic", "try"], rows, align="rlll"),
            data={"topics": [t.slug for t in topics]},
        )
    card = find_topic(ctx, name)
    fields = [Field("try", f"`{card.try_command}`", inline=False)] if card.try_command else []
    if card.questions:
        fields.append(Field("discuss", "\n".join(f"• {q}" for q in card.questions), inline=False))
    buttons = [b for b in (_try_button(ctx, card), Button("Quiz me", "quiz", "topic", card.slug)) if b is not None]
    return Reply(
        title=card.title,
        text=card.key_idea,
        table=card.table,
        fields=fields,
        buttons=buttons,
        data={"topic": card.slug, "questions": list(card.questions), "quiz_questions": len(card.quiz)},
    )


def _try_button(ctx: Context, card: Topic) -> Button | None:
    """The card's command as a button, when it is one command with one option."""
    try:
        cmd, rest = split_command(card.try_command, ctx.app.registry.commands)
        texts = parse_options(cmd, rest)
    except CommandError:  # no such command here (a disabled plugin), or no command at all
        return None
    if len(texts) != 1:
        return None
    ((option, value),) = texts.items()
    if value.startswith("<") and value.endswith(">"):  # a placeholder for the reader to fill in
        return None
    return Button("Try it", cmd.name, option, value)


def shuffled(count: int, seed: int) -> list[int]:
    """The display order of a question's choices for one asking."""
    return random.Random(seed).sample(range(count), count)


def _questions(ctx: Context, name: str | None) -> list[tuple[str, QuizQuestion]]:
    topics = [find_topic(ctx, name)] if name else list(ctx.app.registry.topics.values())
    return [(f"{t.slug}.{n}", q) for t in topics for n, q in enumerate(t.quiz)]


def _ask(ctx: Context, name: str | None) -> Reply:
    pool = _questions(ctx, name)
    if not pool:
        raise UserError("There are no quiz questions for that topic yet.")
    qid, question = random.choice(pool)
    # A fresh order each time, rebuilt from the seed when the answer comes back, so the
    # answer names only a letter and never gives away which choice is right.
    seed = random.randrange(1_000_000)
    order = shuffled(len(question.choices), seed)
    buttons = [
        Button(
            f"{LETTERS[shown]}. {question.choices[original]}"[:80], "quiz", "answer", f"{qid}.{seed}.{LETTERS[shown]}"
        )
        for shown, original in enumerate(order)
    ]
    return Reply(
        title=f"Quiz: {ctx.app.registry.topics[qid.rsplit('.', 1)[0]].title}",
        text=question.question,
        buttons=buttons,
        data={"question": qid, "choices": [question.choices[i] for i in order]},
    )


async def _answer(ctx: Context, answer: str) -> Reply:
    try:
        slug, number, seed, letter = answer.rsplit(".", 3)
        question = ctx.app.registry.topics[slug].quiz[int(number)]
        picked = shuffled(len(question.choices), int(seed))[LETTERS.index(letter.upper())]
    except (ValueError, KeyError, IndexError):
        raise UserError("That answer does not match a quiz question; start a new one with /quiz.") from None
    correct = picked == question.answer
    guild = ctx.guild_id or ctx.transport
    scores = scores_for(ctx)
    first = await asyncio.to_thread(scores.record, guild, ctx.user.id, ctx.user.name, f"{slug}.{number}", correct)
    right, total = await asyncio.to_thread(scores.score, guild, ctx.user.id)
    verdict = "Correct!" if correct else f"Not quite: the answer is “{question.choices[question.answer]}”."
    note = "" if first else " (You had answered this one before; only your first answer counts.)"
    return Reply(
        title=f"{ctx.user.name}: {verdict}",
        text=f"{question.why}{note}",
        fields=[Field("score", f"{right} of {total} right")],
        buttons=[
            Button("Next question", "quiz", "topic", slug),
            Button("Study card", "topic", "name", slug),
            Button("Scores", "quiz", "leaderboard", "true"),
        ],
        data={"question": f"{slug}.{number}", "correct": correct, "counted": first, "score": [right, total]},
    )


@command(
    "quiz",
    "A multiple-choice question on a course topic; scores are kept per server",
    options=[
        Text("topic", "Only questions from this topic; `scores` shows the leaderboard", required=False, max_length=60),
        Text("answer", "An answer (the buttons fill this in)", required=False, max_length=80),
        Boolean("leaderboard", "Show this server's scores instead of a question", default=False),
    ],
)
async def quiz(ctx: Context, topic: str | None, answer: str | None, leaderboard: bool) -> Reply:
    # `/quiz scores` reads naturally in the console; on Discord it is `topic: scores` or `leaderboard: True`.
    if leaderboard or (topic or "").strip().lower() in ("scores", "leaderboard"):
        rows = await asyncio.to_thread(scores_for(ctx).leaderboard, ctx.guild_id or ctx.transport)
        if not rows:
            return Reply("No quiz answers here yet. Start with /quiz.", data={"leaderboard": []})
        table = Table(
            ["#", "who", "right", "answered"],
            [[str(n), who, str(r), str(t)] for n, (who, r, t) in enumerate(rows, 1)],
            align="rlrr",
        )
        return Reply(title="Quiz leaderboard", table=table, data={"leaderboard": rows})
    if answer:
        return await _answer(ctx, answer.strip())
    return _ask(ctx, topic)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(topic)
    register(quiz)


@hookimpl
def register_options(register: Callable[[Text], None]) -> None:
    # [plugins.options.study] quiz_db: the SQLite file that keeps quiz scores.
    register(Text("quiz_db", "The SQLite file that keeps quiz scores", default=DEFAULT_DB, max_length=4096))
