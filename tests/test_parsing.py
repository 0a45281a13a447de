"""Console option syntax: quotes, unicode, empty values, unknown and repeated options."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.commands import Boolean, Command, Integer, Number, OptionError, Reply, Text
from bot.parsing import UsageError, format_line, parse_line


async def _handler(ctx, **values):  # type: ignore[no-untyped-def]
    return Reply()


DEMO = Command(
    "demo",
    "A command for parsing tests",
    _handler,
    (
        Text("text", "Some text", max_length=200),
        Integer("k", "A count", default=3, min_value=1, max_value=9),
        Number("temp", "A number", default=1.0, min_value=0.1, max_value=2.0),
        Boolean("flag", "A switch", default=False),
        Text("enc", "A choice", default="gpt2", choices=("gpt2", "cl100k_base")),
    ),
)
BARE = Command("bare", "A command without options", _handler, ())
COMMANDS = {"demo": DEMO, "bare": BARE}


def parse(line: str) -> dict:
    return parse_line(line, COMMANDS)[1]


def test_bare_value_runs_until_next_option() -> None:
    assert parse("/demo text:The capital of France is k:4") == {"text": "The capital of France is", "k": 4}


def test_text_before_any_option_fills_the_first_option() -> None:
    assert parse("/demo The capital of France is k:4") == {"text": "The capital of France is", "k": 4}
    assert parse('/demo "quoted k:5" flag:yes') == {"text": "quoted k:5", "flag": True}
    assert parse("/demo Note: still text") == {"text": "Note: still text"}
    assert parse("/demo 10:30 at http://x.org") == {"text": "10:30 at http://x.org"}


def test_a_command_without_options_takes_no_text() -> None:
    with pytest.raises(UsageError, match="/bare takes no options"):
        parse("/bare just words")


def test_colon_inside_text_stays_text() -> None:
    assert parse("/demo text:Note: this is fine") == {"text": "Note: this is fine"}


def test_double_and_single_quotes_with_escapes() -> None:
    assert parse('/demo text:"hello  world" k:2') == {"text": "hello  world", "k": 2}
    assert parse("/demo text:'it\\'s here'") == {"text": "it's here"}
    assert parse('/demo text:"say \\"hi\\" k:5"') == {"text": 'say "hi" k:5'}


def test_unicode_emoji_and_rtl_pass_through() -> None:
    assert parse("/demo text:naïve café 日本語 🙂 שלום") == {"text": "naïve café 日本語 🙂 שלום"}


def test_types_and_choices() -> None:
    values = parse("/demo text:x k:9 temp:0.5 flag:yes enc:cl100k_base")
    assert values == {"text": "x", "k": 9, "temp": 0.5, "flag": True, "enc": "cl100k_base"}


def test_empty_value_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(OptionError, match="`text` is empty"):
        parse("/demo text: k:3")
    with pytest.raises(OptionError, match="whole number"):
        parse("/demo text:x k:")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/demo text:x size:3", "has no option `size`"),
        ("/demo text:x text:y", "`text` is given twice"),
        ('/demo text:"never closed', "never closed"),
        ("/demo k:3", "needs `text`"),
        ("/demo size:3 words", "has no option `size`"),
        ("/nothing", "There is no /nothing command"),
        ("demo text:x", "start with a slash"),
    ],
)
def test_syntax_errors_name_the_problem_and_show_usage(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse(line)
    if "Usage" in str(info.value):
        assert "/demo text:<text> [k:<1..9>]" in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/demo text:x k:10", "at most 9"),
        ("/demo text:x temp:nan", "finite"),
        ("/demo text:x flag:maybe", "true or false"),
        ("/demo text:x enc:latin1", "must be one of"),
    ],
)
def test_values_outside_their_option_are_option_errors(line: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse(line)


printable = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Mn", "Me", "Zl", "Zp")), min_size=1, max_size=60
).filter(lambda s: s.strip())


@given(text=printable, k=st.integers(1, 9), flag=st.booleans())
def test_format_then_parse_round_trips(text: str, k: int, flag: bool) -> None:
    values = {"text": text, "k": k, "flag": flag}
    assert parse(format_line(DEMO, values)) == values


# --------------------------------------------------------------------------- issue 25, item 6


@pytest.mark.parametrize(
    ("typed", "key", "expected"),
    [
        ("k:\uff14", "k", 4),  # fullwidth digit in a whole number
        ("temp:\uff11\uff0e\uff15", "temp", 1.5),  # fullwidth digits and point in a decimal
        ("temp:\uff10\uff0e\uff15", "temp", 0.5),
        ("k:\u0664", "k", 4),  # Arabic-Indic digit: Python reads it in both kinds alike
        ("temp:\u0661.\u0665", "temp", 1.5),
    ],
)
def test_one_rule_for_every_number_fullwidth_digits_read_in_wholes_and_decimals(
    typed: str, key: str, expected: float
) -> None:
    assert parse(f"/demo text:x {typed}")[key] == expected


@given(st.integers(min_value=1, max_value=9), st.integers(min_value=0, max_value=9))
def test_a_number_typed_in_fullwidth_reads_as_the_same_number_typed_plainly(whole: int, tenth: int) -> None:
    def wide(text: str) -> str:
        return "".join(chr(ord(c) + 0xFEE0) for c in text)  # ASCII digits and "." to their fullwidth forms

    assert Integer("k", "k").convert(wide(str(whole))) == Integer("k", "k").convert(str(whole))
    plain = f"{whole % 2}.{tenth}"
    assert Number("t", "t").convert(wide(plain)) == Number("t", "t").convert(plain)


@pytest.mark.parametrize(
    "text",
    [
        "\u115f\u115f\u115f",
        "\u3164",
        "\u2800\u2800 \u2800",
        "\uffa0\u1160",
        "\u3164\u200b\u3164",
    ],
)
def test_text_made_only_of_invisible_letters_is_refused_as_empty(text: str) -> None:
    with pytest.raises(OptionError, match="is empty"):
        Text("text", "Some text").check(text)


def test_combining_marks_stacked_through_invisible_letters_are_a_flood() -> None:
    zalgo = "a" + ("\u115f" + "\u0301" * 4) * 20  # 80 marks drawn on one spot
    with pytest.raises(OptionError, match="too many combining marks"):
        Text("text", "Some text").check(zalgo)
    for filler in "\u3164\u2800\uffa0\u1160":
        with pytest.raises(OptionError, match="too many combining marks"):
            Text("text", "Some text").check("a" + (filler + "\u0301\u0302") * 3)
    # Real text with an invisible letter in it, and one accent per letter, still passes.
    assert Text("text", "Some text").check("caf\u00e9 \u3164 ok") == "caf\u00e9 \u3164 ok"
