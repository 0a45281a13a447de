"""Every headline command answers any text with a short reply, never a traceback or a hang.

Hypothesis feeds arbitrary text (control characters, lone surrogates excepted as Discord
cannot send them, combining floods, emoji, right-to-left scripts, mentions) to each
command through the real App and inference workers on tiny models.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.app import App
from bot.commands import Reply
from tests.conftest import examples, make_config
from tests.plugin_helpers import assert_fits_discord

# The text option of each command and the other values it needs.
COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "nexttoken": ("prompt", {}),
    "tokenize": ("text", {}),
    "mask": ("sentence", {}),
    "maskrecipe": ("sentence", {}),
    "ngram": ("context", {}),
    "compare": ("text", {}),
    "nsp": ("sentence_a", {"sentence_b": "It purred."}),
    "summarize": ("text", {"max_length": 5}),
    "sentiment": ("text", {}),
    "complexity": ("lengths", {"width": 16}),
    "adapt": ("text", {}),
    "topic": ("name", {}),
    "quiz": ("answer", {}),
    "attention": ("text", {"layer": 1}),
    "sample": ("prompt", {"n": 1, "seed": 0}),
    "surprise": ("text", {"ngram": True}),
}

NASTY = [
    "",
    "   \t  ",
    "x" * 5000,
    "bell\x07ring",
    "z" + "\u0301\u0302\u0303" * 10,
    "🙂" * 300,
    "שלום עולם مرحبا",
    "@everyone look",
    "<@&123> and <@456> and @here",
    "\u202eevil rtl override",
    "[MASK]",
    "___ ___",
    "\xad",  # a soft hyphen: WordPiece finds no token in it (found by hypothesis)
    "\u200b\u200b",
]


@pytest.fixture(scope="module")
def run_app(cache_dir: Path, tiny_gpt2: Path, tiny_bert_mlm: Path) -> Iterator[tuple[App, Callable[..., Reply]]]:
    """An App whose event loop runs in a thread, so sync hypothesis tests can drive it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = App(make_config(cache_dir, {"causal_lm": tiny_gpt2, "masked_lm": tiny_bert_mlm}))

    def run(name: str, values: dict[str, Any]) -> Reply:
        future = asyncio.run_coroutine_threadsafe(app.execute(name, values, app.local_context()), loop)
        return future.result(timeout=120)

    yield app, run
    asyncio.run_coroutine_threadsafe(app.close(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def check(reply: Reply) -> None:
    assert_fits_discord(reply)
    if reply.error:
        assert len(reply.text) < 300 and "Traceback" not in reply.text
        assert "error id" not in reply.text, reply.text  # bad input is not a plugin crash


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_nasty_inputs_get_short_answers(run_app, name: str, text: str) -> None:  # type: ignore[no-untyped-def]
    _, run = run_app
    option, extra = COMMANDS[name]
    check(run(name, {option: text, **extra}))


@pytest.mark.parametrize("name", sorted(COMMANDS))
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=300))
def test_arbitrary_text_never_raises(run_app, name: str, text: str) -> None:  # type: ignore[no-untyped-def]
    _, run = run_app
    option, extra = COMMANDS[name]
    check(run(name, {option: text, **extra}))
