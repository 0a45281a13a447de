"""Loading plugins: the built-ins in ``plugins/`` and the ``lmbot`` entry-point group.

A plugin that breaks a rule is recorded with one clear error and skipped; every
other plugin keeps working (``/plugins`` and ``lmbot plugins`` show the error).
What is checked when a plugin loads, so that mistakes show up at start-up and
not on a student's first use:

* its import and its hooks are contained: any exception, ``sys.exit()`` and
  ``KeyboardInterrupt`` included, and a time limit per plugin
  (:data:`LOAD_TIME_LIMIT_S`), so one plugin cannot stop the bot from starting;
* it does not pull torch (or another heavy ML library, :data:`HEAVY_MODULES`)
  into the bot process: models run in worker processes only;
* every hook it implements exists (a misspelt hook name would never be called);
* every :class:`~bot.inference.protocol.Request` type it defines names a task
  that exists (found without importing it), defines ``texts()`` and uses a
  registered model role;
* every command's handler takes exactly its options (checked by
  :class:`~bot.commands.Command` itself).

A plugin that claims a name already taken (a command name, or the plugin's own
name) is skipped with a load error naming the plugin that holds it: the plugins
loaded first keep theirs (the core, then the built-ins, then installed plugins
in order of their names), and one plugin cannot stop the bot from starting. The plugin options in
``[plugins.options.<plugin>]`` are checked against what each plugin declares
with ``register_options`` (:func:`check_plugin_config`).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import pkgutil
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import pluggy

from bot import hookspecs
from bot.commands import Command, Context, Option
from bot.config import Config, ConfigError, shown_key, value_shown
from bot.errors import OptionError
from bot.inference import protocol
from bot.inference.protocol import Request
from bot.topics import ModelRole, Topic

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmbot"
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


class PluginConflict(Exception):
    """Two plugins claim one name (kept for callers that catch it; the host now skips the later plugin)."""


class PluginLoadError(Exception):
    """A plugin broke a rule of the plugin API; the message says which."""


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


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, PluginLoadError):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}): the plugin tried to exit the bot"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt raised by the plugin"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Installed plugins this process skips, one ``name=value`` per line. The testing kit sets it so
# that an ``lmbot`` process a test starts sees the plugins the test's own apps see.
IGNORE_ENV = "LMBOT_IGNORE_ENTRY_POINTS"


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed plugins: the ``lmbot`` entry-point group, less those :data:`IGNORE_ENV` names."""
    ignored = set(os.environ.get(IGNORE_ENV, "").splitlines())
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if f"{ep.name}={ep.value}" not in ignored]


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


# --------------------------------------------------------------------------- worker tasks


@functools.cache
def builtin_tasks() -> tuple[str, ...]:
    """Names of the tasks the service itself provides (found without importing torch)."""
    names = {
        value.task
        for value in vars(protocol).values()
        if isinstance(value, type) and issubclass(value, Request) and "task" in value.__dict__
    }
    return tuple(sorted(names))


def task_name(function: Callable[..., Any]) -> str:
    """The ``"package.module:function"`` name of a module-level worker task function.

    Use it as a request's ``task``: ``task: ClassVar[str] = task_name(count_letters)``.
    The function's module must import torch (and any model library) inside the function,
    since the bot process imports the module to read this name.
    """
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not module or not callable(function) or "." in qualname or "<" in qualname:
        raise ValueError(f"a worker task must be a function defined at module level, not {function!r}")
    if module == "__main__":
        raise ValueError("a worker task cannot live in __main__: worker processes import it by module name")
    return f"{module}:{qualname}"


def _positional_count(args: ast.arguments) -> tuple[int, bool]:
    return len(args.posonlyargs) + len(args.args), args.vararg is not None


def _signature_problem(task: str, positional: int, has_varargs: bool) -> str | None:
    if positional < 3 and not has_varargs:
        return f"names the task {task!r}, whose function must take (model, tokenizer, batch)"
    return None


def _top_level_definition(tree: ast.Module, name: str) -> ast.AST | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return node
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
        if isinstance(node, ast.Import | ast.ImportFrom) and any(
            (alias.asname or alias.name.partition(".")[0]) == name for alias in node.names
        ):
            return node
    return None


def task_problem(task: Any) -> str | None:
    """Why ``task`` names no worker task, or None when it does.

    A built-in task, or ``"package.module:function"``: a module that is already
    imported is looked into; any other is found and its source read without
    running it, so that checking a task never imports torch into the bot process.
    """
    if not isinstance(task, str) or not task:
        return 'names no task: set `task: ClassVar[str] = "package.module:function"` (or a built-in task)'
    if task in builtin_tasks():
        return None
    module_name, sep, attr = task.partition(":")
    if not sep:
        return (
            f"names the unknown task {task!r}: a built-in task is one of {', '.join(builtin_tasks())}; "
            'a task of your own is "package.module:function"'
        )
    if not module_name or not attr.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        return f'names the task {task!r}, which is not of the form "package.module:function"'
    module = sys.modules.get(module_name)
    if module is not None:
        function = getattr(module, attr, None)
        if function is None:
            return f"names the task {task!r}, but {module_name} has no {attr}"
        if not callable(function):
            return f"names the task {task!r}, but {module_name}.{attr} is not a function"
        if inspect.iscoroutinefunction(function):
            return f"names the task {task!r}, which is async; a worker task is a plain function"
        try:
            params = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            return None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
        return _signature_problem(task, len(positional), varargs)
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        return f"names the task {task!r}, but its module cannot be found ({_short_error(exc)})"
    if spec is None:
        return f"names the task {task!r}, but there is no module named {module_name}"
    loader = spec.loader
    get_source = getattr(loader, "get_source", None)
    try:
        source = get_source(module_name) if get_source is not None else None
    except (ImportError, OSError):
        source = None
    if source is None:
        return None  # a compiled module: it cannot be looked into without running it
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return f"names the task {task!r}, but {module_name} has a syntax error (line {exc.lineno})"
    node = _top_level_definition(tree, attr)
    if node is None:
        return f"names the task {task!r}, but {module_name} defines no {attr}"
    if isinstance(node, ast.AsyncFunctionDef):
        return f"names the task {task!r}, which is async; a worker task is a plain function"
    if isinstance(node, ast.FunctionDef):
        return _signature_problem(task, *_positional_count(node.args))
    return None


def request_types(plugin: Any) -> list[type[Request]]:
    """The request types a plugin defines (not the built-in ones it imports from ``bot``)."""
    modules: list[Any] = [plugin]
    name = getattr(plugin, "__name__", "")
    if isinstance(plugin, ModuleType) and hasattr(plugin, "__path__"):
        modules += [m for key, m in list(sys.modules.items()) if key.startswith(f"{name}.")]
    found: dict[str, type[Request]] = {}
    for module in modules:
        for value in list(getattr(module, "__dict__", {}).values()):
            if (
                isinstance(value, type)
                and issubclass(value, Request)
                and value is not Request
                and not value.__module__.startswith("bot.")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    # A base class that the plugin's other requests build on need not name a task itself.
    bases = {base for cls in found.values() for base in cls.__mro__[1:]}
    return [cls for key, cls in sorted(found.items()) if cls not in bases]


def request_problem(cls: type[Request], roles: Mapping[str, ModelRole]) -> str | None:
    """Why a request type cannot be served, or None."""
    problem = task_problem(getattr(cls, "task", None))
    if problem:
        return f"request {cls.__name__} {problem}"
    if getattr(cls, "texts", None) is Request.texts:
        return (
            f"request {cls.__name__} must define texts(): the strings its task tokenizes (return [] when it reads none)"
        )
    role = getattr(cls, "role", None)
    if role is not None and role not in roles:
        known = ", ".join(sorted(roles))
        return (
            f"request {cls.__name__} uses the model role {role!r}, which no plugin registers "
            f"(known roles: {known}; add one with register_models)"
        )
    return None


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
        return LOAD_TIME_LIMIT_S if self._time_limit_s is None else self._time_limit_s

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
