"""config.toml validation: one clear line naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ConfigError, check_roles, load_config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[inference]\nmax_batch_sise = 4\n", "unknown key `inference.max_batch_sise`"),
        ("[inference]\nmax_batch_size = '4'\n", "`inference.max_batch_size`: input should be a valid integer"),
        ("[inference]\nmax_batch_size = 0\n", "`inference.max_batch_size`: input should be greater than or equal to 1"),
        ("[inference]\ndevice = 'tpu'\n", "`inference.device`: input should be 'auto', 'cpu' or 'cuda'"),
        ("[bot]\nowner_ids = ['me']\n", "`bot.owner_ids.0`"),
        ("[surprise]\n", "unknown key `surprise`"),
        ("[inference\n", "not valid TOML"),
        ('[bot]\noutput_dir = "out\\u0000x"\n', "`bot.output_dir`: must not contain a NUL character"),
        ("[bot]\noutput_dir = ''\n", "`bot.output_dir`: must name a file or folder"),
        ("[inference]\ncache_dir = ''\n", "`inference.cache_dir`: must name a file or folder"),
        ("[inference]\ncache_dir = '  '\n", "`inference.cache_dir`: must name a file or folder"),
        ("[models]\ncausal_lm = ''\n", "`models.causal_lm`: must name a file or folder"),
        ("[inference]\nmemory_budget_mb = 9223372036854775807\n", "`inference.memory_budget_mb`: input should be less"),
        ("[bot]\nlog_level = 'verbose'\n", "`bot.log_level`: input should be 'DEBUG'"),
        ("[bot]\nowner_ids = [-5]\n", "`bot.owner_ids.0`: input should be greater than or equal to 0"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_token_pasted_into_token_env_is_refused_and_never_printed(tmp_path: Path) -> None:
    token = "MTA5ODc2NTQzMjEwOTg3NjU0.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[bot]\ntoken_env = '{token}'\n"))
    assert "`bot.token_env`: must be the NAME of the environment variable" in str(info.value)
    assert token not in str(info.value) and "abcdefghij" not in str(info.value)


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR"])
def test_log_level_is_read_in_any_case(tmp_path: Path, level: str) -> None:
    assert load_config(write(tmp_path, f"[bot]\nlog_level = '{level}'\n")).bot.log_level == level.upper()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "latin-1"])
def test_a_byte_order_mark_is_fine_and_latin_1_is_one_clear_line(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes("# café\n[inference]\nworkers = 2\n".encode(encoding))
    if encoding == "utf-8-sig":
        assert load_config(str(path)).inference.workers == 2
        return
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: line 1: byte 0xE9 is not UTF-8")
    assert str(info.value).endswith("save it as UTF-8") and "\n" not in str(info.value)


def test_an_unknown_preloaded_role_is_reported(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[inference]\npreload = ['casual_lm']\n"))
    with pytest.raises(ConfigError, match="`inference.preload`: unknown role 'casual_lm'"):
        check_roles(config, {"causal_lm"})


def test_missing_named_file_is_an_error_but_default_file_is_optional(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMBOT_CONFIG", raising=False)
    assert load_config(None).inference.max_batch_size == 64


def test_env_var_names_the_config(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LMBOT_CONFIG", write(tmp_path, "[inference]\nworkers = 2\n"))
    assert load_config(None).inference.workers == 2


def test_unknown_model_role_is_reported_like_a_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[models]\ncasual_lm = 'gpt2'\n"))
    with pytest.raises(ConfigError, match="unknown key `models.casual_lm`"):
        check_roles(config, {"causal_lm"})


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).parent.parent
    assert load_config(str(root / "config.toml")).bot.token_env == "LMBOT_DISCORD_TOKEN"
    docker = load_config(str(root / "docker" / "config.toml"))
    assert docker.inference.metrics_port and docker.plugins.options["study"]["quiz_db"]


def test_the_shipped_config_lists_every_key_with_its_default() -> None:
    """config.toml is the reference an admin reads: every core key, each at its default."""
    import tomllib

    from bot.config import Config

    shipped = tomllib.loads((Path(__file__).parent.parent / "config.toml").read_text(encoding="utf-8"))
    defaults = Config()
    for section in ("bot", "discord", "inference", "ask"):
        model = getattr(defaults, section)
        assert set(shipped[section]) == set(type(model).model_fields), section
        for key, value in shipped[section].items():
            assert value == getattr(model, key), f"{section}.{key}"


# --------------------------------------------------------------------------- issue 25, item 6: names and folders


def _app(path: str):  # type: ignore[no-untyped-def]
    from bot.app import App

    return App(load_config(path), builtins=True, entry_points=False)


def test_a_misspelt_name_in_plugins_disabled_is_refused_like_an_unknown_key(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = write(tmp_path, f"[plugins]\ndisabled = ['nexttokn']\n[inference]\ncache_dir = '{cache}'\n")
    with pytest.raises(ConfigError) as info:
        _app(path)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{path}: `plugins.disabled`: no such plugin (got 'nexttokn')")
    assert "nexttoken" in line  # the plugins it could have meant
    # Spelt right, the plugin is disabled.
    path = write(tmp_path, f"[plugins]\ndisabled = ['nexttoken']\n[inference]\ncache_dir = '{cache}'\n")
    assert "nexttoken" not in _app(path).registry.commands


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[inference]\ncache_dir = '/proc/self'\n", "`inference.cache_dir`: cannot write in it: "),
        ("[inference]\ncache_dir = '/dev/null/lmbot'\n", "`inference.cache_dir`: cannot write in it: not a directory"),
        ("[models]\ncausal_lm = '/no/such/model/folder'\n", "`models.causal_lm`: no such folder (got '/no/such/model"),
        ("[models]\ncausal_lm = './not-here'\n", "`models.causal_lm`: no such folder (got './not-here')"),
    ],
)
def test_an_unusable_folder_fails_lmbot_plugins_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    from bot.frontends.cli import main

    monkeypatch.chdir(tmp_path)
    if "[inference]" not in toml:
        toml += f"[inference]\ncache_dir = '{tmp_path / 'cache'}'\n"
    path = write(tmp_path, toml)
    assert main(["plugins", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_a_model_folder_only_the_ray_cluster_has_is_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.config import check_paths

    toml = (
        f"[models]\ncausal_lm = '/cluster/only/model'\n[inference]\nbackend = 'ray'\ncache_dir = '{tmp_path / 'c'}'\n"
    )
    check_paths(load_config(write(tmp_path, toml)))
    assert "`models.causal_lm`: no folder (got '/cluster/only/model') here" in caplog.text
    local = load_config(write(tmp_path, toml.replace("backend = 'ray'", "backend = 'local'")))
    with pytest.raises(ConfigError, match="no such folder"):
        check_paths(local)
