"""The Ray Serve backend: the same client interface, inference on a Ray cluster.

One Serve application per model role (``lmbot-<role>``). Each replica owns its
role's model (the same :class:`~bot.worker.loading.ModelCache` the local
workers use) and runs the same tasks through :func:`bot.worker.process.run_batch`;
the replica's class lives on the worker side, :class:`bot.worker.ray_replica.RoleServer`.
The bot process batches requests with the same batching core as the local
backend (:mod:`bot.inference.scheduler`: admission, fair queues, deadlines,
batching); this module is its transport: it sends each batch to the
application in one handle call, at most two per replica at a time; a replica
that is busy merges the batches waiting for it, from every bot process, into
its next run. A replica that dies fails its batch with WorkerDied while Serve
replaces it. Admission (readable text, size, cost budget, per-user share) is the
one every backend shares (:class:`bot.inference.service.InferenceClient`).

Many bot processes, one cluster: the applications are shared. A small detached
actor (:class:`AppRegistry`, ``lmbot-serve-apps`` in namespace ``lmbot``) decides,
one process at a time, whether a role's application must be deployed, can be
reused (it runs with the same config: same fingerprint of :func:`app_config`) or
must be refused (a different config: the message names each difference; a
running application is never replaced). It counts which processes hold each
application; the last one to close deletes it. A process that dies without
closing is dropped from the count once Ray marks its job dead.

The request path is kept short (see ``bench/inference.py --ray`` for the
measured breakdown): the handle's router runs on the bot's own event loop (no
hop to Serve's router thread), one call carries a whole batch, each request
carries its remaining time budget (the replica turns it into a deadline on its
own clock: no wall-clock conversion and no clock skew between hosts), a run
crosses to the compute thread once whatever tasks it mixes, and every result
carries the replica's timestamps so the client can say where a request's time
went (:meth:`RayInferenceClient.breakdown`).

Choose it with ``inference.backend = "ray"``; ``inference.ray_address`` names an
existing cluster (empty: start a local Ray instance, which lives and dies with
this process). Task functions and plugins must be importable on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import time
import uuid
from collections import deque
from typing import Any

from bot.config import Config
from bot.inference.protocol import Busy, DeadlineExceeded, InferenceError, WorkerDied
from bot.inference.scheduler import BatchedClient, Pending
from bot.inference.settings import WorkerSettings
from bot.topics import ModelRole

NO_ROLE = "_none"  # the application for tasks that need no model
APP_PREFIX = "lmbot-"
REGISTRY_NAME = "lmbot-serve-apps"
REGISTRY_NAMESPACE = "lmbot"
DEPLOY_WAIT_S = 600.0  # how long a process waits for another one's deployment of a shared application


def app_name(role: str) -> str:
    return f"{APP_PREFIX}{role}"


class ClusterConfigConflict(InferenceError):
    """The cluster already runs this role's application with a different config."""

    outcome = "config_conflict"  # its label in lmbot_requests_total


# ---------------------------------------------------------------------- what an application is built from


def app_config(config: Config, role: str, roles: dict[str, ModelRole]) -> dict[str, Any]:
    """Every setting a role's Serve application is built from, as the config file spells it.

    Two bot processes share an application only if these agree; what only the bot
    process uses (its queue: max_queue, max_wait_ms; timeouts, character limits,
    Discord) is left out.
    """
    from bot import __version__

    inf = config.inference
    described: dict[str, Any] = {"lmbot": __version__}
    if role != NO_ROLE:
        known = roles.get(role)
        described["models." + role] = config.models.get(role) or (known.default if known else "")
        described["model class"] = known.auto_class if known else ""
        described.update(
            {
                "inference.offline": inf.offline,
                "inference.cache_dir": inf.cache_dir,
                "inference.memory_budget_mb": inf.memory_budget_mb,
                "inference.max_input_tokens": inf.max_input_tokens,
                "inference.max_batch_tokens": inf.max_batch_tokens,
                "inference.max_new_tokens": inf.max_new_tokens,
            }
        )
    described.update(
        {
            "inference.device": inf.device,
            "inference.dtype": inf.dtype,
            "inference.threads": inf.threads,
            "inference.ray_replicas": inf.ray_replicas,
            "inference.ray_num_cpus": inf.ray_num_cpus,
            "inference.ray_num_gpus": inf.ray_num_gpus,
            "inference.max_batch_size": inf.max_batch_size,  # the most a replica's merged run takes
        }
    )
    return described


def fingerprint(described: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``key: X there, Y here`` for every setting that differs."""
    keys = sorted(set(theirs) | set(ours))
    missing = "(not set)"
    return [
        f"{key}: {theirs.get(key, missing)!r} there, {ours.get(key, missing)!r} here"
        for key in keys
        if theirs.get(key, missing) != ours.get(key, missing)
    ]


# ---------------------------------------------------------------------- the registry of shared applications


def _status_name(status: Any) -> str:
    """``RUNNING`` for Serve's ApplicationStatus.RUNNING (a str enum) or a plain string."""
    return str(getattr(status, "value", status))


class AppRegistry:
    """Which bot processes hold which lmbot application on this cluster (one detached actor).

    Its methods run one at a time, so two processes starting together deploy a role once,
    and a deletion never races a new claim.
    """

    def __init__(self) -> None:
        # app -> {"fingerprint", "config", "state": "deploying"|"running", "holders": {holder: job id}}
        self.apps: dict[str, dict[str, Any]] = {}

    def claim(self, app: str, print_: str, described: dict[str, Any], holder: str, job: str) -> tuple[str, Any]:
        """``("deploy", None)``, ``("reuse", None)`` or ``("refused", their config or None)``."""
        running = self._serve_status(app)
        entry = self.apps.get(app)
        if entry is not None:
            self._prune(entry)
            stale = entry["state"] == "running" and running is None  # deleted behind our back
            orphaned = entry["state"] == "deploying" and entry["deployer"] not in entry["holders"]
            if stale or orphaned:
                del self.apps[app]
                entry = None
        if entry is None and running is not None:
            # Running but unknown here (deployed before this registry started): ask the app itself.
            theirs = self._describe(app)
            if theirs is None:
                return "refused", None
            entry = self.apps[app] = {**theirs, "state": "running", "holders": {}}
        if entry is None:
            self.apps[app] = {
                "fingerprint": print_,
                "config": described,
                "state": "deploying",
                "deployer": holder,
                "holders": {holder: job},
            }
            return "deploy", None
        if entry["fingerprint"] != print_:
            return "refused", entry["config"]
        entry["holders"][holder] = job
        return "reuse", None

    def deployed(self, app: str, ok: bool) -> None:
        entry = self.apps.get(app)
        if entry is not None:
            if ok:
                entry["state"] = "running"
            else:
                del self.apps[app]

    def state(self, app: str) -> str | None:
        entry = self.apps.get(app)
        return None if entry is None else str(entry["state"])

    def holders(self, app: str) -> list[str]:
        entry = self.apps.get(app)
        if entry is None:
            return []
        self._prune(entry)
        return sorted(entry["holders"])

    def release(self, app: str, holder: str) -> bool:
        """Drop ``holder``; the last one out deletes the application (returns True then)."""
        entry = self.apps.get(app)
        if entry is None:
            return False
        entry["holders"].pop(holder, None)
        self._prune(entry)
        if entry["holders"]:
            return False
        del self.apps[app]
        from ray import serve

        with contextlib.suppress(Exception):  # already gone
            serve.delete(app)
        return True

    @staticmethod
    def _serve_status(app: str) -> str | None:
        from ray import serve

        found = serve.status().applications.get(app)
        return None if found is None else _status_name(found.status)

    @staticmethod
    def _describe(app: str) -> dict[str, Any] | None:
        from ray import serve

        try:
            answer = serve.get_app_handle(app).describe.remote().result(timeout_s=60)
        except Exception:  # not an lmbot application, or one from before describe() existed
            return None
        return {"fingerprint": answer["fingerprint"], "config": answer["config"]}

    @staticmethod
    def _prune(entry: dict[str, Any]) -> None:
        """Forget holders whose bot process is gone (Ray marks a driver's job dead when it exits)."""
        try:
            from ray._private import state

            dead = {job["JobID"] for job in state.jobs() if job.get("IsDead")}
        except Exception:  # no job table here: keep every holder
            return
        for holder, job in list(entry["holders"].items()):
            if job in dead:
                del entry["holders"][holder]


# ---------------------------------------------------------------------- the client

_REGISTRY_CLASS: Any = None  # AppRegistry as a Ray actor class, made on first use

# Where a request's time goes, from the timestamps it carries (see RayInferenceClient.breakdown).
STAGES = (
    "client_queue",  # waiting in the bot process for its batch to form (max_wait_ms, or a free slot)
    "to_replica",  # handle call, router, Ray's actor call, argument deserialisation (same-host clocks)
    "replica_queue",  # waiting at the replica while it computes an earlier batch
    "thread_hop",  # the batch crossing to the replica's compute thread
    "prepare",  # grouping, tokenising, sorting by length, padding
    "forward",  # the model's forward pass(es) of the batch
    "replica_return",  # back from the thread to the call's coroutine
    "to_client",  # result serialisation, transport, the bot's loop resuming the caller (same-host clocks)
    "transport",  # to_replica + to_client, from durations only (valid across hosts)
    "total",
)


class RayInferenceClient(BatchedClient):
    """The batching core's transport to Ray Serve: each batch goes to its role's Serve
    application in one handle call."""

    def __init__(self, config: Config, roles: dict[str, ModelRole]) -> None:
        super().__init__(config)  # the shared admission rules: text, size, cost, per-user share
        inf = config.inference
        self.config = config
        self.settings = WorkerSettings.from_config(config, roles)
        self.roles = roles
        # Batches in flight per role: two per replica, so the next batch travels while one computes.
        self.slots = 2 * inf.ray_replicas
        self._handles: dict[str, Any] = {}
        self._held: set[str] = set()  # applications this client holds in the registry
        self._holder = uuid.uuid4().hex
        self._job = ""
        self._lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._owns_ray = False
        self._in_flight: dict[str, int] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._traces: deque[tuple[float, ...]] = deque(maxlen=4096)

    async def start(self) -> None:
        if self._started:
            return
        async with self._start_lock:  # concurrent first requests must not init Ray twice
            if not self._started:
                await asyncio.to_thread(self._connect)
                self.core.start()
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

        for attempt in range(5):
            try:
                serve.start(proxy_location="Disabled")  # handles only: no HTTP server is opened
                break
            except ray.exceptions.ActorAlreadyExistsError:
                # Another bot process started Serve on this cluster at the same moment: join it.
                if attempt == 4:
                    raise
                time.sleep(0.5)
        self._job = ray.get_runtime_context().get_job_id()

    # ------------------------------------------------------------------ shared applications

    def _registry(self) -> Any:
        import ray

        global _REGISTRY_CLASS
        if _REGISTRY_CLASS is None:
            _REGISTRY_CLASS = ray.remote(AppRegistry)
        return _REGISTRY_CLASS.options(
            name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0
        ).remote()

    def _registry_call(self, method: str, *args: Any) -> Any:
        import ray

        for attempt in range(3):
            try:
                return ray.get(getattr(self._registry(), method).remote(*args))
            except ray.exceptions.RayActorError:  # killed or restarting: get_if_exists makes a new one
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _acquire(self, role: str) -> None:
        """Deploy ``role``'s application, or join the one already running with the same config."""
        from ray import serve

        app = app_name(role)
        described = app_config(self.config, role, self.roles)
        decision, theirs = self._registry_call("claim", app, fingerprint(described), described, self._holder, self._job)
        if decision == "refused":
            raise ClusterConfigConflict(self._conflict_message(app, theirs, described))
        self._held.add(app)
        if decision != "deploy":
            self._wait_until_running(app)
            return
        inf = self.config.inference
        # The replica's class crosses the process boundary by name only: importing it loads no
        # torch (it imports its model code when a replica starts, on the cluster).
        from bot.worker.ray_replica import RoleServer

        role_server: Any = serve.deployment(RoleServer)  # (its stubs miss the class overload)
        deployment = role_server.options(
            name=app,
            num_replicas=inf.ray_replicas,
            ray_actor_options={"num_cpus": inf.ray_num_cpus, "num_gpus": inf.ray_num_gpus},
            # Each call is a whole batch; several bot processes may each have two in flight.
            max_ongoing_requests=64,
            # A line per call in the replica's log is work the request path does not need.
            logging_config={"enable_access_log": False},
        )
        try:
            serve.run(deployment.bind(self.settings, role, described, inf.max_batch_size), name=app, route_prefix=None)
        except Exception as exc:
            self._registry_call("deployed", app, False)
            self._held.discard(app)
            raise InferenceError(f"Ray could not deploy `{app}`: {type(exc).__name__}: {exc}") from None
        self._registry_call("deployed", app, True)

    def _wait_until_running(self, app: str) -> None:
        """Another process deploys ``app`` (or has): wait until Serve says it runs."""
        from ray import serve

        deadline = time.monotonic() + DEPLOY_WAIT_S
        while time.monotonic() < deadline:
            found = serve.status().applications.get(app)
            status = None if found is None else _status_name(found.status)
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                self._held.discard(app)
                self._registry_call("release", app, self._holder)
                raise InferenceError(f"`{app}` failed on the Ray cluster: {found.message if found else ''}".strip())
            if status is None and self._registry_call("state", app) is None:
                self._held.discard(app)
                raise InferenceError(f"Another bot process failed to deploy `{app}`; try again.")
            time.sleep(0.25)
        raise InferenceError(f"`{app}` is still deploying on the Ray cluster; try again in a minute.")

    @staticmethod
    def _conflict_message(app: str, theirs: dict[str, Any] | None, ours: dict[str, Any]) -> str:
        how = f'remove it first (`serve.delete("{app}")` on the cluster, or `serve shutdown`)'
        if theirs is None:
            return f"The Ray cluster runs an application named `{app}` that this lmbot cannot read; {how}."
        changed = "; ".join(differences(theirs, ours))
        return (
            f"The Ray cluster already runs `{app}` with a different config ({changed}). "
            f"Bot processes sharing a cluster must use the same settings, or {how}; "
            "a running application is never replaced."
        )

    async def _handle(self, role: str) -> Any:
        """The role's handle, deployed or joined on first use (so unused roles cost nothing)."""
        handle = self._handles.get(role)
        if handle is not None:
            return handle
        async with self._lock:
            if role not in self._handles:
                from ray import serve

                await asyncio.to_thread(self._acquire, role)
                handle = await asyncio.to_thread(serve.get_app_handle, app_name(role))
                assert handle is not None  # _acquire saw it running
                with contextlib.suppress(Exception):  # an older Serve: its router keeps its own thread
                    # The router on this event loop: no hop to Serve's router thread and back per call.
                    handle._init(_run_router_in_separate_loop=False)
                self._handles[role] = handle
        return self._handles[role]

    # ------------------------------------------------------------------ the transport

    @property
    def parallelism(self) -> int:
        return max(1, self.config.inference.ray_replicas)

    async def prepare(self, role: str | None) -> None:
        """Connect to Ray, and deploy (or join) the role's application before its first request queues."""
        await self.start()
        name = role or NO_ROLE
        if name not in self._handles:
            await self._handle(name)

    def free(self, role: str | None) -> int:
        return self.slots - self._in_flight.get(role or NO_ROLE, 0)

    def run(self, batch: list[Pending]) -> bool:
        role = batch[0].role or NO_ROLE
        self._in_flight[role] = self._in_flight.get(role, 0) + 1
        sending = asyncio.get_running_loop().create_task(self._send(role, batch, batch[0].sent))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)
        return True

    async def _send(self, role: str, batch: list[Pending], formed: float) -> None:
        """One batch, one handle call; its answers go back to the core."""
        task = batch[0].task
        items = [(w.request, w.deadline - formed) for w in batch]
        response = None
        try:
            response = self._handles[role].remote(items)
            # No batch outlives its last request's deadline by much, even if a replica hangs.
            async with asyncio.timeout(max(w.deadline for w in batch) - formed + 5.0):
                answers = await response
        except (Exception, asyncio.CancelledError) as exc:
            if response is not None and isinstance(exc, TimeoutError | asyncio.CancelledError):
                response.cancel()
            if isinstance(exc, asyncio.CancelledError):  # only close() cancels a batch call
                error: InferenceError = InferenceError("The bot is shutting down.")
            elif isinstance(exc, TimeoutError):
                error = DeadlineExceeded()
            else:
                error = self._translate(exc, task)
            self._in_flight[role] -= 1
            self.core.failed(batch, error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._in_flight[role] -= 1
        done = time.monotonic()
        sizes = set()
        outcomes = []
        busy: float | None = None  # the replica's compute run, from its own timestamps
        for waiting, (ok, value, stamps) in zip(batch, answers, strict=True):
            if len(stamps) == 7:
                self._traces.append((waiting.enqueued, formed, *stamps, done))
                sizes.add(stamps[5])
                busy = max(busy or 0.0, stamps[3] - stamps[2])
            outcomes.append((waiting.id, ok, value))
        timing: dict[str, Any] = {"sizes": sorted(size for size in sizes if size)}
        if busy is not None:
            timing["busy_s"] = busy
        self.core.finished(batch, outcomes, timing)

    def breakdown(self, last: int | None = None) -> dict[str, float]:
        """Median milliseconds per stage of the last ``last`` answered requests, and their mean batch size.

        ``to_replica`` and ``to_client`` compare this host's clock with the replica's, so they
        are left out when the replica runs on another host (``transport`` is their sum either way).
        """
        traces = list(self._traces)[-last:] if last else list(self._traces)
        if not traces:
            return {}
        columns: dict[str, list[float]] = {stage: [] for stage in STAGES}
        same_host = True
        for enqueued, formed, arrived, picked, began, ended, forward, _size, returned, done in traces:
            columns["client_queue"].append(formed - enqueued)
            columns["to_replica"].append(arrived - formed)
            columns["replica_queue"].append(picked - arrived)
            columns["thread_hop"].append(began - picked)
            columns["prepare"].append(max(0.0, ended - began - forward))
            columns["forward"].append(forward)
            columns["replica_return"].append(returned - ended)
            columns["to_client"].append(done - returned)
            columns["transport"].append((done - formed) - (returned - arrived))
            columns["total"].append(done - enqueued)
            same_host = same_host and arrived >= formed and done >= returned
        result = {stage: 1000 * statistics.median(values) for stage, values in columns.items()}
        if not same_host:
            del result["to_replica"], result["to_client"]
        result["batch_size_mean"] = statistics.fmean(t[7] for t in traces)
        result["requests"] = float(len(traces))
        return result

    def _translate(self, exc: Exception, task: str) -> InferenceError:
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        if isinstance(exc, BackPressureError):
            return Busy(retry_after=2.0)
        died = (
            ray_errors.RayActorError,
            ray_errors.ActorDiedError,
            ray_errors.ActorUnavailableError,
            ReplicaUnavailableError,
        )
        if isinstance(exc, died):
            self.metrics.worker_restarts.inc()
            return WorkerDied("The model replica stopped unexpectedly; Ray is replacing it, try again.")
        if isinstance(exc, InferenceError):
            return exc
        return InferenceError(f"The Ray backend failed: {type(exc).__name__}")

    async def replica_pids(self, role: str) -> list[int]:
        handle = await self._handle(role)
        return [await handle.pid.remote()]

    async def describe_app(self, role: str) -> dict[str, Any]:
        """What the running application of ``role`` was built from (its fingerprint and config)."""
        handle = await self._handle(role)
        answer: dict[str, Any] = await handle.describe.remote()
        return answer

    async def status(self) -> dict[str, Any]:
        return {
            "backend": "ray",
            "roles": sorted(self._handles),
            "queue_depth": self.core.waiting,
            "breakdown_ms": self.breakdown(),
        }

    async def close(self) -> None:
        self._closing = True
        await self.core.close()
        if not self._started:
            return
        for running in list(self._sending):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        import ray
        from ray import serve

        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                await handle.shutdown_async()
        self._handles.clear()

        def shutdown() -> None:
            if self._owns_ray:  # everything on this Ray goes with it
                serve.shutdown()
                ray.shutdown()
                return
            for app in sorted(self._held):
                with contextlib.suppress(Exception):  # the registry or the cluster is already gone
                    self._registry_call("release", app, self._holder)

        await asyncio.to_thread(shutdown)
        self._held.clear()
