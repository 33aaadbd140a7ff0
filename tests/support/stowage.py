"""``Stowage``: the system under test, run as a real ``python -m stowage serve`` subprocess.

CLI contract relied upon: ``serve --listen HOST:PORT --data DIR --insecure-registry HOST[:PORT]
(repeatable) --auth-file PATH --tag-ttl SECONDS --default-registry HOST --ca-file PATH
--log-format json|plain``; readiness via ``GET /readyz`` -> 200; metrics on ``/metrics``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from prometheus_client.parser import text_string_to_metric_families

from tests.support.regclient import RegistryClient, Response
from tests.support.util import (
    HarnessError,
    ManagedProcess,
    Service,
    free_port,
    port_open,
    tail,
    wait_port_closed,
    wait_until,
)

READY_TIMEOUT = 30.0

MetricKey = tuple[str, frozenset[tuple[str, str]]]


class Stowage(Service):
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        insecure_registries: Sequence[str] = (),
        auth_file: Path | None = None,
        tag_ttl: float | None = None,
        default_registry: str | None = None,
        ca_file: Path | None = None,
        log_format: Literal["json", "plain"] = "json",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        argv = [
            sys.executable,
            "-m",
            "stowage",
            "serve",
            "--listen",
            self.host,
            "--data",
            str(data_dir),
            "--log-format",
            log_format,
        ]
        for reg in insecure_registries:
            argv += ["--insecure-registry", reg]
        if auth_file is not None:
            argv += ["--auth-file", str(auth_file)]
        if tag_ttl is not None:
            argv += ["--tag-ttl", _num(tag_ttl)]
        if default_registry is not None:
            argv += ["--default-registry", default_registry]
        if ca_file is not None:
            argv += ["--ca-file", str(ca_file)]
        argv += list(extra_args)
        # Log next to (not inside) the data dir, so tests inspecting the store see only its files.
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="stowage-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
        self.log_file = log_file
        self.process = ManagedProcess(
            argv,
            stdout_path=log_file,
            env={"PYTHONUNBUFFERED": "1", **(env or {})},
        )

    # --- addressing -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def argv(self) -> list[str]:
        return self.process.argv

    def client(self, username: str | None = None, password: str | None = None) -> RegistryClient:
        return RegistryClient(self.url, username=username, password=password)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.client().raw("GET", path, headers)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self.process.running():
            return self
        if port_open("127.0.0.1", self.port):
            raise HarnessError(f"port {self.port} is already in use")
        self.process.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.ready_timeout if timeout is None else timeout
        client = RegistryClient(self.url, timeout=2)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.process.running():
                raise HarnessError(
                    f"stowage exited with {self.process.proc and self.process.proc.returncode} "
                    f"before becoming ready\nargv: {self.argv}\n{self.log_tail()}"
                )
            try:
                resp = client.raw("GET", "/readyz")
                if resp.status == 200:
                    return
                last = f"/readyz -> {resp.status} {resp.body[:200]!r}"
            except OSError as e:
                last = f"/readyz: {e}"
            time.sleep(0.1)
        self.process.kill()
        raise HarnessError(
            f"stowage not ready after {timeout}s ({last})\nargv: {self.argv}\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``."""
        rc = self.process.stop(timeout)
        wait_port_closed("127.0.0.1", self.port)
        return rc

    def kill9(self) -> int | None:
        rc = self.process.kill()
        wait_port_closed("127.0.0.1", self.port)
        return rc

    def signal(self, sig: signal.Signals) -> None:
        if self.process.proc is None:
            raise HarnessError("stowage not started")
        os.kill(self.process.proc.pid, sig)

    def restart(self) -> Self:
        """Graceful stop then start on the same port and data dir."""
        self.stop()
        return self.start()

    def running(self) -> bool:
        return self.process.running()

    @property
    def returncode(self) -> int | None:
        return self.process.proc.returncode if self.process.proc else None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_file, lines)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines whose ``event`` is exactly ``event``, parsed, oldest first."""
        return [
            doc
            for line in self.log_text().splitlines()
            if line.startswith("{") and (doc := json.loads(line)).get("event") == event
        ]

    # --- metrics --------------------------------------------------------------------------

    def metrics(self) -> dict[MetricKey, float]:
        """``/metrics`` as {(sample name, frozenset(labels)): value}. Sample names keep their
        suffixes (``_total``, ``_bucket``, ``_count`` ...)."""
        resp = self.get("/metrics")
        if resp.status != 200:
            raise HarnessError(f"/metrics -> {resp.status}: {resp.body[:200]!r}")
        out: dict[MetricKey, float] = {}
        for family in text_string_to_metric_families(resp.body.decode()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return out

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no fill is in flight: clients get a blob's last byte once it is
        verified, and the file is committed (fsync, rename, index) just after."""
        wait_until(
            lambda: self.metric("stowage_fills_in_flight") == 0,
            timeout=timeout,
            describe=lambda: "fills to be committed",
        )

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples named ``name`` (or ``name_total``) whose labels include ``labels``.

        Summing over supersets keeps tests robust to extra labels; 0.0 when nothing matches.
        """
        return metric_value(self.metrics(), name, **labels)


def metric_value(metrics: Mapping[MetricKey, float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    for candidate in (name, f"{name}_total"):
        values = [v for (n, ls), v in metrics.items() if n == candidate and wanted <= ls]
        if values:
            return sum(values)
    return 0.0


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without STOWAGE_* (so only the test decides), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOWAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``stowage ARGS`` as a user runs it: its own process, no stdin, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "stowage", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
