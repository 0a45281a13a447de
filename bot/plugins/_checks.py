"""Static checks of what a plugin contributes, done without running its worker code.

Every :class:`~bot.inference.protocol.Request` type a plugin defines
(:func:`request_types`) must name a task that exists, found by reading the task's
source over ``ast`` rather than importing it (:func:`task_problem`), define
``texts()`` and use a registered model role (:func:`request_problem`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from bot.inference import protocol
from bot.inference.protocol import Request
from bot.plugins._containment import _short_error
from bot.topics import ModelRole


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
