"""The node agent's configuration: flags > STOWAGE_* environment > YAML file > defaults."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from stowage.agent.cri import DEFAULT_ENDPOINT
from stowage.agent.mirror import DEFAULT_PROXY_URL
from stowage.settings import ClusterSettings, http_url, positive_duration, split_listen

TAINT_KEY = "stowage.dev/not-ready"


def _node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


class AgentSettings(ClusterSettings):
    node_name: str = Field(
        default_factory=_node_name,
        description="This node's name (default $NODE_NAME, else the host name).",
    )
    cri_socket: str = Field(DEFAULT_ENDPOINT, description="The runtime's CRI socket.")
    proxy_address: str = Field(
        "localhost:7439",
        description="Node proxy HOST:PORT images are pulled through (host-prefixed, as the "
        "webhook rewrites pods), for registries not mirrored.",
    )
    proxy_url: str = Field(
        DEFAULT_PROXY_URL,
        description="URL of the node proxy: containerd's mirror, and whose /readyz lifts "
        "the start-up taint.",
    )
    containerd_config_path: Path = Field(
        Path("/etc/containerd/certs.d"),
        description="containerd's registry config_path, where hosts.toml files go.",
    )
    mirror: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Registry whose pulls containerd sends through the node proxy first "
        "(hosts.toml; falls back to the registry): HOST[:PORT], http://HOST[:PORT] for a "
        "plain-HTTP one, or _default for all; repeatable (default: none).",
    )
    uninstall: bool = Field(
        False,
        description="Remove the hosts.toml files the agent wrote, restore the ones it "
        "replaced, and exit.",
    )
    disk_threshold: float = Field(
        85.0,
        gt=0,
        le=100,
        description="Percent of the image filesystem in use above which pre-pulls are "
        "skipped (kubelet's image GC starts at 85).",
    )
    remove_taint: bool = Field(
        False,
        description=f"Remove the start-up taint {TAINT_KEY}:NoSchedule from this node once "
        "the node proxy answers /readyz.",
    )
    sync_interval: float = Field(
        30.0, description="Seconds between two full reconciliations (watch events come sooner)."
    )
    state_dir: Path = Field(
        Path("/var/lib/stowage-agent"),
        description="Where the agent remembers the images it pulled (only those it removes).",
    )
    health_listen: str = Field(
        "0.0.0.0:8081",
        description="Address of the liveness (GET /healthz) and Prometheus metrics "
        "(GET /metrics) endpoints.",
    )

    @field_validator("sync_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return positive_duration(value)

    @field_validator("health_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("proxy_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)
