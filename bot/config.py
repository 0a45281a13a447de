"""config.toml: reading and validation.

Every key is declared here with its type, range and default, so a typo or a
wrong value is reported as one line naming the key and the file rather than
surfacing later as a strange failure. Secrets never live in the file: it names
the environment variable that holds them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import tomllib
import unicodedata
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

log = logging.getLogger(__name__)

DEFAULT_PATH = "config.toml"
ENV_VAR = "LMBOT_CONFIG"
# A config file is a few KB; more than this is the wrong file (a log, a model, /dev/zero).
MAX_CONFIG_BYTES = 1 << 20
# An error message shows at most this much of a value or key.
SHOWN_CHARS = 60


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


# Looks like a Discord bot token (three base64url parts joined by dots), or a URL's password.
_DISCORD_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}")
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def looks_secret(text: str) -> bool:
    """Whether ``text`` holds what looks like a Discord token or a URL with a password."""
    return bool(_DISCORD_TOKEN.search(text) or _URL_PASSWORD.search(text))


def _holds_secret(value: object) -> bool:
    if isinstance(value, str):
        return looks_secret(value)
    if isinstance(value, dict):
        return any(_holds_secret(k) or _holds_secret(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return any(_holds_secret(v) for v in value)
    return False


def value_shown(value: object) -> str:
    """``(got <value>)`` for a config error: repr'd (control and bidi characters escaped), cut to
    :data:`SHOWN_CHARS`, and never a secret pasted by mistake."""
    if _holds_secret(value):
        return "(the value is not shown: it looks like a secret)"
    text = _escaped(repr(value))
    return f"(got {text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + '...'})"


def shown_key(key: str) -> str:
    """A key as an error message may show it (escaped, cut, never a token)."""
    if looks_secret(key):
        return "<a key that looks like a secret>"
    text = _escaped(key)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _escaped(text: str) -> str:
    # repr() keeps bidi controls (U+202E) and other format characters as they are: a terminal
    # would then show the line reordered.
    return "".join(ch if ch.isprintable() and unicodedata.category(ch) != "Cf" else ascii(ch)[1:-1] for ch in text)


PathText = Annotated[str, AfterValidator(_path_text)]
# A Discord id: an unsigned 64-bit number.
Snowflake = Annotated[int, Field(ge=0, le=2**64 - 1)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
# Keys whose value is never repeated in an error message (it may be a secret pasted by mistake).
SECRET_KEYS = {("bot", "token_env")}


class _Section(BaseModel):
    # strict: TOML already has types, so "5" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BotSection(_Section):
    token_env: Annotated[str, AfterValidator(_env_var_name)] = "LMBOT_DISCORD_TOKEN"
    owner_ids: list[Snowflake] = []
    log_level: LogLevel = "INFO"  # any case: "debug" means DEBUG
    output_dir: PathText = "lmbot-out"
    # Every command is answered within this many seconds: a handler still running then is abandoned
    # and the student told so. Under Discord's 15-minute interaction token, with room to deliver.
    command_timeout_s: Annotated[float, Field(gt=0, le=600)] = 120.0


class DiscordSection(_Section):
    # Guilds to sync commands to at once (guild commands update instantly; global ones
    # can take a while to show up), e.g. a test server during development.
    guild_ids: list[Snowflake] = []
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


class AskSection(_Section):
    # `lmbot ask` leaves a warm lmbot (app and workers) this long after its last answer, so the
    # next ask skips starting a worker and loading the model; 0: every ask starts from nothing.
    keep_alive_s: Annotated[float, Field(ge=0, le=86_400)] = 300.0


class Config(_Section):
    bot: BotSection = BotSection()
    discord: DiscordSection = DiscordSection()
    plugins: PluginsSection = PluginsSection()
    inference: InferenceSection = InferenceSection()
    ask: AskSection = AskSection()
    # role -> hub id or local path; roles are checked against the registered ones after plugins load.
    models: dict[str, PathText] = {}

    path: str | None = None

    @property
    def cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.inference.cache_dir))


# A plugin option's value is one of these TOML types; pydantic reports each alternative apart.
_OPTION_VALUE_TYPES = {"string_type", "int_type", "float_type", "bool_type"}


def _describe(error: ErrorDetails) -> str:
    loc = [str(p) for p in error["loc"]]
    kind = error["type"]
    if loc[:2] == ["plugins", "options"] and len(loc) == 5 and kind in _OPTION_VALUE_TYPES:
        # [plugins.options.<plugin>] <key> = [..] / {..} / a date: say what it may be, once.
        key = shown_key(".".join(loc[:4]))
        return f"`{key}`: must be a string, a number or true/false {value_shown(error.get('input'))}"
    key = shown_key(".".join(loc))
    if kind == "extra_forbidden":
        return f"unknown key `{key}`"
    if kind == "missing":
        return f"`{key}` is required"
    message = error["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if tuple(loc[:2]) in SECRET_KEYS:
        return f"`{key}`: {message} (the value is not shown)"
    return f"`{key}`: {message} {value_shown(error.get('input'))}"


def _problems(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """One error per key: a plugin option's value gets one error per type it could have been."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for error in errors:
        loc = tuple(str(p) for p in error["loc"])
        if loc[:2] == ("plugins", "options") and len(loc) == 5 and error["type"] in _OPTION_VALUE_TYPES:
            loc = loc[:4]
        if loc not in seen:
            seen.add(loc)
            kept.append(error)
    return kept


def parse_config(data: dict, *, source: str = "<config>") -> Config:
    if "path" in data:
        raise ConfigError(f"{source}: unknown key `path`")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = _problems(exc.errors())
        more = len(errors) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{source}: {_describe(errors[0])}{suffix}") from None
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
    try:
        # Opened, not checked first: exists() itself raises for a folder we may not enter or a
        # name too long, and a pipe (`--config <(...)`) is read like a file.
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such config file") from None
        return parse_config({}, source="<defaults>")
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{shown_key(str(path))}: cannot read: {reason}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: is larger than {MAX_CONFIG_BYTES >> 20} MB; is it really the config file?")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors add one) is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {_not_utf8(raw, exc.start)}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


def _not_utf8(raw: bytes, offset: int) -> str:
    """Where a file that is not UTF-8 goes wrong: the line, and the key written on it."""
    before = raw[:offset]
    line_no = before.count(b"\n") + 1
    line = raw[before.rfind(b"\n") + 1 :].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    table = ""
    for earlier in reversed(before.decode("utf-8", "replace").splitlines()[:-1]):
        header = re.fullmatch(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?", earlier)
        if header:
            table = header.group(1).replace(" ", "") + "."
            break
    name = re.match(r"\s*([A-Za-z0-9_.\-\"']+)\s*=", line)
    where = f"line {line_no}"
    if name:
        where += f", `{shown_key(table + name.group(1).strip(chr(34) + chr(39)))}`"
    return (
        f"{where}: byte 0x{raw[offset]:02X} is not UTF-8 (the file looks saved as Latin-1 or another "
        "legacy encoding); save it as UTF-8"
    )


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


# How [models] tells a local folder from a hub id (the same rule as bot.inference.registry.resolve).
LOCAL_PATH_PREFIXES = ("/", "./", "~", "../")


def check_paths(config: Config) -> None:
    """Folders the bot will need, checked before it starts: one line naming the key if one is unusable.

    ``inference.cache_dir`` must be a folder the bot can write in (it is made if missing);
    a ``[models]`` value written as a local path must exist (with the local backend only: Ray's
    workers read it on the cluster's machines, so here it is only a warning).
    """
    source = config.path or "<config>"
    for role, name in config.models.items():
        if name.startswith(LOCAL_PATH_PREFIXES) and not Path(os.path.expanduser(name)).exists():
            if config.inference.backend == "ray":
                log.warning(
                    "%s: `%s`: no folder %s here; the Ray cluster's workers must have it",
                    source,
                    shown_key("models." + role),
                    value_shown(name),
                )
                continue
            raise ConfigError(f"{source}: `{shown_key('models.' + role)}`: no such folder {value_shown(name)}")
    cache = config.cache_dir
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{source}: `inference.cache_dir`: cannot write in it: {reason.lower()} {value_shown(str(cache))}"
        ) from None
