"""The core's commands as Discord application-command payloads, and back.

Commands are synced as raw JSON (not through discord.py's CommandTree) so that
the registry is the single source of truth: the payload, its hash for
deliberate syncing, and the parsing of incoming options all derive from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from bot.commands import Command, Option

# Discord's application command option types.
OPTION_TYPE = {"text": 3, "integer": 4, "true|false": 5, "number": 10}
MAX_CHOICES = 25


def option_payload(option: Option) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": OPTION_TYPE[option.kind],
        "name": option.name,
        "description": option.description,
        "required": option.required,
    }
    for key in ("min_value", "max_value"):
        value = getattr(option, key, None)
        if value is not None:
            body[key] = value
    max_length = getattr(option, "max_length", None)
    if max_length is not None:
        body["max_length"] = min(max_length, 6000)  # Discord's ceiling for a string option
    if option.choices:
        if len(option.choices) <= MAX_CHOICES:
            body["choices"] = [{"name": str(c), "value": c} for c in option.choices]
        else:
            body["autocomplete"] = True  # long lists are offered as the user types
    return body


# default_member_permissions "0": in a server, only members with Administrator see the command
# in their menu until a server admin grants it to a role (Server Settings > Integrations).
OWNER_ONLY_PERMISSIONS = "0"


def command_payload(cmd: Command) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": 1,  # slash command
        "name": cmd.name,
        "description": cmd.description,
        "options": [option_payload(o) for o in cmd.options],
        "contexts": [0, 1, 2],  # guilds, the bot's DMs, private channels
        "integration_types": [0],  # installed to a guild
    }
    if cmd.owner_only:
        # Hidden from students' menus; the owner check in the client still refuses anyone else.
        body["default_member_permissions"] = OWNER_ONLY_PERMISSIONS
    return body


def commands_payload(commands: Iterable[Command]) -> list[dict[str, Any]]:
    return [command_payload(c) for c in sorted(commands, key=lambda c: c.name)]


def payload_hash(payload: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def option_values(data: dict[str, Any]) -> dict[str, Any]:
    """The ``name: value`` pairs of an interaction's options."""
    return {o["name"]: o.get("value") for o in data.get("options", []) if "value" in o}


def focused_option(data: dict[str, Any]) -> tuple[str, str] | None:
    for option in data.get("options", []):
        if option.get("focused"):
            return option["name"], str(option.get("value", ""))
    return None


def autocomplete(cmd: Command, name: str, typed: str) -> list[dict[str, Any]]:
    """Up to 25 choices of option ``name`` that contain what the user typed."""
    option = cmd.option(name)
    if option is None or not option.choices:
        return []
    typed = typed.lower()
    matches = [c for c in option.choices if typed in str(c).lower()]
    return [{"name": str(c), "value": c} for c in matches[:MAX_CHOICES]]
