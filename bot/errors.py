"""Errors whose message is meant for the person who asked.

Every front end shows ``str(error)`` of a :class:`CommandError` as the answer
(short, no traceback). This module imports nothing from the rest of ``bot``,
so both the command model and the inference service can build on it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CommandError(Exception):
    """An error whose message is meant for the user (short, no traceback).

    Front ends show ``str(error)`` as is; the command "answered with an error".
    """

    ephemeral: ClassVar[bool] = False


class UserError(CommandError):
    """Bad input: the user can fix it by asking differently."""

    ephemeral = True


class OptionError(UserError):
    """An option value that does not fit the option's type or limits."""


# --------------------------------------------------------------------------- inference


class InferenceError(CommandError):
    """A model request that could not be answered; the message is shown to the user."""


class Busy(InferenceError):
    """The queue is full. ``retry_after`` is a hint in seconds."""

    ephemeral = True

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"The bot is busy right now; try again in {retry_after:.0f} s.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Busy, (self.retry_after,))


class DeadlineExceeded(InferenceError):
    def __init__(self, message: str = "That took too long and was given up; try again in a moment.") -> None:
        super().__init__(message)


class WorkerDied(InferenceError):
    def __init__(
        self, message: str = "The model worker stopped unexpectedly; it is being restarted, try again."
    ) -> None:
        super().__init__(message)


class NoModelForRole(InferenceError):
    """No weights for a role: offline with no packaged stand-in, or a bad path."""

    def __init__(self, role: str, reason: str = "") -> None:
        self.role, self.reason = role, reason
        why = f" ({reason})" if reason else ""
        super().__init__(f"No `{role}` model is available{why}: set `models.{role}` in config.toml to a local folder.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (NoModelForRole, (self.role, self.reason))


class InputTooLong(InferenceError):
    ephemeral = True


class ModelFailed(InferenceError):
    """The model raised; the worker logged the traceback under an error id."""


class InvalidText(UserError, InferenceError):
    """Text a model cannot read at all (not encodable as UTF-8: a lone surrogate, say)."""


class TooCostly(InferenceError):
    """A request whose estimated cost (``Request.cost()``) is over ``inference.max_request_cost``."""

    ephemeral = True

    def __init__(self, cost: float, limit: float) -> None:
        self.cost, self.limit = cost, limit
        super().__init__(
            f"That request would cost about {cost:.2g} multiply-accumulate operations; "
            f"this bot allows {limit:.2g} per request. Ask for something smaller."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (TooCostly, (self.cost, self.limit))


class TooManyRequests(InferenceError):
    """One user already has ``inference.max_per_user`` requests queued or running."""

    ephemeral = True

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        requests = "1 request" if waiting == 1 else f"{waiting} requests"
        super().__init__(f"You have {requests} waiting; try again when they finish.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TooManyRequests, (self.waiting,))


class TaskNotFound(InferenceError):
    """A request names a task function that cannot be found: a bug in the plugin that defines it."""

    def __init__(self, task: str, detail: str = "") -> None:
        self.task, self.detail = task, detail
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"This command's model task `{task}` was not found{why}: a bug in the plugin that "
            "defines the command (a typo in its task name?). Please tell the bot's owner."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskNotFound, (self.task, self.detail))
