"""How ``lmbot ask`` answers: through a warm lmbot if one is running, else in this process.

A one-shot ``lmbot ask`` spends most of its time before the answer starting a worker:
importing torch and transformers and loading the model take seconds on a laptop, the
answer itself a fraction of one. So, as ``ollama run`` does, an ask that needed a model
leaves a *warm lmbot* behind: a detached process holding the app and its workers, which
answers the asks that follow over a Unix socket and stops itself after
``ask.keep_alive_s`` seconds (default 300) without one.

* One warm lmbot per user and model cache (``inference.cache_dir``); its socket and log live
  in a private folder (``$XDG_RUNTIME_DIR/lmbot-UID``, else the temp folder's). It serves
  asks from every working folder: each ask says its folder, and its images are saved there.
* It answers only an ask whose *fingerprint* matches its own: the effective config, lmbot's
  version and every file of its code and data (``bot/``, ``plugins/`` with its topic TOMLs and
  corpus, editable plugins' folders, local model folders), the installed plugins and the
  environment variables models and threads depend on; and the working folder itself only
  when the config names a relative path (which that folder resolves). Any difference stops
  it; that ask is answered here, and leaves a warm lmbot for the new setting.
* ``-v`` (the logs are wanted), ``--cold``, ``ask.keep_alive_s = 0`` or
  ``LMBOT_ASK_KEEP_ALIVE_S=0`` answer here and leave nothing behind; ``lmbot ask --stop``
  stops a warm one now.
* If the warm lmbot dies mid-answer, the ask is answered here instead: never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bot.config import AskSection, Config, ConfigError
from bot.parsing import UsageError
from bot.render import render_json, render_text, save_reply_images

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

# The exit codes of every lmbot command (bot.frontends.cli imports them from here).
EXIT_OK, EXIT_ANSWERED_ERROR, EXIT_USAGE = 0, 1, 2
KEEP_ALIVE_ENV = "LMBOT_ASK_KEEP_ALIVE_S"
# Environment variables that change what a worker loads or how it runs: a warm lmbot
# started under other values does not answer.
_ENV_PREFIXES = (
    "LMBOT_",
    "HF_",
    "TRANSFORMERS_",
    "PYTORCH_",
    "TORCH",
    "OMP_",
    "MKL_",
    "CUDA_",
    "GOMP_",
    "PYTHON",
)
_ENV_NAMES = ("TZ", "LANG", "LC_ALL", "HOME", "XDG_CACHE_HOME")
_PROTOCOL = 3
_LINE_WAIT_S = 10.0  # how long the warm lmbot waits for an asker's request line
_CONNECT_TIMEOUT_S = 2.0
_LINE_LIMIT = 1 << 20  # one request line: a command line and a few flags
_LOCK_WAIT_S = 30.0  # a new warm lmbot waits this long for the one it replaces to let go


@dataclass(frozen=True)
class Answer:
    """What an ask prints, and its exit code."""

    rc: int
    stdout: str = ""
    stderr: str = ""

    def emit(self) -> int:
        if self.stdout:
            print(self.stdout, flush=True)
        if self.stderr:
            print(self.stderr, file=sys.stderr, flush=True)
        return self.rc


@dataclass(frozen=True)
class AskRequest:
    line: str
    as_json: bool
    out_dir: str  # as given: relative to ``cwd``
    colour: bool
    save_images: bool = True
    cwd: str = "."  # the asker's working folder (a warm lmbot serves several)


def _shown_path(path: str, cwd: str) -> str:
    """An image's path as the asker would name it: relative to their folder when inside it."""
    relative = os.path.relpath(path, cwd)
    return path if relative.startswith("..") else relative


def usage_json(message: str) -> str:
    return json.dumps({"ok": False, "usage_error": True, "text": message}, ensure_ascii=False)


async def answer_line(app: App, request: AskRequest) -> Answer:
    """Run one command line and render its reply as ``lmbot ask`` prints it (images saved)."""
    try:
        reply = await app.execute_line(request.line)
    except UsageError as exc:
        if request.as_json:
            return Answer(EXIT_USAGE, stdout=usage_json(str(exc)))
        return Answer(EXIT_USAGE, stderr=f"lmbot: {exc}")
    paths: list[str] = []
    note = ""
    if request.save_images:
        saved, note = save_reply_images(reply, Path(request.cwd) / request.out_dir, request.line.split()[0])
        paths = [_shown_path(str(path), request.cwd) for path in saved]
    text = render_json(reply, paths) if request.as_json else render_text(reply, paths, colour=request.colour)
    return Answer(EXIT_ANSWERED_ERROR if reply.error else EXIT_OK, stdout=text, stderr=note)


# ---------------------------------------------------------------------------- settings


def keep_alive_s(config: Config) -> float:
    """Seconds a warm lmbot waits for the next ask: ``$LMBOT_ASK_KEEP_ALIVE_S``, else ``ask.keep_alive_s``."""
    raw = os.environ.get(KEEP_ALIVE_ENV)
    if raw is None or raw.strip() == "":
        return config.ask.keep_alive_s
    try:  # checked by the config key's own rule, so the two cannot drift apart
        return AskSection(keep_alive_s=float(raw)).keep_alive_s
    except (ValueError, ValidationError):
        raise ConfigError(f"{KEEP_ALIVE_ENV}: must be a number of seconds from 0 to 86400 (got {raw!r})") from None


@dataclass(frozen=True)
class WarmPaths:
    socket: Path
    lock: Path
    log: Path


def warm_paths(config: Config) -> WarmPaths | None:
    """Where this user's warm lmbot for this model cache listens; None where there can be none."""
    if not hasattr(socket, "AF_UNIX") or not hasattr(os, "getuid"):
        return None  # pragma: no cover - not POSIX
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"lmbot-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        info = base.lstat()
    except OSError:
        return None
    # Another user's folder, a link, or one others may enter: not a place for our socket.
    if info.st_uid != os.getuid() or not base.is_dir() or base.is_symlink() or info.st_mode & 0o077:
        log.info("not using a warm lmbot: %s is not a private folder of this user", base)
        return None
    cache = str(config.cache_dir.resolve())
    name = "ask-" + hashlib.sha256(cache.encode()).hexdigest()[:12]
    paths = WarmPaths(base / f"{name}.sock", base / f"{name}.lock", base / f"{name}.log")
    if len(str(paths.socket).encode()) > 100:  # sun_path holds 108 bytes
        return None
    return paths


def _files_stamp(folder: Path, pattern: str = "*") -> list[str]:
    """Name, size and change time of every file under ``folder`` (bytecode caches aside)."""
    stamp = []
    for path in sorted(folder.rglob(pattern)):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        with contextlib.suppress(OSError):
            info = path.stat()
            if not path.is_dir():
                stamp.append(f"{path}|{info.st_size}|{info.st_mtime_ns}")
    return stamp


def _code_stamp() -> list[str]:
    """Every file of lmbot's code and data (topic TOMLs, corpus), and of plugins installed from a folder.

    Data counts as code: a lecturer who edits ``plugins/data/topics/ngrams.toml`` expects the
    next ask to show the new text.
    """
    root = Path(__file__).resolve().parents[2]  # the folder holding bot/ and plugins/
    stamp = _files_stamp(root / "bot") + _files_stamp(root / "plugins")
    for ep in metadata.entry_points(group="lmbot"):
        dist = getattr(ep, "dist", None)
        stamp.append(f"{ep.name}={ep.value}@{dist.version if dist else '?'}")
        with contextlib.suppress(Exception):  # a plugin that cannot be found fails to load anyway
            spec = importlib.util.find_spec(ep.module.partition(".")[0])
            if spec is not None and spec.origin and "site-packages" not in spec.origin:
                stamp += _files_stamp(Path(spec.origin).parent)
    return stamp


def _models_stamp(config: Config) -> list[str]:
    """Local model folders named in ``[models]``: retrained weights are a new model."""
    stamp = []
    for role, where in sorted(config.models.items()):
        folder = Path(os.path.expanduser(where))
        if folder.is_dir():
            stamp += [f"{role}:{line}" for line in _files_stamp(folder, "*")]
    return stamp


def _looks_relative(text: str) -> bool:
    """Whether a config value may be a file path that the working folder resolves."""
    if not text or "://" in text or text.startswith(("/", "~")) or len(text) > 4096 or "\0" in text:
        return False
    if text.startswith(".") or "/" in text or os.sep in text:
        return True
    return not any(c.isspace() for c in text) and (bool(Path(text).suffix) or os.path.exists(text))


def relative_config_values(config: Config) -> list[str]:
    """The config's values that look like relative paths: they make answers depend on the folder.

    ``bot.output_dir`` is not one of them: each ask sends it with its own folder.
    """
    dump = config.model_dump(mode="json", exclude={"path"})
    dump["bot"].pop("output_dir", None)
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and _looks_relative(value):
            found.append(value)

    walk(dump)
    return found


def fingerprint(config: Config) -> str:
    """Everything a warm lmbot's answers depend on besides the command line and the asker's folder."""
    from bot import __version__

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES)
    folder: list[Any] = []
    if relative_config_values(config):
        # A relative path in the config means another file in another folder: the folder
        # itself, not only its name.
        here = os.stat(".")
        folder = [os.getcwd(), here.st_dev, here.st_ino]
    parts = {
        "protocol": _PROTOCOL,
        "version": __version__,
        "python": sys.executable,
        "cwd": folder,
        "config": config.model_dump(mode="json"),
        "env": env,
        "code": _code_stamp(),
        "models": _models_stamp(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def environment_stamp(names: Iterable[str]) -> str:
    """The values of the environment variables plugins declared (``register_environment``).

    The asker loads no plugins, so the warm lmbot writes the names it was given beside its
    socket (:func:`declared_path`) and compares each ask's stamp of them with its own."""
    names = list(names)
    exact = {n for n in names if not n.endswith("*")}
    prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
    pairs = sorted((k, v) for k, v in os.environ.items() if k in exact or (prefixes and k.startswith(prefixes)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:24]


def declared_path(paths: WarmPaths) -> Path:
    """Where a warm lmbot lists the environment variables its plugins' replies depend on."""
    return paths.socket.with_name(paths.socket.name + ".env")


def _declared_names(paths: WarmPaths) -> list[str]:
    try:
        names = json.loads(declared_path(paths).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _try_lock(handle: Any, timeout: float) -> bool:
    """Take an exclusive lock on an open file within ``timeout`` seconds (0: try once)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


# ---------------------------------------------------------------------------- client

_LOST: dict[str, Any] = {"op": "lost"}  # connected, but no answer came back


def _exchange(path: Path, message: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Send one message to the warm lmbot and read its answer.

    None when there is no warm lmbot to talk to (none listening: a stale socket file of a
    killed one refuses too); :data:`_LOST` when one took the message but gave no answer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_CONNECT_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except OSError:
            return None
        sock.settimeout(timeout)
        data = b""
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return _LOST
    try:
        answer = json.loads(data)
    except ValueError:
        return _LOST
    return answer if isinstance(answer, dict) else _LOST


def ask_warm(config: Config, request: AskRequest, paths: WarmPaths, stamp: str) -> Answer | None:
    """The warm lmbot's answer to ``request``, or None (then answer in this process)."""
    if not paths.socket.exists():
        return None
    message = {
        "op": "ask",
        "fingerprint": stamp,
        "environment": environment_stamp(_declared_names(paths)),
        **dataclasses.asdict(request),
    }
    # A warm lmbot still loading its model keeps the ask waiting as a cold one would.
    answer = _exchange(paths.socket, message, timeout=config.inference.request_timeout_s + 60)
    if answer is None:
        return None
    if answer is _LOST:
        log.warning("the warm lmbot stopped before answering; answering here (its log: %s)", paths.log)
        return None
    if answer.get("op") != "answer":
        log.info("the warm lmbot does not answer this ask (%s); answering here", answer.get("op"))
        return None
    return Answer(int(answer["rc"]), str(answer.get("stdout", "")), str(answer.get("stderr", "")))


def stop_warm(paths: WarmPaths, wait_s: float = 30) -> str:
    """Stop the warm lmbot at ``paths`` (waiting up to ``wait_s`` for it); a line saying what happened."""
    answer = _exchange(paths.socket, {"op": "stop"}, timeout=10)
    if answer is None or answer is _LOST:
        return "no warm lmbot was running"
    pid = answer.get("pid")
    with open(paths.lock, "a") as handle:  # it lets go of its lock once its workers have exited
        if _try_lock(handle, wait_s):
            return f"stopped the warm lmbot (pid {pid})"
    return f"the warm lmbot (pid {pid}) stops once the asks it is answering are done"


# How long a lock found held with no settings written yet is read again: its taker writes them
# right after taking it.
STAMP_WRITE_S = 2.0


def _stamp_once_written(lock: Any, stamp: str) -> bool:
    """Whether the held lock file names ``stamp``. Its holder truncates it and then writes its
    settings: a read in between finds it empty (or part written), which is not other settings, so
    read again for a moment (else two racing asks would both start a warm lmbot)."""
    deadline = time.monotonic() + STAMP_WRITE_S
    while True:
        lock.seek(0)
        held = lock.read()
        if held == stamp:
            return True
        if not stamp.startswith(held) or time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def start_warm(config: Config, stamp: str, roles: list[str], keep_alive: float, paths: WarmPaths) -> None:
    """Start a detached warm lmbot that loads ``roles`` and waits ``keep_alive`` s for asks.

    Never raises: an answer was already printed, and without a warm lmbot the next ask
    simply starts from nothing.
    """
    setup = {"config": config.model_dump(mode="json"), "fingerprint": stamp, "roles": roles, "keep_alive_s": keep_alive}
    try:
        with open(paths.lock, "a+", encoding="utf-8") as lock, open(paths.log, "a", encoding="utf-8") as log_file:
            # Two asks racing to leave a warm lmbot: the first takes the lock here and hands it to its
            # child (a flock belongs to the open file, which the child shares), so exactly one starts.
            # The lock file names the settings it serves: a second ask with the same ones leaves it be;
            # one with other settings starts its own, which waits for the stopping one to let go.
            if _try_lock(lock, 0):
                lock.truncate(0)
                lock.write(stamp)
                lock.flush()
                setup["lock_fd"] = lock.fileno()
            elif _stamp_once_written(lock, stamp):
                log.info("a warm lmbot for these settings is running or starting already")
                return
            # The log is appended to: a warm lmbot may still be writing to it. The one that takes the
            # lock starts the file afresh.
            process = subprocess.Popen(
                # -P: the asker's folder is not put on sys.path (a ./bot/ there must not shadow lmbot).
                [sys.executable, "-P", "-m", "bot.frontends.ask"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,  # not stopped by the terminal's Ctrl-C or hangup
                close_fds=True,
                pass_fds=(lock.fileno(),) if "lock_fd" in setup else (),
            )
        assert process.stdin is not None
        process.stdin.write(json.dumps(setup).encode())
        process.stdin.close()
    except OSError as exc:
        log.info("no warm lmbot left: %s", exc)
        return
    log.info("started a warm lmbot (pid %d) for %.0f s; its log: %s", process.pid, keep_alive, paths.log)


# ---------------------------------------------------------------------------- the warm lmbot


class WarmServer:
    """The detached process: an app, a Unix socket, and a clock that stops it when idle."""

    def __init__(self, config: Config, stamp: str, keep_alive: float, paths: WarmPaths) -> None:
        self.config = config
        self.stamp = stamp
        self.keep_alive = keep_alive
        self.paths = paths
        self.in_flight = 0
        self.last_answer = time.monotonic()
        self.stopping = False  # set once it stops taking asks; answers in progress still finish
        self.stop = asyncio.Event()
        self.idle = asyncio.Event()  # set while no ask is being answered
        self.idle.set()
        self.environment = ""  # the stamp of the variables the plugins declared, set by run()

    async def run(self, app: App, roles: list[str]) -> None:
        """Answer asks with ``app`` until stopped or idle for ``keep_alive`` s; then close it."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.stop.set)
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()  # a dead one's; the lock says none is alive
        names = sorted(app.registry.environment)
        self.environment = environment_stamp(names)
        declared = declared_path(self.paths)
        declared.write_text(json.dumps(names), encoding="utf-8")  # before the socket: asks read it
        os.chmod(declared, 0o600)
        server = await asyncio.start_unix_server(
            lambda r, w: self._serve(app, r, w), path=str(self.paths.socket), limit=_LINE_LIMIT
        )
        os.chmod(self.paths.socket, 0o600)
        preload = asyncio.create_task(self._preload(app, roles))
        try:
            while not self.stop.is_set():
                idle_for = time.monotonic() - self.last_answer
                if self.in_flight == 0 and idle_for >= self.keep_alive:
                    _say(f"no ask for {idle_for:.0f} s: stopping")
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.5, self.keep_alive - idle_for))
        finally:
            self.stopping = True  # an ask accepted from now on is told to answer itself
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.socket.unlink()
            preload.cancel()
            # Asks being answered finish first (their deadline is the request timeout).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), self.config.inference.request_timeout_s + 5)
            await app.close()

    async def _preload(self, app: App, roles: list[str]) -> None:
        load_role = getattr(app.inference, "load_role", None)
        if load_role is None:
            return
        for role in roles:
            try:
                await load_role(role)
            except Exception as exc:  # the asks that need it will say why
                log.warning("could not preload %s: %s", role, exc)

    async def _serve(self, app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # An asker sends its line at once: a client that holds the socket with a partial line is cut off,
        # and until its line is in, it is not an ask in progress (it must not keep the warm lmbot alive).
        try:
            line = await asyncio.wait_for(reader.readline(), _LINE_WAIT_S)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                message = json.loads(line)
            except ValueError:
                return
            answer = await self._answer(app, message)
            writer.write(json.dumps(answer, ensure_ascii=False).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
            self.last_answer = time.monotonic()
            writer.close()

    async def _answer(self, app: App, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            return {"op": "error"}
        if message.get("op") == "stop":
            _say("asked to stop (lmbot ask --stop)")
            self.stop.set()
            return {"op": "stopping", "pid": os.getpid()}
        if self.stopping:
            return {"op": "stopping", "pid": os.getpid()}
        if (
            message.get("op") != "ask"
            or message.get("fingerprint") != self.stamp
            or message.get("environment") != self.environment
        ):
            # Newer settings or code: the asker answers itself and leaves a warm lmbot of its own.
            _say("an ask came with other settings, code or folder: stopping")
            self.stop.set()
            return {"op": "mismatch", "pid": os.getpid()}
        request = AskRequest(
            line=str(message["line"]),
            as_json=bool(message["as_json"]),
            out_dir=str(message["out_dir"]),
            colour=bool(message["colour"]),
            save_images=bool(message["save_images"]),
            cwd=str(message["cwd"]),
        )
        started = time.perf_counter()
        try:
            answer = await answer_line(app, request)
        except Exception as exc:  # pragma: no cover - App.execute already answers every plugin error
            log.exception("ask %r failed", request.line)
            answer = Answer(EXIT_ANSWERED_ERROR, stderr=f"lmbot: the warm lmbot failed: {exc}")
        name = (request.line.split() or ["?"])[0].lstrip("/")[:40]
        _say(f"answered /{name} in {time.perf_counter() - started:.2f} s (exit {answer.rc})")
        return {"op": "answer", **dataclasses.asdict(answer)}


def _say(line: str) -> None:
    """A line of the warm lmbot's own log (its stderr is the log file)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


def serve_main() -> int:
    """Entry of the detached warm lmbot (``python -P -m bot.frontends.ask``): its setup comes on stdin."""
    setup = json.loads(sys.stdin.read())
    config = Config.model_validate(setup["config"])
    logging.basicConfig(
        level=config.bot.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    paths = warm_paths(config)
    if paths is None:
        return EXIT_USAGE
    handed = setup.get("lock_fd")
    with os.fdopen(handed, "a+") if isinstance(handed, int) else open(paths.lock, "a+") as lock:
        # Held for this process's life: one warm lmbot per socket. The asker that started this one
        # may have taken it already (handed over as ``lock_fd``); else a predecessor that is
        # stopping gets a moment to let go; a live one keeps it, and this one leaves.
        if handed is None:
            if not _try_lock(lock, _LOCK_WAIT_S):
                return EXIT_OK
            lock.truncate(0)
            lock.write(setup["fingerprint"])
            lock.flush()
        with contextlib.suppress(OSError):
            os.truncate(paths.log, 0)  # the log starts afresh with each warm lmbot (stderr appends)
        keep_alive = float(setup["keep_alive_s"])
        _say(f"warm lmbot {os.getpid()} listening on {paths.socket}; stops {keep_alive:.0f} s after its last ask")
        from bot.app import App

        server = WarmServer(config, setup["fingerprint"], keep_alive, paths)
        asyncio.run(server.run(App(config), list(setup["roles"])))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(serve_main())
