"""A Ray Serve replica of one role's application: owns the role's model, runs merged batches.

Deployed by :class:`bot.inference.ray_backend.RayInferenceClient` (``serve.deployment`` wraps
:class:`RoleServer` at deploy time). It runs on the cluster, never in the bot process: it
loads the role with the same :class:`~bot.worker.loading.ModelCache` as the local workers
and runs each batch through the same :func:`bot.worker.process.run_batch`. Its module
imports nothing heavy at the top, so the bot process can name the class to deploy it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from bot.inference.protocol import InferenceError, Request
from bot.inference.ray_backend import fingerprint
from bot.inference.settings import WorkerSettings

# What a replica answers per request: ok, the result or the error, and its timestamps
# (arrived, picked for a compute run, compute began in the thread, compute ended,
# forward seconds, requests in the run, returned).
Answer = tuple[bool, Any, tuple[float, ...]]


class RoleServer:
    """One replica of a role's application (wrapped by ``serve.deployment`` at deploy time).

    A call carries a whole batch formed in a bot process. Batches that arrive while the
    replica computes wait, and the next compute run takes all of them together (up to
    ``max_batch_size`` requests): batches from several bot processes merge here without
    any added wait.
    """

    def __init__(self, settings: WorkerSettings, role: str, described: dict[str, Any], max_batch_size: int) -> None:
        # As in the local workers, and before torch loads libgomp (which reads it once, at load):
        # OpenMP's default long spin keeps idle threads busy, taking the cores from everything else.
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
        from bot.worker.loading import ModelCache

        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        # else Ray has set OMP_NUM_THREADS to the replica's whole CPUs (ray_num_cpus, at least 1)
        self.settings = settings
        self.role = role
        self.described = described
        self.max_batch_size = max_batch_size
        self.cache = ModelCache(settings)
        self._pending: list[tuple[float, list[tuple[Request, float]], asyncio.Future[list[Answer]]]] = []
        self._runner: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        """What this application was built from (read by another process before it shares it)."""
        return {"fingerprint": fingerprint(self.described), "config": self.described}

    def pid(self) -> int:
        return os.getpid()

    async def __call__(self, items: list[tuple[Request, float]]) -> list[Answer]:
        """Run a batch of ``(request, seconds left)``; answers in the same order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Answer]] = loop.create_future()
        self._pending.append((time.monotonic(), items, future))
        if self._runner is None or self._runner.done():
            # Its own task: a caller that is cancelled must not stop the others' batches.
            self._runner = loop.create_task(self._run_pending())
        answers = await future
        returned = time.monotonic()
        return [(ok, value, (*stamps, returned)) for ok, value, stamps in answers]

    async def _run_pending(self) -> None:
        while self._pending:
            taken: list[tuple[float, list[tuple[Request, float]], asyncio.Future[list[Answer]]]] = []
            count = 0
            while self._pending and (not taken or count + len(self._pending[0][1]) <= self.max_batch_size):
                entry = self._pending.pop(0)
                taken.append(entry)
                count += len(entry[1])
            picked = time.monotonic()
            merged = [(arrived, request, left) for arrived, items, _ in taken for request, left in items]
            try:
                # The forward must not block this event loop, where the next batches arrive.
                answers = await asyncio.to_thread(self._compute, merged, picked)
            except Exception as exc:  # a bug here must fail these requests, not hang them
                for _, _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for _, items, future in taken:
                if not future.done():
                    future.set_result(answers[start : start + len(items)])
                start += len(items)

    def _compute(self, merged: list[tuple[float, Request, float]], picked: float) -> list[Answer]:
        from bot.worker.process import run_batch

        began = time.monotonic()
        # run_batch takes one (task, batch key) at a time; a batch from one bot process holds one,
        # merged batches may hold several.
        groups: dict[tuple[Any, ...], list[tuple[int, Request, float]]] = {}
        for index, (arrived, request, left) in enumerate(merged):
            groups.setdefault((type(request), request.batch_key()), []).append((index, request, arrived + left))
        answers: list[Answer] = [(False, InferenceError("not run"), ())] * len(merged)
        for group in groups.values():
            outcomes, timing = run_batch(self.cache, self.settings, group)
            ended = time.monotonic()
            forward, size = timing.get("compute_s", 0.0), float(max(timing.get("sizes") or [0]))
            for index, ok, value in outcomes:
                answers[index] = (ok, value, (merged[index][0], picked, began, ended, forward, size))
        return answers
