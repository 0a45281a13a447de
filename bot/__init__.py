"""lmbot: a study bot that shows how language models work.

Plugin authors need only what this module exports: the ``hookimpl`` marker,
the command model (``command``, option types, ``Reply``) and the error types.
"""

from bot.commands import (
    Boolean,
    Button,
    CodeBlock,
    Command,
    CommandError,
    Context,
    Field,
    Image,
    Integer,
    Number,
    Reply,
    Segment,
    Table,
    Text,
    UserError,
    command,
)
from bot.hookspecs import hookimpl
from bot.topics import ModelRole, QuizQuestion, Topic

__version__ = "0.1.0"

__all__ = [
    "Boolean",
    "Button",
    "CodeBlock",
    "Command",
    "CommandError",
    "Context",
    "Field",
    "Image",
    "Integer",
    "ModelRole",
    "Number",
    "QuizQuestion",
    "Reply",
    "Segment",
    "Table",
    "Text",
    "Topic",
    "UserError",
    "__version__",
    "command",
    "hookimpl",
]
