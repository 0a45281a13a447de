from collections.abc import Callable

import torch

from bot import Command, Reply, command, hookimpl


@command("torchversion", "Which torch this is")
async def torchversion(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(torch.__version__)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(torchversion)
