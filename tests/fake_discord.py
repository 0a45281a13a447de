"""A small fake Discord (REST + gateway) on 127.0.0.1 for end-to-end tests.

The real, unmodified discord.py client talks to it: tests point discord.py's
two base URLs here and give the client a resolver that refuses every host
but loopback. The fake records every REST call the bot makes and can push
INTERACTION_CREATE events through the gateway.

Sharding as Discord does it: ``GET /gateway/bot`` recommends ``shards``; each
gateway connection IDENTIFYs with ``[shard_id, shard_count]``, and an event of
guild ``g`` goes only to the connection of shard ``(g >> 22) % shard_count``
(direct messages to shard 0). Several bot processes can connect to one fake.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

APP_ID = 1100
BOT_ID = 1101
OWNER_ID = 1102
GUILD_ID = 1200
CHANNEL_ID = 1300


def _user(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name, "avatar": None, "bot": bot}


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses JSON only when the content type is exactly application/json.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class LoopbackOnlyResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, or refuses: tests cannot leave the machine."""

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        if host not in ("127.0.0.1", "localhost") and (self.allowed is None or host not in self.allowed):
            raise OSError(f"tests may only reach 127.0.0.1, not {host}")
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


@dataclass
class Call:
    method: str
    path: str
    body: Any
    files: list[tuple[str, bytes]] = field(default_factory=list)
    at: float = 0.0
    failed: bool = False  # answered with a queued failure (fail_webhooks, fail_channel): not delivered


class FakeDiscord:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.ready = asyncio.Event()
        self.seq = itertools.count(2)
        self.ids = itertools.count(5000)
        self.new_call = asyncio.Condition()
        self.fail_callbacks = 0  # answer this many interaction callbacks with a 404
        # The next webhook calls (follow-ups, edits of the original response) and channel messages fail, in
        # order: a number is the status to answer (503: Discord's outage), "drop" closes the connection unanswered.
        self.fail_webhooks: list[int | str] = []
        self.fail_channel: list[int | str] = []
        self.reject_token = False
        self.rejected: list[tuple[Call, str]] = []  # messages refused as Discord refuses them, and why
        self.sent: dict[str, float] = {}  # interaction token -> when it was dispatched
        self.recommended_shards = 1  # what GET /gateway/bot answers
        self.shard_of: dict[web.WebSocketResponse, tuple[int, int]] = {}  # connection -> (shard id, count)
        self.identified: list[tuple[int, int]] = []  # every IDENTIFY, in order
        self.ready_shards: set[int] = set()
        self.delivered: dict[str, int] = {}  # interaction token -> the shard it was sent to
        self.shard_ready = asyncio.Condition()
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self.me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self.application)
        app.router.add_put("/api/v10/applications/{app}/commands", self.put_commands)
        app.router.add_put("/api/v10/applications/{app}/guilds/{guild}/commands", self.put_commands)
        app.router.add_post("/api/v10/interactions/{id}/{token}/callback", self.callback)
        app.router.add_post("/api/v10/webhooks/{app}/{token}", self.followup)
        app.router.add_patch("/api/v10/webhooks/{app}/{token}/messages/@original", self.followup)
        app.router.add_delete("/api/v10/webhooks/{app}/{token}/messages/@original", self.delete)
        app.router.add_post("/api/v10/channels/{channel}/messages", self.channel_message)
        app.router.add_get("/api/v10/gateway/bot", self.gateway_bot)
        app.router.add_get("/gateway", self.gateway)
        self.app = app
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ recording

    async def _record(self, request: web.Request) -> Call:
        files: list[tuple[str, bytes]] = []
        body: Any = None
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                else:
                    files.append((part.filename or "", bytes(await part.read())))
        elif request.can_read_body:
            text = await request.text()
            body = json.loads(text) if text else None
        call = Call(request.method, request.path, body, files, asyncio.get_running_loop().time())
        self.calls.append(call)
        async with self.new_call:
            self.new_call.notify_all()
        return call

    def calls_to(self, fragment: str, method: str | None = None) -> list[Call]:
        return [c for c in self.calls if fragment in c.path and (method is None or c.method == method)]

    async def wait_for(self, predicate: Any, timeout: float = 120) -> list[Call]:
        """Wait until ``predicate(calls)`` is true; return the calls."""
        async with asyncio.timeout(timeout), self.new_call:
            await self.new_call.wait_for(lambda: predicate(self.calls))
        return self.calls

    # ------------------------------------------------------------------ REST

    async def me(self, request: web.Request) -> web.Response:
        if self.reject_token:
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return _json(_user(BOT_ID, "lmbot", bot=True))

    async def application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": str(APP_ID),
                "name": "lmbot",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": _user(OWNER_ID, "owner"),
                "team": None,
                "verify_key": "0" * 64,
                "flags": 0,
            }
        )

    async def put_commands(self, request: web.Request) -> web.Response:
        call = await self._record(request)
        return _json(
            [{**c, "id": str(next(self.ids)), "application_id": str(APP_ID), "version": "1"} for c in call.body]
        )

    async def callback(self, request: web.Request) -> web.Response:
        call = await self._record(request)
        if self.fail_callbacks:
            self.fail_callbacks -= 1
            return _json({"message": "Unknown interaction", "code": 10062}, status=404)
        kind = call.body["type"]
        body = {
            "interaction": {
                "id": request.match_info["id"],
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool((call.body.get("data") or {}).get("flags", 0) & 64),
            }
        }
        return _json(body)

    def _message(self, body: dict[str, Any] | None) -> dict[str, Any]:
        body = body or {}
        return {
            "id": str(next(self.ids)),
            "channel_id": str(CHANNEL_ID),
            "author": _user(BOT_ID, "lmbot", bot=True),
            "content": body.get("content", ""),
            "timestamp": "2026-11-28T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": body.get("embeds", []),
            "pinned": False,
            "type": 0,
            "flags": body.get("flags", 0),
            "components": [],
        }

    @staticmethod
    def invalid(body: dict[str, Any] | None) -> str | None:
        """Why Discord would refuse this message (Invalid Form Body), or None."""
        body = body or {}
        if len(body.get("content") or "") > 2000:
            return "content over 2000 characters"
        ids = [c.get("custom_id") for row in body.get("components", []) for c in row.get("components", [])]
        if len(ids) != len(set(ids)):
            return "component custom_ids repeat"
        if any(len((i or "").encode("utf-16-le")) // 2 > 100 for i in ids):
            return "a custom_id is over 100 characters"
        return None

    @staticmethod
    def _failure(request: web.Request, failures: list[int | str]) -> web.Response | None:
        """The failure queued for this call, if any (a dropped connection answers nothing)."""
        if not failures:
            return None
        how = failures.pop(0)
        if how == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        return _json({"message": "503: Service Unavailable", "code": 0}, status=int(how))

    async def channel_message(self, request: web.Request) -> web.Response:
        call = await self._record(request)
        failed = self._failure(request, self.fail_channel)
        if failed is not None:
            call.failed = True
            return failed
        return _json(self._message(call.body))

    async def followup(self, request: web.Request) -> web.Response:
        call = await self._record(request)
        failed = self._failure(request, self.fail_webhooks)
        if failed is not None:
            call.failed = True
            return failed
        reason = self.invalid(call.body)
        if reason is not None:
            self.rejected.append((call, reason))
            return _json({"message": "Invalid Form Body", "code": 50035, "errors": {"_errors": [reason]}}, 400)
        return _json(self._message(call.body))

    async def delete(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=204)

    # ------------------------------------------------------------------ gateway

    async def gateway_bot(self, request: web.Request) -> web.Response:
        await self._record(request)
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return _json({"url": self.gateway_url, "shards": self.recommended_shards, "session_start_limit": limit})

    async def wait_shards(self, shard_ids: set[int], timeout: float = 60) -> None:
        """Wait until every shard in ``shard_ids`` has been sent READY."""
        async with asyncio.timeout(timeout), self.shard_ready:
            await self.shard_ready.wait_for(lambda: shard_ids <= self.ready_shards)

    def shard_for(self, guild_id: int | None) -> int:
        counts = {count for _, count in self.shard_of.values()} or {1}
        assert len(counts) == 1, f"connections disagree on the shard count: {counts}"
        return 0 if guild_id is None else (guild_id >> 22) % counts.pop()

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            payload = json.loads(message.data)
            if payload["op"] == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:
                shard = payload["d"].get("shard") or [0, 1]
                self.shard_of[ws] = (shard[0], shard[1])
                self.identified.append((shard[0], shard[1]))
                ready = {
                    "v": 10,
                    "user": _user(BOT_ID, "lmbot", bot=True),
                    "guilds": [],
                    "session_id": "fake-session",
                    "resume_gateway_url": self.gateway_url,
                    "application": {"id": str(APP_ID), "flags": 0},
                    "shard": shard,
                }
                await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}))
                self.ready.set()
                async with self.shard_ready:
                    self.ready_shards.add(shard[0])
                    self.shard_ready.notify_all()
        self.sockets.remove(ws)
        self.shard_of.pop(ws, None)
        return ws

    async def interact(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int = 2000,
        bot: bool = False,
        kind: int = 2,
        focused: str | None = None,
        guild_id: int = GUILD_ID,
    ) -> str:
        """Send an INTERACTION_CREATE for /name to the shard of ``guild_id``; return its token.

        ``kind`` 3 is a button press (``options`` holds its ``custom_id``), 5 a modal submit.
        """
        interaction_id = next(self.ids)
        # Shaped like Discord's: long base64url text (an id in it keeps tokens unique in a test).
        token = (
            "aW50ZXJhY3Rpb246" + base64.urlsafe_b64encode(f"{interaction_id}:{secrets.token_hex(24)}".encode()).decode()
        )
        types = {bool: 5, int: 4, float: 10, str: 3}
        data: dict[str, Any] = {}
        if kind == 3:  # a button press: the "options" are the component's custom_id
            data = {"custom_id": (options or {})["custom_id"], "component_type": 2}
        elif kind == 5:  # a modal submit: "components" are the form's filled-in rows, as Discord sends them
            data = {"custom_id": (options or {})["custom_id"], "components": (options or {}).get("components", [])}
        data_options = [
            {"name": k, "type": types[type(v)], "value": v, **({"focused": True} if k == focused else {})}
            for k, v in ((options or {}).items() if kind not in (3, 5) else ())
        ]
        payload = {
            "id": str(interaction_id),
            "application_id": str(APP_ID),
            "type": kind,
            "token": token,
            "version": 1,
            "guild_id": str(guild_id),
            "channel_id": str(CHANNEL_ID),
            "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(guild_id), "name": "study", "position": 0},
            "member": {
                "user": _user(user_id, f"student{user_id}", bot=bot),
                "roles": [],
                "joined_at": "2026-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
                "permissions": "0",
                "flags": 0,
            },
            "app_permissions": "0",
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id)},
            "context": 0,
            "attachment_size_limit": 8 * 1024 * 1024,
            "data": data if kind in (3, 5) else {"id": "1", "name": name, "type": 1, "options": data_options},
        }
        event = json.dumps({"op": 0, "t": "INTERACTION_CREATE", "s": next(self.seq), "d": payload})
        shard = self.shard_for(guild_id)
        targets = [ws for ws, (shard_id, _) in self.shard_of.items() if shard_id == shard]
        if not targets:
            raise LookupError(f"no connection runs shard {shard} (guild {guild_id})")
        self.sent[token] = asyncio.get_running_loop().time()
        self.delivered[token] = shard
        for ws in targets:
            await ws.send_str(event)
        return token
