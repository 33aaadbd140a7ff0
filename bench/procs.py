"""The processes a benchmark run starts on loopback, besides the upstream registry
(``tests.support.registry.Registry``): the proxies under test and nginx."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import yaml
from tests.support.regclient import RegistryClient
from tests.support.registry import Registry, registry_binary
from tests.support.stowage import Stowage
from tests.support.util import (
    AccessLogEntry,
    HarnessError,
    ManagedProcess,
    free_port,
    parse_access_log,
    port_open,
    wait_port_closed,
    wait_until,
)


class Proxy(Protocol):
    """What the measurements need of a pull-through proxy."""

    label: str
    url: str

    def name_for(self, repository: str) -> str:
        """The repository name to ask the proxy for, for ``repository`` upstream."""
        ...

    def pid(self) -> int: ...

    def fresh(self) -> None:
        """(Re)start with an empty cache."""
        ...

    def stop(self) -> None: ...


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: its peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def disk_fsync_rate(directory: Path, size: int = 256 * 1024 * 1024) -> float:
    """Bytes/s of writing ``size`` bytes and fsyncing them in ``directory``."""
    path = directory / "fsync-probe"
    chunk = os.urandom(1024 * 1024)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    rate = size / (time.perf_counter() - started)
    path.unlink()
    return rate


class StowageProxy:
    label = "stowage"

    def __init__(self, workdir: Path, upstream: Registry) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = workdir / "stowage.log"
        self._instance: Stowage | None = None
        self.generation = 0

    def name_for(self, repository: str) -> str:
        return f"127.0.0.1-{self.upstream.port}/{repository}"

    @property
    def instance(self) -> Stowage:
        if self._instance is None:
            raise HarnessError("stowage not started")
        return self._instance

    def pid(self) -> int:
        pid = self.instance.process.pid
        assert pid is not None
        return pid

    def fresh(self) -> None:
        self.stop()
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        self.generation += 1
        self._instance = Stowage(
            data,
            port=self.port,
            insecure_registries=[self.upstream.host],
            log_format="json",
            log_file=self.log_file,
        ).start()

    def stop(self) -> None:
        if self._instance is not None:
            self._instance.stop()
            self._instance = None

    def metric(self, name: str, **labels: str) -> float:
        return self.instance.metric(name, **labels)


class DistributionProxy:
    """CNCF Distribution (Debian's docker-registry) in pull-through mode (``proxy.remoteurl``)."""

    label = "distribution"

    def __init__(self, workdir: Path, upstream: Registry) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = workdir / "access.log"
        self.config_file = workdir / "config.yml"
        self.data_dir = workdir / "data"
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                # As in the config.yml shipped with Distribution and its container image.
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "stowage-bench-secret"},
            "proxy": {"remoteurl": upstream.url},
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            [registry_binary(), "serve", str(self.config_file)],
            stdout_path=self.access_log,
            stderr_path=workdir / "registry.log",
        )

    def name_for(self, repository: str) -> str:
        return repository

    def pid(self) -> int:
        pid = self.process.pid
        if pid is None or not self.process.running():
            raise HarnessError("distribution proxy not running")
        return pid

    def fresh(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.process.start()
        probe = RegistryClient(self.url, timeout=2)

        def ready() -> bool:
            if not self.process.running():
                raise HarnessError(f"distribution proxy exited:\n{self.process.log_tail()}")
            if not port_open("127.0.0.1", self.port):
                return False
            try:
                return probe.raw("GET", "/v2/").status == 200
            except OSError:
                return False

        wait_until(ready, timeout=20, describe=self.process.log_tail)

    def stop(self) -> None:
        if self.process.running():
            self.process.stop()
            wait_port_closed("127.0.0.1", self.port)

    def requests(self) -> list[AccessLogEntry]:
        time.sleep(0.1)  # the access log line is written after the response
        return parse_access_log(self.access_log)


class Nginx:
    """nginx serving files with sendfile (the limit reference): ``files`` maps a URL
    name to a path, served at ``/<name>``. ``nopush=False`` sends like aiohttp does
    (TCP_NODELAY without TCP_CORK), to tell the socket options from the server's cost."""

    def __init__(self, workdir: Path, files: dict[str, Path], *, nopush: bool = True) -> None:
        binary = shutil.which("nginx")
        if binary is None:
            raise HarnessError("nginx not found (apt-get install nginx-light)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        temp = workdir / "temp"
        temp.mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"  {kind}_temp_path {temp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        locations = "".join(
            f"    location = /{name} {{\n      alias {path};\n"
            "      default_type application/octet-stream;\n    }\n"
            for name, path in files.items()
        )
        conf = workdir / "nginx.conf"
        conf.write_text(
            f"""{user}daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  {"tcp_nopush on;" if nopush else "tcp_nopush off;"}
  tcp_nodelay on;
  keepalive_requests 100000;
{temps}  server {{
    listen 127.0.0.1:{self.port};
{locations}  }}
}}
"""
        )
        self.process = ManagedProcess(
            [binary, "-p", str(workdir), "-c", str(conf)],
            stdout_path=workdir / "nginx.out",
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> Nginx:
        self.process.start()
        wait_until(
            lambda: port_open("127.0.0.1", self.port),
            timeout=10,
            describe=self.process.log_tail,
        )
        return self

    def stop(self) -> None:
        self.process.stop()
