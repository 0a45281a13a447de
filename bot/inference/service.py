"""The inference service as plugins and front ends see it, whatever the backend.

:class:`InferenceClient` is the interface every backend implements (the local
worker processes in :mod:`bot.inference.local`, Ray Serve in
:mod:`bot.inference.ray_backend`) and the admission rules they share. Both
backends queue and batch through one core, :mod:`bot.inference.scheduler`, which
also refuses a request as busy when the work ahead of it cannot be done before
its deadline at the measured speed. A request
is admitted before anything is queued or started: the service must be open,
its text must be readable text within ``inference.max_input_chars``, its
estimated cost (:meth:`Request.cost`) within ``inference.max_request_cost``,
and its user may not already have ``inference.max_per_user`` requests queued or
running. Each refusal is a short message for the person who asked and is counted
in the metrics under its own outcome.

Handlers reach the service through ``ctx.inference``, a :class:`UserInference`
view that tags every request with the user who asked; a request submitted with
no user (the console's own tooling, tests, benchmarks) is admitted without the
per-user share.
"""

from __future__ import annotations

import abc
from collections import Counter
from typing import Any

from bot.config import Config
from bot.errors import InferenceError, InputTooLong, InvalidText, TooCostly, TooManyRequests
from bot.inference.metrics import ServiceMetrics
from bot.inference.protocol import Request, check_text


class InferenceClient(abc.ABC):
    """What plugins and front ends use; every backend implements :meth:`_submit` and the lifecycle."""

    metrics: ServiceMetrics

    def __init__(self, config: Config) -> None:
        inf = config.inference
        self.metrics = ServiceMetrics()
        self.timeout = inf.request_timeout_s
        self.max_chars = inf.max_input_chars
        self.max_request_cost = inf.max_request_cost
        self.max_per_user = inf.max_per_user
        self._closing = False
        self._per_user: Counter[str] = Counter()  # requests queued or running, per user id
        # Model roles admitted requests asked for (None: a task needing no model); `lmbot ask`
        # reads it to decide whether a warm lmbot is worth leaving, and what it should load.
        self.roles_used: set[str | None] = set()

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: Request, *, timeout: float | None = None, user: str | None = None) -> Any:
        """Run ``request`` and return its result, or raise an :class:`InferenceError`.

        ``user`` (a user id) counts the request against that user's share of the service.
        """
        self.admit(request, user)
        self.roles_used.add(type(request).role)
        if user is None:
            return await self._submit(request, timeout=timeout, user=None)
        self._per_user[user] += 1
        try:
            return await self._submit(request, timeout=timeout, user=user)
        finally:
            self._per_user[user] -= 1
            if self._per_user[user] <= 0:
                del self._per_user[user]

    def for_user(self, user: str) -> UserInference:
        """This service as ``user`` sees it (what ``ctx.inference`` returns)."""
        return UserInference(self, user)

    @abc.abstractmethod
    async def _submit(self, request: Request, *, timeout: float | None, user: str | None) -> Any:
        """Queue an admitted request and await its result (the backend's own part of :meth:`submit`)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def retry_hint_if_full(self) -> float | None:
        """Seconds to suggest waiting when a new request would be refused as busy, else None."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """Workers and the models they hold."""

    # ------------------------------------------------------------------ admission

    def admit(self, request: Request, user: str | None = None) -> None:
        """Refuse ``request`` before it is queued if any shared rule says no (raises, else returns)."""
        task = type(request).task
        try:
            if self._closing:
                raise InferenceError("The bot is shutting down.")
            texts = request.texts()
            check_text(texts)
            chars = sum(len(t) for t in texts)
            if chars > self.max_chars:
                raise InputTooLong(f"That text is {chars:,} characters long; the limit is {self.max_chars:,}.")
            cost = request.cost()
            if not (cost <= self.max_request_cost):  # also refuses a NaN estimate
                raise TooCostly(float(cost), self.max_request_cost)
            if user is not None and self._per_user[user] >= self.max_per_user:
                raise TooManyRequests(self._per_user[user])
        except InferenceError as exc:
            self.metrics.requests.labels(task, REFUSALS.get(type(exc), type(exc).__name__)).inc()
            raise


# The outcome label each refusal is counted under in ``lmbot_requests_total``.
REFUSALS: dict[type[Exception], str] = {
    InferenceError: "closing",
    InvalidText: "invalid_text",
    InputTooLong: "too_long",
    TooCostly: "too_costly",
    TooManyRequests: "user_share",
}


class UserInference:
    """The shared service seen by one user: every request is tagged with the user's id.

    Everything but :meth:`submit` is the shared service's own (metrics, limits, status).
    """

    def __init__(self, service: InferenceClient, user: str) -> None:
        self.service = service
        self.user = user

    async def submit(self, request: Request, *, timeout: float | None = None) -> Any:
        return await self.service.submit(request, timeout=timeout, user=self.user)

    @property
    def metrics(self) -> ServiceMetrics:
        return self.service.metrics

    @property
    def max_request_cost(self) -> float:
        return self.service.max_request_cost

    def retry_hint_if_full(self) -> float | None:
        return self.service.retry_hint_if_full()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)
