"""lmbot: a study bot that shows how language models work.

Plugin authors need only what this module exports: the ``hookimpl`` marker,
the command model (``command``, option types, ``Reply``), study cards
(``Topic``, ``QuizQuestion``), model roles, the inference requests and results
a handler submits to ``ctx.inference``, plugin options (``plugin_options``),
and the error types. Charts are drawn with :mod:`bot.charts`; plugins are
tested with :mod:`bot.testing`. The author's guide is ``docs/plugins.md``.

The worker-task contract, for a plugin that computes with a model of its own:

* A request is a frozen dataclass subclassing :class:`Request`. Its ``task``
  (a ``ClassVar[str]``) is a built-in task name (:func:`builtin_tasks`) or
  ``"package.module:function"``; :func:`task_name` writes the latter for a
  function. ``role`` names the model role it needs (``None``: no model).
  It defines ``texts()``: the strings its task tokenizes, so the service can
  enforce the input limits (``[]`` when there are none).
* The task function runs in a worker process as ``function(model, tokenizer,
  batch)`` and returns one result per request of the batch, in order. It
  imports torch (and any other model library) inside the function: the bot
  process imports the plugin, and it never imports torch.
* A result is a picklable object; when it is a dataclass with a ``model``
  field, the worker fills that field with the served model's label.

These rules are checked when the plugin loads; a plugin that breaks one is
skipped with one load error naming it (``lmbot plugins``).
"""

from bot.commands import (
    Boolean,
    Button,
    CodeBlock,
    Command,
    Context,
    Field,
    Image,
    Integer,
    Number,
    Option,
    Reply,
    Segment,
    Table,
    Text,
    command,
)
from bot.errors import (
    Busy,
    CommandError,
    DeadlineExceeded,
    InferenceError,
    InputTooLong,
    InvalidText,
    ModelFailed,
    NoModelForRole,
    OptionError,
    TaskNotFound,
    TooCostly,
    TooManyRequests,
    UserError,
    WorkerDied,
)
from bot.hookspecs import hookimpl
from bot.inference.protocol import (
    MASK,
    Classify,
    ClassifyResult,
    Embed,
    EmbedResult,
    FillMask,
    FillMaskResult,
    Generate,
    GenerateResult,
    MaskFill,
    NextToken,
    NextTokenResult,
    Request,
    Score,
    ScoreResult,
    Seq2Seq,
    TokenProb,
)
from bot.plugins import builtin_tasks, plugin_options, task_name
from bot.topics import ModelRole, Packaged, QuizQuestion, Topic

__version__ = "0.1.0"

__all__ = [
    "MASK",
    "Boolean",
    "Busy",
    "Button",
    "Classify",
    "ClassifyResult",
    "CodeBlock",
    "Command",
    "CommandError",
    "Context",
    "DeadlineExceeded",
    "Embed",
    "EmbedResult",
    "Field",
    "FillMask",
    "FillMaskResult",
    "Generate",
    "GenerateResult",
    "Image",
    "InferenceError",
    "InputTooLong",
    "Integer",
    "InvalidText",
    "MaskFill",
    "ModelFailed",
    "ModelRole",
    "NextToken",
    "NextTokenResult",
    "NoModelForRole",
    "Number",
    "Option",
    "OptionError",
    "Packaged",
    "QuizQuestion",
    "Reply",
    "Request",
    "Score",
    "ScoreResult",
    "Segment",
    "Seq2Seq",
    "Table",
    "TaskNotFound",
    "Text",
    "TokenProb",
    "TooCostly",
    "TooManyRequests",
    "Topic",
    "UserError",
    "WorkerDied",
    "__version__",
    "builtin_tasks",
    "command",
    "hookimpl",
    "plugin_options",
    "task_name",
]
