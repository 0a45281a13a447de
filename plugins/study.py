"""Study material: /topic shows a topic's card, /quiz asks its questions and keeps scores.

Cards and questions are registered by each topic's own plugin (see ``Topic``); this plugin only
presents them. Scores live in ``[plugins.options.study] quiz_db``: a SQLite path (default
``~/.local/share/lmbot/quiz.sqlite3``) or a ``postgresql://`` URL shared by several bot processes
(see ``plugins/_scores.py``). Each server keeps its own leaderboard; a direct message or the
console is a scope of its own, one per person.

Quiz answers must be earned. Each question is sent with a token the server signs with a secret
kept in the score database: the question, the scope it was asked in, a fresh nonce, and a tag for
the person asked. The order of the choices is derived from the same secret, so a button's id
names a letter that only the server can map to a choice. An answer without a valid token scores
nothing; a classmate pressing someone else's button sees the answer but scores nothing; a second
answer to a question scores nothing (the database's primary key).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import os
import random
import re
import time
from collections.abc import Callable, Sequence

from bot import (
    Boolean,
    Button,
    Command,
    CommandError,
    Context,
    Field,
    QuizQuestion,
    Reply,
    Table,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
    plugin_options,
)
from plugins._scores import DEFAULT_DB, STORE_ENVIRONMENT, ScoreStore, ScoresUnavailable, add_review_card, open_store

log = logging.getLogger(__name__)

LETTERS = "ABCDE"
NONCE_CHARS = 6  # base64url characters: 36 random bits, a fresh choice order per asking
MAC_BYTES, TAG_BYTES = 9, 6  # 12 + 8 base64url characters
SIGNATURE_CHARS = (MAC_BYTES + TAG_BYTES) * 4 // 3
FIELD_VALUE = 1024  # Discord's limit on one embed field
MAX_COMMAND_LINE = 300  # a "go deeper" line longer than this is not shown
PLACEHOLDER = re.compile(r"<[^<>]+>")  # `/summarize text:<a paragraph>` is for the reader to fill in


def scores_for(ctx: Context) -> ScoreStore:
    return open_store(str(plugin_options(ctx, "study")["quiz_db"]))


def scope_of(ctx: Context) -> str:
    """Whose leaderboard an answer counts on: a server's, or one person's own (DMs, console)."""
    if ctx.guild_id:
        return str(ctx.guild_id)
    return f"{ctx.transport}:{ctx.user.id}"


# --------------------------------------------------------------------------- /topic


def ordered_topics(ctx: Context) -> list[Topic]:
    """The cards in course order, numbered from 1 in `/topic`'s list."""
    return sorted(ctx.app.registry.topics.values(), key=lambda t: (t.order, t.slug))


YES = frozenset({"1", "yes", "y", "true", "on"})  # `try` beside a `name`: run that card's command
NO = frozenset({"0", "no", "n", "false", "off"})


def find_topic(ctx: Context, name: str) -> Topic:
    topics = ordered_topics(ctx)
    wanted = name.strip().lower()
    number = wanted.removeprefix("#")
    if number.isascii() and number.isdigit():
        if 1 <= int(number) <= len(topics):
            return topics[int(number) - 1]
        raise UserError(f"There is no topic {number[:6]}: the topics are numbered 1 to {len(topics)} (see /topic).")
    for topic in topics:
        if wanted in (topic.slug, topic.title.lower()):
            return topic
    matches = [t for t in topics if wanted in t.slug or wanted in t.title.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:  # part of several names: say which, not that there is none
        which = ", ".join(t.slug for t in matches)
        raise UserError(f"“{name.strip()[:40]}” is part of more than one topic: {which}. Which one?")
    known = ", ".join(sorted(t.slug for t in topics))
    raise UserError(f"No topic called “{name.strip()[:40]}”. Topics: {known}.")


def runnable(ctx: Context, card: Topic) -> bool:
    """Whether the card's command can run as written: a command this bot has, nothing to fill in."""
    words = card.try_command.split()
    if not words or not words[0].startswith("/") or PLACEHOLDER.search(card.try_command):
        return False
    cmd = ctx.app.registry.commands.get(words[0][1:])
    # A card that points at a card (`/topic ...`) would run itself; an owner's command is not for students.
    return cmd is not None and not cmd.owner_only and cmd.name != "topic"


def _names_a_command(ctx: Context, line: str) -> bool:
    words = line.split()
    cmd = ctx.app.registry.commands.get(words[0][1:]) if words and words[0].startswith("/") else None
    return cmd is not None and not cmd.owner_only


def _code(line: str) -> str:
    fence = "``" if "`" in line else "`"
    return f"{fence} {line} {fence}" if fence == "``" else f"`{line}`"


def command_lines(lines: Sequence[str], limit: int = FIELD_VALUE) -> str:
    """Command lines as a list that fits in ``limit`` characters; what does not fit is counted."""
    shown: list[str] = []
    for n, line in enumerate(lines):
        one = " ".join(line.split())
        if not one or len(one) > MAX_COMMAND_LINE:
            continue
        item = f"• {_code(one)}"
        rest = len(lines) - n - 1
        tail = f"\n… and {rest} more" if rest else ""
        if len("\n".join([*shown, item])) + len(tail) > limit:
            shown.append(f"… and {len(lines) - n} more")
            break
        shown.append(item)
    return "\n".join(shown)


@command(
    "topic",
    "A study card: the key idea, a table, a command to try, questions to discuss",
    options=[
        Text("name", "The topic, by name or number (leave out to list them all)", required=False, max_length=60),
        Text("try", "Run a topic's example command (the card's Try it button)", required=False, max_length=60),
    ],
)
async def topic(ctx: Context, name: str | None, **more: str | None) -> Reply:
    # "try" is a Python keyword, so it arrives through **more.
    chosen = str(more.get("try") or "").strip()
    if chosen and not name:
        return await _try(ctx, chosen)
    if chosen and name:
        # With a name, `try` reads as yes/no for that card (`name:ngrams try:1`); a topic it names
        # must be the same one, never a different card run silently in its place.
        card = find_topic(ctx, name)
        if chosen.lower() not in NO:
            if chosen.lower() not in YES and find_topic(ctx, chosen).slug != card.slug:
                other = find_topic(ctx, chosen)
                raise UserError(
                    f"`name` is {card.slug} but `try` is {other.slug}: give one topic "
                    f"(e.g. `/topic name:{card.slug} try:yes`)."
                )
            return await _try(ctx, card.slug)
    if not name:
        topics = ordered_topics(ctx)
        rows = [[str(n), t.slug, t.title, t.try_command.split(" ")[0]] for n, t in enumerate(topics, 1)]
        return Reply(
            title="Course topics",
            text="Open one with `/topic name:<name or number>`; test yourself with `/quiz`.",
            table=Table(["#", "name", "topic", "try"], rows, align="rlll"),
            data={"topics": [t.slug for t in topics]},
        )
    card = find_topic(ctx, name)
    fields = [Field("try", _code(card.try_command), inline=False)] if card.try_command else []
    if card.questions:
        fields.append(Field("discuss", "\n".join(f"• {q}" for q in card.questions)[:FIELD_VALUE], inline=False))
    # Only lines this bot can run (a plugin may be disabled, or not installed here).
    deeper = command_lines([line for line in card.go_deeper if _names_a_command(ctx, line)])
    if deeper:
        fields.append(Field("go deeper", deeper, inline=False))
    buttons = [Button("Try it", "topic", "try", card.slug)] if runnable(ctx, card) else []
    buttons.append(Button("Quiz me", "quiz", "topic", card.slug))
    return Reply(
        title=card.title,
        text=card.key_idea,
        table=card.table,
        fields=fields,
        buttons=buttons,
        data={
            "topic": card.slug,
            "questions": list(card.questions),
            "quiz_questions": len(card.quiz),
            "go_deeper": list(card.go_deeper),
        },
    )


async def _try(ctx: Context, name: str) -> Reply:
    """Run a card's whole command, options and all, for whoever pressed its Try it button."""
    card = find_topic(ctx, name)
    if not runnable(ctx, card):
        shown = f" Its card suggests `{card.try_command}`: fill in your own text." if card.try_command else ""
        raise UserError(f"The “{card.title}” card has no command to run as it is.{shown}")
    try:
        reply: Reply = await ctx.app.execute_line(card.try_command, ctx)
    except CommandError as exc:  # the card's line is malformed: the plugin's mistake, told in words
        log.warning("the %s card's command %r does not parse: %s", card.slug, card.try_command, exc)
        raise UserError(f"The “{card.title}” card's example does not run on this bot.") from None
    if reply.error and reply.data.get("error_kind") == "NoModelForRole":
        return _no_model(ctx, card, reply)
    return reply


def _no_model(ctx: Context, card: Topic, reply: Reply) -> Reply:
    """A student-facing line for a command whose model this server lacks; the operator's
    message (which config key to set) goes to the log, and `lmbot models` shows it too."""
    name = card.try_command.split()[0].lstrip("/")
    log.warning("/topic try:%s: %s", card.slug, reply.text)
    roles = ctx.app.registry.roles
    role = next((roles[r] for r in re.findall(r"`([a-z0-9_-]+)`", reply.text) if r in roles), None)
    missing = _lower_first(role.description) if role is not None else "model for it"
    description = ctx.app.registry.commands[name].description.rstrip(".")
    text = (
        f"This server has no {missing}, so `/{name}` cannot run here. What it does: {description}. "
        "The card explains what it would show; on a bot with that model, Try it runs it."
    )
    return Reply.failure(text, ephemeral=False, error_kind="NoModelForRole", topic=card.slug)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# --------------------------------------------------------------------------- question tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _payload(scope: str, question_id: str, question: QuizQuestion, nonce: str) -> bytes:
    # The question's content is signed too: a token for a question that has since been rewritten fails.
    content = repr((question.question, tuple(question.choices), question.answer)).encode()
    digest = hashlib.sha256(content).hexdigest()[:16]
    return "\x1f".join(("lmbot-quiz-1", scope, question_id, digest, nonce)).encode()


def _mac(key: bytes, purpose: bytes, message: bytes) -> bytes:
    return hmac.new(key, purpose + b"\x1e" + message, hashlib.sha256).digest()


def question_mac(key: bytes, payload: bytes) -> str:
    """Proves the server asked this question in this scope."""
    return _b64(_mac(key, b"ask", payload)[:MAC_BYTES])


def asker_tag(key: bytes, mac: str, user_id: str) -> str:
    """Proves whom it was asked to."""
    return _b64(_mac(key, b"who", f"{mac}\x1f{user_id}".encode())[:TAG_BYTES])


def display_order(key: bytes, payload: bytes, count: int) -> list[int]:
    """The order the choices are shown in (shown position -> choice index), secret to the server."""
    stream = _mac(key, b"order", payload)
    order = list(range(count))
    for i in range(count - 1, 0, -1):  # Fisher-Yates on the keyed hash's bytes
        j = int.from_bytes(stream[2 * i : 2 * i + 2], "big") % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _questions(ctx: Context, name: str | None) -> list[tuple[str, QuizQuestion]]:
    topics = [find_topic(ctx, name)] if name else ordered_topics(ctx)
    return [(f"{t.slug}.{n}", q) for t in topics for n, q in enumerate(t.quiz)]


async def _ask(ctx: Context, name: str | None) -> Reply:
    pool = _questions(ctx, name)
    if not pool:
        raise UserError("There are no quiz questions for that topic yet.")
    question_id, question = random.choice(pool)
    store = scores_for(ctx)
    key = await store.key() or store.local_key
    nonce = _b64(os.urandom(6))[:NONCE_CHARS]
    payload = _payload(scope_of(ctx), question_id, question, nonce)
    mac = question_mac(key, payload)
    token = f"{question_id}.{nonce}.{mac}{asker_tag(key, mac, ctx.user.id)}"
    order = display_order(key, payload, len(question.choices))
    buttons = [
        Button(f"{LETTERS[shown]}. {question.choices[choice]}"[:80], "quiz", "answer", f"{token}.{LETTERS[shown]}")
        for shown, choice in enumerate(order)
    ]
    return Reply(
        title=f"Quiz: {ctx.app.registry.topics[question_id.rsplit('.', 1)[0]].title}",
        text=question.question,
        buttons=buttons,
        data={"question": question_id, "choices": [question.choices[i] for i in order]},
    )


NOT_ASKED = "That answer is not to a question the bot asked here, so it scores nothing; start a new one with /quiz."


async def _answer(ctx: Context, answer: str) -> Reply:
    parts = answer.split(".")
    if len(parts) != 5:
        raise UserError(NOT_ASKED)
    slug, number, nonce, signature, letter = parts
    topic = ctx.app.registry.topics.get(slug)
    if (
        topic is None
        or not (number.isascii() and number.isdigit() and int(number) < len(topic.quiz))
        or len(nonce) != NONCE_CHARS
        or len(signature) != SIGNATURE_CHARS
        or letter not in LETTERS[: len(topic.quiz[int(number)].choices)]
    ):
        raise UserError(NOT_ASKED)
    question_id, question = f"{slug}.{number}", topic.quiz[int(number)]
    mac, tag = signature[: MAC_BYTES * 4 // 3], signature[MAC_BYTES * 4 // 3 :]
    store = scores_for(ctx)
    database_key = await store.key()
    payload = _payload(scope_of(ctx), question_id, question, nonce)
    key = next(
        (k for k in (database_key, store.local_key) if k and hmac.compare_digest(question_mac(k, payload), mac)), None
    )
    if key is None:
        if database_key is None:  # it may be signed with the key we cannot read now
            raise UserError(f"Your answer cannot be checked right now: {store.key_problem}.")
        raise UserError(NOT_ASKED)
    correct = display_order(key, payload, len(question.choices))[LETTERS.index(letter)] == question.answer
    verdict = "Correct!" if correct else f"Not quite: the answer is “{question.choices[question.answer]}”."
    notes: list[str] = []
    fields: list[Field] = []
    own = hmac.compare_digest(asker_tag(key, mac, ctx.user.id), tag)
    counted = saved = False
    score: list[int] | None = None
    if not own:
        notes.append("This question was asked to someone else, so your answer does not count; /quiz asks you one.")
    else:
        try:
            counted, right, total = await store.record(scope_of(ctx), ctx.user.id, ctx.user.name, question_id, correct)
        except ScoresUnavailable as exc:
            notes.append(f"Your answer was not saved: {exc}.")
        else:
            saved, score = True, [right, total]
            fields.append(Field("score", f"{right} of {total} right"))
            if not counted:
                notes.append("You had answered this one before; only your first answer counts.")
            elif not correct and await _review_card(store, ctx, question_id, question):
                notes.append("It is in your /review queue, to try again later.")
    return Reply(
        title=f"{ctx.user.name}: {verdict}",
        text="\n".join([question.why, *notes]),
        fields=fields,
        buttons=[
            Button("Next question", "quiz", "topic", slug),
            Button("Study card", "topic", "name", slug),
            Button("Scores", "quiz", "leaderboard", "true"),
        ],
        data={
            "question": question_id,
            "correct": correct,
            "counted": counted,
            "saved": saved,
            "own": own,
            "score": score,
        },
    )


async def _review_card(store: ScoreStore, ctx: Context, question_id: str, question: QuizQuestion) -> bool:
    """A missed question as a card of the person's review queue; whether it was added."""
    choices = "\n".join(f"• {choice}" for choice in question.choices)
    back = f"{question.choices[question.answer]}. {question.why}"
    try:
        return await add_review_card(store, ctx.user.id, f"quiz.{question_id}", f"{question.question}\n{choices}", back)
    except ScoresUnavailable:
        return False


async def _leaderboard(ctx: Context) -> Reply:
    try:
        rows = await scores_for(ctx).leaderboard(scope_of(ctx))
    except ScoresUnavailable as exc:
        return Reply.failure(f"The scores cannot be read right now: {exc}.", ephemeral=False)
    if ctx.guild_id:
        empty, shown = "No quiz answers on this server yet.", "Scores on this server."
    else:
        empty, shown = (
            "No quiz answers from you here yet.",
            "Your own scores: outside a server, each person has a board.",
        )
    if not rows:
        return Reply(f"{empty} Start with /quiz.", title="Quiz leaderboard", data={"leaderboard": []})
    table = Table(
        ["#", "who", "right", "answered"],
        [[str(n), who, str(r), str(t)] for n, (who, r, t) in enumerate(rows, 1)],
        align="rlrr",
    )
    return Reply(title="Quiz leaderboard", text=shown, table=table, data={"leaderboard": rows})


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
        return await _leaderboard(ctx)
    if answer:
        return await _answer(ctx, answer.strip())
    return await _ask(ctx, topic)


# --------------------------------------------------------------------------- /leaderboard

PERIODS = ("day", "week", "all")
GAMES = ("round", "quiz")
BOARD_ROWS = 10
STANDING_ROWS = 1000  # a member's own place is counted among this many (a class is far smaller)


def period_start(period: str, now: float | None = None) -> float:
    """When a board's period began (UTC): today's midnight, this week's Monday, or the beginning."""
    if period == "all":
        return 0.0
    today = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC).date()
    if period == "week":
        today -= datetime.timedelta(days=today.weekday())
    return datetime.datetime.combine(today, datetime.time(), datetime.UTC).timestamp()


async def _board_rows(ctx: Context, game: str, since: float, limit: int) -> list[tuple[str, str, str, str]]:
    """(user id, name, score, played) rows, best first."""
    store = scores_for(ctx)
    if game == "round":
        return [
            (user, name, f"{points:.1f}", str(played))
            for user, name, points, played in await store.round_board(scope_of(ctx), since, limit)
        ]
    return [
        (user, name, str(right), str(total))
        for user, name, right, total in await store.quiz_board(scope_of(ctx), since, limit)
    ]


@command(
    "leaderboard",
    "This server's best players of rounds or the quiz, today, this week or all time",
    options=[
        Text("game", "Which game's board", default="round", choices=GAMES),
        Text("period", "Since when (UTC days; weeks start on Monday)", default="week", choices=PERIODS),
        Boolean("mine", "Only your own standing, shown to you alone", default=False),
    ],
)
async def leaderboard(ctx: Context, game: str, period: str, mine: bool) -> Reply:
    since = period_start(period)
    when = {"day": "today", "week": "this week", "all": "all time"}[period]
    headers = ["#", "player", "points", "rounds"] if game == "round" else ["#", "player", "right", "answered"]
    where = "on this server" if ctx.guild_id else "(yours alone: outside a server each person has a board)"
    try:
        rows = await _board_rows(ctx, game, since, STANDING_ROWS if mine else BOARD_ROWS)
    except ScoresUnavailable as exc:
        return Reply.failure(f"The scores cannot be read right now: {exc}.", ephemeral=mine)
    title = f"{'Round' if game == 'round' else 'Quiz'} leaderboard, {when}"
    board = [{"user": user, "name": name, "score": score, "played": played} for user, name, score, played in rows]
    if mine:
        place = next((n for n, row in enumerate(rows, 1) if row[0] == ctx.user.id), None)
        if place is None:
            text = f"You have no {game} scores {where} {when} yet; /{game} to start."
        else:
            _, _, score, played = rows[place - 1]
            text = f"You are #{place} of {len(rows)} {where} {when}: {score} {headers[2]}, {played} {headers[3]}."
        return Reply(text, title=title, ephemeral=True, data={"place": place, "players": len(rows)})
    if not rows:
        return Reply(f"No {game} scores {where} {when} yet. Start with /{game}.", title=title, data={"board": []})
    shown = [[str(n), name, score, played] for n, (_, name, score, played) in enumerate(rows, 1)]
    # A button carries one option: "My standing" is offered for the default board, which it shows.
    standing = [Button("My standing", "leaderboard", "mine", "true")] if (game, period) == ("round", "week") else []
    return Reply(
        f"The best {len(rows)} {where}, {when}.",
        title=title,
        table=Table(headers, shown, "rlrr"),
        buttons=standing,
        data={"board": board, "game": game, "period": period, "since": since},
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(topic)
    register(quiz)
    register(leaderboard)


@hookimpl
def register_options(register: Callable[[Text], None]) -> None:
    # [plugins.options.study] quiz_db: where quiz scores are kept.
    register(Text("quiz_db", "Quiz scores: a SQLite file, or a postgresql:// URL", default=DEFAULT_DB, max_length=4096))


@hookimpl
def register_environment(register: Callable[[str], None]) -> None:
    register(STORE_ENVIRONMENT)  # the score store's PostgreSQL login
