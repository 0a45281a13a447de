"""Loading plugins: the built-ins in ``plugins/`` and the ``lmbot`` entry-point group.

A plugin that fails to import or to register is recorded with its error and
skipped; every other plugin keeps working (``/plugins`` and ``lmbot plugins``
show the error). Two plugins that claim the same command name are a startup
error naming both, because silently picking one would hide a real conflict.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import pluggy

from bot import hookspecs
from bot.commands import Command
from bot.topics import ModelRole, Topic

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmbot"
BUILTIN_PACKAGE = "plugins"


class PluginConflict(Exception):
    """Two plugins registered the same command name."""


@dataclass
class PluginRecord:
    """What ``/plugins`` shows about one plugin."""

    name: str
    source: str  # "builtin", "entry point <dist>", "core" or "test"
    version: str = ""
    module: str = ""  # what to re-import on reload; empty for plugins given as objects
    status: str = "loaded"  # loaded | disabled | failed
    error: str = ""
    commands: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """Everything the loaded plugins registered, by name."""

    commands: dict[str, Command] = field(default_factory=dict)
    roles: dict[str, ModelRole] = field(default_factory=dict)
    topics: dict[str, Topic] = field(default_factory=dict)


def _core_version() -> str:
    from bot import __version__

    return __version__


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginHost:
    """Owns the pluggy manager and the registry built from it."""

    def __init__(self, *, disabled: Iterable[str] = (), builtin_roles: Iterable[ModelRole] = ()) -> None:
        self.pm = pluggy.PluginManager("lmbot")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disabled)
        self.records: dict[str, PluginRecord] = {}
        self.builtin_roles = {role.name: role for role in builtin_roles}

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
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            version = dist.version if dist is not None else ""
            source = f"entry point {dist.name}" if dist is not None else "entry point"
            self._load(ep.name, source, ep.load, version=version, module=ep.module)

    def add(self, plugin: Any, name: str, source: str = "test") -> None:
        """Register an already-imported plugin object (used by the core and by tests)."""
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

    def _load(self, name: str, source: str, importer: Callable[[], Any], version: str = "", module: str = "") -> None:
        if name in self.records:
            # The same name from two places (e.g. a pip plugin shadowing a built-in) is a conflict.
            raise PluginConflict(f"two plugins are named {name!r} ({self.records[name].source} and {source})")
        record = PluginRecord(name, source, version=version, module=module)
        self.records[name] = record
        if name in self.disabled:
            record.status = "disabled"
            return
        try:
            plugin = importer()
            self.pm.register(plugin, name=name)
        except Exception as exc:
            log.exception("plugin %s failed to load; skipping it", name)
            record.status, record.error = "failed", _short_error(exc)
            return
        if not record.version and isinstance(plugin, ModuleType):
            record.version = getattr(plugin, "__version__", "") or ""

    # ------------------------------------------------------------------ registration

    def build_registry(self) -> Registry:
        """Call every plugin's register hooks, one plugin at a time.

        Each plugin's contributions are collected apart and only merged when all
        of its hooks succeeded, so a plugin that raises half way leaves nothing behind.
        """
        registry = Registry(roles=dict(self.builtin_roles))
        owners: dict[str, str] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            record = self.records.setdefault(name, PluginRecord(name, "test"))
            try:
                commands, roles, topics = self._collect(name)
            except Exception as exc:
                log.exception("plugin %s failed while registering; skipping it", name)
                record.status, record.error = "failed", _short_error(exc)
                self.pm.unregister(plugin, name=name)
                continue
            for cmd in commands:
                if cmd.name in owners:
                    raise PluginConflict(
                        f"command /{cmd.name} is registered by two plugins: {owners[cmd.name]!r} and {name!r}"
                    )
                owners[cmd.name] = name
                registry.commands[cmd.name] = cmd
            for role in roles:
                registry.roles.setdefault(role.name, role)
            for topic in topics:
                registry.topics[topic.slug] = topic
            record.commands = [c.name for c in commands]
        return registry

    def _collect(self, name: str) -> tuple[list[Command], list[ModelRole], list[Topic]]:
        commands: list[Command] = []
        roles: list[ModelRole] = []
        topics: list[Topic] = []

        def add_command(cmd: Command) -> None:
            if not isinstance(cmd, Command):
                raise TypeError(f"register_commands expects a Command, got {type(cmd).__name__}")
            if any(c.name == cmd.name for c in commands):
                raise ValueError(f"command /{cmd.name} registered twice")
            commands.append(_with_plugin(cmd, name))

        def add_role(role: ModelRole | str) -> None:
            if isinstance(role, str):
                if role not in self.builtin_roles:
                    raise ValueError(f"unknown model role {role!r}; register a ModelRole to add one")
                role = self.builtin_roles[role]
            if not isinstance(role, ModelRole):
                raise TypeError(f"register_models expects a ModelRole or a role name, got {type(role).__name__}")
            roles.append(role)

        def add_topic(topic: Topic) -> None:
            if not isinstance(topic, Topic):
                raise TypeError(f"register_topics expects a Topic, got {type(topic).__name__}")
            topics.append(topic)

        for hook_name, register in (
            ("register_commands", add_command),
            ("register_models", add_role),
            ("register_topics", add_topic),
        ):
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name == name:
                    impl.function(register)
        return commands, roles, topics


def _with_plugin(cmd: Command, plugin: str) -> Command:
    return replace(cmd, plugin=plugin)
