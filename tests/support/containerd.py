"""A private ``containerd`` daemon (plus ``ctr``) for end-to-end pulls through stowage.

The daemon gets its own root/state/socket in temp dirs, so it never touches a system
containerd. It needs root; use ``require_containerd()`` to skip cleanly otherwise.

Its CRI plugin serves ``runtime.v1`` on the same socket (``cri_socket``/``cri_endpoint``);
image operations work without CNI, and its ``registry.config_path`` is ``hosts_dir``. Pod
sandboxes can run too when a ``sandbox_image`` is given (host network only: there is no
CNI); ``build_pause_layout`` makes a tiny one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import grpc

from stowage.agent.criapi import api_pb2 as pb
from stowage.agent.criapi import api_pb2_grpc as rpc
from tests.support.images import OCI_CONFIG, OCI_LAYER_GZIP, REF_NAME
from tests.support.regclient import OCI_INDEX, OCI_MANIFEST, sha256_digest
from tests.support.util import HarnessError, ManagedProcess, Service, tail, wait_until

NAMESPACE = "test"
CRI_NAMESPACE = "k8s.io"  # where the CRI plugin keeps its images, containers and sandboxes
START_TIMEOUT = 30.0

# Plugins that cannot work in a test sandbox (no btrfs/zfs/devmapper/aufs backing store) or
# are not needed. Disabling them keeps startup fast and the log readable; containerd would
# otherwise just log a load failure for each. The CRI plugin stays enabled so its registry
# config (config_path) is exercised, with CNI pointed at empty temp dirs.
DISABLED_PLUGINS: tuple[str, ...] = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

# The native snapshotter is a plain copy: slower than overlayfs, but works inside
# containers where overlay-on-overlay mounts are not allowed. Test images are tiny anyway.
SNAPSHOTTER = "native"


def require_containerd() -> None:
    """pytest.skip unless containerd can run here (root + binaries)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("containerd tests need root")
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install containerd)")


def _toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_hosts_toml(
    hosts_dir: Path,
    registry_host: str,
    mirror_url: str | None = None,
    *,
    server_url: str | None = None,
    server_ca: Path | None = None,
    mirror_ca: Path | None = None,
    mirror_capabilities: Sequence[str] = ("pull", "resolve"),
    mirror_override_path: bool = False,
) -> Path:
    """Write ``hosts_dir/<registry_host>/hosts.toml``.

    ``server_url`` defaults to ``http://<registry_host>`` (or https when ``server_ca`` is
    given). With a ``mirror_url`` containerd tries the mirror first and sends ``?ns=<host>``
    on every request to it, then falls back to ``server``.
    """
    if server_url is None:
        server_url = f"{'https' if server_ca else 'http'}://{registry_host}"
    lines = [f"server = {_toml_str(server_url)}"]
    if server_ca is not None:
        lines.append(f"ca = {_toml_str(server_ca)}")
    if mirror_url is None:
        # containerd 1.6 rejects a hosts.toml without any `host` tree ("invalid `host` tree",
        # containerd#10027) and silently falls back to defaults; an empty table avoids that.
        lines += ["", "[host]"]
    else:
        caps = ", ".join(_toml_str(c) for c in mirror_capabilities)
        lines += ["", f"[host.{_toml_str(mirror_url)}]", f"  capabilities = [{caps}]"]
        if mirror_ca is not None:
            lines.append(f"  ca = {_toml_str(mirror_ca)}")
        if mirror_override_path:
            lines.append("  override_path = true")
    directory = hosts_dir / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Containerd(Service):
    def __init__(
        self,
        workdir: Path | None = None,
        *,
        hosts_dir: Path | None = None,
        sandbox_image: str | None = None,
    ) -> None:
        """``sandbox_image``: the CRI plugin's pause image (pulled on the first
        RunPodSandbox); setting it also makes runc usable here (see ``_config``)."""
        self.sandbox_image = sandbox_image
        # Unix socket paths are limited to ~108 bytes and pytest tmp paths can be long, so
        # the socket and state (which holds more sockets) live in a short mkdtemp dir.
        self._short = tempfile.TemporaryDirectory(prefix="ctrd-")
        short = Path(self._short.name)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="containerd-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = short / "state"
        self.socket = short / "containerd.sock"
        self.hosts_dir = hosts_dir or workdir / "hosts.d"
        self.log_file = workdir / "containerd.log"
        self.config_file = workdir / "config.toml"
        for d in (
            self.root,
            self.state,
            self.hosts_dir,
            workdir / "cni" / "bin",
            workdir / "cni" / "conf",
            workdir / "opt",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._config())
        binary = shutil.which("containerd")
        if binary is None:
            raise HarnessError("containerd not installed")
        self.process = ManagedProcess(
            [binary, "--config", str(self.config_file)], stdout_path=self.log_file
        )

    def _config(self) -> str:
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        w = self.workdir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        pods = ""
        runtime = ""
        if self.sandbox_image is not None:
            # Containers: the pause image comes from the test registry; oom_score_adj is
            # clamped to containerd's own (lowering it needs CAP_SYS_RESOURCE, which a
            # sandboxed root may lack: runc then fails with "can't get final child's PID");
            # runc keeps its state in our state dir, not /run/containerd/runc.
            pods = (
                f"  sandbox_image = {_toml_str(self.sandbox_image)}\n"
                "  restrict_oom_score_adj = true\n"
            )
            runtime = f"""\
  [{cri}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [{cri}.containerd.runtimes.runc.options]
    Root = {_toml_str(self.state / "runc")}
"""
        return f"""\
version = 2
root = {_toml_str(self.root)}
state = {_toml_str(self.state)}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml_str(self.socket)}

[ttrpc]
  address = {_toml_str(str(self.socket) + ".ttrpc")}

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(w / "opt")}

[{cri}]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
{pods}  [{cri}.containerd]
    snapshotter = "{SNAPSHOTTER}"
{runtime}  [{cri}.cni]
    bin_dir = {_toml_str(w / "cni" / "bin")}
    conf_dir = {_toml_str(w / "cni" / "conf")}
  [{cri}.registry]
    config_path = {_toml_str(self.hosts_dir)}
"""

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self.process.running():
            return self
        self.process.start()

        def ready() -> bool:
            if not self.process.running():
                raise HarnessError(f"containerd exited:\n{tail(self.log_file)}")
            if not self.socket.exists():
                return False
            return self.ctr("version", check=False).returncode == 0

        wait_until(ready, timeout=START_TIMEOUT, interval=0.1, describe=lambda: tail(self.log_file))
        return self

    def stop(self) -> None:
        if self.sandbox_image is not None and self.process.running():
            self._kill_cri_tasks()
        self.process.stop(15)

    def _kill_cri_tasks(self) -> None:
        """Sandboxes and containers outlive containerd (their shims are not its children),
        and a sandbox's /dev/shm stays mounted under our state dir: remove every pod a test
        left behind, over the CRI as kubelet would, then kill any task still there."""
        try:
            with grpc.insecure_channel(self.cri_endpoint) as channel:
                runtime = rpc.RuntimeServiceStub(channel)
                pods = runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
                for pod in pods:
                    runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
                    runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
        except grpc.RpcError as exc:
            print(f"containerd harness: removing pods failed: {exc}")
        listed = self.ctr("tasks", "ls", "-q", namespace=CRI_NAMESPACE, check=False)
        for task in listed.stdout.split():
            self.ctr("tasks", "delete", "--force", task, namespace=CRI_NAMESPACE, check=False)

    # --- CRI ------------------------------------------------------------------------------

    @property
    def cri_socket(self) -> Path:
        """The CRI plugin serves runtime.v1 on containerd's own gRPC socket."""
        return self.socket

    @property
    def cri_endpoint(self) -> str:
        return f"unix://{self.socket}"

    def close(self) -> None:
        self.stop()
        self._short.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --- ctr ------------------------------------------------------------------------------

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120, namespace: str = NAMESPACE
    ) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("ctr") or "ctr"
        argv = [binary, "--address", str(self.socket), "--namespace", namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path | None = None,
        plain_http: bool = False,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        extra_args: Sequence[str] = (),
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` (not raising: tests assert on returncode/output).

        ``user`` is ``name:password``.
        """
        args = [
            "images",
            "pull",
            "--snapshotter",
            SNAPSHOTTER,
            "--hosts-dir",
            str(hosts_dir or self.hosts_dir),
        ]
        if plain_http:
            args.append("--plain-http")
        if user:
            args += ["--user", user]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        args += [*extra_args, ref]
        return self.ctr(*args, check=False, timeout=timeout)

    def images(self) -> dict[str, str]:
        """{ref: manifest/index digest} from ``ctr images ls``."""
        out = self.ctr("images", "ls").stdout.splitlines()
        result: dict[str, str] = {}
        for line in out[1:]:  # header: REF TYPE DIGEST SIZE PLATFORMS LABELS
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = cols[2]
        return result

    def image_digest(self, ref: str) -> str | None:
        return self.images().get(ref)

    def content_digests(self) -> set[str]:
        """Digests of all blobs in containerd's content store."""
        out = self.ctr("content", "ls", "-q").stdout.split()
        return {d for d in out if d.startswith("sha256:")}

    def remove_image(self, ref: str) -> None:
        self.ctr("images", "rm", "--sync", ref, check=False)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_file, lines)


# --- a pause image for pod sandboxes ----------------------------------------------------------


def pods_unsupported() -> str | None:
    """Why pod sandboxes cannot run here (for pytest.skip), or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the test pause binary is x86-64 only, not {platform.machine()}"
    if shutil.which("runc") is None:
        return "runc not installed"
    return None


def pause_binary() -> bytes:
    """A 129-byte static x86-64 Linux executable that sleeps forever: ``pause()`` in a loop.

    As a sandbox's PID 1 it ignores SIGTERM (no handler), so containerd stops it with
    SIGKILL, as it does the real pause image's. Built here so the tests need no toolchain
    and no image from the network.
    """
    base = 0x400000
    code = bytes([0xB8, 0x22, 0, 0, 0, 0x0F, 0x05, 0xEB, 0xF7])  # mov eax,34; syscall; jmp -9
    ehsize, phsize = 64, 56
    size = ehsize + phsize + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # e_type: ET_EXEC
        0x3E,  # e_machine: x86-64
        1,  # e_version
        base + ehsize + phsize,  # e_entry: the code, right after the headers
        ehsize,  # e_phoff
        0,  # e_shoff: no section headers
        0,  # e_flags
        ehsize,  # e_ehsize
        phsize,  # e_phentsize
        1,  # e_phnum
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD R+X
    return header + segment + code


def build_pause_layout(dest: Path, tag: str = "1") -> Path:
    """An OCI image layout at ``dest`` holding ``/pause`` (``pause_binary``) as entrypoint."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> dict[str, Any]:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    binary = pause_binary()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(binary), 0o755, 1_700_000_000
        tar.addfile(info, io.BytesIO(binary))
    layer = tar_buf.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **put(json.dumps(config).encode())},
        "layers": [{"mediaType": OCI_LAYER_GZIP, **put(gzip.compress(layer, mtime=0))}],
    }
    descriptor = {"mediaType": OCI_MANIFEST, **put(json.dumps(manifest).encode())}
    descriptor["annotations"] = {REF_NAME: tag}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
    (dest / "index.json").write_text(json.dumps(index))
    return dest
