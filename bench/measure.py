"""Measurement primitives: pulls (with ``stowage.pull``, the code ``stowage bench`` and
``stowage cache warm`` use), curl transfers, a manifest load generator, ctr pulls."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tests.support.containerd import Containerd, write_hosts_toml
from tests.support.util import HarnessError

from stowage.oci.manifest import OCI_INDEX, OCI_MANIFEST, Platform
from stowage.pull import PullResult, pull

PLATFORM = Platform("linux", "amd64")
MANIFEST_ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- pulls ----------------------------------------------------------------------------------


def pull_image(base: str, name: str, tag: str) -> PullResult:
    """A whole image, as containerd fetches it: manifest, then blobs three at a time."""

    async def go() -> PullResult:
        timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await pull(session, base, name, tag, PLATFORM)

    return asyncio.run(go())


# --- curl transfers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    status: int
    size: int
    seconds: float


def _curl() -> str:
    path = shutil.which("curl")
    if path is None:
        raise HarnessError("curl not found (apt-get install curl)")
    return path


_WRITE_OUT = "%{http_code} %{size_download} %{time_total}\\n"


def _parse_transfers(out: str) -> list[Transfer]:
    transfers = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            transfers.append(Transfer(int(parts[0]), int(parts[1]), float(parts[2])))
    return transfers


def curl_get(url: str, *, timeout: float = 300) -> Transfer:
    """One GET, body discarded; curl's own timing (no process start-up in it)."""
    proc = subprocess.run(
        [_curl(), "-s", "-o", "/dev/null", "-w", _WRITE_OUT, url],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    transfers = _parse_transfers(proc.stdout)
    if proc.returncode != 0 or not transfers:
        raise HarnessError(f"curl {url} -> {proc.returncode}: {proc.stderr}")
    return transfers[0]


def curl_concurrent(
    url: str, clients: int, *, timeout: float = 600
) -> tuple[float, list[Transfer]]:
    """``clients`` simultaneous GETs of ``url`` on separate connections, from one curl
    process (``--parallel``). Returns (wall seconds until the last finished, transfers)."""
    argv = [
        _curl(),
        "-s",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        str(clients),
        "-w",
        _WRITE_OUT,
    ]
    for _ in range(clients):
        argv += ["-o", "/dev/null", url]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    transfers = _parse_transfers(proc.stdout)
    if proc.returncode != 0 or len(transfers) != clients:
        raise HarnessError(f"curl --parallel {url} -> {proc.returncode}: {proc.stderr}")
    return wall, transfers


def curl_single_wall(url: str) -> tuple[float, Transfer]:
    """One GET timed the same way as :func:`curl_concurrent` (process wall time)."""
    wall, transfers = curl_concurrent(url, 1)
    return wall, transfers[0]


# --- manifest load --------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int
    tool: str


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise HarnessError(f"unexpected wrk latency {text!r}")
    return float(m[1]) * _WRK_UNITS[m[2]]


def manifest_load(url: str, *, connections: int = 4, seconds: float = 10.0) -> Load:
    """GET ``url`` over ``connections`` keep-alive connections for ``seconds``."""
    if shutil.which("wrk"):
        return _wrk(url, connections, seconds)
    return asyncio.run(_aiohttp_load(url, connections, seconds))


def _wrk(url: str, connections: int, seconds: float) -> Load:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-H",
        f"Accept: {MANIFEST_ACCEPT}",
        url,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = proc.stdout
    if proc.returncode != 0:
        raise HarnessError(f"wrk failed: {proc.stderr}{out}")
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if not (rps and total and "50" in pct and "99" in pct):
        raise HarnessError(f"cannot parse wrk output:\n{out}")
    n_errors = int(errors[1]) if errors else 0
    if socket_errors:
        n_errors += sum(int(x) for x in re.findall(r"\d+", socket_errors[1]))
    return Load(
        p50_ms=_wrk_ms(pct["50"]),
        p99_ms=_wrk_ms(pct["99"]),
        rps=float(rps[1]),
        requests=int(total[1]),
        errors=n_errors,
        tool="wrk -t1",
    )


async def _aiohttp_load(url: str, connections: int, seconds: float) -> Load:
    """Fallback load generator when wrk is not installed."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return Load(
        p50_ms=latencies[n // 2] * 1000,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1000,
        rps=n / elapsed,
        requests=n,
        errors=errors,
        tool="aiohttp (wrk not installed)",
    )


# --- containerd -----------------------------------------------------------------------------


def ctr_pull(workdir: Path, ref: str, registry_host: str, mirror_url: str | None) -> float:
    """``ctr image pull`` (fetch and unpack) by a fresh containerd; wall seconds.

    With ``mirror_url`` containerd's hosts.toml names it as the mirror of ``registry_host``.
    """
    with Containerd(workdir) as daemon:
        hosts = workdir / "hosts.d"
        write_hosts_toml(hosts, registry_host, mirror_url)
        started = time.perf_counter()
        proc = daemon.pull(ref, hosts_dir=hosts, platform="linux/amd64", timeout=1200)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise HarnessError(f"ctr pull {ref} failed:\n{proc.stdout}{proc.stderr}")
    shutil.rmtree(workdir, ignore_errors=True)
    return seconds
