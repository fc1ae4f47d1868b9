"""Every setting of every LockN Gen process, in one typed class.

Values come from environment variables (prefix `LOCKN_`, `__` between nested
names, e.g. `LOCKN_COMFYUI__BASE_URL`), then from an optional JSON/YAML file
named by `LOCKN_CONFIG_FILE`, then from the defaults. The file may use the
LOC-58 note's `appsettings.json` spelling (`"ComfyUi": {"BaseUrl": ...}`).
`DATABASE_URL` is read too, as most tooling sets it. Nothing else in the code
reads `os.environ`: a bad value stops start-up with one line naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

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
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "LOCKN_"
CONFIG_FILE_VARIABLE = "LOCKN_CONFIG_FILE"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _alias(name: str, legacy: str) -> AliasChoices:
    return AliasChoices(name, legacy)


class ComfyUiSettings(BaseModel):
    """The LOC-58 note's `ComfyUi` section, kept name for name."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    base_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://localhost:8188"), validation_alias=_alias("base_url", "BaseUrl")
    )
    timeout_seconds: PositiveInt = Field(
        300, validation_alias=_alias("timeout_seconds", "TimeoutSeconds")
    )
    poll_interval_ms: PositiveInt = Field(
        2000, validation_alias=_alias("poll_interval_ms", "PollIntervalMs")
    )
    max_concurrent_generations: PositiveInt = Field(
        1, validation_alias=_alias("max_concurrent_generations", "MaxConcurrentGenerations")
    )
    workflows_path: Path = Field(
        Path("./workflows"), validation_alias=_alias("workflows_path", "WorkflowsPath")
    )
    output_path: Path = Field(
        Path("./outputs"), validation_alias=_alias("output_path", "OutputPath")
    )


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

    comfyui: ComfyUiSettings = Field(
        default_factory=ComfyUiSettings, validation_alias=_alias("comfyui", "ComfyUi")
    )
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
        return (init_settings, env_settings, _FileSource(settings_cls))

    @property
    def database_dsn(self) -> str:
        if self.database_url is None:
            raise SettingsError("LOCKN_DATABASE_URL", "is not set (nor DATABASE_URL)")
        return self.database_url.get_secret_value()


class _FileSource(PydanticBaseSettingsSource):
    """The optional JSON or YAML file named by LOCKN_CONFIG_FILE."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        name = os.environ.get(CONFIG_FILE_VARIABLE)
        if not name:
            return {}
        path = Path(name)
        try:
            text = path.read_text()
        except OSError as error:
            raise SettingsError(
                CONFIG_FILE_VARIABLE, f"cannot read {path}: {error.strerror}"
            ) from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as error:
            raise SettingsError(CONFIG_FILE_VARIABLE, f"{path} is not valid: {error}") from None
        if not isinstance(data, dict):
            raise SettingsError(CONFIG_FILE_VARIABLE, f"{path} must hold a mapping")
        return data


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
    except ValidationError as error:
        first = error.errors()[0]
        name = ENV_PREFIX + "__".join(str(p) for p in first["loc"] if not isinstance(p, int))
        raise SettingsError(name.upper(), first["msg"]) from None
