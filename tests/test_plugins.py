"""Plugin discovery and isolation: built-ins, entry points, plugins that fail, and the checks a
plugin passes when it loads (worker tasks, handlers, heavy imports, options, time limits)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path
from typing import Any

import pytest
import transformers

import bot.plugins
import bot.plugins._containment
from bot import Integer, Reply, Text, builtin_tasks, command, hookimpl, plugin_options, task_name
from bot.app import App
from bot.config import ConfigError
from bot.plugins import PluginHost, check_plugin_config, task_problem
from bot.testing import IsolatedApp, ignoring_plugins_installed_before, make_app
from tests.plugin_fixtures import BROKEN_IMPORT, ECHO_PLUGIN, install_plugin

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "tensorflow", "jax")


def plugin_module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@command("boom", "Raises inside its handler")
async def boom(ctx) -> Reply:  # type: ignore[no-untyped-def]
    raise ZeroDivisionError("secret internal detail")


@command("fine", "Answers", options=[Text("text", "Anything")])
async def fine(ctx, text: str) -> Reply:  # type: ignore[no-untyped-def]
    return Reply(f"fine: {text}")


def registers(*commands):  # type: ignore[no-untyped-def]
    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        for cmd in commands:
            register(cmd)

    return register_commands


def record(app: App, name: str) -> Any:
    return next(r for r in app.plugin_records if r.name == name)


def run_cli(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def workdir(tmp_path: Path, cache_dir: Path) -> Path:
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[bot]\nlog_level = "WARNING"\n', encoding="utf-8"
    )
    return tmp_path


# --------------------------------------------------------------------------- discovery


def test_builtin_plugins_are_discovered(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    records = {r.name: r for r in app.plugin_records}
    assert records["nexttoken"].source == "builtin"
    assert all(r.status == "loaded" for r in records.values()), [(r.name, r.error) for r in records.values()]
    assert "nexttoken" in app.registry.commands
    assert app.registry.commands["nexttoken"].plugin == "nexttoken"
    assert "language-model" in app.registry.topics


async def test_entry_point_plugin_is_discovered_and_answers(app_factory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_echo_demo", ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory(entry_points=True)
    plugin = record(app, "lmbot_echo_demo")
    assert (plugin.source, plugin.version, plugin.commands) == ("entry point lmbot-echo-demo", "1.2.3", ["echo"])
    reply = await app.execute_line("/echo text:hi there")
    assert (reply.text, reply.error) == ("hi there", False)


async def test_plugin_that_fails_to_import_is_listed_and_others_work(app_factory, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_broken_demo", BROKEN_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory(entry_points=True)
    broken = record(app, "lmbot_broken_demo")
    assert broken.status == "failed"
    assert "broken on purpose" in broken.error
    listing = await app.execute_line("/plugins")
    assert not listing.error
    assert any(p["name"] == "lmbot_broken_demo" and p["status"] == "failed" for p in listing.data["plugins"])
    assert not (await app.execute_line("/help")).error


async def test_plugin_that_raises_while_registering_is_skipped(app_factory) -> None:  # type: ignore[no-untyped-def]
    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        register(fine)
        raise KeyError("half way")

    app = app_factory(plugins=[(plugin_module("halfway", register_commands=register_commands), "halfway")])
    halfway = record(app, "halfway")
    assert halfway.status == "failed" and "half way" in halfway.error
    assert "fine" not in app.registry.commands  # nothing half-registered is left behind
    assert "help" in app.registry.commands


async def test_handler_error_gets_an_error_id_and_other_commands_work(app_factory, caplog) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(plugins=[(plugin_module("bad", register_commands=registers(boom, fine)), "bad")])
    reply = await app.execute_line("/boom")
    assert reply.error
    error_id = reply.data["error_id"]
    assert f"error id {error_id}" in reply.text
    assert "secret internal detail" not in reply.text  # the traceback goes to the log only
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    assert (await app.execute_line("/fine text:still here")).text == "fine: still here"


def test_two_plugins_claiming_one_command_name_skip_the_later_one(cache_dir) -> None:  # type: ignore[no-untyped-def]
    # Once a start-up error (PluginConflict); one plugin must not stop the bot, so the plugin
    # loaded first keeps the name and the other is skipped with an error naming both.
    one = plugin_module("one", register_commands=registers(fine))
    two = plugin_module("two", register_commands=registers(fine))
    app = make_app((one, "one"), (two, "two"), cache_dir=cache_dir)
    assert record(app, "one").status == "loaded" and app.registry.commands["fine"].plugin == "one"
    later = record(app, "two")
    assert later.status == "failed" and "/fine is already registered by plugin 'one'" in later.error


def test_disabled_plugin_is_listed_but_not_loaded() -> None:
    host = PluginHost(disabled={"nexttoken"})
    host.load_builtins()
    assert host.records["nexttoken"].status == "disabled"
    assert "nexttoken" not in host.build_registry().commands


def test_plugin_registered_for_one_test_only(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory(plugins=[(plugin_module("temp", register_commands=registers(fine)), "temp")])
    assert "fine" in app.registry.commands
    app.host.remove("temp")
    assert "temp" not in app.host.records


async def test_reload_picks_up_new_code_and_isolates_a_broken_reload(app_factory, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_reload_demo", ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory(entry_points=True)
    assert (await app.execute_line("/echo text:before")).text == "before"
    new_code = textwrap.dedent(ECHO_PLUGIN).replace("return Reply(text,", "return Reply(text.upper() + ' (v2)',")
    (tmp_path / "lmbot_reload_demo.py").write_text(new_code)
    reply = await app.execute_line("/reload plugin:lmbot_reload_demo")
    assert not reply.error and "Reloaded lmbot_reload_demo: /echo" in reply.text
    assert (await app.execute_line("/echo text:after")).text == "AFTER (v2)"

    (tmp_path / "lmbot_reload_demo.py").write_text("raise RuntimeError('broken in version three')\n")
    broken = await app.execute_line("/reload plugin:lmbot_reload_demo")
    assert broken.error and "broken in version three" in broken.text
    assert "echo" not in app.registry.commands
    assert not (await app.execute_line("/help")).error

    refused = await app.execute_line("/reload plugin:core")
    assert refused.error and "cannot be reloaded" in refused.text
    unknown = await app.execute_line("/reload plugin:nope")
    assert unknown.error and "no plugin named" in unknown.text


async def test_sync_outside_discord_says_so(app_factory) -> None:  # type: ignore[no-untyped-def]
    reply = await app_factory().execute_line("/sync")
    assert reply.error and "Discord front end" in reply.text


# --------------------------------------------------------------------------- handlers


async def handler_ctx_text(ctx, text):  # type: ignore[no-untyped-def]
    return Reply(text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([Text("prompt", "Some text")], "handler parameter `text` is not an option (options: prompt)"),
        ([Text("text", "Some text"), Integer("k", "How many")], "option `k` is not a parameter of the handler"),
        ([], "handler parameter `text` is not an option (options: none)"),
    ],
)
def test_handler_parameters_must_match_the_options(options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        command("probe", "Checks its handler", options=options)(handler_ctx_text)


def test_handler_shapes_that_match() -> None:
    async def with_default(ctx, text, k=3):  # type: ignore[no-untyped-def]
        return Reply(text)

    async def takes_any(ctx, **values):  # type: ignore[no-untyped-def]
        return Reply(str(values))

    async def keyword_only(ctx, *, text):  # type: ignore[no-untyped-def]
        return Reply(text)

    command("a", "Both options", options=[Text("text", "t"), Integer("k", "k", default=3)])(with_default)
    command("b", "Any options", options=[Text("text", "t"), Integer("k", "k", default=3)])(takes_any)
    command("c", "Keyword only", options=[Text("text", "t")])(keyword_only)

    async def no_ctx() -> Reply:
        return Reply("")

    with pytest.raises(TypeError, match="first parameter must be ctx"):
        command("d", "No ctx")(no_ctx)

    async def extra_default(ctx, text, verbose=False):  # type: ignore[no-untyped-def]
        return Reply(text)

    with pytest.raises(TypeError, match="handler parameter `verbose` is not an option"):
        command("e", "Extra parameter", options=[Text("text", "t")])(extra_default)


async def test_a_mismatched_handler_is_a_load_error_naming_the_plugin(lmbot_app) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app("tests.plugins.wrong_handler", "tests.plugins.good_task")
    broken = record(app, "wrong_handler")
    assert broken.status == "failed"
    assert "command 'mismatch'" in broken.error and "handler parameter `text` is not an option" in broken.error
    assert "mismatch" not in app.registry.commands
    assert record(app, "good_task").status == "loaded"


# --------------------------------------------------------------------------- worker tasks


def test_builtin_task_names_are_the_service_tasks() -> None:
    from bot.worker.tasks import TASKS  # imports torch: fine in a test process

    assert set(builtin_tasks()) == set(TASKS)


def test_task_name_of_a_module_level_function() -> None:
    from tests.plugins import good_task

    assert task_name(good_task.count_tokens) == "tests.plugins.good_task:count_tokens"
    assert good_task.CountTokens.task == "tests.plugins.good_task:count_tokens"
    with pytest.raises(ValueError, match="module level"):
        task_name(lambda model, tokenizer, batch: [])

    def nested(model, tokenizer, batch):  # type: ignore[no-untyped-def]
        return []

    with pytest.raises(ValueError, match="module level"):
        task_name(nested)


REQUEST_PLUGIN = """
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from bot import Command, Reply, Request, Text, command, hookimpl


def plain_task(model, tokenizer, batch):
    return [None for _ in batch]


async def async_task(model, tokenizer, batch):
    return [None for _ in batch]


def two_arguments(model, batch):
    return [None for _ in batch]


@dataclass(frozen=True)
class Probe(Request):
    text: str
{body}


@command("probe{index}", "Sends a probe", options=[Text("text", "Anything")])
async def probe(ctx, text: str) -> Reply:
    return Reply(text)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(probe)
"""

TEXTS = "\n    def texts(self) -> list[str]:\n        return [self.text]"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('    task: ClassVar[str] = "next_tokens"' + TEXTS, "request Probe names the unknown task 'next_tokens'"),
        ('    task: ClassVar[str] = "no_such_module_here:run"' + TEXTS, "there is no module named no_such_module_here"),
        ('    task: ClassVar[str] = "json:no_such_function"' + TEXTS, "json has no no_such_function"),
        (
            '    task: ClassVar[str] = "tests.plugins.untouchable_task_module:missing"' + TEXTS,
            "tests.plugins.untouchable_task_module defines no missing",
        ),
        ('    task: ClassVar[str] = "not a task:at all"' + TEXTS, 'not of the form "package.module:function"'),
        ("    pass", "request Probe names no task"),
        ('    task: ClassVar[str] = "{module}:plain_task"', "request Probe must define texts()"),
        ('    task: ClassVar[str] = "{module}:async_task"' + TEXTS, "which is async"),
        ('    task: ClassVar[str] = "{module}:two_arguments"' + TEXTS, "must take (model, tokenizer, batch)"),
        (
            '    task: ClassVar[str] = "{module}:plain_task"\n    role: ClassVar[str] = "casual_lm"' + TEXTS,
            "uses the model role 'casual_lm', which no plugin registers",
        ),
    ],
)
async def test_each_request_mistake_is_one_load_error(lmbot_app, tmp_path, monkeypatch, body, message) -> None:  # type: ignore[no-untyped-def]
    index = zlib.crc32((body + message).encode())
    module = f"lmbot_probe_{index}"
    source = REQUEST_PLUGIN.format(body=body.replace("{module}", module), index=index)
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = lmbot_app(module, "tests.plugins.good_task")
    failed = record(app, module)
    assert failed.status == "failed", failed
    assert message in failed.error
    assert f"probe{index}" not in app.registry.commands  # skipped whole
    assert record(app, "good_task").status == "loaded"
    listing = await app.ask("/plugins")
    row = next(row for row in listing.table.rows if row[0] == module)
    assert row[-1].startswith("failed: request Probe")


def test_a_task_module_is_checked_without_importing_it() -> None:
    sys.modules.pop("tests.plugins.untouchable_task_module", None)
    assert task_problem("tests.plugins.untouchable_task_module:heavy_task") is None
    assert "tests.plugins.untouchable_task_module" not in sys.modules
    assert task_problem("next_token") is None


async def test_a_plugins_own_task_runs_in_the_worker(lmbot_app, lmbot_models) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app("tests.plugins.good_task", models={"causal_lm": lmbot_models.tiny_gpt2})
    reply = await app.ask("/counttokens text:Tokenizers split words show:2")
    assert not reply.error, reply.text
    tokenizer = transformers.AutoTokenizer.from_pretrained(lmbot_models.tiny_gpt2)
    expected = [tokenizer.decode([i]) for i in tokenizer("Tokenizers split words")["input_ids"]]
    assert reply.data["tokens"] == expected
    assert reply.data["vocabulary"] == len(tokenizer)
    assert reply.data["model"]  # the worker put the served model's label in the result's `model` field
    assert reply.text.startswith(f"Counted: {len(expected)} tokens: {' '.join(expected[:2])}")


# --------------------------------------------------------------------------- containment


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("tests.plugins.exits_on_import", "SystemExit(3): the plugin tried to exit the bot"),
        ("tests.plugins.interrupted_on_import", "KeyboardInterrupt raised by the plugin"),
        ("tests.plugins.exits_in_hook", "SystemExit('a plugin must not end the bot')"),
        ("tests.plugins.misspelt_hook", "implements unknown hook 'register_comands'"),
        ("tests.plugins.imports_torch", "tests.plugins.imports_torch imports torch at module level"),
    ],
)
async def test_a_plugin_that_breaks_a_rule_is_skipped_and_the_bot_starts(lmbot_app, module, message) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app(module, "tests.plugins.good_task")
    failed = record(app, module.rpartition(".")[2])
    assert failed.status == "failed"
    assert message in failed.error
    assert record(app, "good_task").status == "loaded"
    assert "counttokens" in app.registry.commands
    assert not (await app.ask("/help")).error


@pytest.mark.parametrize("module", ["tests.plugins.hangs_on_import", "tests.plugins.hangs_in_hook"])
async def test_a_plugin_that_hangs_is_skipped_after_the_time_limit(lmbot_app, monkeypatch, module) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(bot.plugins._containment, "LOAD_TIME_LIMIT_S", 1.0)
    app = lmbot_app(module, "tests.plugins.good_task")
    failed = record(app, module.rpartition(".")[2])
    assert failed.status == "failed"
    assert "took longer than 1 s to load" in failed.error
    assert record(app, "good_task").status == "loaded"
    assert not (await app.ask("/help")).error


async def test_load_errors_are_shown_to_owners_only(lmbot_app) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app("tests.plugins.exits_on_import")
    owner = await app.ask("/plugins", owner=True)
    student = await app.ask("/plugins", owner=False)
    owner_row = next(row for row in owner.table.rows if row[0] == "exits_on_import")
    student_row = next(row for row in student.table.rows if row[0] == "exits_on_import")
    assert "SystemExit" in owner_row[-1]
    assert student_row[-1] == "failed to load"
    assert all(p["error"] == "" for p in student.data["plugins"])
    assert "SystemExit" not in json.dumps(student.data) + str(student.table)
    assert "1 failed to load" in student.text


def test_lmbot_plugins_lists_a_plugin_that_exits_and_the_bot_answers(workdir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "lmbot_exits_cli", "import sys\nsys.exit(5)\n")
    install_plugin(site, "lmbot_interrupts_cli", "raise KeyboardInterrupt\n")
    done = run_cli(["plugins"], workdir, extra_path=site)
    assert done.returncode == 1, done.stderr[-2000:]  # a plugin failed to load: usable in CI
    assert "failed: SystemExit(5)" in next(line for line in done.stdout.splitlines() if "lmbot_exits_cli" in line)
    assert "KeyboardInterrupt" in next(line for line in done.stdout.splitlines() if "lmbot_interrupts_cli" in line)
    answered = run_cli(["ask", "/help"], workdir, extra_path=site)
    assert answered.returncode == 0 and "/nexttoken" in answered.stdout


# --------------------------------------------------------------------------- the bot process stays free of torch

NO_TORCH_SCRIPT = """
import asyncio, json, sys
from bot.app import App
from bot.config import parse_config

async def main():
    app = App(parse_config(json.loads(sys.argv[1]), source="probe"))
    failed = {r.name: r.error for r in app.plugin_records if r.status != "loaded"}
    lines = ["/help", "/plugins", "/topic name:nsp", "/quiz", "/tokenize text:hello world compare:true",
             "/maskrecipe sentence:The cat sat on the mat. seed:3", "/nexttoken prompt:Hello k:3"]
    replies = [await app.execute_line(line) for line in lines]
    await app.close()
    heavy = sorted(m for m in sys.modules if m.partition(".")[0] in {heavy})
    print(json.dumps({"failed": failed, "errors": [r.text for r in replies if r.error], "heavy": heavy}))

asyncio.run(main())
"""


def test_the_bot_process_never_imports_torch(cache_dir: Path, tiny_gpt2: Path, tmp_path: Path) -> None:
    """Every built-in loaded, commands answered (one through a model worker): no torch in the bot."""
    config = {
        "inference": {"cache_dir": str(cache_dir), "offline": "always"},
        "models": {"causal_lm": str(tiny_gpt2)},
        "bot": {"log_level": "WARNING"},
        "plugins": {"options": {"study": {"quiz_db": str(tmp_path / "quiz.sqlite3")}}},
    }
    script = NO_TORCH_SCRIPT.replace("{heavy}", repr(set(HEAVY)))
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"failed": {}, "errors": [], "heavy": []}


def test_a_plugin_that_loads_torch_without_a_name_for_it_is_reported(tmp_path: Path) -> None:
    """In a fresh bot process, a plugin whose import loads torch by any route fails to load."""
    code = (
        "from bot.plugins import PluginHost\n"
        "host = PluginHost()\n"
        "host.add('tests.plugins.loads_torch_quietly', 'quiet')\n"
        "print(host.records['quiet'].status, '|', host.records['quiet'].error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    status, error = done.stdout.strip().splitlines()[-1].split(" | ")
    assert status == "failed"
    assert "importing it loaded torch into the bot process" in error


# --------------------------------------------------------------------------- plugin options


def write_config(folder: Path, text: str) -> Path:
    path = folder / "bad.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[plugins.options.adapt]\ntraining = "sometimes"\n',
            "`plugins.options.adapt.training`: must be one of: gpu, always, never (got 'sometimes')",
        ),
        ('[plugins.options.adapt]\ntrainig = "always"\n', "unknown key `plugins.options.adapt.trainig`"),
        ("[plugins.options.study]\nquiz_db = 7\n", "`plugins.options.study.quiz_db`: must be text (got 7)"),
        ('[plugins.options.study]\nquiz_db = ""\n', "`plugins.options.study.quiz_db`: is empty"),
        (
            "[plugins.options.nexttoken]\nk = 3\n",
            "unknown key `plugins.options.nexttoken.k` (nexttoken has no options)",
        ),
        ('[plugins]\ndisabled = ["core"]\n', '`plugins.disabled`: "core" cannot be disabled'),
    ],
)
def test_bad_plugin_options_are_one_config_line_and_exit_2(workdir: Path, toml: str, message: str) -> None:
    config = workdir / "config.toml"
    config.write_text(config.read_text(encoding="utf-8") + toml, encoding="utf-8")
    done = run_cli(["ask", "/help"], workdir)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmbot: config.toml: "), done.stderr
    assert message in lines[0]


def test_options_for_a_plugin_not_installed_here_are_a_warning(workdir: Path) -> None:
    config = workdir / "config.toml"
    config.write_text(config.read_text(encoding="utf-8") + '[plugins.options.adpat]\ntraining = "always"\n')
    done = run_cli(["ask", "/help"], workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[plugins.options.adpat] names no plugin here (plugins: adapt, " in done.stderr


async def test_declared_options_are_read_with_their_defaults(lmbot_app, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    app = lmbot_app("tests.plugins.good_task")
    ctx = app.context()
    assert plugin_options(ctx, "good_task") == {"greeting": "Counted:"}
    changed = lmbot_app("tests.plugins.good_task", options={"good_task": {"greeting": "Tokens!"}})
    assert plugin_options(changed.context(), "good_task") == {"greeting": "Tokens!"}
    with pytest.raises(KeyError, match="declares no options"):
        plugin_options(ctx, "core")
    with pytest.raises(ConfigError, match="`plugins.options.good_task.greeting`: is too long"):
        lmbot_app("tests.plugins.good_task", options={"good_task": {"greeting": "x" * 41}})


def test_options_of_a_plugin_that_did_not_load_are_left_alone(cache_dir: Path) -> None:
    app = make_app("tests.plugins.exits_on_import", cache_dir=cache_dir, options={"exits_on_import": {"any": 1}})
    assert record(app, "exits_on_import").status == "failed"
    check_plugin_config(app.config, app.host, app.registry)


async def test_a_required_option_and_ranges_are_checked(cache_dir: Path) -> None:
    @hookimpl
    def register_options(register):  # type: ignore[no-untyped-def]
        register(Integer("port", "Where to listen", min_value=1, max_value=65535))
        register(Integer("workers", "How many", min_value=1, max_value=8, default=2))

    plugin = plugin_module("needs", register_options=register_options)
    with pytest.raises(ConfigError, match=r"`plugins.options.needs.port` is required \(Where to listen\)"):
        make_app((plugin, "needs"), cache_dir=cache_dir)
    with pytest.raises(ConfigError, match=r"`plugins.options.needs.workers`: must be at most 8 \(got 9\)"):
        make_app((plugin, "needs"), cache_dir=cache_dir, options={"needs": {"port": 80, "workers": 9}})
    app = make_app((plugin, "needs"), cache_dir=cache_dir, options={"needs": {"port": 80}})
    assert plugin_options(app.context(), "needs") == {"port": 80, "workers": 2}
    await app.close()


def test_an_option_whose_default_its_own_check_refuses_is_a_load_error(cache_dir: Path) -> None:
    @hookimpl
    def register_options(register):  # type: ignore[no-untyped-def]
        register(Text("mode", "A mode", choices=("a", "b"), default="c"))

    app = make_app((plugin_module("oops", register_options=register_options), "oops"), cache_dir=cache_dir)
    assert record(app, "oops").status == "failed"
    assert "`mode` must be one of: a, b" in record(app, "oops").error


def test_environment_variables_plugins_declare_are_collected_and_checked(cache_dir: Path) -> None:
    @hookimpl
    def register_environment(register):  # type: ignore[no-untyped-def]
        register("MY_SERVICE_URL")
        register("MYSVC_*")

    @hookimpl
    def bad_environment(register):  # type: ignore[no-untyped-def]
        register("NOT A NAME")

    good = plugin_module("declares", register_environment=register_environment)
    bad = plugin_module("misdeclares", register_environment=bad_environment)
    app = make_app((good, "declares"), (bad, "misdeclares"), "plugins.study", cache_dir=cache_dir)
    assert app.registry.environment == {"MY_SERVICE_URL", "MYSVC_*", "PG*"}  # PG*: the score store's login
    assert record(app, "declares").status == "loaded"
    assert record(app, "misdeclares").status == "failed"
    assert "'NOT A NAME'" in record(app, "misdeclares").error
    assert "NOT A NAME" not in app.registry.environment


# --------------------------------------------------------------------------- isolation of the suite


def test_apps_in_tests_do_not_see_installed_plugins(tmp_path: Path, monkeypatch, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_installed_demo", ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with ignoring_plugins_installed_before({("lmbot_installed_demo", "lmbot_installed_demo")}):
        hidden = App(make_config_for(cache_dir), builtins=False)
    seen = App(make_config_for(cache_dir), builtins=False)
    assert "lmbot_installed_demo" not in hidden.host.records
    assert record(seen, "lmbot_installed_demo").status == "loaded"
    assert isinstance(make_app(cache_dir=cache_dir), IsolatedApp)


def make_config_for(cache_dir: Path):  # type: ignore[no-untyped-def]
    from bot.testing import make_config

    return make_config(cache_dir)


def test_the_suite_passes_with_a_third_party_plugin_installed(tmp_path: Path) -> None:
    """A plugin with a command and a study card installed in the environment changes nothing in
    the suite's view: /help still matches the README, the course still has its ten topics."""
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(
        site,
        "lmbot_third_party",
        ECHO_PLUGIN
        + textwrap.indent(
            textwrap.dedent(
                """
                from bot import Topic

                @hookimpl
                def register_topics(register):
                    register(Topic("third-party", "A third-party topic", "Installed with pip."))
                """
            ),
            "    ",
        ),
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    tests = [
        "tests/test_readme.py",
        "tests/test_study.py::test_every_course_topic_has_a_card_a_command_and_five_questions",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"), *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 passed" in done.stdout


# --------------------------------------------------------------------------- the import graph of bot/


def module_imports(path: Path, package_root: Path) -> tuple[str, set[str]]:
    """A module's name and the bot modules it imports when it is imported (module level only)."""
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    name = ".".join(parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "bot")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == "bot":
                    # "from bot import hookspecs" imports a submodule; "from bot import __version__"
                    # needs bot/__init__ itself. Which one it is is settled once all modules are known.
                    found.update(f"{node.module}|{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return name, found


def test_bot_has_no_import_cycles() -> None:
    root = REPO / "bot"
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name, imports = module_imports(path, root)
        graph[name] = imports
    for name, imports in graph.items():
        resolved = set()
        for item in imports:
            module, _, attr = item.partition("|")
            resolved.add(f"{module}.{attr}" if f"{module}.{attr}" in graph else module)
        graph[name] = {m for m in resolved if m in graph and m != name}

    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert graph["bot.plugins"] and graph["bot.commands"] == {"bot.errors"}  # the graph is real
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


STUCK_PLUGIN = """
    from bot import Reply, command, hookimpl
    from tests.test_handler_faults import RELEASE

    @command("stuck", "Blocks its loop until the test lets it go")
    async def stuck(ctx):
        RELEASE.entered.set()
        RELEASE.gate.wait()
        return Reply("let go")

    @command("fine", "Answers at once")
    async def fine(ctx):
        return Reply("fine answer")

    @hookimpl
    def register_commands(register):
        register(stuck)
        register(fine)
"""


async def test_reload_recovers_a_plugin_stuck_on_its_loop(app_factory, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A handler that never lets its loop go: /reload gives the plugin a fresh loop, its commands answer again."""
    from tests.test_handler_faults import RELEASE

    RELEASE.gate.clear()
    RELEASE.entered.clear()
    install_plugin(tmp_path, "lmbot_stuck_demo", STUCK_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory(entry_points=True)
    app.config = app.config.model_copy(update={"bot": app.config.bot.model_copy(update={"command_timeout_s": 1.0})})
    try:
        stuck = asyncio.create_task(app.execute_line("/stuck"))
        await asyncio.to_thread(RELEASE.entered.wait)
        assert (await app.execute_line("/fine")).data["error_kind"] == "CommandTimeout"  # behind the stuck one
        reply = await app.execute_line("/reload plugin:lmbot_stuck_demo")
        assert not reply.error, reply.text
        assert (await app.execute_line("/fine")).text == "fine answer"
        assert (await stuck).data["error_kind"] == "CommandTimeout"
    finally:
        RELEASE.gate.set()
