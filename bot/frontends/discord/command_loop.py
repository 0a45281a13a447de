"""Commands off the Discord client's loop, so that they can never delay Discord's acknowledgements.

Discord drops an interaction that gets no first response within 3 s. The
discord.py client acknowledges (defers, or refuses at once) on its own loop;
:meth:`~bot.app.App.execute`, the core's commands and the inference client run
on this loop, in a thread of its own, and the client hands each command over
with ``run_coroutine_threadsafe``. Plugins' handlers run further away still, on
their own plugin's loop (:mod:`bot.plugin_loops`), so a handler that blocks
delays neither acknowledgements nor other plugins' answers. A watchdog thread
still watches this loop: code that blocks it is named in the log and in
``/plugins``.
"""

from __future__ import annotations

import logging
import threading
import time

from bot.app import App
from bot.plugin_loops import LoopThread

log = logging.getLogger(__name__)


class CommandLoop(LoopThread):
    """An event loop in a daemon thread, with a watchdog that measures how late it runs."""

    def __init__(self, app: App, *, stall_after_s: float = 1.0, probe_every_s: float = 0.1) -> None:
        super().__init__("lmbot-commands")
        self.app = app
        self.stall_after_s = stall_after_s
        self.probe_every_s = probe_every_s
        self._watchdog = threading.Thread(target=self._watch, name="lmbot-commands-watchdog", daemon=True)

    def start(self) -> None:
        if self._started:
            return
        super().start()
        self._watchdog.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread (a blocking call: run it with ``asyncio.to_thread``)."""
        super().stop(timeout)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout)

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        """Post a no-op to the loop every ``probe_every_s``; a late one means something blocks it."""
        while not self._stopping.wait(self.probe_every_s):
            posted = time.monotonic()
            ran = self.probe()
            if self.loop.is_closed():
                return
            if ran.wait(self.stall_after_s):
                continue
            command, plugin, where = self._culprit()
            log.warning(
                "%s has blocked the command loop for %.1f s (at %s): handlers must not block; "
                "use asyncio.to_thread for slow code. Acknowledgements are unaffected, other answers wait.",
                _name(command, plugin),
                time.monotonic() - posted,
                where,
            )
            while not ran.wait(0.1):
                if self._stopping.is_set():
                    return
            seconds = time.monotonic() - posted
            log.warning("%s blocked the command loop for %.1f s in all", _name(command, plugin), seconds)
            if plugin is not None and command is not None:
                self.app.record_stall(plugin, command, seconds)

    def _culprit(self) -> tuple[str | None, str | None, str]:
        """The command (and its plugin) whose code the loop's thread is running now, and where."""
        return self.app.culprit_on(self)


def _name(command: str | None, plugin: str | None) -> str:
    return f"/{command} (plugin {plugin})" if command else "code outside any command"
