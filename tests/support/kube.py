"""A real Kubernetes API on loopback for the e2e tests: etcd + kube-apiserver (envtest style,
no kubelet, scheduler or controller-manager), plus kubectl. The binaries are built from Go
modules by ``scripts/build-test-binaries.sh`` into ``.cache/bin/``.

Flags that matter without the rest of a control plane:
- ``--endpoint-reconciler-type=none``: with ``--advertise-address=127.0.0.1`` the reconciler
  would refuse the loopback address for the default/kubernetes Endpoints.
- ``--disable-admission-plugins=ServiceAccount``: no controller-manager creates the
  ``default`` ServiceAccount, so pods would be refused.
- The self-signed serving certificate in ``certs/apiserver.crt`` (SANs include 127.0.0.1)
  doubles as the kubeconfig's CA. The kubeconfig user is a static token in group
  system:masters; anonymous requests are system:anonymous (403).
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.util import (
    HarnessError,
    ManagedProcess,
    Service,
    free_port,
    http_ok,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".cache" / "bin"
BINARIES = ("etcd", "kube-apiserver", "kubectl")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if not (BIN / name).exists()]


class KubeAPI(Service):
    """etcd + kube-apiserver in ``workdir``; ``kubeconfig`` is an admin kubeconfig."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.token = secrets.token_hex(16)
        self.port = 0
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None
        self.kubeconfig = workdir / "kubeconfig"
        self.ca_path = workdir / "certs" / "apiserver.crt"
        self._ssl: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> KubeAPI:
        missing = missing_binaries()
        if missing:
            raise HarnessError(f"missing {missing} in {BIN} (run scripts/build-test-binaries.sh)")
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (d / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (d / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')

        etcd_port, peer_port = free_port(), free_port()
        self.etcd = ManagedProcess(
            [
                str(BIN / "etcd"),
                "--name=test",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
            stdout_path=d / "etcd.log",
        )
        self.etcd.start()
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{etcd_port}/health"),
            timeout=30,
            describe=lambda: "etcd health\n" + self._tails(),
        )

        self.port = free_port()
        self.apiserver = ManagedProcess(
            [
                str(BIN / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.port}",
                f"--cert-dir={d / 'certs'}",
                f"--service-account-issuer=https://127.0.0.1:{self.port}",
                f"--service-account-key-file={d / 'sa.key'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--enable-priority-and-fairness=false",
                "--v=1",
            ],
            stdout_path=d / "kube-apiserver.log",
        )
        self.apiserver.start()
        wait_until(self._ready, timeout=90, interval=0.2, describe=self._tails)
        self._write_kubeconfig()
        # The default namespace's objects are created by the apiserver itself shortly after
        # /readyz; wait so the first test does not race it.
        wait_until(
            lambda: self.request("GET", "/api/v1/namespaces/default")[0] == 200,
            timeout=30,
            describe=self._tails,
        )
        return self

    def stop(self) -> None:
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop()

    def _tails(self) -> str:
        return "\n".join(p.log_tail(30) for p in (self.etcd, self.apiserver) if p is not None)

    def _ready(self) -> bool:
        if self.apiserver is None or not self.apiserver.running():
            raise HarnessError("kube-apiserver exited:\n" + self._tails())
        if not self.ca_path.exists():
            return False
        try:
            with urllib.request.urlopen(
                f"{self.url}/readyz", context=self.ssl_context(), timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        return self._ssl

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    # --- clients ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        token: str | None = None,
    ) -> tuple[int, Any]:
        """One API call as admin (or ``token``); returns (status, decoded JSON body)."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """``request`` that must succeed; returns the body."""
        status, doc = self.request(method, path, body, **kwargs)
        if status >= 300:
            raise HarnessError(f"{method} {path} -> {status}: {doc}")
        return doc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise HarnessError(f"kubectl {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
        return proc
