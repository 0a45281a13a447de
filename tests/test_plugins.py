"""Plugin discovery and isolation: built-ins, entry points, and plugins that fail."""

from __future__ import annotations

import textwrap
import types
from pathlib import Path

import pytest

from bot import Reply, Text, command, hookimpl
from bot.app import App
from bot.plugins import PluginConflict, PluginHost
from tests.plugin_fixtures import BROKEN_IMPORT, ECHO_PLUGIN, install_plugin


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


def test_builtin_plugins_are_discovered(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = app_factory()
    records = {r.name: r for r in app.plugin_records}
    assert records["nexttoken"].source == "builtin"
    assert records["nexttoken"].status == "loaded"
    assert "nexttoken" in app.registry.commands
    assert app.registry.commands["nexttoken"].plugin == "nexttoken"
    assert "language-model" in app.registry.topics


async def test_entry_point_plugin_is_discovered_and_answers(app_factory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_echo_demo", ECHO_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory()
    record = next(r for r in app.plugin_records if r.name == "lmbot_echo_demo")
    assert (record.source, record.version, record.commands) == ("entry point lmbot-echo-demo", "1.2.3", ["echo"])
    reply = await app.execute_line("/echo text:hi there")
    assert (reply.text, reply.error) == ("hi there", False)


async def test_plugin_that_fails_to_import_is_listed_and_others_work(app_factory, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    install_plugin(tmp_path, "lmbot_broken_demo", BROKEN_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = app_factory()
    record = next(r for r in app.plugin_records if r.name == "lmbot_broken_demo")
    assert record.status == "failed"
    assert "broken on purpose" in record.error
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
    record = next(r for r in app.plugin_records if r.name == "halfway")
    assert record.status == "failed" and "half way" in record.error
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


def test_two_plugins_claiming_one_command_name_is_a_startup_error(cache_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_config

    one = plugin_module("one", register_commands=registers(fine))
    two = plugin_module("two", register_commands=registers(fine))
    with pytest.raises(PluginConflict, match="'one' and 'two'"):
        App(make_config(cache_dir), extra_plugins=[(one, "one"), (two, "two")], builtins=False, entry_points=False)


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
    app = app_factory()
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
