"""`stowage agent` as the e2e tests run it: a process against the test apiserver and a
private containerd's CRI socket."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from tests.support.kube import KubeAPI
from tests.support.util import HarnessError, ManagedProcess, Service, free_port, http_ok
from tests.support.util import wait_until as _wait_until


class Agent(Service):
    def __init__(
        self,
        kube: KubeAPI,
        workdir: Path,
        *,
        node: str,
        cri_endpoint: str,
        proxy_address: str,
        proxy_url: str,
        config_path: Path,
        extra_args: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.health_port = free_port()
        self.log_file = workdir / "agent.log"
        argv = [
            sys.executable,
            "-m",
            "stowage",
            "agent",
            f"--kubeconfig={kube.kubeconfig}",
            f"--node-name={node}",
            f"--cri-socket={cri_endpoint}",
            f"--proxy-address={proxy_address}",
            f"--proxy-url={proxy_url}",
            f"--containerd-config-path={config_path}",
            f"--state-dir={workdir / 'state'}",
            f"--health-listen=127.0.0.1:{self.health_port}",
            "--sync-interval=2",
            "--log-format=json",
            *extra_args,
        ]
        self.process = ManagedProcess(argv, stdout_path=self.log_file, cwd=workdir)

    def start(self) -> Self:
        self.process.start()
        _wait_until(self._ready, timeout=60, interval=0.2, describe=self.log_tail)
        return self

    def _ready(self) -> bool:
        if not self.process.running():
            raise HarnessError("stowage agent exited:\n" + self.log_tail())
        return http_ok(f"http://127.0.0.1:{self.health_port}/healthz")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/metrics") as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)
