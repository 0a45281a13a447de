"""Study cards and model roles: what plugins register besides commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"model role {self.name!r} must match {NAME_RE.pattern}")
