"""Shared fixtures: lmbot's own tests build on the plugin testing kit (bot.testing), so the
tiny models, the converted SmolLM2 and the apps are the ones plugin authors get."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from bot.app import App
from bot.config import Config
from bot.inference.client import LocalInferenceClient
from bot.inference.registry import BUILTIN_ROLES
from bot.testing import TestModels, make_app
from bot.testing import make_config as kit_config
from tests.loopback_only import sitecustomize as _loopback_only  # noqa: F401  (import = the guard)

# The kit's fixtures (lmbot_app, lmbot_models, ...); a no-op when the pytest11 entry point
# already loaded them under this name.
pytest_plugins = ["bot.testing.pytest_plugin"]

# No test may reach the network: the hub is "offline" for every test and every
# worker process they start (workers inherit the environment), and the import of
# tests.loopback_only above fails any connection to a host other than loopback.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
LOOPBACK_ONLY = str(Path(__file__).parent / "loopback_only")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LOOPBACK_ONLY, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `lmbot ask` run by a test answers in its own process and leaves no warm lmbot behind
# (tests/test_ask_warm.py turns it on where it is the subject).
os.environ["LMBOT_ASK_KEEP_ALIVE_S"] = "0"

ROLES = {r.name: r for r in BUILTIN_ROLES}

# Property-based tests: a fixed seed by default, so a clean checkout is green or red the same
# way every time; `HYPOTHESIS_PROFILE=fuzz python -m pytest -k "hypothesis or arbitrary"` runs
# a long random search instead (see README, Tests).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=4000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FUZZ_FACTOR = 40 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1


def examples(n: int) -> int:
    """``n`` property examples in CI, many more in the fuzz profile."""
    return n * FUZZ_FACTOR


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker's temporary folders under a short root of its own.

    xdist puts each worker's under ``.../pytest-N/popen-gwN/``; the warm lmbot's socket in a
    test's folder would then pass the 108 bytes a Unix socket's path may have."""
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        config.option.basetemp = tempfile.mkdtemp(prefix=f"lmbot-{worker['workerid']}-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is not None and config.option.basetemp:
        shutil.rmtree(config.option.basetemp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_installed_plugins(lmbot_ignore_installed_plugins: None) -> None:
    """The suite tests lmbot, not whatever plugins the environment has installed."""


@pytest.fixture(scope="session")
def cache_dir(lmbot_cache_dir: Path) -> Path:
    return lmbot_cache_dir


@pytest.fixture(scope="session")
def tiny_gpt2(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_gpt2


@pytest.fixture(scope="session")
def tiny_llama(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_llama


@pytest.fixture(scope="session")
def tiny_bert_mlm(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_bert_mlm


@pytest.fixture(scope="session")
def tiny_bert_nsp(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_bert_nsp


@pytest.fixture(scope="session")
def tiny_classifier(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_classifier


@pytest.fixture(scope="session")
def tiny_t5(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_t5


@pytest.fixture(scope="session")
def smollm_dir(lmbot_models: TestModels) -> Path:
    """The packaged SmolLM2 converted once to safetensors (the product's own code path).

    Kept between runs in ``LMBOT_TEST_MODEL_CACHE`` (default ``~/.cache/lmbot/test-models``).
    """
    return lmbot_models.smollm2


def make_config(
    cache_dir: Path,
    models: dict[str, Path | str] | None = None,
    plugin_options: dict[str, dict[str, Any]] | None = None,
    **inference: Any,
) -> Config:
    """The kit's test config with every built-in loaded: quiz scores next to the test's cache."""
    options = {"study": {"quiz_db": str(cache_dir / "quiz.sqlite3")}, **(plugin_options or {})}
    return kit_config(cache_dir, models, options, **inference)


@pytest.fixture
def config_factory(cache_dir: Path):  # type: ignore[no-untyped-def]
    def build(models: dict[str, Path | str] | None = None, **inference: Any) -> Config:
        return make_config(cache_dir, models, **inference)

    return build


@pytest.fixture(scope="session")
async def causal_service(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[LocalInferenceClient]:
    """One service on the tiny GPT-2, shared by tests that only read from it."""
    client = LocalInferenceClient(make_config(cache_dir, {"causal_lm": tiny_gpt2}), ROLES)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def app_factory(cache_dir: Path) -> AsyncIterator[Any]:
    """Apps with every built-in plugin (and only those, unless a test adds some)."""
    apps: list[App] = []

    def build(
        models: dict[str, Path | str] | None = None,
        plugins: list[tuple[object, str]] = (),  # type: ignore[assignment]
        *,
        builtins: bool = True,
        entry_points: bool = False,
    ) -> App:
        if entry_points:
            app: App = App(make_config(cache_dir, models), extra_plugins=plugins, builtins=builtins)
        else:
            app = make_app(*plugins, cache_dir=cache_dir, models=models, builtins=builtins)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.close()


# Skips that hide a missing service: reported always (pyproject's addopts has -rs), and failures
# in CI (CI=true, as CI services set it), where PostgreSQL and Ray must be present. .ci/run
# stays the README's test command; this is how it makes them mandatory.
MANDATORY_IN_CI = ("postgres", "ray")


def mandatory_skip(where: str, reason: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether a skip raised at ``where`` for ``reason`` must fail this run instead."""
    if environ.get("CI", "").lower() not in ("true", "1"):
        return False
    text = f"{where} {reason}".lower()
    return any(word in text for word in MANDATORY_IN_CI)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and not hasattr(report, "wasxfail"):
        where, _, reason = report.longrepr
        if mandatory_skip(str(where), str(reason)):
            report.outcome = "failed"
            report.longrepr = f"skipped, but CI makes the PostgreSQL and Ray tests mandatory: {reason}"


# The fast tier is `pytest -m "not slow"` (docs/testing.md). These tests take over about 5 s
# each alone on a 2-core machine (measured with --durations): nested pytest sessions, the
# fault benchmark, workers crashed, stopped or restarted, subprocess CLIs, real Discord
# clients. A file name marks all of its tests; a test's name (without parameters), that test.
SLOW: frozenset[str] = frozenset()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if path in SLOW or f"{path}::{name.split('[')[0]}" in SLOW:
            item.add_marker(pytest.mark.slow)
