"""The transport-neutral command model.

A :class:`Command` is a name, a description, typed options and an async handler
that returns a :class:`Reply`. Front ends (Discord, the console, tests) turn
user input into option values, call :meth:`Command.invoke`, and render the
reply in their own way. Nothing here knows about Discord.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Protocol

# Defined in bot.errors (which both this module and the inference service build on); re-exported here.
from bot.errors import CommandError as CommandError
from bot.errors import OptionError as OptionError
from bot.errors import UserError as UserError

# Discord's own limits on command and option names/descriptions; keeping them
# in the core means a plugin cannot register something Discord would reject.
NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
MAX_DESCRIPTION = 100
MAX_OPTIONS = 25
# A run of combining marks longer than this on one base character is a
# "zalgo" flood: it renders as a smear and can slow down layout engines.
MAX_COMBINING_RUN = 4


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """Base of the option types.

    An option with a default is optional; an optional option without one
    passes ``None`` to the handler when left out.
    """

    name: str
    description: str
    _: KW_ONLY
    required: bool = True
    default: Any = None
    choices: tuple[Any, ...] | None = None
    kind: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"option name {self.name!r} must match {NAME_RE.pattern}")
        if not 1 <= len(self.description) <= MAX_DESCRIPTION:
            raise ValueError(f"option {self.name!r}: description must be 1-{MAX_DESCRIPTION} characters")
        if self.default is not None:
            object.__setattr__(self, "required", False)
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    def convert(self, raw: str) -> Any:
        """Convert text typed by a user (console syntax) into a value, then check it."""
        return self.check(raw)

    def check(self, value: Any) -> Any:
        """Validate a value that is already of the right Python type."""
        raise NotImplementedError

    def placeholder(self) -> str:
        if self.choices:
            return "|".join(str(c) for c in self.choices)
        low, high = getattr(self, "min_value", None), getattr(self, "max_value", None)
        if low is not None or high is not None:
            return f"{'' if low is None else low}..{'' if high is None else high}"
        return self.kind

    def usage(self) -> str:
        text = f"{self.name}:<{self.placeholder()}>"
        return text if self.required else f"[{text}]"

    def _check_choice(self, value: Any) -> Any:
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise OptionError(f"`{self.name}` must be one of: {allowed}.")
        return value


# Bidirectional embedding, override and isolate controls: they reorder how the text
# around them is displayed, so echoed text could be made to read differently than typed.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Letters and symbols that show nothing (Hangul fillers, the blank Braille pattern, ...): they neither
# make text visible nor start a new character that combining marks could stack on.
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Invisible format characters (joiners, tags) may follow a base character too, but a long
# run of them is a flood like a combining-mark flood; emoji tag sequences need up to 7.
MAX_FORMAT_RUN = 8


def clean_text(value: str, *, name: str, max_length: int) -> str:
    """Reject text that no command should have to handle.

    Blank or invisible-only text (invisible letters such as U+3164 included), text
    over ``max_length`` characters, control
    characters, lone surrogates (not text at all), bidirectional overrides and
    floods of combining marks each get a short explanation. Newlines and tabs
    are allowed; everything else printable, emoji and right-to-left scripts
    included, passes through unchanged.
    """
    if len(value) > max_length:
        raise OptionError(f"`{name}` is too long: {len(value):,} characters, the limit is {max_length:,}.")
    marks = formats = 0
    visible = False
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in "\n\t":
            raise OptionError(f"`{name}` contains a control character (U+{ord(ch):04X}); remove it and try again.")
        if category == "Cs":
            raise OptionError(f"`{name}` contains a broken character (a lone surrogate, U+{ord(ch):04X}).")
        if ch in BIDI_CONTROLS:
            raise OptionError(
                f"`{name}` contains a direction override (U+{ord(ch):04X}), which reorders how text is shown; "
                "remove it and try again."
            )
        if ch in INVISIBLE_LETTERS:
            continue  # as if absent: marks after it stack on the character before it
        if category in ("Mn", "Me"):
            marks += 1  # a format character in between does not start a new run
            if marks > MAX_COMBINING_RUN:
                raise OptionError(f"`{name}` has too many combining marks stacked on one character.")
        elif category == "Cf":
            formats += 1
            if formats > MAX_FORMAT_RUN:
                raise OptionError(f"`{name}` has too many invisible characters in a row.")
        else:
            marks = formats = 0
            visible = visible or not (ch.isspace() or category == "Zs")
    if not visible:
        raise OptionError(f"`{name}` is empty: type some text after `{name}:`.")
    return value


@dataclass(frozen=True)
class Text(Option):
    max_length: int = 500
    kind: ClassVar[str] = "text"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionError(f"`{self.name}` must be text.")
        return self._check_choice(clean_text(value, name=self.name, max_length=self.max_length))


def number_text(raw: str) -> str:
    """A typed number as Python reads it: NFKC folds fullwidth digits, point and signs (``１．５`` -> ``1.5``),
    so that one rule holds for every number, whole or not."""
    return unicodedata.normalize("NFKC", raw).strip()


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise OptionError(f"`{name}` must be at least {low}.")
    if high is not None and value > high:
        raise OptionError(f"`{name}` must be at most {high}.")


@dataclass(frozen=True)
class Integer(Option):
    min_value: int | None = None
    max_value: int | None = None
    kind: ClassVar[str] = "integer"

    def convert(self, raw: str) -> int:
        try:
            value = int(number_text(raw))
        except ValueError:
            raise OptionError(f"`{self.name}` must be a whole number, not {raw!r}.") from None
        return self.check(value)

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"`{self.name}` must be a whole number.")
        _check_range(self.name, value, self.min_value, self.max_value)
        return self._check_choice(value)


@dataclass(frozen=True)
class Number(Option):
    min_value: float | None = None
    max_value: float | None = None
    kind: ClassVar[str] = "number"

    def convert(self, raw: str) -> float:
        try:
            value = float(number_text(raw))
        except ValueError:
            raise OptionError(f"`{self.name}` must be a number, not {raw!r}.") from None
        return self.check(value)

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OptionError(f"`{self.name}` must be a number.")
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(f"`{self.name}` must be a finite number.")
        _check_range(self.name, value, self.min_value, self.max_value)
        return value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Boolean(Option):
    kind: ClassVar[str] = "true|false"

    def convert(self, raw: str) -> bool:
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise OptionError(f"`{self.name}` must be true or false, not {raw!r}.")

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise OptionError(f"`{self.name}` must be true or false.")
        return value


# --------------------------------------------------------------------------- replies
#
# The parts of a reply check their types when they are made, inside the handler: a number where
# text belongs is then the plugin's error (a short reply with an error id, the cause in the log),
# not a crash of whichever front end tries to show it.


def _must_be_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise TypeError(
            f'{what} must be a str, not {type(value).__name__} ({shown}); format numbers yourself, e.g. f"{{x:.3f}}"'
        )


@dataclass(frozen=True)
class Field:
    """A named value, shown as an embed field on Discord and as ``name: value`` elsewhere."""

    name: str
    value: str
    inline: bool = True

    def __post_init__(self) -> None:
        _must_be_text(self.name, "a Field's name")
        _must_be_text(self.value, f"the value of Field {self.name!r}")


@dataclass(frozen=True)
class Table:
    """Rows of cells under headers; ``align`` is ``"l"`` or ``"r"`` per column."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.headers, str):
            raise TypeError("a Table's headers are a list of str, not one str")
        for header in self.headers:
            _must_be_text(header, "a Table header")
        width = len(self.headers)
        for n, row in enumerate(self.rows):
            # A shorter row leaves its last columns empty; a longer one has cells with no column.
            if isinstance(row, str) or len(row) > width:
                cells = "a str" if isinstance(row, str) else f"{len(row)} cells"
                raise TypeError(
                    f"row {n} of a Table is {cells}; a row is a list of at most {width} cells, one per header"
                )
        if self.align is not None and (not isinstance(self.align, str) or len(self.align) < width):
            raise TypeError(f"a Table's align is one 'l' or 'r' per column ({width} columns), not {self.align!r}")


@dataclass(frozen=True)
class Image:
    """A PNG picture attached to the reply."""

    filename: str
    data: bytes
    description: str = ""


@dataclass(frozen=True)
class Segment:
    """A run of text in a colour (one of :data:`COLOURS`, or ``None`` for plain)."""

    text: str
    colour: str | None = None


# The eight colours that both ANSI terminals and Discord's ```ansi blocks show.
COLOURS = ("gray", "red", "green", "yellow", "blue", "pink", "cyan", "white")


@dataclass(frozen=True)
class CodeBlock:
    """A block of monospaced text whose segments may be coloured."""

    segments: Sequence[Segment]

    @property
    def plain(self) -> str:
        return "".join(s.text for s in self.segments)


def utf16_length(text: str) -> int:
    """Length as Discord (and JavaScript) count it: characters outside the BMP count twice."""
    return len(text.encode("utf-16-le")) // 2


@dataclass(frozen=True)
class Button:
    """A button that, when pressed, runs ``/command option:value`` for whoever pressed it.

    On Discord it is a real button; in the console it is shown as the command to type.

    With ``text_option`` (the name of another option of the command), pressing first asks the
    presser for a line of their own text and runs ``/command option:value text_option:<text>``:
    the way to collect a free answer (a guess, say) from whoever presses. Discord shows a form
    with one text box, labelled with that option's description; the console shows the line to
    type. The handler checks the text like any typed option's.
    """

    label: str
    command: str
    option: str
    value: str
    text_option: str = ""

    def __post_init__(self) -> None:
        for what in ("label", "command", "option", "value", "text_option"):
            _must_be_text(getattr(self, what), f"a Button's {what}")

    # Discord carries command, option and value in the button's 100-character id (with
    # a prefix and separators); a longer button is left out, never run with a cut value.
    MAX_LENGTH: ClassVar[int] = 90

    @property
    def fits(self) -> bool:
        """Whether command, option, value (and the text option's name) together fit every front end."""
        asks = len(self.text_option) + 1 if self.text_option else 0
        return utf16_length(self.command + self.option + self.value) + asks <= self.MAX_LENGTH


@dataclass
class Reply:
    """What a command answers.

    ``data`` holds the structured figures the command computed (tokens, ids,
    probabilities, counts); ``lmbot ask --json`` prints it so that lecturers can
    script the bot. ``error`` marks a reply that answers with an error.
    """

    text: str = ""
    title: str | None = None
    fields: list[Field] = field(default_factory=list)
    table: Table | None = None
    code: CodeBlock | None = None
    images: list[Image] = field(default_factory=list)
    buttons: list[Button] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: bool = False
    ephemeral: bool = False
    # A later message in the same conversation (a game's results when its time is up): a front end
    # that can post one (Discord) awaits ``followup()`` after showing this reply, on the command
    # loop, and posts the Reply it returns; it is cancelled when the bot stops. Front ends that
    # answer once (the console, ``lmbot ask``) never call it, so a command must not depend on it there.
    followup: Callable[[], Awaitable[Reply]] | None = None
    # Seconds ``followup()`` waits by design before it answers (a round's length). Its deadline is this
    # plus ``bot.command_timeout_s``: past it the later message says so and ``followup()`` is abandoned.
    followup_in_s: float = 0.0

    def __post_init__(self) -> None:
        _must_be_text(self.text, "a Reply's text")
        if self.followup is not None and not callable(self.followup):
            raise TypeError("a Reply's followup must be an async function of no arguments")
        if not 0 <= self.followup_in_s < float("inf"):
            raise ValueError("a Reply's followup_in_s must be a number of seconds from 0")
        if self.title is not None:
            _must_be_text(self.title, "a Reply's title")
        for what, items, kind in (
            ("fields", self.fields, Field),
            ("images", self.images, Image),
            ("buttons", self.buttons, Button),
        ):
            if not isinstance(items, list) or not all(isinstance(item, kind) for item in items):
                raise TypeError(f"a Reply's {what} must be a list of {kind.__name__}")
        if self.table is not None and not isinstance(self.table, Table):
            raise TypeError(f"a Reply's table must be a Table, not {type(self.table).__name__}")
        if self.code is not None and not isinstance(self.code, CodeBlock):
            raise TypeError(f"a Reply's code must be a CodeBlock, not {type(self.code).__name__}")
        if not isinstance(self.data, dict):
            raise TypeError(f"a Reply's data must be a dict, not {type(self.data).__name__}")
        # A chart that could not be drawn comes back with no data (bot.charts.render): the
        # reply goes without it rather than failing.
        self.images = [image for image in self.images if image.data]

    @classmethod
    def failure(cls, message: str, *, ephemeral: bool = True, **data: Any) -> Reply:
        return cls(text=message, error=True, ephemeral=ephemeral, data=dict(data))


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class User:
    id: str
    name: str
    is_owner: bool = False


class InferenceService(Protocol):
    """What a handler uses of the inference service (``ctx.inference``)."""

    metrics: Any
    # The most one request may cost (``Request.cost()``, multiply-accumulates); more is refused.
    max_request_cost: float

    async def submit(self, request: Any, *, timeout: float | None = None) -> Any:
        """Run a request in a worker and return its result, or raise an ``InferenceError``."""
        ...

    def retry_hint_if_full(self) -> float | None: ...


class CommandCatalog(Protocol):
    """What the ``/help`` and ``/plugins`` commands read about the running bot."""

    def commands(self) -> Sequence[Command]: ...


# The user whose command is being handled: work done on their behalf (a chart, say) can take
# turns with other users' without every helper taking a ctx.
current_user: ContextVar[User | None] = ContextVar("lmbot_current_user", default=None)


@dataclass
class Context:
    """What a handler gets besides its options."""

    user: User
    app: Any  # bot.app.App; typed loosely so that plugins need not import it
    guild_id: str | None = None
    transport: str = "console"
    # The loop the inference client lives on (the front end's): a handler runs on its plugin's own
    # loop, and its requests are handed over to this one. Set by App.execute.
    home_loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)

    @property
    def inference(self) -> InferenceService:
        """The shared service, seen as this user: their requests count against their own share."""
        view = getattr(self.app, "inference_view", None)  # bot.app.App's: reached from the handler's loop
        if view is not None:
            return view(self.user.id, self.home_loop)
        service = self.app.inference
        for_user = getattr(service, "for_user", None)
        return for_user(self.user.id) if for_user is not None else service

    @property
    def config(self) -> Any:
        return self.app.config


Handler = Callable[..., Awaitable[Reply]]


def _check_handler_parameters(name: str, handler: Handler, options: Sequence[Option]) -> None:
    """The handler is called as ``handler(ctx, **options)``: its parameters must be ctx and the options.

    Checked when the command is made, so a renamed option fails when the plugin loads
    rather than on a student's first use.
    """
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # a callable whose signature cannot be read: nothing to check
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise TypeError(f"command {name!r}: the handler's first parameter must be ctx")
    rest = params[1:]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)
    named = [p for p in rest if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    option_names = [o.name for o in options]
    for param in rest:
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"command {name!r}: handler parameter `{param.name}` cannot be passed by name")
    takes = ", ".join(["ctx", *(p.name for p in named)])
    for param in named:
        if param.name not in option_names:
            raise TypeError(
                f"command {name!r}: handler parameter `{param.name}` is not an option "
                f"(options: {', '.join(option_names) or 'none'})"
            )
    if not takes_any:
        for option in option_names:
            if option not in {p.name for p in named}:
                raise TypeError(f"command {name!r}: option `{option}` is not a parameter of the handler ({takes})")


@dataclass(frozen=True)
class Command:
    name: str
    description: str
    handler: Handler
    options: tuple[Option, ...] = ()
    topic: str | None = None
    owner_only: bool = False
    plugin: str = ""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"command name {self.name!r} must match {NAME_RE.pattern}")
        if not 1 <= len(self.description) <= MAX_DESCRIPTION:
            raise ValueError(f"command {self.name!r}: description must be 1-{MAX_DESCRIPTION} characters")
        if len(self.options) > MAX_OPTIONS:
            raise ValueError(f"command {self.name!r}: at most {MAX_OPTIONS} options")
        for option in self.options:
            if not isinstance(option, Option):
                raise TypeError(f"command {self.name!r}: options are Text, Integer, Number or Boolean, not {option!r}")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"command {self.name!r}: option names repeat")
        seen_optional = False
        for option in self.options:
            # Discord requires every required option to come before optional ones.
            if option.required and seen_optional:
                raise ValueError(f"command {self.name!r}: required option {option.name!r} after an optional one")
            seen_optional |= not option.required
            if option.default is not None:
                # The handler gets the default unchecked when the option is left out: a default the
                # option's own rules refuse (out of range, not a choice) is the author's mistake.
                try:
                    option.check(option.default)
                except OptionError as exc:
                    raise ValueError(
                        f"command {self.name!r}: the default of option {option.name!r} ({option.default!r}) is "
                        f"refused by the option itself: {exc}"
                    ) from None
        if not inspect.iscoroutinefunction(self.handler):
            raise TypeError(f"command {self.name!r}: handler must be an async function")
        _check_handler_parameters(self.name, self.handler, self.options)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def usage(self) -> str:
        return " ".join([f"/{self.name}", *(o.usage() for o in self.options)])

    def convert(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """Typed values from option text (a console line, a button's value)."""
        values: dict[str, Any] = {}
        for key, text in texts.items():
            option = self.option(key)
            if option is None:
                raise OptionError(f"/{self.name} has no option `{key}`. Usage: {self.usage()}")
            values[key] = option.convert(text)
        return values

    def bind(self, values: dict[str, Any]) -> dict[str, Any]:
        """Check already-typed values (from Discord or tests) and fill defaults."""
        unknown = set(values) - {o.name for o in self.options}
        if unknown:
            raise OptionError(f"/{self.name} has no option `{sorted(unknown)[0]}`. Usage: {self.usage()}")
        bound: dict[str, Any] = {}
        for option in self.options:
            if option.name in values and values[option.name] is not None:
                bound[option.name] = option.check(values[option.name])
            elif option.required:
                raise OptionError(f"/{self.name} needs `{option.name}`. Usage: {self.usage()}")
            else:
                bound[option.name] = option.default
        return bound

    async def invoke(self, ctx: Context, values: dict[str, Any]) -> Reply:
        token = current_user.set(ctx.user)
        try:
            return await self.handler(ctx, **self.bind(values))
        finally:
            current_user.reset(token)


def command(
    name: str,
    description: str,
    *,
    options: Sequence[Option] = (),
    topic: str | None = None,
    owner_only: bool = False,
) -> Callable[[Handler], Command]:
    """Decorate an async handler ``(ctx, **options) -> Reply`` into a :class:`Command`."""

    def wrap(handler: Handler) -> Command:
        return Command(name, description, handler, tuple(options), topic, owner_only)

    return wrap
