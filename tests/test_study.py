"""/topic and /quiz: cards for every topic, questions, scores that survive a restart."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot import QuizQuestion, Reply
from bot.app import App
from bot.commands import Context, User, utf16_length
from bot.frontends.discord.render import button_id, render_reply
from tests import study_fixtures
from tests.conftest import examples, make_config
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
    # "Try it" names only the card; the server runs the card's whole command.
    try_it = buttons["Try it"]
    assert (try_it.command, try_it.option, try_it.value) == ("topic", "try", "transformers-vs-rnns")
    tried = await app.execute_text(try_it.command, {try_it.option: try_it.value}, ctx)
    direct = await app.execute_line(app.registry.topics["transformers-vs-rnns"].try_command)
    assert not tried.error and tried.data["lengths"] == direct.data["lengths"]
    quizzed = await app.execute_text("quiz", {"topic": buttons["Quiz me"].value}, ctx)
    assert quizzed.data["question"].startswith("transformers-vs-rnns.")


async def test_unknown_topic_lists_the_known_ones(app_factory) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute_line("/topic name:astrology")
    assert reply.error and "Topics: ar-vs-masked" in reply.text


def answers_of(reply) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """choice text -> the answer value its button carries."""
    return {re.sub(r"^[A-E]\. ", "", b.label): b.value for b in reply.buttons}


async def test_quiz_asks_checks_and_scores(cache_dir: Path, tmp_path: Path) -> None:
    # A score database of its own: the board below holds this test's answers only, whatever ran before.
    app = App(make_config(cache_dir, plugin_options={"study": {"quiz_db": str(tmp_path / "quiz.sqlite3")}}))
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
    await app.close()


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


async def test_console_shows_buttons_as_commands(app_factory) -> None:  # type: ignore[no-untyped-def]
    from bot.render import render_text

    reply = await app_factory().execute_line("/quiz")
    text = render_text(reply, [])
    assert text.count("→ /quiz answer:") == len(reply.buttons)
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- fixture cards and questions


@pytest.fixture
async def study_app(cache_dir: Path, tmp_path: Path) -> AsyncIterator[App]:
    """The bot with the fixture cards, and a score database of its own."""
    config = make_config(cache_dir, plugin_options={"study": {"quiz_db": str(tmp_path / "quiz.sqlite3")}})
    app = App(config, extra_plugins=[(study_fixtures, "study-fixtures")])
    yield app
    await app.close()


def person(app: App, user: str = "1", guild: str | None = "4242") -> Context:
    """Someone on Discord: in a server, or (guild None) in a direct message."""
    return Context(user=User(user, f"student{user}"), app=app, guild_id=guild, transport="discord")


async def ask(app: App, ctx: Context, slug: str = study_fixtures.MULTI) -> tuple[Reply, QuizQuestion]:
    asked = await app.execute("quiz", {"topic": slug}, ctx)
    assert not asked.error, asked.text
    slug, number = asked.data["question"].rsplit(".", 1)
    return asked, app.registry.topics[slug].quiz[int(number)]


def value_for(asked: Reply, question: QuizQuestion, right: bool = True) -> str:
    """The answer a button carries: for the right choice, or for a wrong one."""
    correct = question.choices[question.answer]
    return next(
        b.value for b, choice in zip(asked.buttons, asked.data["choices"], strict=True) if (choice == correct) == right
    )


async def test_topics_open_by_their_listed_number(study_app: App) -> None:
    listing = await study_app.execute_line("/topic")
    for number, slug in enumerate(listing.data["topics"], 1):
        for name in (str(number), f" {number} ", f"#{number}"):
            card = await study_app.execute("topic", {"name": name}, study_app.local_context())
            assert not card.error and card.data["topic"] == slug, (name, card.text)
    for name in ("0", str(len(listing.data["topics"]) + 1), "99999999999999999999"):
        wrong = await study_app.execute("topic", {"name": name}, study_app.local_context())
        assert wrong.error and f"numbered 1 to {len(listing.data['topics'])}" in wrong.text
    assert (await study_app.execute_line("/quiz topic:1")).data["question"].startswith(listing.data["topics"][0] + ".")


async def test_try_it_runs_the_cards_whole_command_on_the_server(study_app: App) -> None:
    ctx = study_app.local_context()
    card = await study_app.execute("topic", {"name": study_fixtures.MULTI}, ctx)
    try_it = next(b for b in card.buttons if b.label == "Try it")
    assert (try_it.command, try_it.option, try_it.value) == ("topic", "try", study_fixtures.MULTI)
    tried = await study_app.execute_text(try_it.command, {try_it.option: try_it.value}, ctx)
    # Three options, one of them quoted: all of them reach the command.
    assert tried.data == {"first": "two words", "second": "three", "times": 4}
    # A card to fill in, or one whose command this bot lacks, offers no button; asking anyway is told why.
    for slug in (study_fixtures.PLACEHOLDER, study_fixtures.MISSING, study_fixtures.LOOP):
        labels = [b.label for b in (await study_app.execute("topic", {"name": slug}, ctx)).buttons]
        assert labels == ["Quiz me"], slug
        refused = await study_app.execute("topic", {"try": slug}, ctx)
        assert refused.error and "no command to run as it is" in refused.text


async def test_every_course_card_with_a_real_command_can_be_tried(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    for slug, card in app.registry.topics.items():
        words = card.try_command.split()
        real = bool(words) and words[0][1:] in app.registry.commands and not re.search(r"<[^<>]+>", card.try_command)
        reply = await app.execute("topic", {"name": slug}, app.local_context())
        buttons = [(b.command, b.option, b.value) for b in reply.buttons if b.label == "Try it"]
        assert buttons == ([("topic", "try", slug)] if real else []), slug
        assert all(b.fits and utf16_length(button_id(b)) <= 100 for b in reply.buttons)
    assert any(b.label == "Try it" for b in (await app.execute_line("/topic name:nsp")).buttons)  # several options


async def test_try_it_without_the_model_tells_the_student_not_the_operator(study_app: App, caplog) -> None:  # type: ignore[no-untyped-def]
    tried = await study_app.execute("topic", {"try": study_fixtures.NO_MODEL}, study_app.local_context())
    assert "config.toml" not in tried.text and "models." not in tried.text
    assert tried.text.startswith("This server has no masked language model") and "`/needsmodel`" in tried.text
    assert "set `models.masked_lm` in config.toml" in caplog.text  # the operator's line stays in the log


async def test_the_masked_lm_card_offline_answers_the_student(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()  # offline: no masked-LM weights on this machine
    card = await app.execute_line("/topic name:masked-lm")
    try_it = next(b for b in card.buttons if b.label == "Try it")
    tried = await app.execute_text(try_it.command, {try_it.option: try_it.value}, app.local_context())
    assert tried.text and "config.toml" not in tried.text and "models.masked_lm" not in tried.text
    assert "error id" not in tried.text


async def test_go_deeper_lines_are_on_the_card_within_discord_limits(study_app: App) -> None:
    card = await study_app.execute("topic", {"name": study_fixtures.MULTI}, study_app.local_context())
    deeper = next(f for f in card.fields if f.name == "go deeper")
    lines = deeper.value.splitlines()
    assert lines[0] == "• `/pair first:one second:two`"
    assert lines[1] == "• `` /pair first:`ticks` second:three ``"  # a backtick inside stays code
    assert len(deeper.value) <= 1024 and re.fullmatch(r"… and \d+ more", lines[-1])
    shown = len(lines) - 1
    assert lines[-1] == f"… and {len(study_fixtures.GO_DEEPER) - 1 - shown} more"  # one names no command here
    assert "notonthisbot" not in deeper.value
    assert_fits_discord(card)
    embed = render_reply(card).embed
    assert embed is not None and len(embed) <= 6000
    plain = await study_app.execute("topic", {"name": study_fixtures.PLACEHOLDER}, study_app.local_context())
    assert "go deeper" not in [f.name for f in plain.fields]


# --------------------------------------------------------------------------- earned answers


async def test_quiz_buttons_fit_discord_for_the_longest_slug(study_app: App) -> None:
    for _ in range(20):
        asked, _question = await ask(study_app, person(study_app, "123456789012345678901"), study_fixtures.LONG_SLUG)
        assert len(asked.buttons) == 5
        for button in asked.buttons:
            assert button.fits and utf16_length(button_id(button)) <= 100
            assert len(button.value) <= 80  # the answer option's own limit
        values = {b.value.rsplit(".", 1)[0] for b in asked.buttons}
        assert len(values) == 1  # one token per question; the buttons differ by letter only


async def test_an_answer_needs_a_question_the_server_asked(study_app: App) -> None:
    ctx = person(study_app)
    # The reported trick: a made-up seed for the old public shuffle, every letter.
    for number in range(2):
        for seed in (0, 1, 42):
            for letter in "ABCDE":
                forged = await study_app.execute(
                    "quiz", {"answer": f"{study_fixtures.MULTI}.{number}.{seed}.{letter}"}, ctx
                )
                assert forged.error and "scores nothing" in forged.text
    # A real token with one character changed is refused too.
    asked, question = await ask(study_app, ctx)
    value = value_for(asked, question)
    slug, number, nonce, signature, letter = value.split(".")
    for tampered in (
        f"{slug}.{number}.{nonce[::-1]}.{signature}.{letter}",
        f"{slug}.{number}.{nonce}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}.{letter}",
        f"{slug}.{1 - int(number)}.{nonce}.{signature}.{letter}",
        f"{study_fixtures.LONG_SLUG}.{number}.{nonce}.{signature}.{letter}",
    ):
        refused = await study_app.execute("quiz", {"answer": tampered}, ctx)
        assert refused.error and "scores nothing" in refused.text, tampered
    # A changed tag (whom it was asked to) makes it someone else's question: shown, never scored.
    retagged = f"{slug}.{number}.{nonce}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}.{letter}"
    elsewhere = await study_app.execute("quiz", {"answer": retagged}, ctx)
    assert elsewhere.data["own"] is False and elsewhere.data["counted"] is False
    assert (await study_app.execute("quiz", {"leaderboard": True}, ctx)).data["leaderboard"] == []


def test_made_up_answers_never_score(cache_dir: Path, tmp_path: Path) -> None:
    config = make_config(cache_dir, plugin_options={"study": {"quiz_db": str(tmp_path / "quiz.sqlite3")}})
    app = App(config, extra_plugins=[(study_fixtures, "study-fixtures")])
    base64url = st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=0, max_size=24
    )
    shaped = st.builds(
        lambda slug, number, nonce, signature, letter: f"{slug}.{number}.{nonce}.{signature}.{letter}",
        st.sampled_from([t.slug for t in study_fixtures.TOPICS] + ["ngrams"]),
        st.integers(-1, 12),
        base64url,
        base64url,
        st.sampled_from([*"ABCDEF", "a", ""]),
    )

    # The old format, `slug.number.seed.letter`: the seed of a public shuffle the client chose.
    seeded = st.builds(
        lambda slug, number, seed, letter: f"{slug}.{number}.{seed}.{letter}",
        st.sampled_from([t.slug for t in study_fixtures.TOPICS]),
        st.integers(0, 11),
        st.integers(0, 10**6),
        st.sampled_from("ABCDE"),
    )

    @settings(max_examples=examples(80), deadline=None)
    @given(st.one_of(shaped, seeded, st.text(max_size=80)))
    def never_scores(answer: str) -> None:
        reply = asyncio.run(app.execute("quiz", {"answer": answer}, person(app)))
        assert reply.error or not reply.data.get("counted")

    try:
        never_scores()
        board = asyncio.run(app.execute("quiz", {"leaderboard": True}, person(app)))
        assert board.data["leaderboard"] == []
    finally:
        asyncio.run(app.close())


async def test_an_answer_counts_for_the_person_asked_and_only_once(study_app: App) -> None:
    asker, classmate = person(study_app, "1"), person(study_app, "2")
    asked, question = await ask(study_app, asker)
    right = value_for(asked, question)
    # A classmate pressing the asker's button sees the answer, but it scores nothing for anyone.
    pressed = await study_app.execute("quiz", {"answer": right}, classmate)
    assert not pressed.error and pressed.title == "student2: Correct!" and question.why in pressed.text
    assert pressed.data["own"] is False and pressed.data["counted"] is False
    assert "asked to someone else" in pressed.text
    answered = await study_app.execute("quiz", {"answer": right}, asker)
    assert answered.data["counted"] is True and answered.data["score"] == [1, 1]
    # The same token again, another letter, or the same question asked anew: nothing more.
    again = await study_app.execute("quiz", {"answer": right}, asker)
    other = await study_app.execute("quiz", {"answer": value_for(asked, question, right=False)}, asker)
    assert again.data["counted"] is other.data["counted"] is False
    assert "only your first answer counts" in again.text and other.data["score"] == [1, 1]
    while True:
        reasked, requestion = await ask(study_app, asker)
        if reasked.data["question"] == asked.data["question"]:
            break
    third = await study_app.execute("quiz", {"answer": value_for(reasked, requestion)}, asker)
    assert third.data["counted"] is False and third.data["score"] == [1, 1]
    board = await study_app.execute("quiz", {"leaderboard": True}, asker)
    assert board.data["leaderboard"] == [("student1", 1, 1)]


async def test_a_question_answers_only_where_it_was_asked(study_app: App) -> None:
    for asked_in, answered_in in (("4242", "999"), ("4242", None), (None, "4242")):
        asked, question = await ask(study_app, person(study_app, "1", asked_in))
        moved = await study_app.execute(
            "quiz", {"answer": value_for(asked, question)}, person(study_app, "1", answered_in)
        )
        assert moved.error and "scores nothing" in moved.text, (asked_in, answered_in)


async def test_the_right_letter_cannot_be_read_off_the_buttons(study_app: App) -> None:
    ctx = person(study_app)
    positions: dict[str, set[int]] = {}
    tokens = set()
    replayed = [0]
    for _ in range(40):
        asked, question = await ask(study_app, ctx)
        positions.setdefault(asked.data["question"], set()).add(
            asked.data["choices"].index(question.choices[question.answer])
        )
        tokens.add(asked.buttons[0].value.rsplit(".", 1)[0])
        # The reported attack: read a number off the button id and replay the public shuffle.
        numbers = [int(part) for part in asked.buttons[0].value.split(".")[2:-1] if part.isdigit()]
        for seed in numbers:
            order = random.Random(seed).sample(range(len(question.choices)), len(question.choices))
            replayed[0] += asked.data["choices"][order.index(question.answer)] == question.choices[question.answer]
    assert replayed[0] < 20
    assert len(tokens) == 40  # a fresh token every time
    assert all(len(shown) >= 3 for shown in positions.values()), positions  # the right choice moves around


async def test_direct_messages_keep_one_board_per_person(study_app: App) -> None:
    for user in ("1", "2"):
        asked, question = await ask(study_app, person(study_app, user, guild=None))
        await study_app.execute("quiz", {"answer": value_for(asked, question)}, person(study_app, user, guild=None))
    for user in ("1", "2"):
        board = await study_app.execute("quiz", {"leaderboard": True}, person(study_app, user, guild=None))
        assert board.data["leaderboard"] == [(f"student{user}", 1, 1)]
    assert (await study_app.execute("quiz", {"leaderboard": True}, person(study_app, "1"))).data["leaderboard"] == []
    # Servers keep their own boards too.
    asked, question = await ask(study_app, person(study_app, "3", "1111"))
    await study_app.execute("quiz", {"answer": value_for(asked, question)}, person(study_app, "3", "1111"))
    assert (await study_app.execute("quiz", {"leaderboard": True}, person(study_app, "3", "2222"))).data[
        "leaderboard"
    ] == []
    server = await study_app.execute("quiz", {"leaderboard": True}, person(study_app, "1", "1111"))
    assert server.data["leaderboard"] == [("student3", 1, 1)]


async def test_a_name_that_fits_several_topics_names_them(app_factory) -> None:  # type: ignore[no-untyped-def]
    """ "masked" is part of ar-vs-masked and masked-lm: the student is asked which, not told there is none."""
    app = app_factory()
    topics = app.registry.topics.values()
    for name in ("masked", "vs"):
        fitting = sorted(t.slug for t in topics if name in t.slug or name in t.title.lower())
        assert len(fitting) > 1
        for line in (f"/topic name:{name}", f"/quiz topic:{name}"):
            reply = await app.execute_line(line)
            assert reply.error and "No topic called" not in reply.text, reply.text
            named = reply.text.split("more than one topic: ")[1].split(". Which one?")[0].split(", ")
            assert sorted(named) == fitting, reply.text
