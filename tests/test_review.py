"""/review: missed quiz questions and far-off round guesses become one's own cards, shown privately,
answer hidden until "Show answer", and each rating schedules the card exactly as fsrs does."""

from __future__ import annotations

import re

from fsrs import Card, Rating, Scheduler

from bot.app import App
from bot.commands import Context, Reply, User
from plugins.study import scores_for
from tests import study_fixtures

app = study_fixtures.app  # the fixture: an app on the tiny GPT-2, its scores in the test's folder


def ctx_of(app: App, user: str, guild: str | None = "4242") -> Context:
    return Context(user=User(user, f"student{user}"), app=app, guild_id=guild, transport="discord")


async def press(app: App, reply: Reply, label: str, ctx: Context) -> Reply:
    button = next(b for b in reply.buttons if b.label == label)
    return await app.execute_text(button.command, {button.option: button.value}, ctx)


async def miss_a_question(app: App, ctx: Context) -> tuple[str, str, str]:
    """Answer a quiz question wrong; (its text, its right choice, why it is right)."""
    asked = await app.execute("quiz", {"topic": "ngrams"}, ctx)
    slug, number = asked.data["question"].split(".")
    question = app.registry.topics[slug].quiz[int(number)]
    wrong = next(b for b in asked.buttons if re.sub(r"^[A-E]\. ", "", b.label) != question.choices[question.answer])
    answered = await app.execute_text("quiz", {"answer": wrong.value}, ctx)
    assert answered.data["correct"] is False and "/review" in answered.text
    return question.question, question.choices[question.answer], question.why


async def test_a_missed_question_is_reviewed_privately_and_scheduled_by_fsrs(app: App) -> None:
    me, classmate = ctx_of(app, "7"), ctx_of(app, "8")
    question, answer, why = await miss_a_question(app, me)
    due = await app.execute("review", {}, me)
    assert due.ephemeral and question in due.text and answer in due.text  # the choices, unmarked
    assert why not in due.text + " ".join(f.value for f in due.fields)  # the answer: hidden until "Show answer"
    assert (await app.execute("review", {}, classmate)).data["due"] == 0  # nobody else's queue
    stolen = await press(app, due, "Show answer", classmate)
    assert stolen.error and "not one of yours" in stolen.text

    shown = await press(app, due, "Show answer", me)
    assert shown.ephemeral and next(f.value for f in shown.fields if f.name == "answer") == f"{answer}. {why}"
    assert [b.label for b in shown.buttons] == ["Again", "Hard", "Good", "Easy"]
    store = scores_for(ctx_of(app, "7"))
    card_id = shown.data["card"]
    before = await store.card("7", card_id)
    assert before is not None
    rated = await press(app, shown, "Good", me)
    assert not rated.error and "comes back in 10 minutes" in rated.text and rated.data["due"] == 0
    after = await store.card("7", card_id)
    assert after is not None
    # Exactly what fsrs computes for a "Good" at the moment it was given.
    stored = Card.from_json(after[2])
    want, _ = Scheduler(enable_fuzzing=False).review_card(Card.from_json(before[2]), Rating.Good, stored.last_review)
    assert after[2] == want.to_json() and after[3] == want.due.timestamp()
    twice = await press(app, shown, "Good", me)
    assert twice.error and "rated that card already" in twice.text
    assert await store.card("7", card_id) == after


async def test_again_brings_a_card_back_sooner_than_easy(app: App) -> None:
    ctx = ctx_of(app, "9", guild=None)
    await miss_a_question(app, ctx)
    shown = await press(app, await app.execute("review", {}, ctx), "Show answer", ctx)
    store = scores_for(ctx)
    card_id = shown.data["card"]
    before = await store.card("9", card_id)
    assert before is not None
    again = await press(app, shown, "Again", ctx)
    assert "comes back in 1 minute." in again.text
    scheduler = Scheduler(enable_fuzzing=False)
    card = Card.from_json(before[2])
    easy, _ = scheduler.review_card(card, Rating.Easy, card.due)
    soon, _ = scheduler.review_card(card, Rating.Again, card.due)
    assert soon.due < easy.due


async def test_a_far_off_round_guess_becomes_a_card(app: App) -> None:
    ctx = ctx_of(app, "5", guild=None)
    played = await app.execute("round", {"prompt": "Once upon a", "guess": "Zzyzx-Quibble-Frobnicate"}, ctx)
    assert played.data["players"][0]["bits"] >= 12
    due = await app.execute("review", {}, ctx)
    assert "Once upon a" in due.text and "Zzyzx" in due.text
    shown = await press(app, due, "Show answer", ctx)
    top = played.data["top"][0]["token"]
    assert top in next(f.value for f in shown.fields if f.name == "answer")
