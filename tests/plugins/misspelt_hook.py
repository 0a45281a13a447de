from collections.abc import Callable

from bot import Command, hookimpl


@hookimpl
def register_comands(register: Callable[[Command], None]) -> None:  # one "m": never called
    pass
