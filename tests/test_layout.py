"""The process boundary, read from the source: no bot-side module imports worker-side code or torch.

lmbot's main rule is that models never run in the bot process. The layout shows it:

* **worker side**, ``bot/worker/``: the only code that may import torch and the other heavy
  libraries (:data:`bot.plugins.HEAVY_MODULES`); it runs in model workers and Ray replicas;
* **test kit**, ``bot/testing/``: runs in test processes, which may hold torch (it builds tiny
  models with it), never in the bot process; its modules other than ``bot.testing.models``
  import torch only inside functions, since pytest loads the kit in every session;
* **bot side**, everything else under ``bot/``: it must not import a worker-side module, the
  test kit or a heavy library, at any level (inside functions too, and through
  ``importlib.import_module("...")``).

The bot process has to *name* the code it starts on the other side of the boundary; those
places are :data:`BOUNDARY_CROSSINGS`, each inside a function, and importing their target
loads nothing heavy. ``tests/test_plugins.py`` checks the same rule at run time: a bot that
loads every built-in plugin and answers commands through a worker has no torch in
``sys.modules``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import bot.plugins

REPO = Path(__file__).resolve().parent.parent
WORKER = "bot.worker"
TEST_KIT = "bot.testing"
TEST_MODELS = "bot.testing.models"  # builds the tiny test models with torch: the kit's one heavy module

# (bot-side module, worker-side module it names) -> why it must. Nothing else crosses.
BOUNDARY_CROSSINGS: dict[tuple[str, str], str] = {
    ("bot.inference.local", "bot.worker.process"): (
        "LocalInferenceClient._spawn gives the worker's main() to multiprocessing as the new "
        "process's target; the parent must name it"
    ),
    ("bot.inference.ray_backend", "bot.worker.ray_replica"): (
        "RayInferenceClient deploys RoleServer: serve.deployment takes the class itself"
    ),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the dotted name imported
    line: int
    in_function: bool


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """``from ..x import y`` inside ``module`` -> the absolute dotted name of ``..x``."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import in a file, at any depth: statements, and ``importlib.import_module("...")``."""
    module = module_name(root, path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node.level, node.module)
            found.append(Import(module, source, node.lineno, in_function))
            # ``from bot import worker`` imports the module bot.worker
            found.extend(Import(module, f"{source}.{alias.name}", node.lineno, in_function) for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(module, node.args[0].value, node.lineno, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def boundary_violations(
    root: Path, heavy: frozenset[str], crossings: dict[tuple[str, str], str]
) -> tuple[list[str], set[tuple[str, str]]]:
    """The imports under ``root/bot`` that break the boundary, and the crossings seen."""
    problems: list[str] = []
    crossed: set[tuple[str, str]] = set()
    for path in sorted((root / "bot").rglob("*.py")):
        module = module_name(root, path)
        where = path.relative_to(root)
        if _within(module, WORKER) or module == TEST_MODELS:
            continue  # may import anything
        in_kit = _within(module, TEST_KIT)
        for found in imports_of(root, path):
            target, at = found.target, f"{where}:{found.line}"
            if target.partition(".")[0] in heavy and (not in_kit or not found.in_function):
                problems.append(f"{at} imports {target} (a heavy library: worker side only)")
            elif _within(target, WORKER) and target != WORKER and not in_kit:
                crossing = next((c for c in crossings if c[0] == module and _within(target, c[1])), None)
                if crossing and found.in_function:
                    crossed.add(crossing)
                else:
                    problems.append(f"{at} imports {target} (worker-side code)")
            elif _within(target, WORKER) and target != WORKER and not found.in_function:
                problems.append(f"{at} imports {target} at module level (the kit loads worker code lazily)")
            elif _within(target, TEST_KIT) and not in_kit:
                problems.append(f"{at} imports {target} (the test kit)")
            elif target == TEST_MODELS and not found.in_function:
                problems.append(f"{at} imports {target} at module level (it imports torch)")
    # One line per import statement (``from bot.worker.x import y`` names bot.worker.x and bot.worker.x.y).
    unique = {problem.partition(" imports ")[0]: problem for problem in reversed(problems)}
    return sorted(unique.values(), key=problems.index), crossed


def module_level_heavy(root: Path, module: str, heavy: frozenset[str], seen: set[str] | None = None) -> list[str]:
    """Heavy libraries that importing ``module`` loads, following the repository's own modules."""
    seen = set() if seen is None else seen
    if module in seen:
        return []
    seen.add(module)
    base = root.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.exists():
        return []
    pulled: list[str] = []
    for found in imports_of(root, path):
        if found.in_function:
            continue
        if found.target.partition(".")[0] in heavy:
            pulled.append(f"{module} -> {found.target}")
        elif found.target.partition(".")[0] in ("bot", "plugins"):
            pulled += module_level_heavy(root, found.target, heavy, seen)
    return pulled


# --------------------------------------------------------------------------- the real tree


def test_no_bot_side_module_imports_worker_side_code_or_a_heavy_library() -> None:
    problems, crossed = boundary_violations(REPO, bot.plugins.HEAVY_MODULES, BOUNDARY_CROSSINGS)
    assert problems == []
    # Every declared crossing is still needed (the list cannot silently outgrow the code).
    assert crossed == set(BOUNDARY_CROSSINGS)


def test_the_worker_side_folder_holds_the_modules_that_import_torch() -> None:
    """The layout is real: torch is imported in bot/worker/ (and the test models), nowhere else in bot/."""
    users = set()
    for path in (REPO / "bot").rglob("*.py"):
        if any(found.target.partition(".")[0] == "torch" for found in imports_of(REPO, path)):
            users.add(module_name(REPO, path))
    assert {"bot.worker.tasks", "bot.worker.loading", "bot.worker.engines", "bot.worker.process"} <= users
    assert {m for m in users if not _within(m, WORKER)} == {TEST_MODELS}


@pytest.mark.parametrize("module", sorted({target for _, target in BOUNDARY_CROSSINGS} | {WORKER}))
def test_naming_a_crossing_target_loads_nothing_heavy(module: str) -> None:
    assert module_level_heavy(REPO, module, bot.plugins.HEAVY_MODULES) == []


def test_the_test_kits_entry_modules_load_nothing_heavy() -> None:
    """pytest loads the kit's plugin in every session (third-party plugins' too)."""
    for module in ("bot.testing", "bot.testing.pytest_plugin"):
        assert module_level_heavy(REPO, module, bot.plugins.HEAVY_MODULES) == []


# --------------------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


FAKE_TREE = {
    "bot/__init__.py": "",
    "bot/errors.py": "class UserError(Exception): ...\n",
    "bot/worker/__init__.py": "",
    "bot/worker/model.py": "import torch\nfrom bot.errors import UserError\n",
    "bot/testing/__init__.py": "def models():\n    from bot.testing import models\n    return models\n",
    "bot/testing/models.py": "import torch\n",
    "bot/fine.py": "import os\nfrom bot.errors import UserError\nfrom . import errors\nimport bot.worker\n",
    "bot/spawn.py": "def start():\n    from bot.worker import model\n    return model\n",
}


def _problems(root: Path, crossings: dict[tuple[str, str], str] | None = None) -> list[str]:
    problems, _ = boundary_violations(root, frozenset({"torch", "transformers"}), crossings or {})
    return problems


def test_the_checker_accepts_a_clean_tree_and_a_declared_crossing(tmp_path: Path) -> None:
    root = _tree(tmp_path, FAKE_TREE)
    crossing = {("bot.spawn", "bot.worker.model"): "starts the worker"}
    problems, crossed = boundary_violations(root, frozenset({"torch"}), crossing)
    assert (problems, crossed) == ([], {("bot.spawn", "bot.worker.model")})
    # Undeclared, the same import is a violation.
    assert _problems(root) == ["bot/spawn.py:2 imports bot.worker.model (worker-side code)"]


@pytest.mark.parametrize(
    ("planted", "said"),
    [
        ("import torch\n", "bot/planted.py:1 imports torch (a heavy library: worker side only)"),
        ("def f():\n    import transformers.models\n", "bot/planted.py:2 imports transformers.models (a heavy"),
        ("from bot.worker.model import x\n", "bot/planted.py:1 imports bot.worker.model (worker-side code)"),
        ("from bot import worker\nfrom .worker import model\n", "bot/planted.py:2 imports bot.worker.model (worker"),
        ("class C:\n    def m(self):\n        from .worker import model\n", "bot/planted.py:3 imports bot.worker.m"),
        ("import importlib\nimportlib.import_module('bot.worker.model')\n", "bot/planted.py:2 imports bot.worker.m"),
        ("def f():\n    from bot.testing import models\n", "bot/planted.py:2 imports bot.testing (the test kit)"),
        ("def f():\n    from bot.spawn import start\n    from bot.worker import model\n", "bot/planted.py:3 imports"),
    ],
)
def test_the_checker_finds_a_planted_violation(tmp_path: Path, planted: str, said: str) -> None:
    root = _tree(tmp_path, {**FAKE_TREE, "bot/planted.py": planted})
    crossing = {("bot.spawn", "bot.worker.model"): "starts the worker"}  # declared for bot.spawn only
    problems = [p for p in _problems(root, crossing) if p.startswith("bot/planted.py")]
    assert len(problems) == 1 and problems[0].startswith(said), problems


def test_the_checker_finds_a_crossing_at_module_level_and_heavy_code_in_the_kit(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            **FAKE_TREE,
            "bot/spawn.py": "from bot.worker import model\n",
            "bot/testing/pytest_plugin.py": "import torch\nfrom bot.worker import model\n",
        },
    )
    assert _problems(root, {("bot.spawn", "bot.worker.model"): "starts the worker"}) == [
        "bot/spawn.py:1 imports bot.worker.model (worker-side code)",
        "bot/testing/pytest_plugin.py:1 imports torch (a heavy library: worker side only)",
        "bot/testing/pytest_plugin.py:2 imports bot.worker.model at module level (the kit loads worker code lazily)",
    ]
    assert module_level_heavy(root, "bot.testing.pytest_plugin", frozenset({"torch"})) == [
        "bot.testing.pytest_plugin -> torch",
        "bot.worker.model -> torch",
    ]
