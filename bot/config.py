"""config.toml: reading and validation.

Every key is declared here with its type, range and default, so a typo or a
wrong value is reported as one line naming the key and the file rather than
surfacing later as a strange failure. Secrets never live in the file: it names
the environment variable that holds them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

DEFAULT_PATH = "config.toml"
ENV_VAR = "LMBOT_CONFIG"


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid (exit code 2)."""


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _path_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must name a file or folder, not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _env_var_name(value: str) -> str:
    # Checked here so that a token pasted in by mistake is refused without being echoed.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", value):
        raise ValueError(
            "must be the NAME of the environment variable that holds the Discord token "
            "(e.g. LMBOT_DISCORD_TOKEN), never the token itself"
        )
    return value


PathText = Annotated[str, AfterValidator(_path_text)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
# Keys whose value is never repeated in an error message (it may be a secret pasted by mistake).
SECRET_KEYS = {("bot", "token_env")}


class _Section(BaseModel):
    # strict: TOML already has types, so "5" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BotSection(_Section):
    token_env: Annotated[str, AfterValidator(_env_var_name)] = "LMBOT_DISCORD_TOKEN"
    owner_ids: list[Annotated[int, Field(ge=0)]] = []
    log_level: LogLevel = "INFO"  # any case: "debug" means DEBUG
    output_dir: PathText = "lmbot-out"


class DiscordSection(_Section):
    # Guilds to sync commands to at once (guild commands update instantly; global ones
    # can take a while to show up), e.g. a test server during development.
    guild_ids: list[int] = []
    cooldown_s: Annotated[float, Field(ge=0, le=3600)] = 3.0  # per user and command
    sync: Literal["auto", "never"] = "auto"  # auto: only when the command set changed
    shutdown_grace_s: Annotated[float, Field(ge=0, le=600)] = 20.0
    # Sharding (Discord requires it past 2,500 guilds): "auto" asks Discord for the count and runs
    # every shard in this process; several processes each name their own shard_ids (and one count).
    shard_count: int | str = "auto"
    shard_ids: list[Annotated[int, Field(ge=0)]] = []  # [] = every shard; the process with 0 syncs commands

    @field_validator("shard_count", mode="before")
    @classmethod
    def _shard_count(cls, count: object) -> object:
        if count != "auto" and not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= 10_000):
            raise ValueError('must be a number of shards from 1 to 10000, or "auto"')
        return count

    @field_validator("shard_ids")
    @classmethod
    def _shards_exist(cls, ids: list[int], info: ValidationInfo) -> list[int]:
        if "shard_count" not in info.data:  # shard_count itself was wrong: that is the error to report
            return ids
        count = info.data["shard_count"]
        if ids and count == "auto":
            raise ValueError("naming shard_ids needs a number in discord.shard_count, not auto")
        if ids and isinstance(count, int) and max(ids) >= count:
            raise ValueError(f"shard ids run from 0 to {count - 1} (discord.shard_count = {count})")
        if len(set(ids)) != len(ids):
            raise ValueError("a shard id is repeated")
        return ids


class PluginsSection(_Section):
    disabled: list[str] = []
    # Per-plugin settings, e.g. [plugins.options.study] quiz_db = "...". Each plugin documents its own.
    options: dict[str, dict[str, str | int | float | bool]] = {}


class InferenceSection(_Section):
    backend: Literal["local", "ray"] = "local"
    # Ray Serve backend (backend = "ray"): an existing cluster's address, or "" to start a local Ray.
    ray_address: str = ""
    ray_replicas: Annotated[int, Field(ge=1, le=256)] = 1  # per model role
    ray_num_cpus: Annotated[float, Field(ge=0, le=256)] = 1.0  # per replica
    ray_num_gpus: Annotated[float, Field(ge=0, le=16)] = 0.0  # per replica; fractions share a GPU
    workers: Annotated[int, Field(ge=1, le=16)] = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    max_queue: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 64
    max_batch_tokens: Annotated[int, Field(ge=16, le=1_000_000)] = 8192
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 2.0
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    max_input_chars: Annotated[int, Field(ge=1, le=100_000)] = 2000
    max_input_tokens: Annotated[int, Field(ge=1, le=100_000)] = 512
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    # Estimated multiply-accumulates one request may cost (Request.cost()); more is refused up front.
    max_request_cost: Annotated[float, Field(gt=0, le=1e15)] = 5e10
    # Requests one user may have queued or running at once; more are refused with "try again when they finish".
    max_per_user: Annotated[int, Field(ge=1, le=100_000)] = 16
    # A worker whose batch runs this long past its requests' last deadline is killed and replaced.
    watchdog_margin_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    memory_budget_mb: Annotated[int, Field(ge=1, le=16 * 2**20)] = 4096  # up to 16 TB
    offline: Literal["auto", "always", "never"] = "auto"
    cache_dir: PathText = "~/.cache/lmbot"
    preload: list[str] = []
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0


class Config(_Section):
    bot: BotSection = BotSection()
    discord: DiscordSection = DiscordSection()
    plugins: PluginsSection = PluginsSection()
    inference: InferenceSection = InferenceSection()
    # role -> hub id or local path; roles are checked against the registered ones after plugins load.
    models: dict[str, PathText] = {}

    path: str | None = None

    @property
    def cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.inference.cache_dir))


def _describe(error: ErrorDetails) -> str:
    key = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key `{key}`"
    if kind == "missing":
        return f"`{key}` is required"
    message = error["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if tuple(str(p) for p in error["loc"][:2]) in SECRET_KEYS:
        return f"`{key}`: {message} (the value is not shown)"
    got = repr(error.get("input"))
    return f"`{key}`: {message} (got {got if len(got) <= 60 else got[:57] + '...'})"


def parse_config(data: dict, *, source: str = "<config>") -> Config:
    if "path" in data:
        raise ConfigError(f"{source}: unknown key `path`")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{source}: {_describe(first)}{suffix}") from None
    return config.model_copy(update={"path": source})


def config_path(explicit: str | None) -> tuple[Path, bool]:
    """The config file to read and whether the user named it (then it must exist)."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), True
    return Path(DEFAULT_PATH), False


def load_config(explicit: str | None = None) -> Config:
    path, named = config_path(explicit)
    if not path.exists():
        if named:
            raise ConfigError(f"{path}: no such config file")
        return parse_config({}, source="<defaults>")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors add one) is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02X} at offset {exc.start}); save the file as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


def check_roles(config: Config, known: set[str]) -> None:
    """Unknown role names in ``[models]`` are typos; report them like other keys."""
    for role in config.models:
        if role not in known:
            raise ConfigError(f"{config.path}: unknown key `models.{role}` (known roles: {', '.join(sorted(known))})")
    for role in config.inference.preload:
        if role not in known:
            raise ConfigError(
                f"{config.path}: `inference.preload`: unknown role {role!r} (known roles: {', '.join(sorted(known))})"
            )
