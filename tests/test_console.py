"""The console's tab completion."""

from __future__ import annotations

from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from bot.frontends.console import CommandCompleter


def complete(app, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    completer = CommandCompleter(app.registry.commands)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_completes_commands_then_options(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    assert complete(app, "/ne") == ["/nexttoken "]
    assert "/help " in complete(app, "/")
    assert complete(app, "/nexttoken ") == ["prompt:", "k:", "temperature:"]
    assert complete(app, "/nexttoken prompt:hi t") == ["temperature:"]
    assert complete(app, "/nexttoken prompt:hi k:3 ") == ["temperature:"]
    assert complete(app, "/unknown ") == []
