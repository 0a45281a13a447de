"""The plugin host: finds and loads plugins, builds the registry, checks their options.

:class:`PluginHost` owns the pluggy manager; it loads the built-ins and the ``lmbot``
entry-point group under the guards of :mod:`bot.plugins._containment`, then
:meth:`PluginHost.build_registry` collects each plugin's contributions apart, settles
claims on names (the plugin loaded first keeps a command or study card) and merges what
passed the checks of :mod:`bot.plugins._checks` into one :class:`Registry`.
:func:`check_plugin_config` checks ``[plugins]`` against what the plugins declare.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import pluggy

from bot import hookspecs
from bot.commands import Command, Context, Option
from bot.config import Config, ConfigError, shown_key, value_shown
from bot.errors import OptionError
from bot.plugins import _containment
from bot.plugins._checks import request_problem, request_types
from bot.plugins._containment import BUILTIN_PACKAGE, PluginLoadError, _short_error, heavy_import_problem, run_limited
from bot.topics import ModelRole, Topic

# The name operators and log filters have always known this logger by.
log = logging.getLogger("bot.plugins")

ENTRY_POINT_GROUP = "lmbot"


class PluginConflict(Exception):
    """Two plugins claim one name (kept for callers that catch it; the host now skips the later plugin)."""


@dataclass
class PluginRecord:
    """What ``/plugins`` shows about one plugin."""

    name: str
    source: str  # "builtin", "entry point <dist>", "core" or "test"
    version: str = ""
    module: str = ""  # what to re-import on reload; empty for plugins given as objects
    status: str = "loaded"  # loaded | disabled | failed
    error: str = ""  # why it failed; may name files on this host, so only owners see it
    commands: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Everything the loaded plugins registered, by name."""

    commands: dict[str, Command] = field(default_factory=dict)
    roles: dict[str, ModelRole] = field(default_factory=dict)
    topics: dict[str, Topic] = field(default_factory=dict)
    # plugin -> option name -> what ``[plugins.options.<plugin>]`` may set
    options: dict[str, dict[str, Option]] = field(default_factory=dict)
    # environment variables (``NAME``, or ``PREFIX*``) that replies depend on
    environment: set[str] = field(default_factory=set)


@dataclass
class _Contributions:
    commands: list[Command] = field(default_factory=list)
    roles: list[ModelRole] = field(default_factory=list)
    topics: list[Topic] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


def _core_version() -> str:
    from bot import __version__

    return __version__


# Installed plugins this process skips, one ``name=value`` per line. The testing kit sets it so
# that an ``lmbot`` process a test starts sees the plugins the test's own apps see.
IGNORE_ENV = "LMBOT_IGNORE_ENTRY_POINTS"


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed plugins: the ``lmbot`` entry-point group, less those :data:`IGNORE_ENV` names."""
    ignored = set(os.environ.get(IGNORE_ENV, "").splitlines())
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if f"{ep.name}={ep.value}" not in ignored]


# --------------------------------------------------------------------------- the host


class PluginHost:
    """Owns the pluggy manager and the registry built from it."""

    def __init__(
        self,
        *,
        disabled: Iterable[str] = (),
        builtin_roles: Iterable[ModelRole] = (),
        load_time_limit_s: float | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager("lmbot")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disabled)
        self.records: dict[str, PluginRecord] = {}
        self.builtin_roles = {role.name: role for role in builtin_roles}
        self._time_limit_s = load_time_limit_s

    @property
    def time_limit_s(self) -> float:
        return _containment.LOAD_TIME_LIMIT_S if self._time_limit_s is None else self._time_limit_s

    # ------------------------------------------------------------------ loading

    def load_builtins(self, package: str = BUILTIN_PACKAGE) -> None:
        try:
            pkg = importlib.import_module(package)
        except Exception as exc:  # the built-ins package itself is missing or broken
            log.exception("cannot import built-in plugin package %s", package)
            self.records[package] = PluginRecord(package, "builtin", status="failed", error=_short_error(exc))
            return
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            self._load(
                info.name,
                "builtin",
                functools.partial(importlib.import_module, f"{package}.{info.name}"),
                version=_core_version(),
                module=f"{package}.{info.name}",
            )

    def load_entry_points(self) -> None:
        # By name: when two installed plugins claim one command, which keeps it must not depend on
        # the order the environment happens to list them in.
        for ep in sorted(entry_points(), key=lambda ep: (ep.name, ep.value)):
            dist = ep.dist
            version = dist.version if dist is not None else ""
            source = f"entry point {dist.name}" if dist is not None else "entry point"
            self._load(ep.name, source, ep.load, version=version, module=ep.module)

    def add(self, plugin: Any, name: str, source: str = "test") -> None:
        """Register a plugin object (used by the core and by tests).

        A string is a module path, imported here under the same guards as any other
        plugin's import (and reloadable with /reload).
        """
        if isinstance(plugin, str):
            self._load(name, source, functools.partial(importlib.import_module, plugin), module=plugin)
        else:
            self._load(name, source, lambda: plugin)

    def remove(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.records.pop(name, None)

    def reload(self, name: str) -> PluginRecord:
        """Re-import a plugin's module and register it again (the registry must be rebuilt after)."""
        record = self.records.get(name)
        if record is None:
            raise KeyError(f"there is no plugin named {name!r}")
        if not record.module:
            raise ValueError(f"plugin {name!r} was not loaded from a module and cannot be reloaded")
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        del self.records[name]

        def reimport() -> Any:
            module = sys.modules.get(record.module)
            return importlib.reload(module) if module is not None else importlib.import_module(record.module)

        self._load(name, record.source, reimport, version=record.version, module=record.module)
        return self.records[name]

    def _fail(self, record: PluginRecord, exc: BaseException, when: str) -> None:
        record.status, record.error = "failed", _short_error(exc)
        # A traceback helps the plugin's author find an exception; a broken rule is said in full already.
        trace = exc if not isinstance(exc, PluginLoadError) or exc.__cause__ is not None else None
        log.error("plugin %s failed %s; skipping it: %s", record.name, when, record.error, exc_info=trace)

    def _load(self, name: str, source: str, importer: Callable[[], Any], version: str = "", module: str = "") -> None:
        if name in self.records:
            # The same name from two places (e.g. a pip plugin shadowing a built-in): the first keeps
            # it; the other is listed under a name that says where it came from, and skipped.
            taken = self.records[name]
            shown = _unused_name(f"{name} ({source})", self.records)
            record = PluginRecord(shown, source, version=version, module=module)
            self.records[shown] = record
            error = PluginLoadError(
                f"another plugin is already named {name!r} ({taken.source}); rename this one's entry point"
            )
            self._fail(record, error, "to load")
            return
        record = PluginRecord(name, source, version=version, module=module)
        self.records[name] = record
        if name in self.disabled:
            record.status = "disabled"
            return
        modules_before = set(sys.modules)
        try:
            plugin = run_limited(importer, "import", self.time_limit_s)
            heavy = heavy_import_problem(plugin, modules_before)
            if heavy:
                raise PluginLoadError(heavy)
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(record, exc, "to load")
            return
        unknown = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [] if not c.has_spec())
        if unknown:
            self.pm.unregister(plugin, name=name)
            known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
            error = PluginLoadError(f"implements unknown hook {unknown[0]!r} (the hooks are: {known})")
            self._fail(record, error, "to load")
            return
        if not record.version and isinstance(plugin, ModuleType):
            record.version = getattr(plugin, "__version__", "") or ""

    # ------------------------------------------------------------------ registration

    def build_registry(self) -> Registry:
        """Call every plugin's register hooks, one plugin at a time, then check what each gave.

        Each plugin's contributions are collected apart and only merged when all of its
        hooks succeeded and its request types check out, so a plugin that fails half way
        leaves nothing behind.
        """
        registry = Registry(roles=dict(self.builtin_roles))
        collected: dict[str, tuple[Any, _Contributions]] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            record = self.records.setdefault(name, PluginRecord(name, "test"))
            modules_before = set(sys.modules)
            try:
                contributions = run_limited(functools.partial(self._collect, name), "register hooks", self.time_limit_s)
                heavy = heavy_import_problem(plugin, modules_before, when="its register hooks")
                if heavy:
                    raise PluginLoadError(heavy)
            except Exception as exc:
                self._fail(record, exc, "while registering")
                self.pm.unregister(plugin, name=name)
                continue
            collected[name] = (plugin, contributions)

        # A plugin that claims a command name or a study card another plugin loaded before it
        # has is skipped whole; roles may come from any plugin, so requests are checked once the
        # plugins that stay are known. Skipping a plugin whose requests fail may free a name a
        # later plugin lost to it, hence the loop (it ends: each round removes a plugin).
        while True:
            winners, losers = _claims(collected)
            roles = dict(registry.roles)
            for name in winners:
                for role in collected[name][1].roles:
                    roles.setdefault(role.name, role)
            failing = {
                name: problems
                for name in winners
                if (problems := [p for cls in request_types(collected[name][0]) if (p := request_problem(cls, roles))])
            }
            if not failing:
                break
            for name, problems in failing.items():
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                self._fail(self.records[name], PluginLoadError(problems[0] + more), "its checks")
                self.pm.unregister(collected.pop(name)[0], name=name)
        for name, reason in losers.items():
            self._fail(self.records[name], PluginLoadError(reason), "its checks")
            self.pm.unregister(collected.pop(name)[0], name=name)

        for name, (_, contributions) in collected.items():
            for cmd in contributions.commands:
                registry.commands[cmd.name] = cmd
            for role in contributions.roles:
                registry.roles.setdefault(role.name, role)
            for topic in contributions.topics:
                registry.topics[topic.slug] = topic
            registry.environment.update(contributions.environment)
            if contributions.options:
                registry.options[name] = {option.name: option for option in contributions.options}
            self.records[name].commands = [c.name for c in contributions.commands]
        return registry

    def _collect(self, name: str) -> _Contributions:
        got = _Contributions()

        def add_command(cmd: Command) -> None:
            if not isinstance(cmd, Command):
                raise TypeError(f"register_commands expects a Command, got {type(cmd).__name__}")
            if any(c.name == cmd.name for c in got.commands):
                raise ValueError(f"command /{cmd.name} registered twice")
            got.commands.append(_with_plugin(cmd, name))

        def add_role(role: ModelRole | str) -> None:
            if isinstance(role, str):
                if role not in self.builtin_roles:
                    raise ValueError(f"unknown model role {role!r}; register a ModelRole to add one")
                role = self.builtin_roles[role]
            if not isinstance(role, ModelRole):
                raise TypeError(f"register_models expects a ModelRole or a role name, got {type(role).__name__}")
            got.roles.append(role)

        def add_topic(topic: Topic) -> None:
            if not isinstance(topic, Topic):
                raise TypeError(f"register_topics expects a Topic, got {type(topic).__name__}")
            got.topics.append(topic)

        def add_option(option: Option) -> None:
            if not isinstance(option, Option):
                raise TypeError(
                    f"register_options expects an option (Text, Integer, Number, Boolean), got {type(option).__name__}"
                )
            if any(o.name == option.name for o in got.options):
                raise ValueError(f"option {option.name!r} registered twice")
            if not option.required:
                option.check(option.default)  # a default that its own checks refuse is the author's mistake
            got.options.append(option)

        def add_environment(variable: str) -> None:
            if not isinstance(variable, str) or not _ENV_NAME.fullmatch(variable):
                raise ValueError(
                    f"register_environment expects a variable name or a prefix ending in '*', got {variable!r}"
                )
            got.environment.append(variable)

        for hook_name, register in (
            ("register_commands", add_command),
            ("register_environment", add_environment),
            ("register_models", add_role),
            ("register_topics", add_topic),
            ("register_options", add_option),
        ):
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name == name:
                    impl.function(register)
        return got


def _claims(collected: Mapping[str, tuple[Any, _Contributions]]) -> tuple[list[str], dict[str, str]]:
    """Which plugins keep their commands and study cards (in load order), and why each other one loses."""
    commands: dict[str, str] = {}
    topics: dict[str, str] = {}
    winners: list[str] = []
    losers: dict[str, str] = {}
    for name, (_, given) in collected.items():
        command_taken = next((c.name for c in given.commands if c.name in commands), None)
        topic_taken = next((t.slug for t in given.topics if t.slug in topics), None)
        if command_taken is not None:
            losers[name] = (
                f"its command /{command_taken} is already registered by plugin {commands[command_taken]!r}; "
                "rename the command, or disable one of the two ([plugins] disabled)"
            )
        elif topic_taken is not None:
            losers[name] = (
                f"its study card {topic_taken!r} is already registered by plugin {topics[topic_taken]!r}; "
                "give the Topic another slug, or disable one of the two ([plugins] disabled)"
            )
        else:
            winners.append(name)
            commands.update((c.name, name) for c in given.commands)
            topics.update((t.slug, name) for t in given.topics)
    return winners, losers


def _unused_name(wanted: str, taken: Mapping[str, Any]) -> str:
    name, n = wanted, 2
    while name in taken:
        name, n = f"{wanted} #{n}", n + 1
    return name


def _with_plugin(cmd: Command, plugin: str) -> Command:
    return replace(cmd, plugin=plugin)


# --------------------------------------------------------------------------- plugin options


def _reason(exc: OptionError, key: str) -> str:
    """An option check's message without its leading "`key` " and final full stop."""
    text = str(exc)
    prefix = f"`{key}` "
    return (text[len(prefix) :] if text.startswith(prefix) else text).rstrip(".")


def check_plugin_config(config: Config, host: PluginHost, registry: Registry) -> None:
    """The ``[plugins]`` section against what the loaded plugins declare (a ConfigError, exit 2).

    ``disabled`` may not name the core (that would remove /help and /plugins). Each
    ``[plugins.options.<plugin>]`` key must be one the plugin declared with
    ``register_options``, with a value its option accepts. Options of a plugin that
    failed to load, is disabled or is not installed cannot be checked and are left alone
    (the last with a warning in the log, in case the name is a typo).
    """
    source = config.path or "<config>"
    if "core" in config.plugins.disabled:
        raise ConfigError(f'{source}: `plugins.disabled`: "core" cannot be disabled (it provides /help and /plugins)')
    for name in config.plugins.disabled:
        if name not in host.records:  # a typo would leave the plugin on, silently
            known = ", ".join(sorted(n for n in host.records if n != "core"))
            raise ConfigError(f"{source}: `plugins.disabled`: no such plugin {value_shown(name)}; plugins: {known}")
    for plugin, values in config.plugins.options.items():
        record = host.records.get(plugin)
        if record is None:
            # One config may serve hosts with different plugins installed: said, not refused.
            known = ", ".join(sorted(n for n in host.records if n != "core"))
            log.warning("%s: [plugins.options.%s] names no plugin here (plugins: %s); ignored", source, plugin, known)
            continue
        if record.status != "loaded":
            continue
        declared = registry.options.get(plugin, {})
        for key, value in values.items():
            where = shown_key(f"plugins.options.{plugin}.{key}")
            option = declared.get(key)
            if option is None:
                takes = f"{plugin}'s options: {', '.join(sorted(declared))}" if declared else f"{plugin} has no options"
                raise ConfigError(f"{source}: unknown key `{where}` ({takes})")
            try:
                option.check(value)
            except OptionError as exc:
                raise ConfigError(f"{source}: `{where}`: {_reason(exc, key)} {value_shown(value)}") from None
    for plugin, declared in registry.options.items():
        values = config.plugins.options.get(plugin, {})
        for key, option in declared.items():
            if option.required and key not in values:
                raise ConfigError(f"{source}: `plugins.options.{plugin}.{key}` is required ({option.description})")


def plugin_options(ctx: Context, plugin: str) -> dict[str, Any]:
    """A plugin's ``[plugins.options.<plugin>]`` values, with its declared defaults filled in.

    The values were checked when the bot started (:func:`check_plugin_config`).
    """
    declared = ctx.app.registry.options.get(plugin)
    if declared is None:
        raise KeyError(f"plugin {plugin!r} declares no options (implement register_options)")
    given = ctx.config.plugins.options.get(plugin, {})
    return {key: option.check(given[key]) if key in given else option.default for key, option in declared.items()}
