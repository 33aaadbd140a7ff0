"""Configuration: command-line flags win over STOWAGE_* environment variables,
which win over the YAML config file, which wins over the defaults."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from stowage.oci.reference import is_valid_registry, normalize_registry
from stowage.store.gc import SizeLimit, parse_size
from stowage.units import parse_duration


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the problem."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stowage"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOWAGE_", extra="forbid")

    listen: str = Field("127.0.0.1:7439", description="Address to serve on, HOST:PORT.")
    data: Path = Field(
        default_factory=default_data_dir,
        description="Data directory: blobs, manifests and the index "
        "(default $XDG_DATA_HOME/stowage or ~/.local/share/stowage).",
    )
    insecure_registry: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Upstream reached over plain HTTP, HOST[:PORT]; repeatable "
        "(comma-separated in the environment).",
    )
    auth_file: Path | None = Field(
        None, description="Docker config.json-style file with upstream credentials."
    )
    ca_file: Path | None = Field(
        None, description="Extra CA bundle (PEM) trusted for upstream TLS, besides the system CAs."
    )
    tag_ttl: float = Field(
        300.0, ge=0, description="Seconds a cached tag is served without asking upstream."
    )
    default_registry: str = Field(
        "docker.io", description="Registry for names with neither host prefix nor ns."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to an upstream.")
    read_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for upstream bytes before giving up on it."
    )
    revalidate_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds an expired tag waits for upstream before the cached copy is "
        "served (stale).",
    )
    cache_retry: float = Field(
        30.0,
        gt=0,
        description="Seconds blobs are passed through uncached after the disk refused one "
        "(full, read-only) before caching is tried again.",
    )
    admin_token_file: Path | None = Field(
        None,
        description="File holding the bearer token of the cache administration API "
        "(/_stowage/v1: pin, unpin, release; the operator uses it); off without it.",
    )
    auth_cache_ttl: float = Field(
        300.0,
        ge=0,
        description="Seconds a verdict of upstream on a client's credentials for a private "
        "repository is reused (also while upstream is down); 0 asks upstream every time.",
    )
    log_format: Literal["plain", "json"] = Field("plain", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged."
    )
    max_size: str | None = Field(
        None,
        description="Cache size limit: bytes with an optional unit (50G = 50*10^9, "
        "500MiB = 500*2^20) or a percentage of the data directory's filesystem (80%). "
        "Default: no limit.",
    )
    high_watermark: float = Field(
        85.0,
        gt=0,
        le=100,
        description="Percent of --max-size above which least-recently-used images are evicted.",
    )
    low_watermark: float = Field(
        80.0,
        gt=0,
        le=100,
        description="Percent of --max-size that eviction brings the cache down to.",
    )
    gc_interval: float = Field(
        60.0,
        gt=0,
        description="Seconds between garbage collections (unreferenced content; eviction "
        "checks also run right after a fill that crossed the high watermark).",
    )
    gc_grace: float = Field(
        3600.0,
        ge=0,
        description="Seconds unreferenced content is kept after its last use before garbage "
        "collection removes it (a blob whose manifest is still to come).",
    )
    parent: str | None = Field(
        None,
        description="URL (http:// or https://HOST[:PORT]) of a parent stowage, e.g. the "
        "cluster's: every registry request is tried there first (anonymously, host-prefixed) "
        "and sent to the registry itself when the parent cannot be reached, fails or refuses "
        "(a failing parent is left alone for 5 s). Default: registries only.",
    )

    @field_validator("insecure_registry", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("insecure_registry")
    @classmethod
    def _registries(cls, value: list[str]) -> list[str]:
        return [_registry(v) for v in value]

    @field_validator("default_registry")
    @classmethod
    def _default_registry(cls, value: str) -> str:
        return _registry(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("parent", mode="before")
    @classmethod
    def _parent(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError("--parent must be a URL")
        try:
            return http_url(value)
        except ValueError as exc:
            raise ValueError(f"--parent {exc}") from None

    @field_validator("max_size", mode="before")
    @classmethod
    def _max_size(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            return str(parse_size(value))
        except ValueError as exc:
            raise ValueError(f"--max-size: {exc}") from None

    @model_validator(mode="after")
    def _watermarks(self) -> Settings:
        if self.low_watermark >= self.high_watermark:
            raise ValueError(
                f"--low-watermark ({self.low_watermark:g}) must be below "
                f"--high-watermark ({self.high_watermark:g})"
            )
        return self

    @property
    def size_limit(self) -> SizeLimit | None:
        return None if self.max_size is None else parse_size(self.max_size)

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)


class ClusterSettings(BaseSettings):
    """What the processes that run in a cluster (operator, agent) have in common."""

    model_config = SettingsConfigDict(env_prefix="STOWAGE_", extra="forbid")

    kubeconfig: Path | None = Field(
        None,
        description="Kubeconfig to use outside a cluster (default: in-cluster config, "
        "else $KUBECONFIG or ~/.kube/config).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["plain", "json"] = Field("plain", description="Log format.")

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: Any) -> Any:
        """A list option given as one string (environment, YAML) is comma-separated."""
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, str) and typing.get_origin(info.annotation) is list:
                data[name] = [v.strip() for v in value.split(",") if v.strip()]
        return data


def positive_duration(value: Any) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or seconds, more than zero."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def http_url(value: str) -> str:
    """A service's base URL, ``http(s)://host[:port]``, without a trailing slash."""
    value = value.strip()
    problem = _url_problem(value)
    if problem is not None:
        raise ValueError(f"{value!r} {problem}")
    return value.rstrip("/")


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if parts.path.strip("/") or parts.query or parts.fragment:
        return "must be scheme://host[:port] only (no path, query or fragment)"
    return None


def _registry(value: str) -> str:
    host = normalize_registry(value.strip())
    if "://" in host or not is_valid_registry(host):
        raise ValueError(f"{value!r} is not a registry HOST[:PORT]")
    return host


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


S = TypeVar("S", bound=BaseSettings)


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from flags (None = not given), environment and config file."""
    return load_layered(Settings, config_file, **flags)


def load_layered(cls: type[S], config_file: Path | None = None, **flags: Any) -> S:
    """``cls`` from flags (None = not given), environment and config file."""
    if config_file is None and os.environ.get("STOWAGE_CONFIG"):
        config_file = Path(os.environ["STOWAGE_CONFIG"])
    file_values = _read_yaml(config_file, cls) if config_file else {}
    given = {k: v for k, v in flags.items() if v is not None and v != ()}

    class _Layered(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        return _Layered(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def _read_yaml(path: Path, cls: type[BaseSettings]) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not readable YAML: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values
