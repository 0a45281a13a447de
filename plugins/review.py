"""/review: each person's own queue of things to go over again, spaced out by FSRS.

A quiz question answered wrong and a round guess the model found very unlikely become review
cards of whoever missed them (plugins/study.py and plugins/round.py add them). ``/review`` shows
that person's due cards privately (ephemeral on Discord): the question first, the answer only
after "Show answer", then four ratings. The rating goes to FSRS (the ``fsrs`` package, the
scheduler Anki uses), which decides when the card is due again: soon after "Again", later the
better it was remembered.

Cards live in the score database (plugins/_scores.py), keyed by person: nobody sees or rates
another person's cards, whatever a button's id says. A rating button names the schedule it was
shown with, so pressing it twice (or an old copy of it) rates once.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from collections.abc import Callable

from fsrs import Card, Rating, Scheduler

from bot import Button, Command, Context, Field, Reply, Text, UserError, command, hookimpl
from bot.render import plural
from plugins._scores import STORE_ENVIRONMENT, ScoresUnavailable
from plugins.study import scores_for

# No fuzzing: the next date is the one FSRS computes for the rating (fuzz spreads big decks'
# reviews over days; a student's queue here is small and a predictable date is easier to trust).
SCHEDULER = Scheduler(enable_fuzzing=False)
RATINGS = {"1": Rating.Again, "2": Rating.Hard, "3": Rating.Good, "4": Rating.Easy}
LABELS = {"1": "Again", "2": "Hard", "3": "Good", "4": "Easy"}
CARD_ID = re.compile(r"^[A-Za-z0-9_.-]{1,60}$")
STAMP_CHARS = 8
SHOWN_DUE = 5

RATING_LINE = (
    "Again: you did not know it (it comes back in minutes) · Hard: with effort · Good: you knew it · "
    "Easy: at once (the better you knew it, the longer until it comes back)"
)


def stamp(state: str) -> str:
    """A short mark of a card's schedule: a rating button only counts while it is unchanged."""
    return hashlib.sha256(state.encode()).hexdigest()[:STAMP_CHARS]


def when(due: datetime.datetime, now: datetime.datetime) -> str:
    seconds = (due - now).total_seconds()
    if seconds < 3600:
        minutes = max(1, round(seconds / 60))
        return f"in {plural(minutes, 'minute')}"
    if seconds < 2 * 86400:
        hours = round(seconds / 3600)
        return f"in {plural(hours, 'hour')}"
    return f"in {plural(round(seconds / 86400), 'day')} ({due:%Y-%m-%d})"


async def _next_card(ctx: Context, before: list[Field] | None = None, note: str = "") -> Reply:
    now = time.time()
    due = await scores_for(ctx).due_cards(ctx.user.id, now, SHOWN_DUE + 1)
    fields = list(before or [])
    if not due:
        empty = "Nothing to review right now. Missed quiz questions and far-off /round guesses land here."
        text = f"{note}\n{empty}" if note else empty
        return Reply(text, title="Review", fields=fields, ephemeral=True, data={"due": 0})
    card_id, front, _, state, _ = due[0]
    more = f"{len(due) - 1}{'+' if len(due) > SHOWN_DUE else ''} more due after this one." if len(due) > 1 else ""
    text = "\n".join(x for x in (note, front, more) if x)
    return Reply(
        text,
        title="Review: try to recall, then check",
        fields=fields,
        buttons=[Button("Show answer", "review", "show", f"{card_id}.{stamp(state)}")],
        ephemeral=True,
        data={"card": card_id, "due": len(due)},
    )


def _parse(value: str, parts: int) -> list[str]:
    pieces = value.strip().rsplit(".", parts - 1)
    if len(pieces) != parts or not CARD_ID.match(pieces[0]):
        raise UserError("That review button is not one of yours; run /review.")
    return pieces


async def _show(ctx: Context, value: str) -> Reply:
    card_id, shown_stamp = _parse(value, 2)
    card = await scores_for(ctx).card(ctx.user.id, card_id)
    if card is None:
        raise UserError("That review button is not one of yours; run /review.")
    front, back, state, _ = card
    if stamp(state) != shown_stamp:
        raise UserError("You have rated that card already; /review shows the next one.")
    buttons = [Button(LABELS[r], "review", "rate", f"{card_id}.{r}.{shown_stamp}") for r in RATINGS]
    return Reply(
        front,
        title="Review: how well did you know it?",
        fields=[Field("answer", back, inline=False), Field("ratings", RATING_LINE, inline=False)],
        buttons=buttons,
        ephemeral=True,
        data={"card": card_id, "answer": back},
    )


async def _rate(ctx: Context, value: str) -> Reply:
    card_id, rating, shown_stamp = _parse(value, 3)
    if rating not in RATINGS:
        raise UserError("That review button is not one of yours; run /review.")
    store = scores_for(ctx)
    card = await store.card(ctx.user.id, card_id)
    if card is None:
        raise UserError("That review button is not one of yours; run /review.")
    _, _, state, _ = card
    if stamp(state) != shown_stamp:
        raise UserError("You have rated that card already; /review shows the next one.")
    now = datetime.datetime.now(datetime.UTC)
    scheduled, _ = SCHEDULER.review_card(Card.from_json(state), RATINGS[rating], now)
    if not await store.reschedule(ctx.user.id, card_id, state, scheduled.to_json(), scheduled.due.timestamp()):
        raise UserError("You have rated that card already; /review shows the next one.")
    note = f"{LABELS[rating]}: that card comes back {when(scheduled.due, now)}."
    reply = await _next_card(ctx, note=note)
    reply.data.update(rated=card_id, next_due=scheduled.due.timestamp())
    return reply


@command(
    "review",
    "Your own review queue: missed quiz questions and round guesses, spaced out to stick",
    options=[
        Text("show", "Show a card's answer (the Show answer button fills this in)", required=False, max_length=80),
        Text("rate", "Rate how well you knew a card (the rating buttons fill this in)", required=False, max_length=80),
    ],
)
async def review(ctx: Context, show: str | None, rate: str | None) -> Reply:
    try:
        if rate:
            return await _rate(ctx, rate)
        if show:
            return await _show(ctx, show)
        return await _next_card(ctx)
    except ScoresUnavailable as exc:
        raise UserError(f"Your review cards cannot be read right now: {exc}.") from None


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(review)


@hookimpl
def register_environment(register: Callable[[str], None]) -> None:
    register(STORE_ENVIRONMENT)  # the score store's PostgreSQL login
