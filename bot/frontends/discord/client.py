"""The Discord client: answers every interaction, never blocks, never pings.

Order of work for a slash command or a button press: cheap checks that can
answer at once (unknown command, shutting down, owner-only, cooldown, full
queue) get an immediate ephemeral reply; everything else is deferred
("thinking…") before any model work, then answered by a followup. Nothing here
runs a model, and no plugin code runs on this loop: handlers and the inference
client run on the :class:`CommandLoop`, so acknowledgements never wait behind
them.

Sharding: ``discord.shard_count`` / ``discord.shard_ids`` choose the shards this
process runs (discord.py's AutoShardedClient; Discord sends each process the
events of its own shards' guilds). One process owns the command sync: the one
that runs shard 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import discord

from bot.app import App
from bot.commands import Context, Reply, User
from bot.frontends.discord import redact
from bot.frontends.discord.command_loop import CommandLoop
from bot.frontends.discord.render import (
    MalformedButton,
    asked_text_option,
    escape,
    fit,
    form_values,
    parse_button_id,
    render_reply,
    text_form,
)
from bot.frontends.discord.schema import autocomplete, commands_payload, focused_option, option_values, payload_hash

log = logging.getLogger(__name__)


ANSWER_UNKNOWN_BUTTON = "That button no longer works; run the command again."
# Failures of one request that another try may not meet: Discord's 5xx come as HTTPException.
TRANSIENT: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
SENDING_FAILED: tuple[type[BaseException], ...] = (discord.HTTPException, *TRANSIENT)
# An interaction token lasts 15 minutes; follow-ups are retried for most of them, leaving room to finish.
TOKEN_LIFETIME_S = 15 * 60


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# The invite: "bot" puts the bot user in the server (the guild count, and DMs), "applications.commands"
# its slash commands. Answers go out as interaction responses, which need no channel permission.
INVITE_SCOPES = ("bot", "applications.commands")
INVITE_PERMISSIONS = discord.Permissions.none()


def invite_url(application_id: int) -> str:
    """The link a server admin opens to add the bot (discord.py builds Discord's OAuth2 URL)."""
    return discord.utils.oauth_url(application_id, permissions=INVITE_PERMISSIONS, scopes=INVITE_SCOPES)


def ready_line(user: discord.abc.User, servers: int, application_id: int | None) -> str:
    """``logged in as NAME (id ID) in N servers; invite: URL``: the start-up summary's last line."""
    where = f"{servers} server{'' if servers == 1 else 's'}"
    invite = f"; invite it to a server: {invite_url(application_id)}" if application_id else ""
    return f"logged in as {user.name} (id {user.id}) in {where}{invite}"


def _parsed_id(data: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
    """A button's or a form's (command, values) from its custom id; None for one this version cannot read."""
    try:
        return parse_button_id(str(data.get("custom_id", "")))
    except MalformedButton:
        return None


def time_heartbeats_from_their_payload() -> None:
    """Make discord.py time a heartbeat's acknowledgement from when the heartbeat was made (idempotent).

    discord.py's keep-alive thread notes a heartbeat as sent only once it gets the GIL back after
    the event loop sent it. In a burst, with the loop and other threads busy, the acknowledgement
    was read first: its latency came out as the time since the *previous* heartbeat (about 41 s),
    and discord.py logged "Can't keep up, websocket is 41.3s behind" for a gateway that was never
    behind. Noting the time when the heartbeat is made (just before it is sent) keeps the
    measure true either way; a loop truly blocked still shows its delay and its warnings.
    """
    handler = discord.gateway.KeepAliveHandler
    if getattr(handler, "_lmbot_timed_from_payload", False):
        return
    made = handler.get_payload

    def get_payload(self: discord.gateway.KeepAliveHandler) -> dict[str, Any]:
        payload = made(self)
        self._last_send = time.perf_counter()
        return payload

    handler.get_payload = get_payload  # type: ignore[method-assign]
    handler._lmbot_timed_from_payload = True  # type: ignore[attr-defined]


class LmbotClient(discord.AutoShardedClient):
    def __init__(self, app: App, *, serve: bool = True, **options: Any) -> None:
        """``serve=False`` logs in without starting the inference service or syncing (``lmbot sync``)."""
        redact.install()  # before anything can log a token
        time_heartbeats_from_their_payload()
        # Slash commands need no privileged intents and no message content; guilds keeps the guild cache.
        intents = discord.Intents.none()
        intents.guilds = True
        # The bot never joins voice; don't warn that voice libraries are missing.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        settings = app.config.discord
        # "auto": discord.py asks Discord for the recommended count and runs every shard here.
        options.setdefault("shard_count", None if settings.shard_count == "auto" else settings.shard_count)
        if settings.shard_ids:
            options.setdefault("shard_ids", list(settings.shard_ids))
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none(), **options)
        self.app = app
        self.serve = serve
        self.settings = settings
        self.owner_ids: set[int] = set(app.config.bot.owner_ids)
        self.accepting = True
        self.in_flight: set[asyncio.Task[None]] = set()
        self._cooldowns: dict[tuple[int, str], float] = {}
        self.synced: list[str] = []  # scopes synced by the last sync_commands call
        self.command_loop = CommandLoop(app)
        # Delivering an answer (see _send): retry follow-ups this long after the interaction came, pausing
        # retry_pause_s, doubling up to retry_pause_max_s; then post in the channel (channel_tries tries).
        self.followup_window_s = TOKEN_LIFETIME_S - 60.0
        self.retry_pause_s = 2.0
        self.retry_pause_max_s = 60.0
        self.channel_tries = 5
        self._said_ready = False

    @property
    def owns_sync(self) -> bool:
        """Whether this process uploads the commands: it runs every shard, or shard 0."""
        return not self.shard_ids or 0 in self.shard_ids

    def _shards(self) -> str:
        ids = self.shard_ids if self.shard_ids else "all"
        return f"shards {ids} of {self.shard_count or 'auto'}"

    # ------------------------------------------------------------------ start-up

    async def login(self, token: str) -> None:
        redact.install(token)
        await super().login(token)

    async def setup_hook(self) -> None:
        if not self.serve:
            return
        self.command_loop.start()
        # Only the process that syncs publishes from /sync and /reload; the others have nothing to publish.
        self.app.publish_commands = self._publish if self.owns_sync else None
        await self.command_loop.run(self.app.inference.start())
        info = self.application or await self.application_info()
        self.owner_ids.add(info.owner.id)
        if info.team is not None:
            self.owner_ids.update(member.id for member in info.team.members)
        if self.settings.sync == "auto":
            if self.owns_sync:
                try:
                    await self.sync_commands()
                except (OSError, aiohttp.ClientError, discord.DiscordServerError) as exc:
                    # The network went away between login and here: the commands Discord has still
                    # work; /sync or the next start uploads the new set. Not worth stopping the bot.
                    log.warning("could not sync the commands now (%s); run /sync or restart later", exc)
            else:
                log.info("%s: the process that runs shard 0 syncs the commands; this one never uploads", self._shards())

    async def on_shard_ready(self, shard_id: int) -> None:
        log.info("shard %d of %s ready", shard_id, self.shard_count)

    async def on_ready(self) -> None:
        """Say once who the bot is, where it is, and how to invite it (every shard is ready)."""
        # A client closed before its delayed ready came (a shutdown during login) says nothing.
        if self._said_ready or self.user is None or self.is_closed():
            return
        self._said_ready = True
        print(f"lmbot: {ready_line(self.user, len(self.guilds), self.application_id)}", file=sys.stderr, flush=True)

    async def _publish(self) -> list[str]:
        """``/sync`` and ``/reload`` call this from the command loop; the upload runs on the client's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.sync_commands(force=True), self.loop))

    @property
    def sync_state_path(self) -> Path:
        return self.app.config.cache_dir / "discord_sync.json"

    async def sync_commands(self, *, force: bool = False, guild_id: int | None = None) -> list[str]:
        """Upload the command set where it changed (or everywhere with ``force``).

        Discord rate-limits command creation, so the hash of what was last
        uploaded to each scope is kept on disk and an unchanged set is skipped.
        """
        assert self.application_id is not None
        payload = commands_payload(self.app.registry.commands.values())
        digest = payload_hash(payload)
        try:
            state = json.loads(self.sync_state_path.read_text())
        except (OSError, ValueError):
            state = {}
        scopes: list[int | None] = [guild_id] if guild_id else [None, *self.settings.guild_ids]
        self.synced = []
        for scope in scopes:
            key = f"{self.application_id}:{scope or 'global'}"
            if not force and state.get(key) == digest:
                continue
            if scope is None:
                await self.http.bulk_upsert_global_commands(self.application_id, payload)
            else:
                await self.http.bulk_upsert_guild_commands(self.application_id, scope, payload)
            state[key] = digest
            self.synced.append(key)
            log.info("synced %d commands to %s", len(payload), key)
        self.sync_state_path.parent.mkdir(parents=True, exist_ok=True)
        self.sync_state_path.write_text(json.dumps(state, indent=1))
        return self.synced

    # ------------------------------------------------------------------ interactions

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.user.bot:
            return  # other bots never drive this one
        if interaction.type is discord.InteractionType.autocomplete:
            await self._autocomplete(interaction)
            return
        data: dict[str, Any] = interaction.data or {}  # type: ignore[assignment]
        if interaction.type is discord.InteractionType.application_command:
            name, values, typed = data.get("name", ""), option_values(data), True
        elif interaction.type is discord.InteractionType.component:
            # Discord sends a component interaction only to the app whose message holds the component:
            # every press is ours to answer, even one whose id this version cannot read.
            pressed = _parsed_id(data)
            if pressed is None:
                await self._answer_now(interaction, ANSWER_UNKNOWN_BUTTON)
                return
            if asked_text_option(str(data.get("custom_id", ""))):
                await self._open_form(interaction, pressed[0], str(data.get("custom_id", "")))
                return
            # A button's value is option text, converted as the console would.
            (name, values), typed = pressed, False
        elif interaction.type is discord.InteractionType.modal_submit:
            # A text-asking button's form: its id is the button's command and option, its text box
            # fills the option the button named (Button.text_option).
            submitted = _parsed_id(data)
            if submitted is None:
                await self._answer_now(interaction, "That form is not one this bot knows; run the command again.")
                return
            name, values = submitted
            values = {**form_values(list(data.get("components") or [])), **values}
            typed = False
        else:
            return
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        try:
            await self._command(interaction, name, values, typed, time.monotonic())
        except asyncio.CancelledError:
            raise
        except BaseException:  # nothing may end this task without a word in the log
            log.exception("unexpected error answering /%s", name)
        finally:
            self.in_flight.discard(task)

    async def _open_form(self, interaction: discord.Interaction, name: str, custom_id: str) -> None:
        """Answer a text-asking button's press with its form (it must come at once: no deferring)."""
        cmd = self.app.registry.commands.get(name)
        option = cmd.option(asked_text_option(custom_id)) if cmd is not None else None
        if not self.accepting or option is None:
            restarting = "The bot is restarting; try again in a minute."
            await self._answer_now(interaction, ANSWER_UNKNOWN_BUTTON if self.accepting else restarting)
            return
        form = text_form(custom_id, f"/{name}", option.description, int(getattr(option, "max_length", 500)))
        form.stop()  # the submit comes back to on_interaction; discord.py need not keep the form
        try:
            await interaction.response.send_modal(form)
        except discord.HTTPException as exc:
            log.warning("could not open the form of a /%s button: %s", name, exc)

    async def _answer_now(self, interaction: discord.Interaction, text: str) -> None:
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.send_message(escape(text), ephemeral=True)

    async def _autocomplete(self, interaction: discord.Interaction) -> None:
        data: dict[str, Any] = interaction.data or {}  # type: ignore[assignment]
        cmd = self.app.registry.commands.get(data.get("name", ""))
        focused = focused_option(data)
        choices = autocomplete(cmd, *focused) if cmd and focused else []
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.autocomplete([discord.app_commands.Choice(**c) for c in choices])

    def _refusal(self, interaction: discord.Interaction, name: str) -> str | None:
        """A reason to answer at once without deferring, or None.

        Slash commands and button presses share the per-user, per-command cooldown:
        pressing a button runs its command as much as typing it does.
        """
        cmd = self.app.registry.commands.get(name)
        if not self.accepting:
            return "The bot is restarting; try again in a minute."
        if cmd is None:
            return f"/{name} is not available any more; the command list will refresh soon."
        if cmd.owner_only and interaction.user.id not in self.owner_ids:
            return f"/{name} is for the bot's owners only."
        now = time.monotonic()
        key = (interaction.user.id, name)
        ready_at = self._cooldowns.get(key, 0.0)
        if now < ready_at:
            return f"Slow down a little: you can use /{name} again in {ready_at - now:.0f} s."
        busy = self.app.inference.retry_hint_if_full()
        if busy is not None:
            return f"The bot is busy right now; try again in {busy:.0f} s."
        if len(self._cooldowns) > 10_000:  # forget expired entries so the table cannot grow forever
            self._cooldowns = {k: t for k, t in self._cooldowns.items() if t > now}
        self._cooldowns[key] = now + self.settings.cooldown_s
        return None

    async def _command(
        self, interaction: discord.Interaction, name: str, values: dict[str, Any], typed: bool, received: float
    ) -> None:
        """Answer one interaction; ``typed`` values come from a slash command, others are option text."""
        refusal = self._refusal(interaction, name)
        if refusal is not None:
            await self._answer_now(interaction, refusal)
            return
        try:
            await interaction.response.defer(thinking=True)
        except discord.HTTPException:
            log.warning("could not defer /%s in time; Discord has dropped the interaction", name)
            return
        try:
            ctx = self._context(interaction)
            # The handler runs on the command loop; this loop stays free to acknowledge others.
            if typed:
                reply = await self.command_loop.run(self.app.execute(name, values, ctx))
            else:
                reply = await self.command_loop.run(self.app.execute_text(name, values, ctx))
        except asyncio.CancelledError:
            # Shutting down past the grace period: release the interaction with a word, not silence.
            with contextlib.suppress(discord.HTTPException):
                await interaction.followup.send("The bot is restarting; please ask again in a minute.")
            raise
        except BaseException:  # execute() already turns plugin errors into replies; this is the last net
            log.exception("unexpected error answering /%s", name)
            reply = Reply.failure("Something went wrong; please try again.")
        await self._send(interaction, reply, received, name=name)
        if reply.followup is not None:
            await self._follow_up(interaction, name, reply.followup, received, due_s=reply.followup_in_s)

    async def _follow_up(
        self, interaction: discord.Interaction, name: str, later: Any, received: float, *, due_s: float = 0.0
    ) -> None:
        """Post a reply's later message (``Reply.followup``) in the same conversation.

        It is plugin code: it runs on its plugin's own loop (a block there costs only that plugin),
        and whatever it raises becomes a short failure, as a handler's would. Its deadline is
        ``due_s`` (``Reply.followup_in_s``, the wait it announced) plus ``bot.command_timeout_s``:
        past it the channel is told so and ``later()`` is abandoned, as a command's handler is.
        """
        cmd = self.app.registry.commands.get(name)
        plugin = cmd.plugin if cmd is not None else "core"
        deadline = due_s + self.app.config.bot.command_timeout_s
        try:
            if plugin == "core":
                work: asyncio.Future[Any] = asyncio.ensure_future(self.command_loop.run(later()))
            else:
                work = asyncio.wrap_future(self.app.plugin_loops.submit(plugin, name, later()))
            try:
                reply = await asyncio.wait_for(asyncio.shield(work), deadline)
            except TimeoutError:
                work.cancel()
                log.warning(
                    "the later message of /%s (plugin %s) passed its %.0f s deadline; abandoned", name, plugin, deadline
                )
                reply = Reply.failure(
                    f"The rest of this /{name} took longer than {deadline:.0f} s, so it was stopped. "
                    f"Sorry; please start a new /{name}.",
                    ephemeral=False,
                    error_kind="CommandTimeout",
                )
            except asyncio.CancelledError:
                work.cancel()
                raise
            if not isinstance(reply, Reply):
                raise TypeError(f"the later message of /{name} is {type(reply).__name__}, not a Reply")
        except asyncio.CancelledError:
            with contextlib.suppress(*SENDING_FAILED):
                await interaction.followup.send(f"The bot is restarting, so this /{name} ends here.")
            raise
        except BaseException:  # a plugin's later message cannot stop the bot, nor leave the channel silent
            log.exception("unexpected error in the later message of /%s", name)
            reply = Reply.failure("Something went wrong; please try again.", ephemeral=False)
        await self._send(interaction, reply, received, later=True, name=name)

    def _context(self, interaction: discord.Interaction) -> Context:
        user = interaction.user
        return Context(
            user=User(str(user.id), user.name, is_owner=user.id in self.owner_ids),
            app=self.app,
            guild_id=str(interaction.guild_id) if interaction.guild_id else None,
            transport="discord",
        )

    async def _send(
        self,
        interaction: discord.Interaction,
        reply: Reply,
        received: float | None = None,
        *,
        later: bool = False,
        name: str = "",
    ) -> None:
        """Deliver ``reply`` (the answer to ``/name``) however Discord lets us: never dropped while any way is open.

        A follow-up that fails with a 5xx or a dropped connection is tried again (the
        follow-up and an edit of the "thinking…" message in turn) with growing pauses
        while the interaction token lasts (15 minutes from ``received``; ``followup_window_s``
        of them); past that, a public answer is posted in the channel instead. ``later``: a
        further message (``Reply.followup``), which keeps the first in place: it is only ever
        sent as a follow-up, never as an edit of the first.

        A private answer is only ever a follow-up; the public "thinking…" message is removed once
        one has arrived. Past the window it is left public, edited to a fixed note that names no
        detail of the answer and asks the student to run the command again.

        A ``NotFound`` after an earlier failure (the token ran out mid-storm, or someone deleted
        "thinking…"), or near the window's end, goes to the channel as the window's end does.
        """
        # Escaping and fitting a long reply is CPU work: off this loop, which must stay free to acknowledge.
        # Rendered afresh for each try: discord.py closes a message's files once it has tried to send them.
        rendered = await asyncio.to_thread(render_reply, reply)
        window_ends = (received if received is not None else time.monotonic()) + self.followup_window_s
        private_first = rendered.ephemeral and not later
        tries = 0
        while True:
            if tries:
                rendered = await asyncio.to_thread(render_reply, reply)
            began = time.monotonic()
            try:
                if tries % 2 == 0 or rendered.ephemeral or later:
                    await interaction.followup.send(**rendered.kwargs())
                else:  # another endpoint than the follow-up's: a storm may spare it
                    await interaction.edit_original_response(**rendered.edit_kwargs())
                if rendered.view is not None:
                    # Presses come back to on_interaction by custom_id; discord.py need not keep the view.
                    rendered.view.stop()
                if private_first:
                    # The "thinking…" message is public; now that the private answer is there, it goes.
                    with contextlib.suppress(*SENDING_FAILED):
                        await interaction.delete_original_response()
                return
            except discord.NotFound as exc:
                if not tries and time.monotonic() < window_ends:
                    # Gone from the start (not a storm's end): retrying would only earn invalid-request strikes.
                    log.warning("the interaction for /%s is gone; its answer was dropped", name or "?")
                    return
                failure: BaseException = exc
                log.warning("the interaction for /%s is gone after %d failed tries (%s)", name or "?", tries, exc)
                break
            except discord.HTTPException as exc:
                if exc.status < 500:
                    log.error("could not answer an interaction: %s", exc)
                    with contextlib.suppress(*SENDING_FAILED):
                        await interaction.followup.send("Sorry, that answer could not be sent.", ephemeral=True)
                    return
                failure = exc
            except TRANSIENT as exc:
                failure = exc
            tries += 1
            pause = min(self.retry_pause_max_s, self.retry_pause_s * 2 ** (tries - 1))
            # The next try may take as long as this one did: it must end within the window too.
            if time.monotonic() + pause + (time.monotonic() - began) > window_ends:
                break
            log.warning("answering an interaction failed (%s); try %d again in %.0f s", _why(failure), tries, pause)
            await asyncio.sleep(pause)
        if private_first or reply.ephemeral:
            await self._private_undelivered(interaction, name)
        else:
            await self._answer_in_channel(interaction, reply)

    async def _private_undelivered(self, interaction: discord.Interaction, name: str) -> None:
        """A private answer Discord would not take: say so publicly, with no detail of it.

        The "thinking…" message (still there: it is removed only once the answer arrived) becomes
        the note; if it cannot be edited, the note goes in the channel.
        """
        command = f"/{name}" if name else "your command"
        note = f"Your answer to {command} is private and Discord would not deliver it; please run {command} again."
        try:
            await interaction.edit_original_response(content=escape(note), embeds=[], attachments=[], view=None)
            log.error("could not deliver a private answer to /%s; its public message now says so", name or "?")
            return
        except SENDING_FAILED as exc:
            log.warning("could not edit the message of /%s to say its answer is private: %s", name or "?", _why(exc))
        await self._answer_in_channel(interaction, Reply(note))

    async def _answer_in_channel(self, interaction: discord.Interaction, reply: Reply) -> None:
        """The last way: a message in the channel, which needs no interaction token."""
        if reply.ephemeral or interaction.channel_id is None:
            # A private answer is never made public (_private_undelivered posts a note naming no detail).
            log.error("could not deliver an answer within the interaction's token; dropped")
            return
        channel = self.get_partial_messageable(interaction.channel_id)
        who = escape(interaction.user.display_name)
        for tries in range(self.channel_tries):
            kwargs = (await asyncio.to_thread(render_reply, reply)).edit_kwargs()
            kwargs["files"] = kwargs.pop("attachments", [])
            note = f"For {who} (Discord would not take this as a reply):"
            kwargs["content"] = fit(f"{note}\n{kwargs.get('content') or ''}", 2000)
            try:
                await channel.send(**kwargs)
                log.warning("delivered an answer as a channel message after the follow-up kept failing")
                return
            except SENDING_FAILED as exc:
                if isinstance(exc, discord.HTTPException) and exc.status < 500:
                    log.error("could not post an answer in the channel either: %s", exc)
                    return
                await asyncio.sleep(min(self.retry_pause_max_s, self.retry_pause_s * 2**tries))
        log.error("could not deliver an answer by any way Discord offers; dropped")

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop taking interactions, let in-flight ones finish, stop the workers, disconnect."""
        if not self.accepting:
            return
        self.accepting = False
        pending = [t for t in self.in_flight if not t.done()]
        if pending:
            log.info("waiting for %d interactions to finish", len(pending))
            _, late = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
        await self._close_app()
        await self.close()

    async def _close_app(self) -> None:
        """Stop the inference service on the loop it runs on, then stop that loop."""
        if not self.command_loop.running:
            await self.app.close()
            return
        try:
            async with asyncio.timeout(30):
                await self.command_loop.run(self.app.close())
        except (Exception, SystemExit, KeyboardInterrupt):  # a blocked loop must not keep the bot from exiting
            log.exception("could not stop the inference service cleanly")
        await asyncio.to_thread(self.command_loop.stop, 10.0)
