"""What an admin runs for a term: the command schema's permissions, the systemd unit, the
compose file, the Docker images and install.sh's preflight (checked by parsing: no docker
engine or systemd runs in the tests)."""

from __future__ import annotations

from bot.discord_frontend.schema import commands_payload
from bot.testing import make_app


async def test_owner_only_commands_are_hidden_from_members_by_default(cache_dir) -> None:  # type: ignore[no-untyped-def]
    app = make_app(cache_dir=cache_dir)
    try:
        payload = {c["name"]: c for c in commands_payload(app.registry.commands.values())}
        owner_only = {name for name, cmd in app.registry.commands.items() if cmd.owner_only}
        assert {"stats", "reload", "sync"} <= owner_only
        for name, body in payload.items():
            if name in owner_only:
                # "0": only server admins see it until they grant it to a role.
                assert body["default_member_permissions"] == "0", name
            else:
                assert "default_member_permissions" not in body, name  # students see every other command
    finally:
        await app.close()
