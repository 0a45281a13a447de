"""The ``lmbot`` command line.

Exit codes: 0 the command answered; 1 it answered with an error (bad input,
busy, no model for a role); 2 a usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bot import __version__, ask
from bot.app import App
from bot.ask import EXIT_ANSWERED_ERROR, EXIT_OK, EXIT_USAGE, usage_json
from bot.commands import Reply
from bot.config import Config, ConfigError, load_config
from bot.inference.metrics import read_running
from bot.inference.registry import ModelSource
from bot.plugins import PluginConflict
from bot.render import render_table, render_text

# Terminal commands print warnings only; -v shows what the bot logs, -vv everything.
VERBOSITY = ("WARNING", "INFO", "DEBUG")
# First use of the packaged causal LM converts it (tens of seconds, more on a busy machine): a
# person at a terminal would rather wait for it than be told to try again, unless the config
# sets inference.request_timeout_s itself.
ASK_TIMEOUT_S = 600.0


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
    request = ask.AskRequest(args.line, args.json, args.out or config.bot.output_dir, sys.stdout.isatty())
    # -v wants this process's logs, --cold a start from nothing: neither uses nor leaves a warm lmbot.
    keep_alive = 0.0 if args.cold or args.verbose else ask.keep_alive_s(config)
    paths = ask.warm_paths(config) if keep_alive > 0 else None
    if paths is None:
        return asyncio.run(_ask_here(App(config), request))
    stamp = ask.fingerprint(config)
    answer = ask.ask_warm(config, request, paths, stamp)
    if answer is not None:
        return answer.emit()
    leave_warm = functools.partial(ask.start_warm, config, stamp, keep_alive=keep_alive, paths=paths)
    return asyncio.run(_ask_here(App(config), request, leave_warm))


async def _ask_here(app: App, request: ask.AskRequest, leave_warm: Callable[[list[str]], None] | None = None) -> int:
    """Answer in this process; then, if the ask needed a worker, leave a warm lmbot for the next."""
    try:
        rc = (await ask.answer_line(app, request)).emit()
        if leave_warm is not None and app.inference.roles_used:
            leave_warm(sorted(r for r in app.inference.roles_used if r))
        return rc
    finally:
        await app.close()  # after the answer is printed: stopping the workers takes a moment


def cmd_console(args: argparse.Namespace) -> int:
    from bot.console import run_console

    app = _load_app(args)
    return asyncio.run(run_console(app))


def cmd_plugins(args: argparse.Namespace) -> int:
    app = _load_app(args)
    reply: Reply = asyncio.run(app.execute("plugins", {}, app.local_context()))
    print(render_text(reply, []))
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
    from bot.commands import Table

    print(render_table(Table(["role", "configured", "resolves to", "size", "runs as", "loaded"], rows)))
    return EXIT_OK


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
        print(f"unhealthy: {queued:.0f} requests waiting and nothing finished for {idle_for:.0f} s")
        return EXIT_ANSWERED_ERROR
    print(f"healthy: config valid, {alive:.0f} worker(s) alive, {queued:.0f} queued")
    return EXIT_OK


def _stats_text(summary: dict) -> str:
    from bot.commands import Table

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


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from bot.discord_frontend.runner import run_bot

    config = _setup_logging(load_config(args.config), args.verbose, server=True)
    port = config.inference.metrics_port
    if port and not _port_free(port):
        print(
            f"lmbot: {config.path}: `inference.metrics_port`: port {port} on 127.0.0.1 is already in use "
            "(another lmbot? pick a free port or 0 to turn metrics off)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    app = App(config)
    token = _token(app.config)
    if token is None:
        return EXIT_USAGE
    return asyncio.run(run_bot(app, token))


def cmd_sync(args: argparse.Namespace) -> int:
    from bot.discord_frontend.runner import sync_now

    app = _load_app(args)
    token = _token(app.config)
    if token is None:
        return EXIT_USAGE
    return asyncio.run(sync_now(app, token, args.guild))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", help="config file (default: $LMBOT_CONFIG or ./config.toml)", default=None
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="show log lines (-v: info, -vv: debug); quiet by default"
    )
    parser = argparse.ArgumentParser(prog="lmbot", description="A study bot that shows how language models work.")
    parser.add_argument("--version", action="version", version=f"lmbot {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    p = sub.add_parser("console", parents=[common], help="interactive console with history and tab completion")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("ask", parents=[common], help='run one command, e.g. lmbot ask "/help"')
    p.add_argument("line", nargs="?", help='the command line, e.g. "/tokenize text:\\"hello world\\""')
    p.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    p.add_argument("--out", metavar="DIR", help="folder for images (default: bot.output_dir)")
    p.add_argument(
        "--cold", action="store_true", help="answer in this process only: neither use nor leave a warm lmbot"
    )
    p.add_argument("--stop", action="store_true", help="stop the warm lmbot an earlier ask left running")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("run", parents=[common], help="run the Discord bot (token from the environment)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sync", parents=[common], help="upload the slash commands to Discord now")
    p.add_argument("--guild", type=int, default=None, help="sync to this guild only (instant)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("plugins", parents=[common], help="list plugins, their commands and load errors")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("models", parents=[common], help="list model roles; 'models fetch' downloads them")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("roles", nargs="*", help="roles to fetch (default: all)")
    p.add_argument("--load", action="store_true", help="load every role now and report memory and load time")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "health", parents=[common], help="exit 0 if a running bot's workers are alive and its queue moves"
    )
    p.add_argument("--port", type=int, default=0, help="metrics port (default: inference.metrics_port)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("stats", parents=[common], help="a running bot's inference figures (via its metrics port)")
    p.add_argument("--port", type=int, default=0, help="metrics port (default: inference.metrics_port)")
    p.add_argument("--json", action="store_true")
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
