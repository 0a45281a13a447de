"""Discord-like command lines for the console and ``lmbot ask``.

``/tokenize text:"hello world" encoding:gpt2`` — each option is ``name:value``.
A value may be quoted with ``"`` or ``'`` (backslash escapes the quote), or
left bare: a bare value runs until the next ``name:`` of one of the command's
own options (or at a lowercase ``word:value`` that looks like a mistyped
option), so ``/nexttoken prompt:The capital of France is k:3`` means what it
looks like, while ``Note: ...``, ``10:30`` and ``http://`` stay text.

Text before the first ``name:`` fills the command's first option, as a shortcut
the console allows and Discord does not need: ``/quiz scores``,
``/tokenize hello world``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bot.commands import Command, CommandError

_NAME = re.compile(r"([A-Za-z0-9_-]+):")
# A lowercase ``word:value`` reads as an option (maybe mistyped), not as text.
_OPTION_LIKE = re.compile(r"[a-z][a-z0-9_-]*:(?=[^\s/])")


class UsageError(CommandError):
    """The line itself is malformed (exit code 2); the message ends with the usage line."""


def _usage(cmd: Command) -> str:
    return f"Usage: {cmd.usage()}"


def split_command(line: str, commands: Mapping[str, Command]) -> tuple[Command, str]:
    text = line.strip()
    if not text.startswith("/"):
        raise UsageError("Commands start with a slash, for example /help.")
    name, _, rest = text[1:].partition(" ")
    name = name.strip().lower()
    if name not in commands:
        raise UsageError(f"There is no /{name} command. Try /help.")
    return commands[name], rest


def _quoted(rest: str, pos: int, cmd: Command, key: str) -> tuple[str, int]:
    quote = rest[pos]
    out: list[str] = []
    i = pos + 1
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and i + 1 < len(rest) and rest[i + 1] in (quote, "\\"):
            out.append(rest[i + 1])
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(rest) and not rest[i + 1].isspace():
                raise UsageError(f"Put a space after the closing quote of `{key}`. {_usage(cmd)}")
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise UsageError(f"The quote after `{key}:` is never closed. {_usage(cmd)}")


def parse_options(cmd: Command, rest: str) -> dict[str, str]:
    """Split the text after the command name into raw option strings."""
    names = [o.name for o in cmd.options]
    # A bare value ends at the next known option, or at something that looks like
    # a mistyped one ("size:3"); "Note: x", "10:30" and "http://" stay text.
    known = "|".join(map(re.escape, names)) or "(?!)"
    next_option = re.compile(rf"\s+(?:(?:{known}):|{_OPTION_LIKE.pattern})")

    def value_at(pos: int, key: str) -> tuple[str, int]:
        """The value starting at ``pos`` and where the next option starts."""
        if pos < len(rest) and rest[pos] in "\"'":
            value, pos = _quoted(rest, pos, cmd, key)
        else:
            # A bare value ends where the next option begins ("k: x:1" gives k an empty value).
            found = next_option.search(rest, pos)
            end = found.start() if found else len(rest)
            value, pos = rest[pos:end].strip(), end
        return value, pos + len(rest[pos:]) - len(rest[pos:].lstrip())

    raw: dict[str, str] = {}
    pos = len(rest) - len(rest.lstrip())
    if not names and pos < len(rest):
        raise UsageError(f"/{cmd.name} takes no options. {_usage(cmd)}")
    leading = _NAME.match(rest, pos)
    if pos < len(rest) and not (leading and (leading.group(1) in names or _OPTION_LIKE.match(rest, pos))):
        raw[names[0]], pos = value_at(pos, names[0])  # text before any option fills the first one
    while pos < len(rest):
        match = _NAME.match(rest, pos)
        if match is None:
            snippet = rest[pos : pos + 20]
            raise UsageError(f"Expected `option:value` at {snippet!r}. {_usage(cmd)}")
        key = match.group(1)
        if key not in names:
            hint = " (put text that contains `word:` in quotes)" if raw else ""
            raise UsageError(f"/{cmd.name} has no option `{key}`{hint}. {_usage(cmd)}")
        if key in raw:
            raise UsageError(f"`{key}` is given twice. {_usage(cmd)}")
        raw[key], pos = value_at(match.end(), key)
    return raw


def parse_line(line: str, commands: Mapping[str, Command]) -> tuple[Command, dict[str, Any]]:
    """Parse a whole line into a command and typed, checked option values.

    Raises :class:`UsageError` for a malformed line and
    :class:`bot.commands.OptionError` for a value that does not fit its option.
    """
    cmd, rest = split_command(line, commands)
    raw = parse_options(cmd, rest)
    missing = [o.name for o in cmd.options if o.required and o.name not in raw]
    if missing:
        raise UsageError(f"/{cmd.name} needs `{missing[0]}`. {_usage(cmd)}")
    return cmd, cmd.convert(raw)


def format_line(cmd: Command, values: Mapping[str, Any]) -> str:
    """The command line that :func:`parse_line` reads back into ``values``."""
    parts = [f"/{cmd.name}"]
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key}:{quote(text)}")
    return " ".join(parts)


def quote(text: str) -> str:
    """``text`` in double quotes, escaped so that :func:`parse_line` reads it back exactly."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
