"""A plugin author's mistakes, and an operator's, found by trying them (issues 13 and 16): each is
one clear message naming the plugin or the key, and never stops or crashes the bot.

Covers what the first round of checks let through: a name another plugin already has (a command
of the core, a study card, a plugin name) stopped the whole bot; torch imported in a hook, or
scikit-learn at import, went unnoticed; a reply with a number where text belongs crashed
``lmbot ask``; a task returning too few results was logged as a zip() error; a result with a
``model`` attribute that is not a dataclass field failed; secrets pasted into any config key but
``token_env`` were echoed; a config path that cannot be looked at, or a device file, crashed or
ate memory; tests that start ``lmbot`` processes saw the plugins installed in the environment;
a score database of another program was changed by the quiz.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sqlite3
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bot.plugins
from bot import Button, Field, QuizQuestion, Reply, Table, Text, Topic, command, hookimpl
from bot.config import ConfigError, load_config, parse_config
from bot.inference.registry import BUILTIN_ROLES
from bot.plugins import PluginHost
from bot.render import render_text
from bot.testing import UsageError, assert_fits_discord, make_app
from tests.plugin_fixtures import ECHO_PLUGIN, install_plugin

REPO = Path(__file__).resolve().parent.parent
TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.abcdefghijklmnopqrstuvwxyz0123"


def plugin(name: str, **hooks: Any) -> tuple[types.ModuleType, str]:
    module = types.ModuleType(name)
    for key, value in hooks.items():
        setattr(module, key, hookimpl(value))
    return module, name


def record(app: Any, name: str) -> Any:
    return next(r for r in app.plugin_records if r.name == name)


@command("help", "A plugin's own /help")
async def own_help(ctx) -> Reply:  # type: ignore[no-untyped-def]
    return Reply("hijacked")


@command("echo2", "Echo", options=[Text("text", "Anything")])
async def echo2(ctx, text: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(text)


# --------------------------------------------------------------------------- names already taken


async def test_a_plugin_with_a_core_command_name_is_skipped_and_the_bot_starts(cache_dir: Path) -> None:
    thief = plugin("thief", register_commands=lambda register: (register(own_help), register(echo2)))
    app = make_app(thief, cache_dir=cache_dir)
    try:
        skipped = record(app, "thief")
        assert skipped.status == "failed"
        assert "/help is already registered by plugin 'core'" in skipped.error
        assert "echo2" not in app.registry.commands  # skipped whole, nothing half-registered
        assert app.registry.commands["help"].plugin == "core"
        assert "hijacked" not in (await app.ask("/help")).text
        assert app.load_errors == {"thief": skipped.error}
    finally:
        await app.close()


async def test_a_study_card_slug_taken_skips_the_later_plugin(cache_dir: Path) -> None:
    def card(title: str) -> Topic:
        question = QuizQuestion("Which?", ("a", "b"), 0, "Because.")
        return Topic(slug="shared-card", title=title, key_idea="An idea.", quiz=(question,))

    first = plugin("first", register_topics=lambda register: register(card("First")))
    second = plugin("second", register_topics=lambda register: register(card("Second")))
    app = make_app(first, second, "plugins.study", cache_dir=cache_dir)
    try:
        assert "study card 'shared-card' is already registered by plugin 'first'" in record(app, "second").error
        assert app.registry.topics["shared-card"].title == "First"
        assert (await app.ask("/topic name:shared-card")).title == "First"
    finally:
        await app.close()


def test_a_plugin_named_like_a_builtin_is_skipped_not_fatal() -> None:
    host = PluginHost(builtin_roles=BUILTIN_ROLES)
    host.load_builtins()
    impostor = plugin("nexttoken", register_commands=lambda register: register(echo2))[0]
    host.add(impostor, "nexttoken", source="entry point lmbot-impostor")
    registry = host.build_registry()
    assert host.records["nexttoken"].source == "builtin" and host.records["nexttoken"].status == "loaded"
    shadow = host.records["nexttoken (entry point lmbot-impostor)"]
    assert shadow.status == "failed" and "already named 'nexttoken' (builtin)" in shadow.error
    assert registry.commands["nexttoken"].plugin == "nexttoken" and "echo2" not in registry.commands


def test_installed_plugins_claiming_one_command_keep_it_by_name_order(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Which of two installed plugins keeps a command must not depend on the order pip listed them."""
    for module in ("lmbot_zz_echo", "lmbot_aa_echo"):
        install_plugin(tmp_path, module, ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.load_entry_points()
    registry = host.build_registry()
    assert registry.commands["echo"].plugin == "lmbot_aa_echo"
    assert "/echo is already registered by plugin 'lmbot_aa_echo'" in host.records["lmbot_zz_echo"].error


def test_lmbot_answers_with_an_installed_plugin_that_claims_help(tmp_path: Path, cache_dir: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "lmbot_claims_help", ECHO_PLUGIN.replace('"echo", "Repeat the text back"', '"help", "Mine"'))
    (tmp_path / "config.toml").write_text(f'[inference]\ncache_dir = "{cache_dir}"\n', encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    outputs = []
    # `lmbot plugins` exits 1 when a plugin failed to load (usable in CI); the bot still answers.
    for args, code in ((["plugins"], 1), (["ask", "/help"], 0)):
        done = subprocess.run(
            [sys.executable, "-m", "bot.frontends.cli", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == code, done.stderr[-2000:]
        outputs.append(done.stdout)
    row = next(line for line in outputs[0].splitlines() if line.startswith("lmbot_claims_help"))
    assert "failed: its command /help is already registered by plugin 'core'" in row
    assert outputs[1].startswith("Commands") and "Mine" not in outputs[1]


# --------------------------------------------------------------------------- heavy libraries


HEAVY_IN_HOOK = """
from bot import Reply, command, hookimpl

@command("late", "Imports torch when it registers")
async def late(ctx):
    return Reply("hi")

@hookimpl
def register_commands(register):
    import torch  # noqa: F401
    register(late)
"""

SKLEARN_AT_IMPORT = """
import sklearn.linear_model  # noqa: F401
from bot import Reply, command, hookimpl

@command("classic", "Imports scikit-learn into the bot process")
async def classic(ctx):
    return Reply("hi")

@hookimpl
def register_commands(register):
    register(classic)
"""


def test_heavy_libraries_in_hooks_or_beyond_torch_are_load_errors(tmp_path: Path) -> None:
    """In a fresh bot process: torch imported by a register hook, scikit-learn by the import."""
    install_plugin(tmp_path, "lmbot_heavy_hook", HEAVY_IN_HOOK)
    install_plugin(tmp_path, "lmbot_sklearn_import", SKLEARN_AT_IMPORT)
    code = (
        "import json, sys\n"
        "from bot.plugins import PluginHost\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "host = PluginHost()\n"
        "host.add('lmbot_sklearn_import', 'sk')\n"
        "host.add('lmbot_heavy_hook', 'hook')\n"
        "registry = host.build_registry()\n"
        "result = {n: [r.status, r.error] for n, r in host.records.items()}\n"
        "print(json.dumps(result | {'late': 'late' in registry.commands}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sk"][0] == "failed" and "sklearn" in result["sk"][1]
    assert result["hook"][0] == "failed" and "its register hooks loaded torch" in result["hook"][1]
    assert result["late"] is False


# --------------------------------------------------------------------------- replies of the wrong shape


@command("shapes", "Answers with a reply of the wrong shape", options=[Text("which", "Which mistake")])
async def shapes(ctx, which: str) -> Reply:  # type: ignore[no-untyped-def]
    if which == "field":
        return Reply("x", fields=[Field("probability", 0.25)])  # type: ignore[arg-type]
    if which == "row":
        return Reply("x", table=Table(["token"], [["a", "0.5"]]))
    if which == "header":
        return Reply("x", table=Table([1, 2], []))  # type: ignore[list-item]
    if which == "button":
        return Reply("x", buttons=[Button("More", "shapes", "which", 3)])  # type: ignore[arg-type]
    if which == "text":
        return Reply(None)  # type: ignore[arg-type]
    if which == "fields":
        return Reply("x", fields=["a: b"])  # type: ignore[list-item]
    return Reply("fine", table=Table(["a", "b"], [["1"]], align="lr"))


@pytest.mark.parametrize("which", ["field", "row", "header", "button", "text", "fields"])
async def test_a_reply_of_the_wrong_shape_is_the_plugins_error_not_a_crash(cache_dir: Path, which: str) -> None:
    """Each of these once reached the renderer: ``lmbot ask`` died with a traceback."""
    app = make_app(plugin("shapes", register_commands=lambda register: register(shapes)), cache_dir=cache_dir)
    try:
        reply = await app.ask(f"/shapes which:{which}")
        assert reply.error and "error id" in reply.text and "(plugin shapes)" not in reply.text
        render_text(reply, [])
        assert_fits_discord(reply)
        fine = await app.ask("/shapes which:none")  # a short row is allowed: its last cells are empty
        assert not fine.error and "fine" in render_text(fine, [])
    finally:
        await app.close()


# --------------------------------------------------------------------------- worker task results


@dataclass(frozen=True)
class _Item:
    text: str


@dataclasses.dataclass
class _Labelled:
    """A result (plain data: a dataclass) with a ``model`` attribute that is not one of its fields."""

    text: str

    def __post_init__(self) -> None:
        self.model = "set by the task"


def drops_one(model: Any, tokenizer: Any, batch: list[_Item]) -> list[str]:
    return [item.text for item in batch if item.text != "drop"]


def plain_objects(model: Any, tokenizer: Any, batch: list[_Item]) -> list[_Labelled]:
    return [_Labelled(item.text) for item in batch]


def test_a_task_returning_too_few_results_fails_only_that_request_and_says_why(caplog) -> None:  # type: ignore[no-untyped-def]
    from bot.worker import process as worker

    loaded = types.SimpleNamespace(model=None, tokenizer=None, label="tiny")
    timing: dict[str, Any] = {"compute_s": 0.0, "sizes": [], "load_s": 0.0}
    chunk = [(1, _Item("a")), (2, _Item("drop")), (3, _Item("c"))]
    outcomes = {rid: (ok, value) for rid, ok, value in worker._run_split(drops_one, loaded, chunk, timing)}
    assert outcomes[1] == (True, "a") and outcomes[3] == (True, "c")
    assert outcomes[2][0] is False and "error id" in str(outcomes[2][1])
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{__name__}:drops_one returned 0 result(s) for 1 request(s)" in said
    assert "zip()" not in said


def test_a_result_with_a_model_attribute_that_is_no_dataclass_field_is_kept() -> None:
    from bot.worker import process as worker

    loaded = types.SimpleNamespace(model=None, tokenizer=None, label="tiny")
    timing: dict[str, Any] = {"compute_s": 0.0, "sizes": [], "load_s": 0.0}
    outcomes = worker._run_split(plain_objects, loaded, [(1, _Item("a"))], timing)
    ((_, ok, value),) = outcomes
    assert ok and isinstance(value, _Labelled) and value.model == "set by the task"


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "toml, key",
    [
        (f'[bot]\nowner_ids = ["{TOKEN}"]\n', "bot.owner_ids.0"),
        (f'[bot]\nlog_level = "{TOKEN}"\n', "bot.log_level"),
        (f'[inference]\ndevice = "{TOKEN}"\n', "inference.device"),
        (f'[discord]\nguild_ids = ["{TOKEN}"]\n', "discord.guild_ids.0"),
        ('[plugins.options.study]\nquiz_db = ["postgresql://lmbot:hunter2secret@db/lmbot"]\n', "plugins.options.study"),
        (f'[plugins.options.study]\nquiz_db = "{TOKEN}\\u0007"\n', "plugins.options.study.quiz_db"),
    ],
)
def test_a_secret_in_any_key_is_never_repeated(toml: str, key: str, tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        config = load_config(str(path))
        make_app("plugins.study", cache_dir=cache_dir, options=config.plugins.options)
    message = str(caught.value)
    assert f"`{key}" in message and "\n" not in message
    for secret in (TOKEN[:20], TOKEN[:20].upper(), "hunter2"):
        assert secret not in message
    assert "not shown" in message


def test_a_plugin_option_of_a_toml_type_no_option_takes_is_one_plain_line() -> None:
    for value in ('["gpu"]', "{ mode = 1 }", "1979-05-27"):
        with pytest.raises(ConfigError) as caught:
            parse_config(__import__("tomllib").loads(f"[plugins.options.adapt]\ntraining = {value}\n"))
        message = str(caught.value)
        assert "`plugins.options.adapt.training`: must be a string, a number or true/false" in message
        assert ".str`" not in message and "more problem" not in message


@pytest.mark.parametrize("guilds", ["[-5]", "[18446744073709551616]"])
def test_discord_ids_are_unsigned_64_bit(guilds: str) -> None:
    with pytest.raises(ConfigError, match="`discord.guild_ids.0`"):
        parse_config(__import__("tomllib").loads(f"[discord]\nguild_ids = {guilds}\n"))


def test_config_paths_that_cannot_be_looked_at_are_one_line(tmp_path: Path) -> None:
    too_long = str(tmp_path / ("x" * 5000))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(too_long)
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(str(tmp_path))
    # A device that never ends is refused after a bounded read, not read into memory.
    with pytest.raises(ConfigError, match="larger than 1 MB"):
        load_config("/dev/zero")


def test_a_config_path_inside_an_unsearchable_folder_is_one_line(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "from bot.config import ConfigError, load_config\n"
        f"os.chmod({str(tmp_path)!r}, 0)\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    load_config({str(tmp_path / 'sub' / 'config.toml')!r})\n"
        "except ConfigError as exc:\n"
        "    print('ConfigError:', exc)\n"
    )
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0)
        try:
            with pytest.raises(ConfigError, match="cannot read: Permission denied"):
                load_config(str(tmp_path / "sub" / "config.toml"))
        finally:
            os.chmod(tmp_path, 0o755)
        return
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    finally:
        os.chmod(tmp_path, 0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ConfigError:" in done.stdout and "Permission denied" in done.stdout


def test_a_latin1_config_names_the_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes('[bot]\nlog_level = "INFO"\noutput_dir = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "line 3, `bot.output_dir`: byte 0xE9 is not UTF-8" in str(caught.value)


def test_odd_keys_are_shown_escaped_and_short() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"inference": {"\u202eworkers": 1}})
    assert "\u202e" not in str(caught.value) and "\\u202eworkers" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config({"inference": {"x" * 5000: 1}})
    assert len(str(caught.value)) < 200


# --------------------------------------------------------------------------- the kit


def test_lmbot_processes_a_test_starts_skip_the_installed_plugins(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The autouse kit fixture is active here: it must reach child processes too."""
    install_plugin(tmp_path, "lmbot_preinstalled_echo", ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert any(ep.name == "lmbot_preinstalled_echo" for ep in bot.plugins.entry_points())  # installed by the test
    monkeypatch.setenv(bot.plugins.IGNORE_ENV, "lmbot_preinstalled_echo=lmbot_preinstalled_echo")
    names = {ep.name for ep in bot.plugins.entry_points()}
    assert "lmbot_preinstalled_echo" not in names
    # What the fixture sets is exactly what the session found installed at its start.
    everything = {f"{ep.name}={ep.value}" for ep in importlib.metadata.entry_points(group="lmbot")}
    monkeypatch.delenv(bot.plugins.IGNORE_ENV)
    from bot.testing.pytest_plugin import INSTALLED_AT_START

    with bot.testing.ignoring_plugins_installed_before(INSTALLED_AT_START):
        ignored = set(os.environ[bot.plugins.IGNORE_ENV].splitlines())
    assert ignored == {f"{name}={value}" for name, value in INSTALLED_AT_START} and ignored <= everything | ignored
    assert bot.plugins.IGNORE_ENV not in os.environ


async def test_asking_for_a_command_of_a_plugin_that_failed_says_why(cache_dir: Path) -> None:
    @command("mismatch", "x", options=[Text("prompt", "p")])
    async def ok(ctx, prompt: str) -> Reply:  # type: ignore[no-untyped-def]
        return Reply(prompt)

    def broken_hook(register: Any) -> None:
        raise RuntimeError("the author's bug")

    app = make_app(plugin("broken", register_commands=broken_hook), cache_dir=cache_dir)
    try:
        assert app.load_errors == {"broken": "RuntimeError: the author's bug"}
        with pytest.raises(UsageError, match="failed to load: broken: RuntimeError: the author's bug"):
            await app.ask("/mismatch prompt:hi")
    finally:
        await app.close()


# --------------------------------------------------------------------------- storage


async def test_a_database_another_program_uses_is_left_exactly_as_it_was(tmp_path: Path) -> None:
    from plugins._scores import ScoresUnavailable, open_store

    path = tmp_path / "theirs.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE quiz_answers (who TEXT, what TEXT)")
    db.execute("INSERT INTO quiz_answers VALUES ('them', 'their data')")
    db.commit()
    db.close()
    before = path.read_bytes()
    store = open_store(str(path))
    with pytest.raises(ScoresUnavailable):
        await store.record("guild", "user", "name", "question", True)
    assert await store.key() is None
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.sqlite3"]  # noqa: ASYNC240 (no WAL files either)
