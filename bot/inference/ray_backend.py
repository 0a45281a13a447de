"""The Ray Serve backend: the same client interface, inference on a Ray cluster.

One Serve deployment per model role. Each replica owns its role's model (the
same :class:`~bot.inference.loading.ModelCache` the local workers use) and runs
the same tasks through :func:`bot.inference.worker.run_batch`; ``@serve.batch``
gathers concurrent requests into batches. Ray's backpressure becomes the bot's
Busy reply, and a replica that dies fails its requests with WorkerDied while
Serve replaces it. Admission (readable text, size, cost budget, per-user share)
is the one every backend shares (:class:`bot.inference.service.InferenceClient`);
Serve forms its own batches, so the local backend's round-robin between users
does not apply here.

Choose it with ``inference.backend = "ray"``; ``inference.ray_address`` names an
existing cluster (empty: start a local Ray instance). Task functions and plugins
must be importable on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from typing import Any

from bot.config import Config
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, Request, WorkerDied
from bot.inference.service import InferenceClient
from bot.inference.settings import WorkerSettings
from bot.topics import ModelRole

NO_ROLE = "_none"  # the deployment for tasks that need no model


def make_deployment(settings: WorkerSettings, role: str, config: Config) -> Any:
    """A Serve application serving one role, built from config (batch size, wait, replicas, GPUs)."""
    from ray import serve

    inf = config.inference

    @serve.deployment(
        name=f"lmbot-{role}",
        num_replicas=inf.ray_replicas,
        ray_actor_options={"num_cpus": inf.ray_num_cpus, "num_gpus": inf.ray_num_gpus},
        max_ongoing_requests=max(inf.max_batch_size * 2, 8),
        max_queued_requests=inf.max_queue,
    )
    class RoleServer:
        def __init__(self) -> None:
            from bot.inference.loading import ModelCache

            os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as in the local workers
            self.cache = ModelCache(settings)

        def pid(self) -> int:
            return os.getpid()

        @serve.batch(max_batch_size=inf.max_batch_size, batch_wait_timeout_s=inf.max_wait_ms / 1000)
        async def run(self, items: list[tuple[Request, float]]) -> list[tuple[bool, Any, int]]:
            from bot.inference.worker import run_batch

            # Deadlines travel as wall-clock times (replicas may be on other hosts).
            offset = time.monotonic() - time.time()
            groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
            for index, (request, _) in enumerate(items):
                groups[(type(request), request.batch_key())].append(index)
            answers: list[tuple[bool, Any, int]] = [(False, InferenceError("not run"), 0)] * len(items)
            for indices in groups.values():
                batch = [(i, items[i][0], items[i][1] + offset) for i in indices]
                outcomes, timing = await asyncio.to_thread(run_batch, self.cache, settings, batch)
                size = max(timing.get("sizes") or [0])
                for request_index, ok, value in outcomes:
                    answers[request_index] = (ok, value, size)
            return answers

        async def __call__(self, request: Request, deadline: float) -> tuple[bool, Any, int]:
            return await self.run((request, deadline))

    return RoleServer.bind()  # type: ignore[attr-defined]  # @serve.deployment made it a Deployment


class RayInferenceClient(InferenceClient):
    """Submits requests to per-role Serve deployments through their handles."""

    def __init__(self, config: Config, roles: dict[str, ModelRole]) -> None:
        super().__init__(config)  # the shared admission rules: text, size, cost, per-user share
        self.config = config
        self.settings = WorkerSettings.from_config(config, roles)
        self.roles = roles
        self._handles: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._owns_ray = False

    async def start(self) -> None:
        async with self._start_lock:  # concurrent first requests must not init Ray twice
            if not self._started:
                await asyncio.to_thread(self._connect)
                self._started = True

    def _connect(self) -> None:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
        # Only a client that started Ray itself shuts it down; one joining a running Ray leaves it be.
        self._owns_ray = not ray.is_initialized() and not self.config.inference.ray_address
        if not ray.is_initialized():
            address = self.config.inference.ray_address or None
            options: dict[str, Any] = {"address": address, "log_to_driver": False}
            if address is None:
                # A local instance binds to loopback only: nothing of it is reachable from outside.
                options.update(include_dashboard=False, num_cpus=os.cpu_count() or 2, _node_ip_address="127.0.0.1")
            ray.init(**options)
        from ray import serve

        serve.start(proxy_location="Disabled")  # handles only: no HTTP server is opened

    async def _handle(self, role: str) -> Any:
        """The role's deployment, deployed on first use (so unused roles cost nothing)."""
        if role in self._handles:
            return self._handles[role]
        async with self._lock:
            if role not in self._handles:
                from ray import serve

                app = make_deployment(self.settings, role, self.config)
                handle = await asyncio.to_thread(serve.run, app, name=f"lmbot-{role}", route_prefix=None)
                self._handles[role] = handle
        return self._handles[role]

    async def _submit(self, request: Request, *, timeout: float | None, user: str | None) -> Any:
        await self.start()
        task = type(request).task
        budget = timeout or self.timeout
        started = time.monotonic()
        handle = await self._handle(type(request).role or NO_ROLE)
        response = handle.remote(request, time.time() + budget)
        try:
            ok, value, size = await asyncio.wait_for(response, budget)
        except TimeoutError:
            response.cancel()
            self.metrics.requests.labels(task, "deadline").inc()
            raise DeadlineExceeded() from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise self._translate(exc, task) from None
        if size:
            self.metrics.batch_size.labels(task).observe(size)
        if not ok:
            self.metrics.requests.labels(task, type(value).__name__).inc()
            raise value
        self.metrics.requests.labels(task, "ok").inc()
        self.metrics.latency.labels(task).observe(time.monotonic() - started)
        self.metrics.last_progress.set_to_current_time()
        return value

    def _translate(self, exc: Exception, task: str) -> InferenceError:
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        if isinstance(exc, BackPressureError):
            self.metrics.requests.labels(task, "busy").inc()
            return Busy(retry_after=2.0)
        died = (
            ray_errors.RayActorError,
            ray_errors.ActorDiedError,
            ray_errors.ActorUnavailableError,
            ReplicaUnavailableError,
        )
        if isinstance(exc, died):
            self.metrics.requests.labels(task, "WorkerDied").inc()
            self.metrics.worker_restarts.inc()
            return WorkerDied("The model replica stopped unexpectedly; Ray is replacing it, try again.")
        if isinstance(exc, InferenceError):
            return exc
        self.metrics.requests.labels(task, "error").inc()
        return InferenceError(f"The Ray backend failed: {type(exc).__name__}")

    def retry_hint_if_full(self) -> float | None:
        return None  # Ray answers backpressure itself, at submit

    async def replica_pids(self, role: str) -> list[int]:
        handle = await self._handle(role)
        return [await handle.pid.remote()]

    async def status(self) -> dict[str, Any]:
        return {"backend": "ray", "roles": sorted(self._handles)}

    async def close(self) -> None:
        self._closing = True
        if not self._started:
            return
        import ray
        from ray import serve

        def shutdown() -> None:
            for role in list(self._handles):
                with contextlib.suppress(Exception):  # already gone (another client replaced it)
                    serve.delete(f"lmbot-{role}")
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()

        await asyncio.to_thread(shutdown)
        self._handles.clear()
