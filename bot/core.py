"""Commands of the core itself, which need no model: /help, /plugins, and the
owner-only /stats, /reload and /sync."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bot.commands import Command, Context, Field, Option, Reply, Table, Text, command
from bot.hookspecs import hookimpl
from bot.render import plural

GENERAL = "General"


def _topic_title(ctx: Context, slug: str | None) -> tuple[int, str]:
    topic = ctx.app.registry.topics.get(slug) if slug else None
    return (topic.order, topic.title) if topic else (10_000, GENERAL)


def required_text(option: Option) -> str:
    """How /help says whether an option must be given (an optional one may have no default)."""
    if option.required:
        return "yes"
    return "optional" if option.default is None else f"optional (default {option.default})"


@command(
    "help",
    "List the commands, grouped by course topic",
    options=[Text("command", "Show one command's options in detail", required=False, max_length=32)],
)
async def help_command(ctx: Context, command: str | None) -> Reply:
    commands: dict[str, Command] = ctx.app.registry.commands
    if command:
        cmd = commands.get(command.strip().lstrip("/").lower())
        if cmd is None:
            return Reply.failure(f"There is no /{command.strip()} command. Try /help.")
        rows = [[o.name, o.kind, required_text(o), o.description] for o in cmd.options]
        return Reply(
            title=f"/{cmd.name}",
            text=f"{cmd.description}\n`{cmd.usage()}`",
            table=Table(["option", "type", "required", "what it is"], rows) if rows else None,
            data={"command": cmd.name, "usage": cmd.usage(), "options": [o.name for o in cmd.options]},
        )
    groups: dict[tuple[int, str], list[Command]] = {}
    for cmd in commands.values():
        if cmd.owner_only and not ctx.user.is_owner:
            continue
        groups.setdefault(_topic_title(ctx, cmd.topic), []).append(cmd)
    fields = [
        Field(title, "\n".join(f"`{c.usage()}` {c.description}" for c in sorted(cmds, key=lambda c: c.name)), False)
        for (_, title), cmds in sorted(groups.items())
    ]
    data = {title: sorted(c.name for c in cmds) for (_, title), cmds in groups.items()}
    return Reply(title="Commands", text="Options are written `name:value`.", fields=fields, data={"groups": data})


@command("plugins", "List the plugins, their commands and any load errors")
async def plugins_command(ctx: Context) -> Reply:
    # Load errors may name files on the host: owners see them, everyone else sees that it failed.
    owner = ctx.user.is_owner
    rows = []
    stalls = getattr(ctx.app, "stalls", {})  # handlers that blocked the event loop (bot.app.LoopStall)
    for record in ctx.app.plugin_records:
        commands = ", ".join(f"/{c}" for c in record.commands) or "-"
        status = record.status
        if record.error:
            status = f"{record.status}: {record.error}" if owner else "failed to load"
        if stall := stalls.get(record.name):
            status += f"; {stall.describe()}"
        rows.append([record.name, record.version or "-", record.source, commands, status])
    data = [
        {
            "name": r.name,
            "version": r.version,
            "source": r.source,
            "commands": r.commands,
            "status": r.status,
            "error": r.error if owner else "",
            "stalls": stalls[r.name].count if r.name in stalls else 0,
        }
        for r in ctx.app.plugin_records
    ]
    failed = sum(1 for r in ctx.app.plugin_records if r.status == "failed")
    text = plural(len(rows), "plugin") + (f", {failed} failed to load" if failed else "")
    return Reply(
        title="Plugins",
        text=text,
        table=Table(["plugin", "version", "source", "commands", "status"], rows),
        data={"plugins": data},
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


@command("stats", "Inference service figures: queue, batches, latency, errors", owner_only=True)
async def stats_command(ctx: Context) -> Reply:
    summary = ctx.inference.metrics.summary()
    rows = []
    for task, row in sorted(summary["tasks"].items()):
        # A request for a model this server does not have is not a failure: its command answers without it.
        missing = row["errors"].get("NoModelForRole", 0)
        errors = sum(row["errors"].values()) - missing
        rows.append(
            [
                task,
                str(row["ok"]),
                str(errors),
                str(missing),
                f"{row.get('batch_size_mean', 0):.1f}",
                _ms(row.get("queue_wait_seconds_mean")),
                _ms(row.get("compute_seconds_mean")),
                _ms(row.get("request_seconds_p50")),
                _ms(row.get("request_seconds_p95")),
            ]
        )
    fields = [
        Field("queue", str(int(summary.get("queue_depth", 0)))),
        Field("workers alive", str(int(summary.get("workers_alive", 0)))),
        Field("worker restarts", str(int(summary.get("worker_restarts", 0)))),
    ]
    # Plugins whose handlers blocked their event loop (bot.app.LoopStall): only their own commands waited.
    stalls = dict(getattr(ctx.app, "stalls", {}))
    if stalls:
        lines = [f"{plugin}: {stall.describe()}" for plugin, stall in sorted(stalls.items())]
        fields.append(Field("blocking plugins", "\n".join(lines)[:1000], False))
    summary = {**summary, "stalls": {p: dataclasses.asdict(s) for p, s in stalls.items()}}
    return Reply(
        title="Inference stats",
        text=(
            "Per task: no model = requests for a model this server does not have (the command answered "
            "without it), not counted as errors; batch = mean requests per batch; "
            "queued = mean wait before its batch ran; "
            "compute = mean time of a batch in the worker; p50/p95 = a request's whole time from "
            "submit to answer (queue, loading a model the first time, compute), half / 95 in 100 "
            "of requests within it."
            if rows
            else "No model requests yet."
        ),
        fields=fields,
        table=Table(["task", "ok", "errors", "no model", "batch", "queued", "compute", "p50", "p95"], rows)
        if rows
        else None,
        data=summary,
    )


@command(
    "reload",
    "Reload a plugin's code without restarting the bot",
    options=[Text("plugin", "The plugin's name, as /plugins lists it", max_length=64)],
    owner_only=True,
)
async def reload_command(ctx: Context, plugin: str) -> Reply:
    try:
        record = ctx.app.reload_plugin(plugin.strip())
    except (KeyError, ValueError) as exc:
        return Reply.failure(str(exc).strip("'\""))
    if record.status != "loaded":
        return Reply.failure(f"{record.name} failed to load: {record.error}", ephemeral=False)
    published = await ctx.app.publish_commands() if ctx.app.publish_commands else []
    note = f" Commands re-published to {len(published)} place(s)." if published else ""
    return Reply(f"Reloaded {record.name}: {', '.join('/' + c for c in record.commands) or 'no commands'}.{note}")


@command("sync", "Publish the slash commands to Discord now", owner_only=True)
async def sync_command(ctx: Context) -> Reply:
    if ctx.app.publish_commands is None:
        return Reply.failure("Commands are published by the Discord front end; this one has nothing to sync.")
    published = await ctx.app.publish_commands()
    commands = plural(len(ctx.app.registry.commands), "command")
    return Reply(f"Published {commands} to {', '.join(published) or 'nowhere'}.")


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(help_command)
    register(plugins_command)
    register(stats_command)
    register(reload_command)
    register(sync_command)
