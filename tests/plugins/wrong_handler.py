from collections.abc import Callable

from bot import Command, Reply, Text, command, hookimpl


# The option is `prompt`, the handler's parameter `text`: a mistake the host reports at load.
@command("mismatch", "Option and parameter disagree", options=[Text("prompt", "Some text")])
async def mismatch(ctx, text: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(text)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(mismatch)
