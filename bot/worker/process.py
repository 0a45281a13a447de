"""The worker process: owns the models and runs batches sent by the client.

Protocol over a ``multiprocessing`` pipe (all messages are tuples):

* client -> worker: ``("batch", batch_id, [(request_id, pickled_request, deadline), ...])``,
  ``("status", token)``, ``("load", token, role)``, ``("stop",)``
* worker -> client: ``("ready", pid, device)``, ``("done", batch_id, outcomes, timing)``,
  ``("status", token, info)``, ``("loading", role)`` before a model loads for a batch and
  every :data:`LOAD_HEARTBEAT_S` while it loads (a worker stopped mid-load sends none, and the
  client replaces it), ``("loaded", role)`` after; the same for :data:`STARTING` while the
  worker starts, before ``ready``

A result must be plain data (:func:`plain_data_problem`): a task returning a torch
tensor, a numpy array or any other object fails with an error naming the task, here,
before anything is pickled, so the bot process never imports torch to read an answer.

A request that fails fails alone: its tokenization and limits are checked one
request at a time, and a batch on which the task raises is split in halves down
to single requests, so the others in its batch are still answered.

An outcome is ``(request_id, ok, result_or_error)``. Deadlines are
``time.monotonic()`` values, which are shared by every process on the host.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import pickle
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

from bot.inference.settings import STARTING

Outcome = tuple[int, bool, Any]
log = logging.getLogger("bot.worker.process")
LOAD_HEARTBEAT_S = 1.0


class LoadHeartbeat:
    """Sends ``("loading", role)`` now and every :data:`LOAD_HEARTBEAT_S` until :meth:`stop`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # the pipe is shared with the main thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)

    def start(self, role: str) -> None:
        self._stop.clear()
        self.send(("loading", role))

        def beat() -> None:
            while not self._stop.wait(LOAD_HEARTBEAT_S):
                try:
                    self.send(("loading", role))
                except (OSError, ValueError):
                    return

        self._thread = threading.Thread(target=beat, name="lmbot-load-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, role: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.send(("loaded", role))


def main(conn: Connection, settings: Any, log_level: str = "INFO") -> None:
    """Entry point of a spawned worker; returns (and the process exits) when the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    # OpenMP threads spin-wait after each parallel region by default, taking the CPU from the
    # bot process exactly when it has results to route; sleeping at once (OMP_WAIT_POLICY=PASSIVE)
    # makes every small op pay a wake-up instead. A short spin is measurably best (bench/inference.py).
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    logging.basicConfig(
        level=log_level, stream=sys.stderr, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    heartbeat = LoadHeartbeat(conn)
    heartbeat.start(STARTING)  # importing torch and preloading models is watched like a load
    import torch  # only workers import torch: the bot process stays small

    from bot.worker.loading import ModelCache, pick_device

    if settings.threads:
        torch.set_num_threads(settings.threads)
    cache = ModelCache(settings)
    for role in settings.preload:
        try:
            cache.get(role)
        except Exception:
            log.exception("could not preload %s", role)
    heartbeat.stop(STARTING)
    conn.send(("ready", os.getpid(), str(pick_device(settings.device))))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "status":
            conn.send(("status", message[1], cache.describe()))
        elif kind == "load":
            try:
                cache.get(message[2])
                answer: Any = cache.describe()[message[2]]
            except Exception as exc:
                log.exception("could not load %s", message[2])
                answer = exc if _picklable(exc) else RuntimeError(str(exc))
            conn.send(("status", message[1], answer))
        elif kind == "batch":
            _, batch_id, pickled = message
            unreadable, items = _unpickle(pickled)
            began = time.perf_counter()
            try:
                outcomes, timing = run_batch(
                    cache,
                    settings,
                    items,
                    on_load=heartbeat.start,
                    on_loaded=heartbeat.stop,
                )
            except Exception:  # run_batch answers every request itself; this is a last resort
                outcomes, timing = _all_failed(items, "running a batch failed"), {}
            # The batch's time here, less any model load: the speed the client admits requests by.
            timing["busy_s"] = max(0.0, time.perf_counter() - began - timing.get("load_s", 0.0))
            _send_done(conn, batch_id, unreadable + outcomes, timing)


def _unpickle(pickled: Sequence[tuple[int, bytes, float]]) -> tuple[list[Outcome], list[tuple[int, Any, float]]]:
    """The batch's requests; one that cannot be unpickled here fails alone."""
    from bot.inference.protocol import InferenceError

    failed: list[Outcome] = []
    items = []
    for request_id, data, deadline in pickled:
        try:
            items.append((request_id, pickle.loads(data), deadline))
        except Exception:
            eid = _error_id()
            log.exception("error %s: request %d cannot be unpickled in the worker", eid, request_id)
            message = f"The model worker cannot read this request (error id {eid}): a bug in the plugin that made it."
            failed.append((request_id, False, InferenceError(message)))
    return failed, items


def _all_failed(items: Sequence[tuple[int, Any, float]], what: str) -> list[Outcome]:
    from bot.inference.protocol import ModelFailed

    eid = _error_id()
    log.exception("error %s: %s", eid, what)
    failure = ModelFailed(f"The model failed on this request (error id {eid}).")
    return [(request_id, False, failure) for request_id, _, _ in items]


def _send_done(conn: Connection, batch_id: int, outcomes: list[Outcome], timing: dict) -> None:
    """Send a batch's outcomes; an answer that cannot be pickled fails alone, not the worker."""
    outcomes = [(rid, ok, value if ok else _portable_error(value)) for rid, ok, value in outcomes]
    try:
        conn.send(("done", batch_id, outcomes, timing))
        return
    except (OSError, EOFError):
        return  # the bot closed the pipe; the main loop ends at its next read
    except Exception:  # pickling failed before anything was written
        pass
    from bot.inference.protocol import ModelFailed

    checked: list[Outcome] = []
    for request_id, ok, value in outcomes:
        if _picklable(value):
            checked.append((request_id, ok, value))
        elif not ok and isinstance(value, Exception):
            checked.append((request_id, False, ModelFailed(str(value)[:500] or type(value).__name__)))
        else:
            eid = _error_id()
            log.error("error %s: the answer to request %d cannot be sent back (%r)", eid, request_id, type(value))
            checked.append((request_id, False, ModelFailed(f"The model's answer could not be sent (error id {eid}).")))
    conn.send(("done", batch_id, checked, timing if _picklable(timing) else {}))


def _portable_error(error: Any) -> Any:
    """``error``, or one with its message that the bot process can unpickle (a plugin's own error
    class whose ``__init__`` takes other arguments than its message cannot be rebuilt there)."""
    from bot.inference.protocol import InferenceError, ModelFailed

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        if isinstance(error, InferenceError):  # a message meant for the user
            return InferenceError(str(error))
        return ModelFailed(f"The model failed on this request ({type(error).__name__}).")


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _error_id() -> str:
    return uuid.uuid4().hex[:8]


def run_batch(
    cache: Any,
    settings: Any,
    items: Sequence[tuple[int, Any, float]],
    on_load: Callable[[str], None] | None = None,
    on_loaded: Callable[[str], None] | None = None,
) -> tuple[list[Outcome], dict]:
    """Run one batch of same-(role, task) requests; never raises.

    ``on_load(role)`` is called before a model that is not in memory yet is loaded
    (which on first use may mean a download), so the caller can tell people why
    their request is slow, and ``on_loaded(role)`` once it is.
    """
    from bot.inference.protocol import DeadlineExceeded, InferenceError, ModelFailed

    outcomes: list[Outcome] = []
    timing: dict[str, Any] = {"compute_s": 0.0, "sizes": [], "load_s": 0.0}
    live = _unexpired(items, outcomes)
    if not live:
        return outcomes, timing
    role, task_name = type(live[0][1]).role, type(live[0][1]).task
    try:
        task = _find_task(task_name)
    except InferenceError as exc:  # a plugin's bug: no model needs loading to say so
        return outcomes + [(rid, False, exc) for rid, _, _ in live], timing
    started = time.perf_counter()
    loading = role is not None and role not in cache.loaded
    try:
        if loading and on_load is not None:
            on_load(role)
        # A task of no role (e.g. timing a layer) runs without a model.
        loaded = cache.get(role) if role is not None else SimpleNamespace(model=None, tokenizer=None, label="")
    except InferenceError as exc:
        return outcomes + [(rid, False, exc) for rid, _, _ in live], timing
    except Exception:
        eid = _error_id()
        log.exception("error %s: loading the %s model failed", eid, role)
        failure = ModelFailed(f"The `{role}` model could not be loaded (error id {eid}).")
        return outcomes + [(rid, False, failure) for rid, _, _ in live], timing
    finally:
        if loading and on_loaded is not None:
            on_loaded(role)
    timing["load_s"] = time.perf_counter() - started
    if loading:  # a long load may have outlived some deadlines: compute nothing nobody awaits
        now = time.monotonic()
        live, expired = [x for x in live if x[2] > now], [x for x in live if x[2] <= now]
        outcomes += [(rid, False, DeadlineExceeded()) for rid, _, _ in expired]

    sized = []
    for request_id, request, _ in live:
        checked = _check_request(request, loaded.tokenizer, settings)
        if isinstance(checked, Exception):
            outcomes.append((request_id, False, checked))
        else:
            length, request = checked
            sized.append((length, request_id, request))

    # Similar lengths together waste less padding; chunks stay under max_batch_tokens.
    sized.sort(key=lambda item: item[0])
    chunk: list[tuple[int, Any]] = []
    for length, request_id, request in sized:
        if chunk and length * (len(chunk) + 1) > settings.max_batch_tokens:
            outcomes += _run_split(task, loaded, chunk, timing)
            chunk = []
        chunk.append((request_id, request))
    if chunk:
        outcomes += _run_split(task, loaded, chunk, timing)
    return outcomes, timing


def _unexpired(items: Sequence[tuple[int, Any, float]], outcomes: list[Outcome]) -> list[tuple[int, Any, float]]:
    """The items still awaited; expired ones (while queued) are answered without computing anything."""
    from bot.inference.protocol import DeadlineExceeded

    now = time.monotonic()
    live = []
    for request_id, request, deadline in items:
        if deadline <= now:
            outcomes.append((request_id, False, DeadlineExceeded()))
        else:
            live.append((request_id, request, deadline))
    return live


def _find_task(name: str) -> Callable[..., Any]:
    """The task function, or :class:`TaskNotFound` saying that the request's plugin names a wrong one."""
    from bot.inference.protocol import TaskNotFound
    from bot.worker.tasks import find_task

    module = name.partition(":")[0]
    try:
        task = find_task(name)
    except KeyError:
        raise TaskNotFound(name, "no built-in task has that name") from None
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise TaskNotFound(name, f"there is no module `{module}`") from None
        eid = _error_id()
        log.exception("error %s: importing the module of task %s failed", eid, name)
        raise TaskNotFound(name, f"its module failed to import, error id {eid}") from None
    except AttributeError:
        raise TaskNotFound(name, f"`{module}` has no such function") from None
    except Exception:
        eid = _error_id()
        log.exception("error %s: importing the module of task %s failed", eid, name)
        raise TaskNotFound(name, f"its module failed to import, error id {eid}") from None
    if not callable(task):
        raise TaskNotFound(name, "it is not a function")
    return task


def _check_request(request: Any, tokenizer: Any, settings: Any) -> tuple[int, Any] | Exception:
    """(padded length, request) for one request, or the error that fails it (and only it)."""
    from bot.inference.protocol import InferenceError, InputTooLong, ModelFailed, check_text

    try:
        if hasattr(request, "max_new_tokens") and request.max_new_tokens > settings.max_new_tokens:
            request = dataclasses.replace(request, max_new_tokens=settings.max_new_tokens)
        texts = request.texts()
        check_text(texts)  # the service refuses such text up front; a request may still bring some here
        if tokenizer is None or not texts:  # nothing to tokenize (e.g. a timing or counting task)
            return 1, request
        length = max(len(tokenizer(t)["input_ids"]) for t in texts)
    except InferenceError as exc:
        return exc
    except BaseException as exc:  # tokenizers written in Rust panic with a BaseException
        if isinstance(exc, KeyboardInterrupt | GeneratorExit):
            raise
        eid = _error_id()
        log.exception("error %s: checking a %s request failed", eid, type(request).__name__)
        return ModelFailed(f"The model could not read this request (error id {eid}).")
    if length == 0:
        return InputTooLong("That text gives the model no tokens to read.")
    if length > settings.max_input_tokens:
        return InputTooLong(f"That text is {length} tokens long; the limit is {settings.max_input_tokens}.")
    return length, request


PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))
REFUSED_MODULES = ("torch", "numpy")  # their objects would import them in the bot process


def plain_data_problem(value: Any, where: str = "the result", depth: int = 0) -> str | None:
    """None if ``value`` is plain data, else what is wrong and where (``"a torch.Tensor at [0].top"``).

    Plain data: None, bool, int, float, str, bytes, enums, lists, tuples, sets and dicts of
    plain data, and dataclass instances whose fields are plain data. Anything else (a tensor,
    an array, a numpy number, an arbitrary object) would make the bot process import its module.
    """
    if depth > 50:
        return f"data nested too deeply at {where}"
    kind = type(value)
    if kind.__module__.split(".", 1)[0] in REFUSED_MODULES:
        return f"a {kind.__module__}.{kind.__qualname__} at {where}"
    if isinstance(value, (*PLAIN_SCALARS, enum.Enum)):
        return None
    if isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            found = plain_data_problem(item, f"{where}[{index}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = plain_data_problem(key, f"a key of {where}", depth + 1)
            found = found or plain_data_problem(item, f"{where}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found = plain_data_problem(getattr(value, f.name, None), f"{where}.{f.name}", depth + 1)
            if found:
                return found
        return None
    return f"a {kind.__module__}.{kind.__qualname__} at {where}"


class WrongResultCount(Exception):
    """A task returned a different number of results than it was given requests."""


def _task_label(task: Any) -> str:
    return f"{getattr(task, '__module__', '?')}:{getattr(task, '__qualname__', repr(task))}"


def _run_split(task: Any, loaded: Any, chunk: list[tuple[int, Any]], timing: dict) -> list[Outcome]:
    """Run a chunk; when it fails (out of memory, or the task raises), run its halves, down to
    single requests, so that only the request at fault fails."""
    import torch

    from bot.inference.protocol import InferenceError, ModelFailed

    started = time.perf_counter()
    retry_halves = False  # decided in the except clauses, done after them (no chained tracebacks)
    try:
        with torch.inference_mode():
            results = task(loaded.model, loaded.tokenizer, [request for _, request in chunk])
        results = list(results)
        if len(results) != len(chunk):
            raise WrongResultCount(
                f"task {_task_label(task)} returned {len(results)} result(s) for {len(chunk)} request(s); "
                "a task returns one result per request, in order"
            )
        answers: list[Outcome] = []
        for (rid, _), result in zip(chunk, results, strict=True):
            problem = plain_data_problem(result)
            if problem is not None:  # a plugin's bug, whatever the request: it fails alone, named
                eid = _error_id()
                log.error("error %s: task %s returned %s", eid, _task_label(task), problem)
                message = (
                    f"The task {_task_label(task)} returned {problem}; a task must return plain data "
                    f"(numbers, text, lists, dicts, dataclasses of those) (error id {eid})."
                )
                answers.append((rid, False, ModelFailed(message)))
            else:
                answers.append((rid, True, _labelled(result, loaded.label)))
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(chunk) == 1:
            log.warning("out of memory on a single request")
            return [(chunk[0][0], False, InferenceError("That request needs more memory than the model worker has."))]
        log.warning("out of memory on a batch of %d; retrying in halves", len(chunk))
        retry_halves = True
    except BaseException as exc:  # also SystemExit (a task calling sys.exit) and Rust panics
        if isinstance(exc, KeyboardInterrupt | GeneratorExit):
            raise
        if len(chunk) > 1:
            log.warning(
                "task %s failed on a batch of %d (%s); retrying in halves",
                _task_label(task),
                len(chunk),
                type(exc).__name__,
            )
            retry_halves = True
        elif isinstance(exc, InferenceError):  # a message the task meant for the user
            return [(chunk[0][0], False, exc)]
        else:
            eid = _error_id()
            if isinstance(exc, WrongResultCount):
                log.error("error %s: %s", eid, exc)
            else:
                log.exception("error %s: task %s failed on a single request", eid, _task_label(task))
            return [(chunk[0][0], False, ModelFailed(f"The model failed on this request (error id {eid})."))]
    if retry_halves:
        return _halves(task, loaded, chunk, timing)
    timing["compute_s"] += time.perf_counter() - started
    timing["sizes"].append(len(chunk))
    return answers


def _labelled(result: Any, label: str) -> Any:
    """The result with the model's label, where it is a dataclass with a ``model`` field.

    Any other result (a tuple, a dict, an object that happens to have a ``model`` attribute)
    is returned as it is: filling the label is a courtesy, never a reason to fail.
    """
    if not label or not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    fields = {f.name: f for f in dataclasses.fields(result)}
    if "model" not in fields or not fields["model"].init:
        return result
    return dataclasses.replace(result, model=label)


def _halves(task: Any, loaded: Any, chunk: list[tuple[int, Any]], timing: dict) -> list[Outcome]:
    half = len(chunk) // 2
    return _run_split(task, loaded, chunk[:half], timing) + _run_split(task, loaded, chunk[half:], timing)
