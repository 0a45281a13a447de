import time
from collections.abc import Callable

from bot import Command, hookimpl


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    time.sleep(3600)
