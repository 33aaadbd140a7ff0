"""The ``stowage`` command line as a user sees it: help, configuration layering, errors,
``stowage cache ...`` against a data dir filled by real pulls, and the request log."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RegistryFactory, SampleImages, StowageFactory
from tests.support.images import PushedImage, push_image
from tests.support.regclient import ACCEPT_ALL_MANIFESTS, RegistryClient, sha256_digest
from tests.support.registry import Registry
from tests.support.stowage import Stowage, clean_env, run_cli
from tests.support.util import free_port, port_open, wait_port_closed

pytestmark = pytest.mark.integration

CLI_TIMEOUT = 60.0


# --- local helpers ------------------------------------------------------------------------


def _cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, no traceback, every needle in the combined output."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    flat = _flat(out)
    for needle in needles:
        assert needle in flat, f"{needle!r} not in output:\n{out}"
    return out


class ServeProcess:
    """``python -m stowage serve ARGS`` with a chosen environment (no --listen forced)."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_file: Path) -> None:
        self.log_file = log_file
        self._log = log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stowage", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            start_new_session=True,
        )

    def wait_ready(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        client = RegistryClient(f"http://127.0.0.1:{port}", timeout=2)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"stowage exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if client.raw("GET", "/readyz").status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"stowage not ready on port {port}:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


ServeFactory = Callable[..., ServeProcess]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    started: list[ServeProcess] = []
    counter = iter(range(1000))

    def start(args: Sequence[str], env: Mapping[str, str] | None = None) -> ServeProcess:
        proc = ServeProcess(args, env or {}, tmp_path / f"serve-{next(counter)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _readyz(port: int) -> bool:
    if not port_open("127.0.0.1", port):
        return False
    return RegistryClient(f"http://127.0.0.1:{port}", timeout=2).raw("GET", "/readyz").status == 200


def _pull(stowage: Stowage, registry: Registry, image: PushedImage) -> None:
    """Manifest by tag and every blob through stowage (host-prefixed), verified."""
    name = f"{registry.path_prefix}/{image.repository}"
    resp = stowage.get(f"/v2/{name}/manifests/{image.tag}", {"Accept": ACCEPT_ALL_MANIFESTS})
    assert resp.status == 200, resp.body
    assert resp.body == image.manifest_bytes
    for digest, _ in image.blobs:
        blob = stowage.get(f"/v2/{name}/blobs/{digest}")
        assert blob.status == 200, blob.body
        assert sha256_digest(blob.body) == digest
    stowage.settle()


def _blob_file(data_dir: Path, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return data_dir / "blobs" / "sha256" / hex_digest[:2] / hex_digest


def _image_size(image: PushedImage) -> int:
    return len(image.manifest_bytes) + sum(size for _, size in image.blobs)


def _ls_json(data_dir: Path) -> list[dict[str, Any]]:
    proc = _cli("cache", "ls", "--json", "--data", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


# --- help ---------------------------------------------------------------------------------

FLAGS = (
    "--listen",
    "--data",
    "--config",
    "--insecure-registry",
    "--auth-file",
    "--tag-ttl",
    "--default-registry",
    "--ca-file",
    "--connect-timeout",
    "--read-timeout",
    "--cache-retry",
    "--log-format",
    "--log-level",
)


def _option_help(help_text: str, flag: str) -> str:
    """The help paragraph of one option (from its flag up to the next option)."""
    flat = _flat(help_text)
    match = re.search(rf"(?:^| ){re.escape(flag)}\b(.*?)(?= --[a-z]| -h, --help|$)", flat)
    assert match, f"{flag} not documented:\n{help_text}"
    return match.group(1)


def test_serve_help_documents_every_flag() -> None:
    proc = _cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        text = _option_help(proc.stdout, flag)
        env = "STOWAGE_" + flag.removeprefix("--").replace("-", "_").upper()
        assert len(text) > 20, f"{flag} has no description: {text!r}"
        if flag != "--config":
            assert env in text, f"{flag} does not name {env}: {text!r}"
    assert "[default: 127.0.0.1:7439]" in _option_help(proc.stdout, "--listen")
    assert "[default: docker.io]" in _option_help(proc.stdout, "--default-registry")
    assert re.search(r"\[default: 300(\.0)?\]", _option_help(proc.stdout, "--tag-ttl"))
    assert "json" in _option_help(proc.stdout, "--log-format")
    assert "debug" in _option_help(proc.stdout, "--log-level")


# --- configuration precedence -------------------------------------------------------------


def test_config_file_env_and_flag_precedence(
    serve: ServeFactory, registry: Registry, images: SampleImages, tmp_path: Path
) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    assert len({file_port, env_port, flag_port}) == 3
    config = tmp_path / "stowage.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{file_port}\n"
        f"data: {tmp_path / 'data'}\n"
        f"insecure-registry: [{registry.host}]\n"
        "tag-ttl: 1\n"
        "log-format: json\n"
    )

    # 1. File only: its listen address serves, its tag TTL (1 s) and upstream list apply.
    proc = serve(["--config", str(config)])
    proc.wait_ready(file_port)
    app = images.app
    path = f"/v2/{registry.path_prefix}/library/app/manifests/1"
    client = RegistryClient(f"http://127.0.0.1:{file_port}")
    since = registry.checkpoint()
    assert client.raw("GET", path, {"Accept": ACCEPT_ALL_MANIFESTS}).body == app.manifest_bytes
    assert client.raw("GET", path, {"Accept": ACCEPT_ALL_MANIFESTS}).status == 200
    assert registry.count("HEAD", "/library/app/manifests/1", since=since) == 0
    time.sleep(1.2)  # past the file's 1 s TTL (the default would be 300 s)
    assert client.raw("GET", path, {"Accept": ACCEPT_ALL_MANIFESTS}).body == app.manifest_bytes
    assert registry.count("HEAD", "/library/app/manifests/1", since=since) == 1
    serving = [line for line in proc.json_lines() if line.get("event") == "serving"]
    assert serving and serving[-1]["tag_ttl"] == 1
    assert proc.stop() == 0
    wait_port_closed("127.0.0.1", file_port)

    # 2. STOWAGE_LISTEN beats the file.
    env = {"STOWAGE_LISTEN": f"127.0.0.1:{env_port}"}
    proc = serve(["--config", str(config)], env)
    proc.wait_ready(env_port)
    assert not port_open("127.0.0.1", file_port)
    proc.stop()
    wait_port_closed("127.0.0.1", env_port)

    # 3. --listen beats the environment; the file still supplies the rest (tag TTL).
    proc = serve(["--config", str(config), "--listen", f"127.0.0.1:{flag_port}"], env)
    proc.wait_ready(flag_port)
    assert not port_open("127.0.0.1", env_port)
    assert not port_open("127.0.0.1", file_port)
    assert _readyz(flag_port)
    serving = [line for line in proc.json_lines() if line.get("event") == "serving"]
    assert serving[-1]["listen"] == f"127.0.0.1:{flag_port}"
    assert serving[-1]["tag_ttl"] == 1


def test_config_via_stowage_config_env(serve: ServeFactory, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "conf.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\ndata: {tmp_path / 'data'}\n")
    proc = serve([], {"STOWAGE_CONFIG": str(config)})
    proc.wait_ready(port)
    assert (tmp_path / "data" / "index.db").exists()


# --- bad configuration --------------------------------------------------------------------


def test_unknown_yaml_key_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tag-ttl: 5\ncolour: blue\n")
    proc = _cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_clean_failure(proc, "colour", str(config))


def test_bad_yaml_value_names_the_option(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tag-ttl: -5\n")
    proc = _cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = _assert_clean_failure(proc)
    assert re.search(r"tag[-_]ttl", out), out


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999"])
def test_bad_listen_is_a_usage_error(listen: str, tmp_path: Path) -> None:
    proc = _cli("serve", "--listen", listen, "--data", str(tmp_path / "data"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_clean_failure(proc, "listen", listen)


def test_bad_listen_from_environment_is_a_usage_error(tmp_path: Path) -> None:
    proc = _cli("serve", "--data", str(tmp_path / "data"), env={"STOWAGE_LISTEN": "nowhere"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_clean_failure(proc, "listen", "nowhere")


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    proc = _cli("serve", "--config", str(missing), "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    _assert_clean_failure(proc, str(missing))


@pytest.mark.parametrize(
    "content",
    [None, "{not json", '{"auths": {"r.example": {"auth": "!!!not-base64"}}}', "[]"],
    ids=["missing", "not-json", "bad-base64", "no-auths"],
)
def test_bad_auth_file_fails_naming_the_file(content: str | None, tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    if content is not None:
        auth.write_text(content)
    port = free_port()
    proc = _cli(
        "serve",
        "--auth-file",
        str(auth),
        "--listen",
        f"127.0.0.1:{port}",
        "--data",
        str(tmp_path / "data"),
        timeout=30,
    )
    _assert_clean_failure(proc, str(auth))
    assert not port_open("127.0.0.1", port)


# --- stowage cache ------------------------------------------------------------------------


def test_cache_ls_and_stats_after_real_pulls(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    app, v2 = images.app, images.dockerv2
    st = stowage_factory(upstreams=[registry])
    _pull(st, registry, app)
    _pull(st, registry, app)  # all hits
    _pull(st, registry, v2)
    data = st.data_dir

    # ls works against a live stowage's data dir.
    rows = {r["repository"]: r for r in _ls_json(data)}
    assert set(rows) == {app.repository, v2.repository}
    for image in (app, v2):
        row = rows[image.repository]
        assert row["registry"] == registry.host
        assert row["tag"] == "1"
        assert row["digest"] == image.manifest_digest
        assert row["media_type"] == image.media_type
        assert row["size"] == _image_size(image)

    # Counters reach the index on shutdown.
    assert st.stop() == 0
    stats_proc = _cli("cache", "stats", "--json", "--data", str(data))
    assert stats_proc.returncode == 0, stats_proc.stderr
    stats = json.loads(stats_proc.stdout)
    requests_per_pull = 1 + len(app.blobs)
    assert stats["misses"] == 2 * requests_per_pull
    assert stats["hits"] == requests_per_pull
    assert stats["stale"] == 0
    assert stats["bytes_from_cache"] == _image_size(app)
    assert stats["bytes_from_upstream"] == _image_size(app) + _image_size(v2)
    assert stats["images"] == 2
    assert stats["cache_size"] == _image_size(app) + _image_size(v2)

    human = _cli("cache", "stats", "--data", str(data))
    assert human.returncode == 0, human.stderr
    assert "hits" in human.stdout and "misses" in human.stdout

    # The table, as read in an ordinary 80-column terminal (or piped to grep): every image
    # is identifiable by its full registry/repository, with tag, short digest and size.
    table = _cli("cache", "ls", "--data", str(data), env={"COLUMNS": "80"})
    assert table.returncode == 0, table.stderr
    for image in (app, v2):
        line = next(
            (ln for ln in table.stdout.splitlines() if image.manifest_digest[:19] in ln), None
        )
        assert line is not None, table.stdout
        assert f"{registry.host}/{image.repository} " in line, table.stdout
        assert re.search(r"\s1\s", line), line  # the tag
        assert re.search(r"\d+(\.\d)? (B|KiB)", line), line  # the size


def test_cache_rm_removes_image_and_pull_refetches(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    app, v2 = images.app, images.dockerv2
    st = stowage_factory(upstreams=[registry])
    _pull(st, registry, app)
    _pull(st, registry, v2)
    data = st.data_dir
    app_files = [app.manifest_digest, *(d for d, _ in app.blobs)]
    v2_files = [v2.manifest_digest, *(d for d, _ in v2.blobs)]
    assert all(_blob_file(data, d).exists() for d in app_files + v2_files)

    # Removed while stowage keeps running, as an operator would.
    proc = _cli("cache", "rm", f"{registry.host}/{app.repository}:1", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed" in proc.stdout
    assert not any(_blob_file(data, d).exists() for d in app_files)
    assert all(_blob_file(data, d).exists() for d in v2_files)  # other images untouched
    assert [r["repository"] for r in _ls_json(data)] == [v2.repository]

    since = registry.checkpoint()
    _pull(st, registry, app)
    assert registry.count("GET", f"/{app.repository}/manifests/1", since=since) == 1
    for digest, _ in app.blobs:
        assert registry.blob_gets(digest, since=since) == 1
        assert _blob_file(data, digest).exists()
    _pull(st, registry, v2)
    for digest, _ in v2.blobs:
        assert registry.blob_gets(digest, since=since) == 0


def test_cache_warm_fills_one_platform_through_running_stowage(
    registry: Registry, images: SampleImages, stowage_factory: StowageFactory
) -> None:
    multi = images.multi
    amd, arm = multi.child("linux/amd64"), multi.child("linux/arm64")
    st = stowage_factory(upstreams=[registry])
    proc = _cli(
        "cache",
        "warm",
        f"{registry.host}/{multi.repository}:1",
        "--url",
        st.url,
        "--platform",
        "linux/arm64",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert multi.manifest_digest in proc.stdout
    st.settle()
    for digest, _ in arm.blobs:
        assert _blob_file(st.data_dir, digest).exists(), digest
    for digest, _ in amd.blobs:
        assert not _blob_file(st.data_dir, digest).exists(), digest

    since = registry.checkpoint()
    name = f"{registry.path_prefix}/{multi.repository}"
    assert st.get(f"/v2/{name}/manifests/1").body == multi.manifest_bytes
    assert st.get(f"/v2/{name}/manifests/{arm.manifest_digest}").body == arm.manifest_bytes
    for digest, _ in arm.blobs:
        assert sha256_digest(st.get(f"/v2/{name}/blobs/{digest}").body) == digest
    assert registry.count("*", "/v2/library/multi/", since=since) == 0

    rows = _ls_json(st.data_dir)
    assert any(r["digest"] == multi.manifest_digest and r["tag"] == "1" for r in rows), rows


def test_cache_warm_unreachable_stowage_is_a_clear_error(registry: Registry) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = _cli("cache", "warm", f"{registry.host}/library/app:1", "--url", url, timeout=60)
    _assert_clean_failure(proc, url)


def test_cache_warm_unknown_image_is_a_clear_error(
    registry: Registry, stowage_factory: StowageFactory
) -> None:
    st = stowage_factory(upstreams=[registry])
    proc = _cli("cache", "warm", f"{registry.host}/library/nope:1", "--url", st.url)
    _assert_clean_failure(proc, "404")


@pytest.mark.parametrize("command", [["ls"], ["stats", "--json"], ["rm", "x/y:1"]])
def test_cache_commands_on_missing_data_dir(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    proc = _cli("cache", *command, "--data", str(missing))
    _assert_clean_failure(proc, str(missing))
    assert not missing.exists()


# --- logs ---------------------------------------------------------------------------------

UPSTREAM_USER = "puller"
UPSTREAM_PASSWORD = "upstream-Secret-4711"
CLIENT_AUTHORIZATION = "Basic " + base64.b64encode(b"client:client-Secret-0815").decode()


def test_json_log_has_one_object_per_request_and_no_secrets(
    registry_factory: RegistryFactory, stowage_factory: StowageFactory, tmp_path: Path
) -> None:
    # The client's credentials are an upstream account too: team/app is private, so stowage
    # checks them upstream before serving it.
    upstream = registry_factory(
        "basic", users={UPSTREAM_USER: UPSTREAM_PASSWORD, "client": "client-Secret-0815"}
    )
    image = push_image(upstream, "team/app", "1", layer_sizes=[512])
    auth_b64 = base64.b64encode(f"{UPSTREAM_USER}:{UPSTREAM_PASSWORD}".encode()).decode()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {upstream.host: {"auth": auth_b64}}}))
    st = stowage_factory(
        upstreams=[upstream],
        auth_file=auth_file,
        log_format="json",
        extra_args=["--log-level", "debug"],
    )

    name = f"{upstream.path_prefix}/{image.repository}"
    client = st.client()
    sent: list[tuple[str, str]] = []
    for method, path in [
        ("GET", f"/v2/{name}/manifests/1"),
        ("HEAD", f"/v2/{name}/manifests/1"),
        *[("GET", f"/v2/{name}/blobs/{d}") for d, _ in image.blobs],
        ("GET", f"/v2/{name}/manifests/nope"),
        ("GET", f"/v2/{name}/tags/list"),
        ("DELETE", f"/v2/{name}/manifests/1"),
    ]:
        resp = client.raw(method, path, {"Authorization": CLIENT_AUTHORIZATION})
        sent.append((method, path))
        if method in ("GET", "HEAD") and "nope" not in path:
            assert resp.status == 200, (method, path, resp.body)
    st.stop()

    text = st.log_text()
    lines = [line for line in text.splitlines() if line.strip()]
    objects = []
    for line in lines:
        obj = json.loads(line)  # every line is one JSON object
        assert isinstance(obj, dict), line
        objects.append(obj)
    requests = [o for o in objects if o.get("event") == "request" and o.get("path") != "/readyz"]
    assert [(o["method"], o["path"]) for o in requests] == sent
    for o in requests:
        assert {"method", "path", "status", "result", "duration_ms"} <= o.keys(), o
        assert isinstance(o["status"], int)
        assert isinstance(o["duration_ms"], int | float) and o["duration_ms"] >= 0
    by_path = {(o["method"], o["path"]): o for o in requests}
    assert by_path[("GET", f"/v2/{name}/manifests/1")]["result"] == "miss"
    assert by_path[("GET", f"/v2/{name}/manifests/nope")]["status"] == 404
    assert by_path[("DELETE", f"/v2/{name}/manifests/1")]["status"] == 405

    for secret in (
        UPSTREAM_PASSWORD,
        auth_b64,
        CLIENT_AUTHORIZATION,
        CLIENT_AUTHORIZATION.split()[1],
        "client-Secret-0815",
    ):
        assert secret not in text, f"secret {secret!r} leaked into the log"
