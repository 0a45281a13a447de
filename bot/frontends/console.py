"""``lmbot console``: type commands as on Discord, with history and tab completion."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory

from bot.app import App
from bot.commands import Button, Command
from bot.parsing import UsageError
from bot.render import button_line, render_text, save_reply_images

BANNER = "lmbot console. Type /help for the commands, Tab to complete, Ctrl-D to quit."


class CommandCompleter(Completer):
    """Completes ``/command`` names, then that command's ``option:`` names and choices."""

    def __init__(self, commands: dict[str, Command]) -> None:
        self.commands = commands

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if " " not in text:
            if text.startswith("/") or not text:
                for name in sorted(self.commands):
                    if f"/{name}".startswith(text or "/"):
                        yield Completion(
                            f"/{name} ", start_position=-len(text), display_meta=self.commands[name].description
                        )
            return
        cmd = self.commands.get(text.split(" ", 1)[0].lstrip("/"))
        if cmd is None:
            return
        word = document.get_word_before_cursor(WORD=True)
        if ":" in word:
            key, _, partial = word.partition(":")
            option = cmd.option(key)
            for choice in (option.choices or ()) if option else ():
                if str(choice).startswith(partial):
                    yield Completion(str(choice), start_position=-len(partial))
            return
        given = {w.split(":", 1)[0] for w in text.split() if ":" in w}
        for option in cmd.options:
            if option.name.startswith(word) and option.name not in given:
                yield Completion(f"{option.name}:", start_position=-len(word), display_meta=option.description)


def _history(app: App) -> FileHistory | InMemoryHistory:
    try:
        path = app.config.cache_dir / "console_history"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


class Console:
    """Answers lines one by one; a bare number presses that button of the last reply."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.buttons: list[Button] = []

    async def answer(self, line: str) -> None:
        line = line.strip()
        if line.isdecimal() and self.buttons:
            if not 1 <= int(line) <= len(self.buttons):
                print(f"There is no button {line}; the last reply has {len(self.buttons)}.")
                return
            button = self.buttons[int(line) - 1]
            print(f"→ {button_line(button)}")
            reply = await self.app.execute_text(button.command, {button.option: button.value}, self.app.local_context())
            name = button.command
        else:
            try:
                reply = await self.app.execute_line(line)
            except UsageError as exc:
                print(str(exc))
                return
            name = line.split()[0].lstrip("/")
        self.buttons = list(reply.buttons)
        paths, note = save_reply_images(reply, Path(self.app.config.bot.output_dir), name)
        print(render_text(reply, paths, colour=sys.stdout.isatty(), numbered=True))
        if note:
            print(note, file=sys.stderr)


async def run_console(app: App) -> int:
    interactive = sys.stdin.isatty()
    console = Console(app)
    try:
        if not interactive:
            # Piped input (scripts, tests): one command per line, no prompt.
            for line in sys.stdin:
                if line.strip():
                    await console.answer(line)
            return 0
        print(BANNER)
        session: PromptSession[str] = PromptSession(
            history=_history(app), completer=CommandCompleter(app.registry.commands), complete_while_typing=False
        )
        while True:
            try:
                line = await session.prompt_async("lmbot> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if line.strip() in ("exit", "quit", "/exit", "/quit"):
                return 0
            if line.strip():
                await console.answer(line)
    finally:
        await app.close()
