"""Containment of plugin code: a plugin cannot stop, hang or bloat the bot process.

Its import and its register hooks run through :func:`run_limited` (any exception,
``sys.exit()`` and ``KeyboardInterrupt`` included, and a time limit per plugin,
:data:`LOAD_TIME_LIMIT_S`); :func:`heavy_import_problem` refuses a plugin that pulls
torch or another heavy ML library (:data:`HEAVY_MODULES`) into the bot process.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

# The top-level package of lmbot's built-in plugins (``plugins/``; this package, ``bot.plugins``,
# is the host that loads them).
BUILTIN_PACKAGE = "plugins"
# A plugin's import, and then its registration hooks, must each finish within this many
# seconds; past it the plugin is skipped and the bot starts without it.
LOAD_TIME_LIMIT_S = 30.0
# Libraries that only model workers may import: each costs the bot process hundreds of
# MB and seconds of start-up, and a model run in the bot process would block every user.
HEAVY_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "tensorflow",
        "jax",
        "flax",
        "keras",
        "peft",
        "sentence_transformers",
        "accelerate",
        "sklearn",
        "onnxruntime",
        "torchvision",
        "torchaudio",
        "datasets",
        "diffusers",
        "vllm",
        "llama_cpp",
    }
)


class PluginLoadError(Exception):
    """A plugin broke a rule of the plugin API; the message says which."""


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, PluginLoadError):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}): the plugin tried to exit the bot"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt raised by the plugin"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_limited(fn: Callable[[], Any], what: str, limit_s: float) -> Any:
    """Run plugin code in a thread, so that neither an exit nor a hang reaches the caller.

    Any exception comes back as it was; ``SystemExit``, ``KeyboardInterrupt`` and other
    ``BaseException``s come back as :class:`PluginLoadError`; a call still running after
    ``limit_s`` is abandoned (the daemon thread cannot keep the process alive).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # contained here: plugin code must not end the bot
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"lmbot-plugin {what}", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        raise PluginLoadError(f"took longer than {limit_s:g} s to load ({what}); skipped so the bot could start")
    error = outcome.get("error")
    if error is None:
        return outcome.get("value")
    if isinstance(error, Exception):
        raise error
    raise PluginLoadError(_short_error(error)) from error


# --------------------------------------------------------------------------- heavy imports


def _heavy_name(value: Any) -> str | None:
    """The heavy library a module-level value comes from, if any."""
    if isinstance(value, ModuleType):
        name: Any = value.__name__
    else:
        try:
            name = getattr(value, "__module__", None)
        except Exception:  # odd objects may raise on attribute access
            return None
    if not isinstance(name, str):
        return None
    top = name.partition(".")[0]
    return top if top in HEAVY_MODULES else None


def _own_modules(plugin: Any, new_modules: Iterable[str]) -> list[Any]:
    """The plugin's module and the modules of its own package that its import loaded."""
    modules: list[Any] = [plugin]
    name = getattr(plugin, "__name__", "")
    if isinstance(plugin, ModuleType) and name:
        top = name.partition(".")[0]
        # Built-ins share the "plugins" package: there, only the module itself is the plugin's.
        prefix = f"{name}." if top == BUILTIN_PACKAGE else f"{top}."
        modules += [sys.modules[m] for m in sorted(new_modules) if m.startswith(prefix) and m in sys.modules]
    return modules


def heavy_import_problem(plugin: Any, modules_before: set[str], when: str = "importing it") -> str | None:
    """Why loading ``plugin`` breaks the no-torch-in-the-bot-process rule, or None.

    ``when`` says what ran since ``modules_before`` was taken (its import, or its hooks).
    """
    new_modules = set(sys.modules) - modules_before
    pulled = sorted({m.partition(".")[0] for m in new_modules} & HEAVY_MODULES)
    if pulled:
        return (
            f"{when} loaded {', '.join(pulled)} into the bot process; "
            "import heavy libraries inside the worker task function instead"
        )
    # The library may already be loaded (a test process, another plugin): look at what the
    # plugin's own modules hold at module level.
    for module in _own_modules(plugin, new_modules):
        for value in list(getattr(module, "__dict__", {}).values()):
            heavy = _heavy_name(value)
            if heavy:
                where = getattr(module, "__name__", "the plugin")
                return (
                    f"{where} imports {heavy} at module level, which loads it into the bot process; "
                    "import it inside the worker task function instead"
                )
    return None
