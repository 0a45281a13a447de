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
