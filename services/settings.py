"""Every setting of every LockN Gen process, in one typed class.

Values come from environment variables (prefix `LOCKN_`, `__` between nested
names, e.g. `LOCKN_COMFYUI__BASE_URL`), then from an optional JSON/YAML file
named by `LOCKN_CONFIG_FILE`, then from the defaults, setting by setting. The
file's keys match whatever the case and underscores, so it may use the LOC-58
note's `appsettings.json` spelling (`"ComfyUi": {"BaseUrl": ...}`); a key that
matches no setting is refused. `DATABASE_URL` is read too, as most tooling
sets it. Nothing else in the code reads `os.environ`: a bad value stops
start-up with one line naming it as the user wrote it (the variable, or the
key in the file).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "LOCKN_"
CONFIG_FILE_VARIABLE = "LOCKN_CONFIG_FILE"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ComfyUiSettings(BaseModel):
    """The LOC-58 note's `ComfyUi` section, kept name for name (`BaseUrl` is `base_url`)."""

    model_config = ConfigDict(extra="forbid")

    base_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8188")
    timeout_seconds: PositiveInt = 300
    poll_interval_ms: PositiveInt = 2000
    max_concurrent_generations: PositiveInt = 1
    workflows_path: Path = Path("./workflows")
    output_path: Path = Path("./outputs")


class RetrySettings(BaseModel):
    """Retries of transient ComfyUI failures (connect errors, timeouts, 5xx)."""

    model_config = ConfigDict(extra="forbid")

    attempts: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_seconds: list[Annotated[float, Field(ge=0)]] = [1.0, 2.0, 4.0]
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1


class WorkerEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    address: str

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_host_port(value)


class TlsSettings(BaseModel):
    """Optional TLS; with `client_ca_file` set, peers must present a certificate (mTLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    # What a client trusts when it dials a TLS server of ours.
    ca_file: Path | None = None

    @field_validator("cert_file", "key_file", "client_ca_file", "ca_file")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class QueueSettings(BaseModel):
    """How GenerationService claims, leases and retries work."""

    model_config = ConfigDict(extra="forbid")

    lease_seconds: Annotated[float, Field(ge=1, le=300)] = 15.0
    heartbeat_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    poll_seconds: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    # Prompts kept waiting in each ComfyUI's own queue beyond its slots, so the
    # GPU starts the next one the moment the last ends.
    lookahead: Annotated[int, Field(ge=0, le=16)] = 1
    max_timeout_seconds: PositiveInt = 3600
    max_queued_per_principal: PositiveInt = 10_000
    # Each priority point is worth this many seconds of waiting (aging).
    aging_seconds_per_priority: PositiveFloat = 10.0
    retention_hours: PositiveFloat = 24.0 * 7


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    comfyui: ComfyUiSettings = Field(default_factory=ComfyUiSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    database_url: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("database_url", "LOCKN_DATABASE_URL", "DATABASE_URL"),
    )
    generation_listen: str = "127.0.0.1:50051"
    worker_listen: str = "127.0.0.1:50052"
    gateway_listen: str = "127.0.0.1:8080"
    # Where the gateway and the CLI reach GenerationService.
    generation_address: str = "127.0.0.1:50051"
    workers: list[WorkerEndpoint] = Field(
        default_factory=lambda: [WorkerEndpoint(name="worker-1", address="127.0.0.1:50052")]
    )
    # Bearer token -> principal. Empty disables caller authentication (dev only).
    auth_tokens: dict[str, str] = Field(default_factory=dict)
    # GenerationService presents it; ComfyWorker accepts only it (when set).
    worker_token: SecretStr | None = None
    # What the CLI presents to GenerationService.
    client_token: SecretStr | None = None
    tls: TlsSettings = Field(default_factory=TlsSettings)
    generation_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9101
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9102
    gateway_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9103
    gateway_max_body_bytes: PositiveInt = 32 * 1024 * 1024
    grpc_max_message_bytes: PositiveInt = 64 * 1024 * 1024
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=300)] = 10.0
    log_level: str = "info"
    # auto: console when stderr is a terminal, JSON otherwise.
    log_format: str = "auto"

    @field_validator("generation_listen", "worker_listen", "gateway_listen", "generation_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _check_host_port(value)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in {"auto", "json", "console"}:
            raise ValueError("must be one of auto, json, console")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _FileSource(settings_cls))

    @property
    def database_dsn(self) -> str:
        if self.database_url is None:
            raise SettingsError("LOCKN_DATABASE_URL", "is not set (nor DATABASE_URL)")
        return self.database_url.get_secret_value()


class _EnvSource(EnvSettingsSource):
    """The environment, where a value that is not JSON is named by its own variable
    (pydantic-settings names only the top-level field, `retry` for
    LOCKN_RETRY__BACKOFF_SECONDS)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)  # type: ignore[arg-type]
        except json.JSONDecodeError as error:
            kind = "JSON" if field is None else _json_kind(field.annotation)
            reason = f"must be {kind} ({error.msg} at character {error.pos})"
            # A ValueError still, so that where pydantic-settings may fall back to
            # the raw string it does; elsewhere it wraps it for load_settings.
            raise _NotJson(self._variable(field_name, value), reason) from error

    def _variable(self, key: str, value: Any) -> str:
        prefix = self.env_prefix.lower()
        for name, found in self.env_vars.items():
            lowered = name.lower()
            if found == value and lowered.startswith(prefix) and lowered.endswith(key.lower()):
                return name.upper()
        return (self.env_prefix + key).upper()


class _NotJson(ValueError):
    """A JSON-typed setting's variable that does not parse."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(reason)
        self.variable = variable
        self.reason = reason


def _json_kind(annotation: Any) -> str:
    origin = get_origin(annotation) or annotation
    return "a JSON array" if origin in (list, tuple, set, frozenset) else "a JSON object"


Location = tuple[str | int, ...]


@dataclass
class _ConfigFile:
    """The file named by LOCKN_CONFIG_FILE, its keys turned into field names."""

    path: Path
    data: dict[str, Any]
    # field path -> the key as the file spells it, e.g. ("comfyui", "timeout_seconds")
    # -> "ComfyUi.TimeoutSeconds", so a bad value is named as the user wrote it.
    spelling: dict[Location, str]

    def spelt(self, loc: Location) -> str | None:
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.spelling:
                return f"{self.spelling[loc[:n]]}{_path_text(loc[n:])} in {self.path}"
        return None


def _read_config_file() -> _ConfigFile | None:
    name = os.environ.get(CONFIG_FILE_VARIABLE)
    if not name:
        return None
    path = Path(name)
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(CONFIG_FILE_VARIABLE, f"cannot read {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise SettingsError(CONFIG_FILE_VARIABLE, f"{path} is not valid: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(CONFIG_FILE_VARIABLE, f"{path} must hold a mapping")
    file = _ConfigFile(path, {}, {})
    file.data = _field_names(data, Settings, (), "", file)
    return file


def _normal(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _field_names(value: Any, annotation: Any, loc: Location, spelt: str, file: _ConfigFile) -> Any:
    """`value` with the keys of every settings model in it turned into field names.
    Keys match ignoring case and underscores; one that matches no field is refused,
    as pydantic would otherwise drop a misspelt section without a word."""
    if loc:
        file.spelling[loc] = spelt
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(value, dict):
            return value
        fields = {_normal(name): name for name in annotation.model_fields}
        named: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{spelt}.{key}" if spelt else str(key)
            name = fields.get(_normal(str(key)))
            if name is None:
                raise SettingsError(f"{where} in {file.path}", _unknown(str(key), fields.values()))
            item_type = annotation.model_fields[name].annotation
            named[name] = _field_names(item, item_type, (*loc, name), where, file)
        return named
    if get_origin(annotation) is list and isinstance(value, list):
        item_type = get_args(annotation)[0]
        return [
            _field_names(item, item_type, (*loc, n), f"{spelt}[{n}]", file)
            for n, item in enumerate(value)
        ]
    return value


def _unknown(key: str, names: Iterable[str]) -> str:
    known = list(names)
    close = difflib.get_close_matches(_normal(key), known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (known: {', '.join(known)})"


def _path_text(loc: Location) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


class _FileSource(PydanticBaseSettingsSource):
    """The optional JSON or YAML file named by LOCKN_CONFIG_FILE."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        file = _read_config_file()
        return {} if file is None else file.data


class SettingsError(Exception):
    """A setting that stops start-up; str() is the one line to print."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid setting {name}: {reason}")
        self.name = name


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port")
    return value


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning pydantic's report into one line naming the setting."""
    try:
        return Settings(**overrides)
    except SourceError as error:
        cause = error.__cause__
        if isinstance(cause, _NotJson):
            raise SettingsError(cause.variable, cause.reason) from None
        field_name = re.search(r'field "(\w+)"', str(error))
        name = ENV_PREFIX + (field_name[1].upper() if field_name else "*")
        raise SettingsError(name, f"{error}: {cause}") from None
    except ValidationError as error:
        first = error.errors()[0]
        raise SettingsError(_setting_name(first["loc"]), first["msg"]) from None


def _setting_name(loc: Location) -> str:
    """Where the value at `loc` came from: its environment variable (the setting's
    own or a JSON one above it), else its key in the config file."""
    environment = {name.upper() for name in os.environ}
    for n in range(len(loc), 0, -1):
        head = loc[:n]
        if any(isinstance(p, int) for p in head):
            continue
        variable = ENV_PREFIX + "__".join(str(p) for p in head).upper()
        candidates = [variable, "DATABASE_URL"] if head == ("database_url",) else [variable]
        for candidate in candidates:
            if candidate in environment:
                return candidate + _path_text(loc[n:])
    file = _read_config_file()
    spelt = file.spelt(loc) if file is not None else None
    if spelt is not None:
        return spelt
    return ENV_PREFIX + "__".join(str(p) for p in loc if not isinstance(p, int)).upper()
