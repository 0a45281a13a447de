"""/topic and /quiz: cards for every topic, questions, scores that survive a restart."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bot.app import App
from plugins.study import Scores, shuffled
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord

TOPICS = {
    "language-model", "ar-vs-masked", "masked-lm", "subwords", "nsp",
    "seq2seq", "transformers-vs-rnns", "foundation", "gen-vs-disc", "ngrams",
}  # fmt: skip


async def test_every_course_topic_has_a_card_a_command_and_five_questions(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    assert set(app.registry.topics) == TOPICS
    listing = await app.execute_line("/topic")
    assert listing.data["topics"][0] == "language-model" and len(listing.data["topics"]) == 10
    for slug, card in app.registry.topics.items():
        assert len(card.quiz) >= 5, slug
        assert card.key_idea and card.questions
        command_name = card.try_command.split()[0].lstrip("/")
        assert command_name in app.registry.commands, card.try_command
        assert app.registry.commands[command_name].topic == slug
        reply = await app.execute("topic", {"name": slug}, app.local_context())
        assert not reply.error and reply.title == card.title
        assert_fits_discord(reply)


async def test_a_card_offers_its_command_and_a_quiz(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    ctx = app.local_context()
    card = await app.execute_line("/topic name:transformers-vs-rnns")
    buttons = {b.label: b for b in card.buttons}
    assert set(buttons) == {"Try it", "Quiz me"}
    tried = await app.execute_text(buttons["Try it"].command, {buttons["Try it"].option: buttons["Try it"].value}, ctx)
    direct = await app.execute_line(app.registry.topics["transformers-vs-rnns"].try_command)
    assert not tried.error and tried.data["lengths"] == direct.data["lengths"]
    quizzed = await app.execute_text("quiz", {"topic": buttons["Quiz me"].value}, ctx)
    assert quizzed.data["question"].startswith("transformers-vs-rnns.")
    # Two options, or a placeholder to fill in, make no "Try it" button.
    for slug in ("subwords", "seq2seq"):
        labels = [b.label for b in (await app.execute_line(f"/topic name:{slug}")).buttons]
        assert labels == ["Quiz me"], slug


async def test_unknown_topic_lists_the_known_ones(app_factory) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute_line("/topic name:astrology")
    assert reply.error and "Topics: ar-vs-masked" in reply.text


def answers_of(reply) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """choice text -> the answer value its button carries."""
    return {re.sub(r"^[A-E]\. ", "", b.label): b.value for b in reply.buttons}


async def test_quiz_asks_checks_and_scores(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    asked = await app.execute_line("/quiz topic:ngrams")
    assert not asked.error and len(asked.buttons) == 4
    slug, number = asked.data["question"].split(".")
    question = app.registry.topics[slug].quiz[int(number)]
    right = answers_of(asked)[question.choices[question.answer]]
    wrong = next(v for text, v in answers_of(asked).items() if text != question.choices[question.answer])
    assert str(question.answer) not in right.rsplit(".", 1)[1]  # the value names a letter, not the index

    first = await app.execute("quiz", {"answer": wrong}, app.local_context())
    assert first.data["correct"] is False and "Not quite" in first.title
    again = await app.execute("quiz", {"answer": right}, app.local_context())
    assert again.data["counted"] is False and again.data["score"] == [0, 1]  # only the first answer counts
    board = await app.execute_line("/quiz scores")
    assert board.data["leaderboard"] == [("console", 0, 1)]
    # After an answer: the next question on the same topic, its study card, the scores.
    ctx = app.local_context()
    pressed = {b.label: await app.execute_text(b.command, {b.option: b.value}, ctx) for b in again.buttons}
    assert pressed["Next question"].data["question"].startswith(f"{slug}.")
    assert pressed["Study card"].title and app.registry.topics[slug].title in pressed["Study card"].title
    assert pressed["Scores"].data["leaderboard"] == board.data["leaderboard"]
    bad = await app.execute("quiz", {"answer": "ngrams.99.1.A"}, app.local_context())
    assert bad.error and "start a new one" in bad.text


async def test_scores_survive_a_restart(cache_dir: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    first = App(config)
    asked = await first.execute_line("/quiz topic:nsp")
    slug, number = asked.data["question"].split(".")
    question = first.registry.topics[slug].quiz[int(number)]
    await first.execute("quiz", {"answer": answers_of(asked)[question.choices[question.answer]]}, first.local_context())
    await first.close()
    restarted = App(make_config(tmp_path))
    board = await restarted.execute_line("/quiz leaderboard:true")
    assert board.data["leaderboard"] == [("console", 1, 1)]
    await restarted.close()


def test_concurrent_answers_are_counted_once(tmp_path: Path) -> None:
    scores = Scores(tmp_path / "quiz.sqlite3")

    def answer(i: int) -> bool:
        # 40 users answer two questions each, and every answer is sent twice at once.
        return scores.record("g", f"u{i % 40}", f"user{i % 40}", f"q{i // 80}", True)

    with ThreadPoolExecutor(8) as pool:
        counted = list(pool.map(answer, range(160)))
    assert sum(counted) == 80
    assert scores.score("g", "u3") == (2, 2)
    assert len(scores.leaderboard("g", limit=100)) == 40


def test_shuffle_is_reproducible_from_its_seed() -> None:
    assert shuffled(4, 123) == shuffled(4, 123)
    assert sorted(shuffled(4, 9)) == [0, 1, 2, 3]


async def test_console_shows_buttons_as_commands(app_factory) -> None:  # type: ignore[no-untyped-def]
    from bot.render import render_text

    reply = await app_factory().execute_line("/quiz")
    text = render_text(reply, [])
    assert text.count("→ /quiz answer:") == len(reply.buttons)
    await asyncio.sleep(0)
