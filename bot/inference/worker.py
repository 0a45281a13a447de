"""The worker process: owns the models and runs batches sent by the client.

Protocol over a ``multiprocessing`` pipe (all messages are tuples):

* client -> worker: ``("batch", batch_id, [(request_id, request, deadline), ...])``,
  ``("status", token)``, ``("load", token, role)``, ``("stop",)``
* worker -> client: ``("ready", pid, device)``, ``("done", batch_id, outcomes, timing)``,
  ``("status", token, info)``

An outcome is ``(request_id, ok, result_or_error)``. Deadlines are
``time.monotonic()`` values, which are shared by every process on the host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

Outcome = tuple[int, bool, Any]
log = logging.getLogger("bot.inference.worker")


def main(conn: Connection, settings: Any, log_level: str = "INFO") -> None:
    """Entry point of a spawned worker; returns (and the process exits) when the pipe closes."""
    # OpenMP threads spin-wait after each parallel region by default, taking the CPU from the
    # bot process exactly when it has results to route; sleeping at once (OMP_WAIT_POLICY=PASSIVE)
    # makes every small op pay a wake-up instead. A short spin is measurably best (bench/inference.py).
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    logging.basicConfig(
        level=log_level, stream=sys.stderr, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    import torch  # only workers import torch: the bot process stays small

    from bot.inference.loading import ModelCache, pick_device

    if settings.threads:
        torch.set_num_threads(settings.threads)
    cache = ModelCache(settings)
    for role in settings.preload:
        try:
            cache.get(role)
        except Exception:
            log.exception("could not preload %s", role)
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
            _, batch_id, items = message
            outcomes, timing = run_batch(cache, settings, items, on_load=lambda role: conn.send(("loading", role)))
            conn.send(("done", batch_id, outcomes, timing))


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
) -> tuple[list[Outcome], dict]:
    """Run one batch of same-(role, task) requests; never raises.

    ``on_load(role)`` is called before a model that is not in memory yet is loaded
    (which on first use may mean a download), so the caller can tell people why
    their request is slow.
    """
    from bot.inference.protocol import DeadlineExceeded, InferenceError, InputTooLong, ModelFailed
    from bot.inference.tasks import find_task

    outcomes: list[Outcome] = []
    timing: dict[str, Any] = {"compute_s": 0.0, "sizes": [], "load_s": 0.0}
    now = time.monotonic()
    live = []
    for request_id, request, deadline in items:
        if deadline <= now:
            # Expired while queued: drop it without computing anything.
            outcomes.append((request_id, False, DeadlineExceeded()))
        else:
            live.append((request_id, request))
    if not live:
        return outcomes, timing
    role, task_name = type(live[0][1]).role, type(live[0][1]).task
    started = time.perf_counter()
    try:
        if role is not None and role not in cache.loaded and on_load is not None:
            on_load(role)
        # A task of no role (e.g. timing a layer) runs without a model.
        loaded = cache.get(role) if role is not None else SimpleNamespace(model=None, tokenizer=None, label="")
        task = find_task(task_name)
    except InferenceError as exc:
        return outcomes + [(rid, False, exc) for rid, _ in live], timing
    except Exception:
        eid = _error_id()
        log.exception("error %s: loading the %s model failed", eid, role)
        failure = ModelFailed(f"The `{role}` model could not be loaded (error id {eid}).")
        return outcomes + [(rid, False, failure) for rid, _ in live], timing
    timing["load_s"] = time.perf_counter() - started

    sized = []
    for request_id, request in live:
        if hasattr(request, "max_new_tokens") and request.max_new_tokens > settings.max_new_tokens:
            request = dataclasses.replace(request, max_new_tokens=settings.max_new_tokens)
        texts = request.texts()
        if loaded.tokenizer is None or not texts:  # nothing to tokenize (e.g. a timing or counting task)
            sized.append((1, request_id, request))
            continue
        length = max(len(loaded.tokenizer(t)["input_ids"]) for t in texts)
        if length == 0:
            outcomes.append((request_id, False, InputTooLong("That text gives the model no tokens to read.")))
        elif length > settings.max_input_tokens:
            message = f"That text is {length} tokens long; the limit is {settings.max_input_tokens}."
            outcomes.append((request_id, False, InputTooLong(message)))
        else:
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


def _run_split(task: Any, loaded: Any, chunk: list[tuple[int, Any]], timing: dict) -> list[Outcome]:
    """Run a chunk; on out-of-memory, retry it as two halves before failing."""
    import torch

    from bot.inference.protocol import InferenceError, ModelFailed

    started = time.perf_counter()
    try:
        with torch.inference_mode():
            results = task(loaded.model, loaded.tokenizer, [request for _, request in chunk])
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(chunk) == 1:
            log.warning("out of memory on a single request")
            return [(chunk[0][0], False, InferenceError("That request needs more memory than the model worker has."))]
        half = len(chunk) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", len(chunk), half, len(chunk) - half)
        return _run_split(task, loaded, chunk[:half], timing) + _run_split(task, loaded, chunk[half:], timing)
    except Exception:
        eid = _error_id()
        log.exception("error %s: task failed on a batch of %d", eid, len(chunk))
        failure = ModelFailed(f"The model failed on this request (error id {eid}).")
        return [(rid, False, failure) for rid, _ in chunk]
    timing["compute_s"] += time.perf_counter() - started
    timing["sizes"].append(len(chunk))
    return [
        (
            rid,
            True,
            dataclasses.replace(result, model=loaded.label) if loaded.label and hasattr(result, "model") else result,
        )
        for (rid, _), result in zip(chunk, results, strict=True)
    ]
