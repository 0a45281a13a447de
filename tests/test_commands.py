"""The command model: option checks and command definitions."""

from __future__ import annotations

import pytest

from bot.commands import Command, Integer, OptionError, Reply, Text, clean_text


async def _handler(ctx, **values):  # type: ignore[no-untyped-def]
    return Reply()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * 101, "too long: 101 characters, the limit is 100"),
        ("bell\x07", "control character \\(U\\+0007\\)"),
        ("esc\x1b[31m", "control character"),
        ("z" + "\u0301" * 12, "combining marks"),
        # Invisible joiners between the marks used to start a new run each time.
        ("a" + "\u0301\u200d" * 30, "combining marks"),
        ("a" + "\u200d" * 20, "invisible characters"),
        ("caf\udce9", "lone surrogate"),
        ("\ud800", "lone surrogate"),
        ("\u202eevil rtl override", "direction override \\(U\\+202E\\)"),
        ("isolate \u2067x\u2069", "direction override"),
        ("\u200b\u200b", "empty"),
        ("\xad", "empty"),
        ("\u0301", "empty"),
    ],
)
def test_bad_text_gets_a_short_reason(value: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        clean_text(value, name="text", max_length=100)


@pytest.mark.parametrize(
    "value",
    [
        "hello",
        "multi\nline\ttext",
        "café",
        "cafe\u0301",
        "👩‍👩‍👧 family",
        "👍🏽 and 🏳️‍🌈",
        "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f flag",  # tag sequence
        "مرحبا بالعالم",
        "שלום עולם",
        "@everyone <@&123>",
    ],
)
def test_ordinary_text_passes_unchanged(value: str) -> None:
    assert clean_text(value, name="text", max_length=100) == value


def test_command_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="must match"):
        Command("Bad Name", "x", _handler)
    with pytest.raises(ValueError, match="required option 'b' after an optional one"):
        Command("c", "x", _handler, (Integer("a", "a", default=1), Text("b", "b")))
    with pytest.raises(TypeError, match="async"):
        Command("c", "x", lambda ctx: Reply())  # type: ignore[arg-type]


def test_bind_fills_defaults_and_checks_types() -> None:
    cmd = Command("c", "x", _handler, (Text("t", "t"), Integer("k", "k", default=5, min_value=1)))
    assert cmd.bind({"t": "hi"}) == {"t": "hi", "k": 5}
    with pytest.raises(OptionError, match="at least 1"):
        cmd.bind({"t": "hi", "k": 0})
    with pytest.raises(OptionError, match="needs `t`"):
        cmd.bind({})
    assert cmd.usage() == "/c t:<text> [k:<1..>]"


def test_a_default_the_option_itself_refuses_is_the_authors_mistake() -> None:
    with pytest.raises(ValueError, match="default of option 'k'"):
        Command("c", "x", _handler, (Integer("k", "k", default=0, min_value=1),))
    with pytest.raises(ValueError, match="default of option 'm'"):
        Command("c", "x", _handler, (Text("m", "m", default="c", choices=("a", "b")),))
    with pytest.raises(TypeError, match="options are Text"):
        Command("c", "x", _handler, ("k",))  # type: ignore[arg-type]
