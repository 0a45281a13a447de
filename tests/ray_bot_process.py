"""One bot process on the Ray backend, for tests/ray_shared_suite.py.

``python -m tests.ray_bot_process CONFIG_JSON`` builds an :class:`~bot.app.App` from the
config (a dict as config.toml would give) and answers one JSON command per line on
stdin with one JSON line on stdout:

* ``{"op": "ask", "prompt": ...}``: a next-token request; its top tokens and probabilities
* ``{"op": "pids", "role": ...}``: the pid of the role's replica
* ``{"op": "describe", "role": ...}``: the fingerprint and config the role's application was built from
* ``{"op": "apps"}``: the Serve applications on the cluster
* ``{"op": "holders", "app": ...}``: how many bot processes hold the application (the registry's count)
* ``{"op": "close"}``: close the app (and so release its applications), answer, exit

An error is answered as ``{"ok": false, "error": <class name>, "message": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from bot.app import App
from bot.config import parse_config
from bot.inference.protocol import NextToken


async def answer(app: App, command: dict[str, Any]) -> dict[str, Any]:
    inference: Any = app.inference
    op = command["op"]
    if op == "ask":
        result = await inference.submit(NextToken(command["prompt"], k=3))
        return {"top": [[t.token, t.prob] for t in result.top], "model": result.model}
    if op == "pids":
        return {"pids": await inference.replica_pids(command["role"])}
    if op == "describe":
        return dict(await inference.describe_app(command["role"]))
    if op == "apps":
        from ray import serve

        await inference.start()
        return {"apps": sorted(await asyncio.to_thread(lambda: serve.status().applications))}
    if op == "holders":
        await inference.start()
        return {"holders": len(await asyncio.to_thread(inference._registry_call, "holders", command["app"]))}
    raise ValueError(f"unknown op {op!r}")


async def main() -> None:
    app = App(parse_config(json.loads(sys.argv[1]), source="ray-bot-process"))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    while line := await reader.readline():
        command = json.loads(line)
        if command["op"] == "close":
            await app.close()
            print(json.dumps({"ok": True}), flush=True)
            return
        try:
            reply = {"ok": True, **await answer(app, command)}
        except Exception as exc:
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
    await app.close()


if __name__ == "__main__":
    asyncio.run(main())
