"""The pytest fixtures of the plugin testing kit (see :mod:`bot.testing`).

Loaded in every pytest session of an environment where lmbot is installed (entry
point ``bot.testing.pytest_plugin`` in the ``pytest11`` group); a project that
vendors lmbot can add ``pytest_plugins = ["bot.testing.pytest_plugin"]`` to its
top-level ``conftest.py`` instead. All fixture names start with ``lmbot_``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from bot.testing import (
    IsolatedApp,
    PluginSpec,
    TestModels,
    ignoring_plugins_installed_before,
    installed_entry_points,
    make_app,
)

try:
    import pytest_asyncio

    async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # without pytest-asyncio no async test runs anyway
    async_fixture = pytest.fixture

# The plugins installed in the environment, as pytest starts: before any test adds its own.
INSTALLED_AT_START = installed_entry_points()

AppFactory = Callable[..., IsolatedApp]


@pytest.fixture(scope="session")
def lmbot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``inference.cache_dir`` of the session's apps (tokenizer files, converted models)."""
    return tmp_path_factory.mktemp("lmbot-cache")


@pytest.fixture(scope="session")
def lmbot_models(tmp_path_factory: pytest.TempPathFactory, lmbot_cache_dir: Path) -> TestModels:
    """Model folders, each built on first use: ``lmbot_models.tiny_gpt2``, ``.smollm2``, ..."""
    return TestModels(tmp_path_factory.mktemp("lmbot-models"), lmbot_cache_dir)


@async_fixture
async def lmbot_app(lmbot_cache_dir: Path) -> AsyncIterator[AppFactory]:
    """Make an app with only the plugins a test names; closed (workers stopped) after the test.

    ``app = lmbot_app(my_plugin, models={"causal_lm": lmbot_models.tiny_gpt2})``, then
    ``reply = await app.ask("/mycommand text:hello")``. See :func:`bot.testing.make_app`.
    """
    apps: list[IsolatedApp] = []

    def build(
        *plugins: PluginSpec,
        models: Mapping[str, Path | str] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        builtins: bool = False,
        **inference: Any,
    ) -> IsolatedApp:
        app = make_app(
            *plugins, cache_dir=lmbot_cache_dir, models=models, options=options, builtins=builtins, **inference
        )
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.close()


@pytest.fixture
def lmbot_ignore_installed_plugins() -> Iterator[None]:
    """Apps made during the test do not load plugins installed in the environment.

    Plugins a test installs itself (an entry point on a path it adds) are still found.
    """
    with ignoring_plugins_installed_before(INSTALLED_AT_START):
        yield
