"""Study cards and commands of fixed content for the /topic and /quiz tests.

The course's own cards and questions are being rewritten; these stay put. Load with
``App(..., extra_plugins=[(study_fixtures, "study-fixtures")])``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot import (
    Command,
    Context,
    Integer,
    NoModelForRole,
    QuizQuestion,
    Reply,
    Text,
    Topic,
    command,
    hookimpl,
)
from bot.app import App
from tests.conftest import make_config

# The longest slug a topic may have (32 characters): its quiz buttons must still fit Discord's ids.
LONG_SLUG = "quiz-fixture-" + "x" * 19
MULTI, PLACEHOLDER, MISSING, NO_MODEL = "fixture-multi", "fixture-placeholder", "fixture-missing", "fixture-no-model"
LOOP = "fixture-loop"

QUESTIONS = tuple(
    QuizQuestion(
        f"Fixture question {n}: which choice is marked right? " + "ünïcødé 東京 🙂 " * 3,
        tuple(f"choice {c} of question {n} " + "🙂" * 30 for c in range(5)),
        n % 5,
        f"Because fixture question {n} says so.",
    )
    for n in range(12)
)

GO_DEEPER = (
    "/pair first:one second:two",
    "/pair first:`ticks` second:three",
    "/notonthisbot text:hidden",
    *(f"/pair first:line {n} second:{'x' * 60}" for n in range(40)),
)


@command(
    "pair",
    "Echo two texts and a count (a fixture)",
    options=[
        Text("first", "First text"),
        Text("second", "Second text"),
        Integer("times", "A count", default=1, min_value=1, max_value=9),
    ],
)
async def pair(ctx: Context, first: str, second: str, times: int) -> Reply:
    return Reply(f"{first} | {second} × {times}", data={"first": first, "second": second, "times": times})


@command("needsmodel", "Needs a masked language model this bot does not have (a fixture)", options=[Text("text", "x")])
async def needsmodel(ctx: Context, text: str) -> Reply:
    raise NoModelForRole("masked_lm", "offline, and bert-base-uncased is not on this machine")


TOPICS = (
    Topic(LONG_SLUG, "Fixture: long slug", "Buttons must fit.", "/pair first:a second:b", quiz=QUESTIONS, order=900),
    Topic(
        MULTI,
        "Fixture: several options",
        "A card whose command has several options, one of them quoted.",
        '/pair first:"two words" second:three times:4',
        quiz=QUESTIONS[:2],
        go_deeper=GO_DEEPER,
        order=901,
    ),
    Topic(PLACEHOLDER, "Fixture: placeholder", "Fill it in.", "/pair first:<your text> second:b", order=902),
    Topic(MISSING, "Fixture: missing command", "Not on this bot.", "/nosuchcommand text:hi", order=903),
    Topic(NO_MODEL, "Fixture: no model", "Needs a model.", "/needsmodel text:The [MASK] sat.", order=904),
    Topic(LOOP, "Fixture: a card that runs itself", "Never runs.", f"/topic try:{LOOP}", order=905),
)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(pair)
    register(needsmodel)


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    for topic in TOPICS:
        register(topic)


@pytest.fixture
async def app(cache_dir: Path, tmp_path: Path, tiny_gpt2: Path) -> AsyncIterator[App]:
    """An app with every built-in plugin on the tiny GPT-2, its quiz scores in the test's own folder
    (the /review and /round tests import it)."""
    options = {"study": {"quiz_db": str(tmp_path / "scores.sqlite3")}}
    application = App(make_config(cache_dir, {"causal_lm": tiny_gpt2}, plugin_options=options))
    yield application
    await application.close()
