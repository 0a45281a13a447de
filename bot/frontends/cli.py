"""The ``lmbot`` command line.

Exit codes: 0 the command answered; 1 it answered with an error (bad input,
busy, no model for a role; ``lmbot plugins``: a plugin failed to load); 2 a usage
or config error; 75 ``lmbot run``/``sync`` gave up reaching Discord; 130 Ctrl-C;
141 the reader of the output went away (``| head``).

Terminal conventions: ``NO_COLOR`` (any value) turns colour off; a status line on
stderr while a model loads, only when stderr is a terminal and never with ``--json``;
tables fit the terminal's width.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import shutil
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bot import __version__
from bot.app import App
from bot.commands import Reply, Table
from bot.config import Config, ConfigError, load_config
from bot.frontends import ask
from bot.frontends.ask import EXIT_ANSWERED_ERROR, EXIT_OK, EXIT_USAGE, usage_json
from bot.inference.metrics import read_running
from bot.inference.registry import ModelSource
from bot.plugins import PluginConflict
from bot.render import display_width, plural, render_table, render_text

# Terminal commands print warnings only; -v shows what the bot logs, -vv everything.
VERBOSITY = ("WARNING", "INFO", "DEBUG")
# First use of the packaged causal LM converts it (tens of seconds, more on a busy machine): a
# person at a terminal would rather wait for it than be told to try again, unless the config
# sets inference.request_timeout_s itself.
ASK_TIMEOUT_S = 600.0
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as a shell reports them
# An ask still unanswered after this long is loading a model: say so on a terminal.
STATUS_AFTER_S = 1.0


def colour_wanted(stream: object = sys.stdout) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class StatusLine:
    """``lmbot: loading the model… 12 s`` on stderr while a slow ask waits, erased before the answer.

    Shown only when stderr is a terminal (a log or a pipe gets nothing) and not for ``--json``.
    """

    def __init__(self, text: str, enabled: bool) -> None:
        self.text = text
        self.enabled = enabled and sys.stderr.isatty()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lmbot-status")

    def __enter__(self) -> StatusLine:
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Erase the line (if shown) and show no more; safe to call twice."""
        if self.enabled and not self.done.is_set():
            self.done.set()
            self.thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        if self.done.wait(STATUS_AFTER_S):
            return
        while True:
            sys.stderr.write(f"\r\x1b[Klmbot: {self.text}… {time.monotonic() - started:.0f} s")
            sys.stderr.flush()
            if self.done.wait(1.0):
                sys.stderr.write("\r\x1b[K")  # erase it: the answer starts on a clean line
                sys.stderr.flush()
                return


def _setup_logging(config: Config, verbose: int, *, server: bool = False) -> Config:
    """Configure logging; return the config with the log level the workers should use too.

    ``lmbot run`` (a server) logs at ``bot.log_level``; commands at a terminal are quiet
    unless ``-v`` is given, so an answer is not buried under loading lines.
    """
    level = config.bot.log_level if server else VERBOSITY[min(verbose, len(VERBOSITY) - 1)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # One INFO line per HTTP request would bury the download progress bars.
    for noisy in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return config.model_copy(update={"bot": config.bot.model_copy(update={"log_level": level})})


def _terminal_config(args: argparse.Namespace) -> Config:
    """The config for a command run at a terminal: quiet, no metrics port (that is the bot's)."""
    config = _setup_logging(load_config(args.config), args.verbose)
    inference = config.inference.model_copy(update={"metrics_port": 0})
    return config.model_copy(update={"inference": inference})


def _load_app(args: argparse.Namespace) -> App:
    return App(_terminal_config(args))


def _ask_config(args: argparse.Namespace) -> Config:
    config = _terminal_config(args)
    if "request_timeout_s" not in config.inference.model_fields_set:
        inference = config.inference.model_copy(update={"request_timeout_s": ASK_TIMEOUT_S})
        config = config.model_copy(update={"inference": inference})
    return config


def cmd_ask(args: argparse.Namespace) -> int:
    config = _ask_config(args)
    if args.stop:
        paths = ask.warm_paths(config)
        print(ask.stop_warm(paths) if paths else "no warm lmbot was running")
        return EXIT_OK
    if args.line is None:
        message = 'ask needs a command line, e.g. lmbot ask "/help"'
        print(usage_json(message) if args.json else f"lmbot: {message}", file=sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    request = ask.AskRequest(
        args.line,
        args.json,
        args.out or config.bot.output_dir,
        colour_wanted(sys.stdout),
        save_images=not args.no_images,
        cwd=os.getcwd(),
    )
    # -v wants this process's logs, --cold a start from nothing: neither uses nor leaves a warm lmbot.
    keep_alive = 0.0 if args.cold or args.verbose else ask.keep_alive_s(config)
    paths = ask.warm_paths(config) if keep_alive > 0 else None
    status = StatusLine(
        "answering (the first ask loads the model: 10-30 s)", enabled=not args.json and not args.verbose
    )
    with status:
        if paths is None:
            return asyncio.run(_ask_here(App(config), request, status.stop))
        stamp = ask.fingerprint(config)
        answer = ask.ask_warm(config, request, paths, stamp)
        if answer is not None:
            status.stop()
            return answer.emit()
        leave_warm = functools.partial(ask.start_warm, config, stamp, keep_alive=keep_alive, paths=paths)
        return asyncio.run(_ask_here(App(config), request, status.stop, leave_warm))


async def _ask_here(
    app: App,
    request: ask.AskRequest,
    before_print: Callable[[], None],
    leave_warm: Callable[[list[str]], None] | None = None,
) -> int:
    """Answer in this process; then, if the ask needed a worker, leave a warm lmbot for the next."""
    try:
        answer = await ask.answer_line(app, request)
        before_print()
        rc = answer.emit()
        if leave_warm is not None and app.inference.roles_used:
            leave_warm(sorted(r for r in app.inference.roles_used if r))
        return rc
    finally:
        await app.close()  # after the answer is printed: stopping the workers takes a moment


def cmd_console(args: argparse.Namespace) -> int:
    from bot.frontends.console import run_console

    app = _load_app(args)
    return asyncio.run(run_console(app))


def cmd_plugins(args: argparse.Namespace) -> int:
    app = _load_app(args)
    reply: Reply = asyncio.run(app.execute("plugins", {}, app.local_context()))
    print(render_text(reply, []))
    failed = [r.name for r in app.plugin_records if r.status == "failed"]
    if failed:  # non-zero, so a CI job or a deploy script notices
        print(f"lmbot: {len(failed)} plugin(s) failed to load: {', '.join(failed)}", file=sys.stderr)
        return EXIT_ANSWERED_ERROR
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from bot.inference.registry import resolve, runs_as

    app = _load_app(args)
    config = app.config
    if args.action == "fetch":
        return _fetch(app, args.roles)
    loaded: dict[str, dict | str] = {}
    if args.load:
        loaded = asyncio.run(_load_all(app))
    rows = []
    for name, role in sorted(app.registry.roles.items()):
        source = resolve(role, config.models.get(name), config.inference.offline)
        size = source.size_bytes()
        where = _where(source)
        info = loaded.get(name)
        state = f"yes ({info['mb']:.0f} MB in memory, {info['load_s']:.1f} s)" if isinstance(info, dict) else "no"
        if isinstance(info, str):
            state = info
        # The precision and engine the workers will run this role in (issue: say the engine).
        runs = runs_as(role, config.inference.device, config.inference.dtype)
        rows.append([name, config.models.get(name, role.default), where, _size(size), runs, state])
    print(fit_table(Table(["role", "configured", "resolves to", "size", "runs as", "loaded"], rows)))
    return EXIT_OK


def fit_table(table: Table, width: int | None = None) -> str:
    """The table as columns if it fits the terminal's width, else one block of ``header: value`` lines per row.

    Written to a pipe or a file with no ``COLUMNS`` set, there is no width to fit: the columns, for scripts.
    """
    text = render_table(table)
    if width is None:
        if not os.environ.get("COLUMNS") and not sys.stdout.isatty():
            return text
        width = shutil.get_terminal_size().columns
    if max(display_width(line) for line in text.splitlines()) <= width:
        return text
    blocks = []
    for row in table.rows:
        lines: list[str] = []
        for header, cell in zip(table.headers, row, strict=False):
            lines += textwrap.wrap(f"{header}: {cell}", width=max(20, width), subsequent_indent="    ") or [header]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _where(source: ModelSource) -> str:
    if source.kind == "missing":
        return f"missing: {source.reason}"
    if source.kind == "hub":
        return "hub, not downloaded yet (first use or `lmbot models fetch` downloads it)"
    if source.kind == "hub-cache":
        return "hub, downloaded"
    if source.kind == "path":
        return "local folder"
    return source.label


def _size(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.0f} MB"


async def _load_all(app: App) -> dict[str, dict | str]:
    """Load every role in the service (what a first request would do) and report."""
    from bot.inference.client import LocalInferenceClient

    client = app.inference
    assert isinstance(client, LocalInferenceClient)
    await client.start()
    result: dict[str, dict | str] = {}
    try:
        for role in app.registry.roles:
            try:
                result[role] = await client.load_role(role)
            except Exception as exc:  # each role reports its own problem
                result[role] = f"no: {exc}"
    finally:
        await app.close()
    return result


def _fetch(app: App, roles: Sequence[str]) -> int:
    from bot.inference.registry import download, first_line, hub_offline

    wanted = roles or sorted(app.registry.roles)
    unknown = [name for name in wanted if name not in app.registry.roles]
    if unknown:
        known = ", ".join(sorted(app.registry.roles))
        print(f"lmbot: unknown role {unknown[0]!r} (roles: {known})", file=sys.stderr)
        return EXIT_USAGE
    if hub_offline(app.config.inference.offline):
        print("lmbot: the Hugging Face hub cannot be reached from here; nothing to fetch.", file=sys.stderr)
        return EXIT_ANSWERED_ERROR
    status = EXIT_OK
    for name in wanted:
        role = app.registry.roles[name]
        target = app.config.models.get(name, role.default)
        if Path(os.path.expanduser(target)).exists():
            print(f"{name}: {target} is a local folder; nothing to fetch")
            continue
        print(f"{name}: fetching {target}")
        try:
            path = download(target)
        except Exception as exc:
            print(f"{name}: could not fetch {target}: {first_line(exc)}", file=sys.stderr)
            status = EXIT_ANSWERED_ERROR
        else:
            print(f"{name}: ready in {path}")
    return status


def cmd_stats(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    port = args.port or config.inference.metrics_port
    if not port:
        print(
            "lmbot: set inference.metrics_port in config.toml (or pass --port) to read a running bot's stats.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        summary = read_running(port)
    except OSError as exc:  # URLError is an OSError
        print(f"lmbot: no bot answers on 127.0.0.1:{port} ({exc}).", file=sys.stderr)
        return EXIT_ANSWERED_ERROR
    print(json.dumps(summary, indent=2) if args.json else _stats_text(summary))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the running bot's workers are alive and its queue moves, else 1 (for HEALTHCHECK)."""
    config = load_config(args.config)
    port = args.port or config.inference.metrics_port
    if not port:
        print("unhealthy: inference.metrics_port is 0, so the bot's workers cannot be checked")
        return EXIT_ANSWERED_ERROR
    try:
        summary = read_running(port)
    except OSError as exc:
        print(f"unhealthy: no bot answers on 127.0.0.1:{port} ({exc})")
        return EXIT_ANSWERED_ERROR
    alive, queued = summary.get("workers_alive", 0), summary.get("queue_depth", 0)
    idle_for = time.time() - summary.get("last_progress_timestamp_seconds", time.time())
    if config.inference.backend == "local" and alive < 1:
        print("unhealthy: no inference worker is alive")
        return EXIT_ANSWERED_ERROR
    if queued > 0 and idle_for > config.inference.request_timeout_s:
        print(f"unhealthy: {plural(round(queued), 'request')} waiting and nothing finished for {idle_for:.0f} s")
        return EXIT_ANSWERED_ERROR
    print(f"healthy: config valid, {alive:.0f} worker(s) alive, {queued:.0f} queued")
    return EXIT_OK


def _stats_text(summary: dict) -> str:
    rows = [
        [
            task,
            str(r["ok"]),
            str(sum(r["errors"].values())),
            f"{r.get('batch_size_mean', 0):.1f}",
            f"{r.get('request_seconds_mean', 0) * 1000:.0f} ms",
        ]
        for task, r in sorted(summary["tasks"].items())
    ]
    labels = {"queue_depth": "queue", "workers_alive": "workers alive", "worker_restarts": "restarts"}
    head = ", ".join(f"{label} {summary.get(key, 0):.0f}" for key, label in labels.items())
    return head + (
        "\n\n" + render_table(Table(["task", "ok", "errors", "mean batch", "mean latency"], rows)) if rows else ""
    )


def _token(config: Config) -> str | None:
    token = os.environ.get(config.bot.token_env, "").strip()
    if not token:
        print(
            f"lmbot: no Discord token: put the bot's token in the {config.bot.token_env} environment variable "
            "(bot.token_env in config.toml names it).",
            file=sys.stderr,
        )
        return None
    return token


def _port_free(port: int, addr: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((addr, port))
        except OSError:
            return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from bot import charts
    from bot.frontends.discord.runner import run_bot

    config = _setup_logging(load_config(args.config), args.verbose, server=True)
    port, addr = config.inference.metrics_port, os.environ.get("LMBOT_METRICS_ADDR", "127.0.0.1")
    if port and not _port_free(port, addr):
        # Metrics are an extra: a taken port (another lmbot, a leftover process) must not keep the
        # class's bot down. One line says so; the bot runs on without /metrics.
        print(
            f"lmbot: warning: {config.path}: `inference.metrics_port`: port {port} on {addr} is already in use "
            "(another lmbot?); running without /metrics (pick a free port, or 0 to turn metrics off)",
            file=sys.stderr,
            flush=True,
        )
        config = config.model_copy(update={"inference": config.inference.model_copy(update={"metrics_port": 0})})
    app = App(config)
    token = _token(app.config)
    if token is None:
        return EXIT_USAGE
    for line in startup_summary(app):
        print(f"lmbot: {line}", file=sys.stderr, flush=True)
    charts.start_process_pool()  # a long-running bot draws its charts off its event loop's GIL
    return asyncio.run(run_bot(app, token, attempts=args.attempts))


def startup_summary(app: App) -> list[str]:
    """What ``lmbot run`` says before logging in: version, config, engine, plugins; and a warning
    when no config file was found (a service started in the wrong folder runs on defaults:
    no owners, metrics off)."""
    from bot.inference.registry import runs_as

    config = app.config
    inference = config.inference
    lines = []
    if config.path in (None, "<defaults>"):
        where = "no config.toml: defaults"
    else:
        where = f"config {Path(config.path).resolve()}"
    causal = app.registry.roles.get("causal_lm")
    engine = f", causal_lm in {runs_as(causal, inference.device, inference.dtype)}" if causal else ""
    records = app.plugin_records
    failed = [r.name for r in records if r.status == "failed"]
    loaded = sum(r.status == "loaded" for r in records)
    plugins = f"{plural(loaded, 'plugin')} loaded" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
    workers = (
        f"{inference.workers} worker{'s' if inference.workers > 1 else ''}" if inference.backend == "local" else "ray"
    )
    lines.append(f"lmbot {__version__}; {where}; device {inference.device}, {workers}{engine}; {plugins}")
    if config.path in (None, "<defaults>"):
        lines.append(
            f"warning: no config.toml in {os.getcwd()} and no --config or $LMBOT_CONFIG: running on the defaults "
            "(no extra owners, metrics off); set WorkingDirectory= or --config in the service"
        )
    return lines


def cmd_sync(args: argparse.Namespace) -> int:
    from bot.frontends.discord.runner import sync_now

    app = _load_app(args)
    token = _token(app.config)
    if token is None:
        return EXIT_USAGE
    return asyncio.run(sync_now(app, token, args.guild, attempts=args.attempts))


# Each subcommand's --help: what it does, then examples (argparse prints the epilog verbatim).
HELP: dict[str, tuple[str, str, str]] = {
    "console": (
        "interactive console with history and tab completion",
        "Type slash commands as in Discord; a reply's buttons are pressed by their number.",
        'lmbot console\n  echo "/help" | lmbot console          (piped: one reply per line read)',
    ),
    "ask": (
        'run one command, e.g. lmbot ask "/help"',
        "Run one slash command and print its reply. An ask that needed a model leaves a warm lmbot "
        "running for ask.keep_alive_s seconds, so the next ask answers at once (--cold: not this time). "
        "Charts are saved as PNG files in --out unless --no-images is given.",
        'lmbot ask "/help"\n'
        '  lmbot ask "/nexttoken prompt:The capital of France is" --json | jq .data.top\n'
        '  lmbot ask --no-images "/tokenize text:unbelievable"\n'
        "  lmbot ask --stop                        (stop the warm lmbot now)",
    ),
    "run": (
        "run the Discord bot (token from the environment)",
        "Log in with the token in $LMBOT_DISCORD_TOKEN (bot.token_env names another variable) and answer "
        "slash commands until SIGTERM or Ctrl-C. While Discord cannot be reached it says so in one line and "
        "tries again after 1, 2, 4 ... 60 s. Exit codes: 0 stopped cleanly, 2 no or rejected token (fix it; "
        "restarting will not help), 75 gave up after --attempts tries (worth restarting).",
        "LMBOT_DISCORD_TOKEN=... lmbot run --config /etc/lmbot/config.toml\n"
        "  lmbot run --attempts 10                 (exit 75 after 10 failed tries)\n"
        "  systemctl start lmbot                   (see deploy/lmbot.service and docs/operating.md)",
    ),
    "sync": (
        "upload the slash commands to Discord now",
        "Upload the command set now (global commands take up to an hour to appear; --guild is instant).",
        "lmbot sync\n  lmbot sync --guild 123456789012345678",
    ),
    "plugins": (
        "list plugins, their commands and load errors",
        "List every plugin with its commands; exit 1 if any plugin failed to load (usable in CI).",
        "lmbot plugins\n  lmbot plugins || echo 'a plugin is broken'",
    ),
    "models": (
        "list model roles; 'models fetch' downloads them",
        "List the model roles, what each resolves to, its size and how it will run; "
        "'fetch' downloads hub models now so the first ask does not.",
        "lmbot models\n  lmbot models --load                     (load each now: memory and load time)\n"
        "  lmbot models fetch causal_lm",
    ),
    "health": (
        "exit 0 if a running bot's workers are alive and its queue moves",
        "Ask a running bot (through inference.metrics_port) whether its workers are alive; for HEALTHCHECK.",
        "lmbot health --port 9321 && echo healthy",
    ),
    "stats": (
        "a running bot's inference figures (via its metrics port)",
        "Requests, errors, batch sizes and latency per task of a running bot, read from its metrics port.",
        "lmbot stats --port 9321\n  lmbot stats --json",
    ),
}


def _subcommand(sub: argparse._SubParsersAction, name: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    summary, description, examples = HELP[name]
    return sub.add_parser(
        name,
        parents=[common],
        help=summary,
        description=description,
        epilog="examples:\n  " + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", help="config file (default: $LMBOT_CONFIG or ./config.toml)", default=None
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="show log lines (-v: info, -vv: debug); quiet by default"
    )
    parser = argparse.ArgumentParser(
        prog="lmbot",
        description="A study bot that shows how language models work.",
        epilog='Start with: lmbot ask "/help"; each command has its own --help (lmbot ask --help).',
    )
    parser.add_argument("--version", action="version", version=f"lmbot {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = _subcommand(sub, "console", common)
    p.set_defaults(func=cmd_console)

    p = _subcommand(sub, "ask", common)
    p.add_argument("line", nargs="?", help='the command line, e.g. "/tokenize text:\\"hello world\\""')
    p.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    p.add_argument("--out", metavar="DIR", help="folder for images (default: bot.output_dir)")
    p.add_argument("--no-images", action="store_true", help="save no chart files (the text answer is complete)")
    p.add_argument(
        "--cold", action="store_true", help="answer in this process only: neither use nor leave a warm lmbot"
    )
    p.add_argument("--stop", action="store_true", help="stop the warm lmbot an earlier ask left running")
    p.set_defaults(func=cmd_ask)

    attempts_help = "give up after this many failed tries to reach Discord, with exit 75 (0: never give up)"
    p = _subcommand(sub, "run", common)
    p.add_argument("--attempts", type=int, default=0, metavar="N", help=attempts_help + " (default 0)")
    p.set_defaults(func=cmd_run)

    p = _subcommand(sub, "sync", common)
    p.add_argument("--guild", type=int, default=None, help="sync to this guild only (instant)")
    p.add_argument("--attempts", type=int, default=4, metavar="N", help=attempts_help + " (default 4)")
    p.set_defaults(func=cmd_sync)

    p = _subcommand(sub, "plugins", common)
    p.set_defaults(func=cmd_plugins)

    p = _subcommand(sub, "models", common)
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("roles", nargs="*", help="roles to fetch (default: all)")
    p.add_argument("--load", action="store_true", help="load every role now and report memory and load time")
    p.set_defaults(func=cmd_models)

    p = _subcommand(sub, "health", common)
    p.add_argument("--port", type=int, default=0, help="metrics port (default: inference.metrics_port)")
    p.set_defaults(func=cmd_health)

    p = _subcommand(sub, "stats", common)
    p.add_argument("--port", type=int, default=0, help="metrics port (default: inference.metrics_port)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PluginConflict) as exc:
        if getattr(args, "json", False):
            print(usage_json(str(exc)))
        else:
            print(f"lmbot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lmbot: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`lmbot ask "/help" | head -3`): no traceback, and none from the
        # interpreter's final flush either (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
