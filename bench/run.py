"""Benchmark stowage against CNCF Distribution's pull-through proxy, nginx and direct pulls.

    uv run --group bench python bench/run.py            # full run, writes docs/benchmarks.md
    uv run --group bench python bench/run.py --quick    # small sizes, for development

Everything runs on loopback: an upstream Distribution registry with generated images,
Distribution in proxy mode, nginx (sendfile) serving the largest blob, and stowage serve.
See docs/benchmarks.md for what each figure measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import linecache
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from tests.support.images import PushedImage, push_image  # noqa: E402
from tests.support.registry import Registry  # noqa: E402
from tests.support.util import HarnessError  # noqa: E402

from bench.measure import (  # noqa: E402
    ctr_pull,
    curl_concurrent,
    curl_get,
    curl_single_wall,
    manifest_load,
    median,
    pull_image,
)
from bench.procs import (  # noqa: E402
    DistributionProxy,
    Nginx,
    Proxy,
    StowageProxy,
    cpu_seconds,
    disk_fsync_rate,
    own_cpu_seconds,
    peak_rss_bytes,
)
from bench.report import Report, Row, chart, fmt_num, loadavg, machine_facts, print_table, summary  # noqa: E402
from bench.report import write_markdown as write_md  # noqa: E402

MiB = 1024 * 1024
PROFILE_RATE = 250
err = Console(stderr=True)


@dataclass(frozen=True)
class Plan:
    big_layer: int
    mid_layer: int
    reps: int  # cold/warm pull repetitions (each with a fresh proxy)
    delay: float  # "warm again after a few seconds"
    blob_reps: int
    load_seconds: float
    client_reps: int  # 20-client runs (each on two uncached blobs of the mid image)
    clients: int = 20
    big_layers: int = 8
    mid_layers: int = 4

    @property
    def big_label(self) -> str:
        return _size_label(self.big_layer * self.big_layers)

    @property
    def mid_label(self) -> str:
        return _size_label(self.mid_layer * self.mid_layers)


FULL = Plan(
    big_layer=128 * MiB,
    mid_layer=64 * MiB,
    reps=3,
    delay=5.0,
    blob_reps=5,
    load_seconds=10.0,
    client_reps=2,
)
QUICK = Plan(
    big_layer=4 * MiB,
    mid_layer=2 * MiB,
    reps=1,
    delay=1.0,
    blob_reps=2,
    load_seconds=2.0,
    client_reps=1,
)


def _size_label(n: int) -> str:
    return f"{n // 1024**3} GiB" if n >= 1024**3 and n % 1024**3 == 0 else f"{n // MiB} MiB"


def say(message: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")


# --- helpers --------------------------------------------------------------------------------


def blob_url(proxy: Proxy | Registry, image: PushedImage, digest: str) -> str:
    if isinstance(proxy, Registry):
        return f"{proxy.url}/v2/{image.repository}/blobs/{digest}"
    return f"{proxy.url}/v2/{proxy.name_for(image.repository)}/blobs/{digest}"


def image_bytes(image: PushedImage) -> int:
    return sum(size for _, size in image.blobs)


def pull_through(proxy: Proxy, image: PushedImage) -> float:
    assert image.tag is not None
    result = pull_image(proxy.url, proxy.name_for(image.repository), image.tag)
    if result.total_bytes != image_bytes(image):
        raise HarnessError(f"{proxy.label}: pulled {result.total_bytes} of {image_bytes(image)}")
    return result.seconds


def pull_direct(upstream: Registry, image: PushedImage) -> float:
    assert image.tag is not None
    result = pull_image(upstream.url, image.repository, image.tag)
    if result.total_bytes != image_bytes(image):
        raise HarnessError(f"direct: pulled {result.total_bytes} of {image_bytes(image)}")
    return result.seconds


def blob_requests(proxy: Proxy) -> int:
    """Blob GETs the proxy answered so far (stowage: metrics; Distribution: access log)."""
    if isinstance(proxy, StowageProxy):
        return int(proxy.metric("stowage_requests", route="blobs"))
    assert isinstance(proxy, DistributionProxy)
    return sum(1 for e in proxy.requests() if e.method == "GET" and "/blobs/" in e.uri)


def upstream_blob_gets(upstream: Registry, image: PushedImage, since: int) -> int:
    return sum(upstream.blob_gets(d, since=since) for d, _ in image.blobs)


# --- the run --------------------------------------------------------------------------------


@dataclass
class Figures:
    """Raw figures per proxy label."""

    direct: list[float]
    values: dict[str, dict[str, list[float]]]
    load: dict[str, dict[str, float]]
    notes: list[str]
    facts: dict[str, float]
    load_tool: str = ""

    def add(self, proxy: str, key: str, value: float) -> None:
        self.values[proxy][key].append(value)

    def med(self, proxy: str, key: str) -> float | None:
        v = self.values[proxy].get(key)
        return median(v) if v else None

    def max(self, proxy: str, key: str) -> float | None:
        v = self.values[proxy].get(key)
        return max(v) if v else None


class Meter:
    """CPU seconds used by the client (this process), the upstream and a proxy."""

    def __init__(self, upstream: Registry, proxy: Proxy | None) -> None:
        self.pids = {"upstream": upstream.process.pid}
        if proxy is not None:
            self.pids["proxy"] = proxy.pid()
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items() if pid}
        now["client"] = own_cpu_seconds()
        return now

    def used(self) -> dict[str, float]:
        end = self._now()
        return {k: end[k] - self.start[k] for k in end}


def timed(
    figures: Figures,
    key: str,
    upstream: Registry,
    proxy: Proxy | None,
    fn: Callable[..., float],
    *args: Any,
) -> float:
    """Run a timed pull after flushing dirty pages; record its CPU use per process."""
    os.sync()
    meter = Meter(upstream, proxy)
    seconds = fn(*args)
    label = proxy.label if proxy else "direct"
    for who, cpu in meter.used().items():
        figures.add(label, f"cpu_{key}_{who}", cpu)
    return seconds


def blob_path(upstream: Registry, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return upstream.data_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def run(plan: Plan, workdir: Path, *, containerd: bool, py_spy: str | None) -> tuple[Figures, str]:
    figures = Figures([], defaultdict(lambda: defaultdict(list)), defaultdict(dict), [], {})
    with contextlib.ExitStack() as stack:
        upstream = Registry("plain", workdir=workdir / "upstream").start()
        stack.callback(upstream.close)
        say(f"upstream registry at {upstream.url}; generating images (not timed)")
        t0 = time.perf_counter()
        big = push_image(upstream, "bench/big", "1", layer_sizes=[plan.big_layer] * plan.big_layers)
        mid = push_image(upstream, "bench/mid", "1", layer_sizes=[plan.mid_layer] * plan.mid_layers)
        small = push_image(upstream, "bench/small", "1")
        say(f"images pushed in {time.perf_counter() - t0:.0f}s")
        os.sync()
        figures.facts["disk_fsync_rate"] = disk_fsync_rate(workdir)
        say(f"disk: write + fsync {figures.facts['disk_fsync_rate'] / 1e6:.0f} MB/s")
        largest, largest_size = max(big.layers, key=lambda layer: layer[1])
        nginx = Nginx(
            workdir / "nginx",
            {"blob": blob_path(upstream, largest), "mid": blob_path(upstream, mid.layers[1][0])},
        ).start()
        stack.callback(nginx.stop)
        nginx_nodelay = Nginx(
            workdir / "nginx-nodelay", {"blob": blob_path(upstream, largest)}, nopush=False
        ).start()
        stack.callback(nginx_nodelay.stop)

        stowage = StowageProxy(workdir / "stowage", upstream)
        distribution = DistributionProxy(workdir / "distribution", upstream)
        proxies: list[Proxy] = [stowage, distribution]
        for p in proxies:
            stack.callback(p.stop)

        # 1, 2, 7a: cold pull of the big image, warm right after and after a delay.
        for rep in range(plan.reps):
            direct = timed(figures, "direct", upstream, None, pull_direct, upstream, big)
            figures.direct.append(direct)
            say(f"rep {rep + 1}/{plan.reps}: direct {big.repository} {direct:.2f}s")
            for p in proxies:
                p.fresh()
                time.sleep(0.5)
                figures.add(p.label, "rss_idle", peak_rss_bytes(p.pid()) / MiB)
                since = upstream.checkpoint()
                cold = timed(figures, "cold", upstream, p, pull_through, p, big)
                now = timed(figures, "warm", upstream, p, pull_through, p, big)
                time.sleep(plan.delay)
                later = timed(figures, "later", upstream, p, pull_through, p, big)
                gets = upstream_blob_gets(upstream, big, since)
                figures.add(p.label, "cold", cold)
                figures.add(p.label, "cold_ratio", cold / direct)
                figures.add(p.label, "warm_now", now)
                figures.add(p.label, "warm_now_ratio", now / direct)
                figures.add(p.label, "warm_later", later)
                figures.add(p.label, "warm_later_ratio", later / direct)
                figures.add(p.label, "rss_big", peak_rss_bytes(p.pid()) / MiB)
                figures.add(p.label, "cold_upstream_gets", gets)
                say(
                    f"  {p.label}: cold {cold:.2f}s ({cold / direct:.2f}x), warm {now:.2f}s, "
                    f"after {plan.delay:.0f}s {later:.2f}s; upstream blob GETs {gets} "
                    f"for {len(big.blobs)} blobs"
                )

        # 3: warm throughput of the largest blob, against nginx sendfile of the same file.
        say(f"warm blob throughput, {largest_size / MiB:.0f} MiB, vs nginx")
        for p in proxies:
            curl_get(blob_url(p, big, largest))  # make sure it is cached and in page cache
        curl_get(nginx.url("blob"))
        curl_get(nginx_nodelay.url("blob"))
        for _ in range(plan.blob_reps):
            t = curl_get(nginx.url("blob"))
            figures.add("nginx", "blob", t.size / t.seconds / MiB)
            t = curl_get(nginx_nodelay.url("blob"))
            figures.add("nginx", "blob_nodelay", t.size / t.seconds / MiB)
            for p in proxies:
                t = curl_get(blob_url(p, big, largest))
                if t.status != 200 or t.size != largest_size:
                    raise HarnessError(f"{p.label}: blob GET {t}")
                figures.add(p.label, "blob", t.size / t.seconds / MiB)
        ngx = figures.med("nginx", "blob")
        assert ngx is not None
        for p in proxies:
            mbps = figures.med(p.label, "blob")
            assert mbps is not None
            figures.add(p.label, "blob_ratio", mbps / ngx)
            say(f"  {p.label}: {mbps:.0f} MiB/s vs nginx {ngx:.0f} MiB/s")

        # 4: manifest GET by tag, warm, 4 keep-alive connections.
        for p in proxies:
            url = f"{p.url}/v2/{p.name_for(small.repository)}/manifests/{small.tag}"
            pull_through(p, small)
            manifest_load(url, seconds=1)  # warm-up
            since = upstream.checkpoint()
            load = manifest_load(url, seconds=plan.load_seconds)
            upstream_manifest = upstream.count(
                "*", f"/v2/{small.repository}/manifests/", since=since
            )
            figures.load[p.label] = {
                "p50": load.p50_ms,
                "p99": load.p99_ms,
                "rps": load.rps,
                "errors": load.errors,
                "upstream": upstream_manifest,
                "requests": load.requests,
            }
            figures.load_tool = load.tool
            say(
                f"  {p.label}: manifest p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, "
                f"{load.rps:.0f} req/s ({load.tool}), {load.errors} errors, "
                f"{upstream_manifest} upstream manifest requests"
            )
            if load.errors:
                figures.notes.append(f"{p.label}: {load.errors} failed manifest requests in 4")

        # 5: concurrent cold clients of one blob (blobs of the mid image: not cached yet).
        say(f"{plan.clients} concurrent cold clients of one {plan.mid_layer // MiB} MiB blob")
        curl_get(nginx.url("mid"))
        single, _ = curl_single_wall(nginx.url("mid"))
        wall, _ = curl_concurrent(nginx.url("mid"), plan.clients)
        figures.add("nginx", "one_client", single)
        figures.add("nginx", "clients", wall)
        say(f"  nginx (page cache, sendfile): one client {single:.2f}s, {plan.clients} {wall:.2f}s")
        for rep in range(plan.client_reps):
            one, many = mid.layers[2 * rep][0], mid.layers[2 * rep + 1][0]
            for p in proxies:
                os.sync()
                single, t = curl_single_wall(blob_url(p, mid, one))
                if t.status != 200 or t.size != mid_size(mid, one):
                    raise HarnessError(f"{p.label}: single cold client got {t}")
                since = upstream.checkpoint()
                os.sync()
                meter = Meter(upstream, p)
                wall, transfers = curl_concurrent(blob_url(p, mid, many), plan.clients)
                for who, cpu in meter.used().items():
                    figures.add(p.label, f"cpu_clients_{who}", cpu)
                gets = upstream.blob_gets(many, since=since)
                bad = [t for t in transfers if t.status != 200 or t.size != mid_size(mid, many)]
                figures.add(p.label, "one_client", single)
                figures.add(p.label, "clients", wall)
                figures.add(p.label, "clients_ratio", wall / single)
                figures.add(p.label, "clients_gets", gets)
                if bad:
                    figures.notes.append(
                        f"{p.label}: {len(bad)} of {plan.clients} concurrent clients got "
                        f"incomplete blobs ({Counter(t.status for t in bad)})"
                    )
                say(
                    f"  {p.label}: one cold client {single:.2f}s, {plan.clients} clients "
                    f"{wall:.2f}s ({wall / single:.2f}x), upstream GETs {gets}"
                    + (f", {len(bad)} incomplete" if bad else "")
                )

        # 7d: peak over everything so far (the last rep's process served 3, 4 and 5).
        for p in proxies:
            figures.add(p.label, "rss_all", peak_rss_bytes(p.pid()) / MiB)

        # 7b: the same pulls with the mid image, a fresh process each time, as often as
        # 7a's, so that the worst of each is compared with the worst of the other.
        for p in proxies:
            for _ in range(plan.reps):
                p.fresh()
                pull_through(p, mid)
                pull_through(p, mid)
                time.sleep(plan.delay)
                pull_through(p, mid)
                figures.add(p.label, "rss_mid", peak_rss_bytes(p.pid()) / MiB)
            say(
                f"  {p.label}: worst peak RSS {figures.max(p.label, 'rss_big'):.1f} MiB "
                f"({plan.big_label}) vs {figures.max(p.label, 'rss_mid'):.1f} MiB "
                f"({plan.mid_label})"
            )

        # 6: containerd end to end, fresh daemon per pull.
        if containerd:
            ref = f"{upstream.host}/{big.repository}:{big.tag}"
            for p in proxies:
                p.fresh()
                os.sync()
                direct = ctr_pull(workdir / "ctr-direct", ref, upstream.host, None)
                before = blob_requests(p)
                os.sync()
                cold = ctr_pull(workdir / "ctr-cold", ref, upstream.host, p.url)
                after_cold = blob_requests(p)
                os.sync()
                warm = ctr_pull(workdir / "ctr-warm", ref, upstream.host, p.url)
                after_warm = blob_requests(p)
                n = len(big.blobs)
                if after_cold - before < n or after_warm - after_cold < n:
                    raise HarnessError(
                        f"containerd did not pull through {p.label} "
                        f"({after_cold - before} and {after_warm - after_cold} blob requests)"
                    )
                figures.add(p.label, "ctr_direct", direct)
                figures.add(p.label, "ctr_cold", cold)
                figures.add(p.label, "ctr_cold_ratio", cold / direct)
                figures.add(p.label, "ctr_warm", warm)
                figures.add(p.label, "ctr_warm_ratio", warm / direct)
                say(
                    f"  ctr pull: direct {direct:.2f}s, through {p.label} cold {cold:.2f}s, "
                    f"warm {warm:.2f}s"
                )

        profile = ""
        if py_spy:
            profile = profile_cold_pull(py_spy, stowage, big, workdir)
    return figures, profile


def mid_size(image: PushedImage, digest: str) -> int:
    return dict(image.blobs)[digest]


# --- profiling ------------------------------------------------------------------------------


def profile_cold_pull(py_spy: str, stowage: StowageProxy, image: PushedImage, workdir: Path) -> str:
    """py-spy (all threads) on stowage during one extra cold pull; a text summary."""
    stowage.fresh()
    raw = workdir / "profile.txt"
    proc = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(stowage.pid()),
            "--rate",
            str(PROFILE_RATE),
            "--threads",
            "--idle",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # let py-spy attach
    seconds = pull_through(stowage, image)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    if not raw.exists():
        return f"py-spy produced no profile: {stderr.decode(errors='replace')[-500:]}"
    shutil.copy(raw, workdir / "profile-cold-pull.raw.txt")
    say(f"profile: raw stacks in {workdir / 'profile-cold-pull.raw.txt'}")
    return summarise_profile(raw.read_text(), seconds)


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.+?)(?::(?P<line>\d+))?\)$")
# Leaf lines where a thread blocks without the GIL, which py-spy does not always count as idle.
_WAITING = re.compile(r"\.get\(|\.select\(|\.wait\(|\.acquire\(|\.poll\(")


def _source_line(file: str, line: int) -> str:
    for entry in sys.path:
        path = Path(entry or ".") / file
        if path.is_file():
            return linecache.getline(str(path), line).strip()
    return ""


def summarise_profile(raw: str, seconds: float, rate: int = PROFILE_RATE, top: int = 16) -> str:
    """Busy and waiting time per thread, then where the busy samples were, by source line."""
    busy_by_line: Counter[str] = Counter()
    busy_by_thread: Counter[str] = Counter()
    waiting_by_thread: Counter[str] = Counter()
    main_inclusive: Counter[str] = Counter()
    main_busy = 0
    for entry in raw.splitlines():
        stack, _, count_text = entry.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        name = thread.split("): ", 1)[-1] if "): " in thread else thread
        if not frames:
            continue
        leaf = _FRAME.match(frames[-1])
        where = frames[-1]
        text = ""
        if leaf and leaf["line"]:
            text = _source_line(leaf["file"], int(leaf["line"]))
        if _WAITING.search(text) or "select (selectors.py" in where:
            waiting_by_thread[name] += count
            continue
        busy_by_thread[name] += count
        busy_by_line[f"{where}  `{text}`" if text else where] += count
        if name == "MainThread":
            main_busy += count
            funcs = {m["func"] for f in frames if (m := _FRAME.match(f))}
            for func in funcs:
                main_inclusive[func] += count
    total = sum(busy_by_thread.values())
    if total == 0:
        return "no samples"
    out = [
        f"{seconds:.2f} s cold pull (py-spy --idle, {rate} samples/s per thread). 'active' is "
        "on CPU or blocked in a system call such as fsync; 'waiting' is an idle thread "
        "(queue.get, select)",
        "",
        "thread        active s   waiting s",
    ]
    for name in sorted(set(busy_by_thread) | set(waiting_by_thread)):
        busy, waiting = busy_by_thread[name] / rate, waiting_by_thread[name] / rate
        out.append(f"{name:<13} {busy:>8.2f}   {waiting:>9.2f}")
    out += ["", "active samples by source line (all threads):"]
    out += [f"  {100 * n / total:5.1f}%  {line}" for line, n in busy_by_line.most_common(top)]
    if main_busy:
        shown = [
            (func, n)
            for func, n in main_inclusive.most_common()
            if n < 0.98 * main_busy  # drop the frames every sample has (run_forever ...)
        ][:top]
        out += ["", "event loop thread, inclusive (share of its active samples):"]
        out += [f"  {100 * n / main_busy:5.1f}%  {func}" for func, n in shown]
    return "\n".join(out)


# --- rows -----------------------------------------------------------------------------------


def build_rows(plan: Plan, f: Figures, containerd: bool) -> list[Row]:
    S, D = "stowage", "distribution"
    direct = median(f.direct)
    rows = [
        Row(
            "1",
            f"cold pull {plan.big_label}, 3 streams",
            "s",
            f.med(S, "cold"),
            f.med(D, "cold"),
            direct,
            "direct",
            f.med(S, "cold_ratio"),
            f.med(D, "cold_ratio"),
            "<=",
            1.15,
            chart=True,
        ),
        Row(
            "2a",
            "warm pull right after the cold one",
            "s",
            f.med(S, "warm_now"),
            f.med(D, "warm_now"),
            direct,
            "direct",
            f.med(S, "warm_now_ratio"),
            f.med(D, "warm_now_ratio"),
            "<=",
            1.0,
            chart=True,
        ),
        Row(
            "2b",
            f"warm pull {plan.delay:.0f} s later",
            "s",
            f.med(S, "warm_later"),
            f.med(D, "warm_later"),
            direct,
            "direct",
            f.med(S, "warm_later_ratio"),
            f.med(D, "warm_later_ratio"),
            "<=",
            1.0,
            chart=True,
        ),
        Row(
            "3",
            f"warm blob {plan.big_layer // MiB} MiB",
            "MiB/s",
            f.med(S, "blob"),
            f.med(D, "blob"),
            f.med("nginx", "blob"),
            "nginx sendfile",
            f.med(S, "blob_ratio"),
            f.med(D, "blob_ratio"),
            ">=",
            0.9,
            better="higher",
            chart=True,
            note="nginx sending the same file with TCP_NODELAY and without TCP_CORK "
            "(tcp_nopush off), as aiohttp's sockets are: "
            f"{fmt_num(f.med('nginx', 'blob_nodelay'))} MiB/s",
        ),
        Row(
            "4a",
            "manifest GET by tag, p50",
            "ms",
            f.load[S].get("p50"),
            f.load[D].get("p50"),
            target_op="<=",
            target=1.0,
        ),
        Row(
            "4b",
            "manifest GET by tag, p99",
            "ms",
            f.load[S].get("p99"),
            f.load[D].get("p99"),
            target_op="<=",
            target=5.0,
        ),
        Row(
            "4c",
            "manifest GET by tag, 4 connections",
            "req/s",
            f.load[S].get("rps"),
            f.load[D].get("rps"),
            target_op=">=",
            target=3000,
            better="higher",
        ),
        Row(
            "5a",
            f"{plan.clients} concurrent cold clients, wall",
            "s",
            f.med(S, "clients"),
            f.med(D, "clients"),
            f.med(S, "one_client"),
            "one cold client, stowage",
            f.med(S, "clients_ratio"),
            f.med(D, "clients_ratio"),
            "<=",
            1.5,
            chart=True,
            note=f"ratios are to one cold client of the same proxy; Distribution's one cold "
            f"client took {_fmt(f.med(D, 'one_client'))} s",
        ),
        Row(
            "5b",
            f"upstream GETs of that blob ({plan.clients} clients)",
            "GETs",
            f.max(S, "clients_gets"),
            f.max(D, "clients_gets"),
            target_op="==",
            target=1,
        ),
    ]
    if containerd:
        ctr_direct = median(f.values[S]["ctr_direct"] + f.values[D]["ctr_direct"])
        rows += [
            Row(
                "6a",
                f"ctr pull {plan.big_label}, cold, as mirror",
                "s",
                f.med(S, "ctr_cold"),
                f.med(D, "ctr_cold"),
                ctr_direct,
                "ctr direct",
                f.med(S, "ctr_cold_ratio"),
                f.med(D, "ctr_cold_ratio"),
                chart=True,
                note="fetch + unpack (native snapshotter); no target in the issue beyond beating "
                "Distribution",
            ),
            Row(
                "6b",
                f"ctr pull {plan.big_label}, warm, as mirror",
                "s",
                f.med(S, "ctr_warm"),
                f.med(D, "ctr_warm"),
                ctr_direct,
                "ctr direct",
                f.med(S, "ctr_warm_ratio"),
                f.med(D, "ctr_warm_ratio"),
                chart=True,
            ),
        ]
    s_big, s_mid = f.max(S, "rss_big"), f.max(S, "rss_mid")
    d_big, d_mid = f.max(D, "rss_big"), f.max(D, "rss_mid")
    rows += [
        Row(
            "7a",
            f"peak RSS, {plan.big_label} pulls",
            "MiB",
            s_big,
            d_big,
            target_op="<=",
            target=80,
            note="right after start, before any request: stowage "
            f"{fmt_num(f.med(S, 'rss_idle'))} MiB, "
            f"Distribution {fmt_num(f.med(D, 'rss_idle'))} MiB",
        ),
        Row(
            "7b",
            f"peak RSS, {plan.mid_label} pulls",
            "MiB",
            s_mid,
            d_mid,
            target_op="<=",
            target=80,
        ),
        Row(
            "7c",
            f"RSS growth {plan.big_label} vs {plan.mid_label}",
            "MiB",
            _diff(s_big, s_mid),
            _diff(d_big, d_mid),
            None,
            "",
            _div(s_big, s_mid),
            _div(d_big, d_mid),
            "<=",
            1.10,
            chart=True,
            note="'flat' is read as at most 10 % more peak RSS for 4x the bytes",
        ),
        Row(
            "7d",
            "peak RSS over 1-5 (one process)",
            "MiB",
            f.max(S, "rss_all"),
            f.max(D, "rss_all"),
            target_op="<=",
            target=80,
        ),
    ]
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--workdir", type=Path, help="keep processes' files here (default: temp)")
    parser.add_argument(
        "--docs",
        type=Path,
        help="where to write benchmarks.md and benchmarks.png "
        "(default: docs/ for a full run, the work directory for --quick)",
    )
    parser.add_argument("--no-containerd", action="store_true", help="skip figure 6")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record stowage with py-spy during an extra cold pull (needs py-spy)",
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary")
    parser.add_argument(
        "--layer-mib",
        nargs=2,
        type=int,
        metavar=("BIG", "MID"),
        help="development: layer sizes of the big (8 layers) and mid (4 layers) images",
    )
    parser.add_argument("--reps", type=int, help="development: cold/warm repetitions")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.layer_mib:
        plan = replace(plan, big_layer=args.layer_mib[0] * MiB, mid_layer=args.layer_mib[1] * MiB)
    if args.reps:
        plan = replace(plan, reps=args.reps)

    containerd = not args.no_containerd
    if containerd and (os.geteuid() != 0 or not shutil.which("containerd")):
        err.print("containerd figures need root and containerd; skipping them")
        containerd = False
    py_spy = None
    if args.profile:
        if not args.py_spy or not Path(args.py_spy).exists():
            parser.error("--profile needs py-spy (pip install py-spy; or give --py-spy PATH)")
        py_spy = args.py_spy

    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stowage-bench-")
        workdir = Path(tmp.name)
    docs = args.docs or (ROOT / "docs" if not args.quick else workdir)
    command = "uv run --group bench python bench/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    started = dt.datetime.now(dt.UTC)
    load_before = loadavg()
    try:
        t0 = time.perf_counter()
        figures, profile = run(plan, workdir, containerd=containerd, py_spy=py_spy)
        took = time.perf_counter() - t0
    except HarnessError as exc:
        err.print(f"[red]benchmark failed:[/] {exc}")
        return 1
    machine = machine_facts()
    machine["load average (1, 5, 15 min) before / after"] = f"{load_before} / {loadavg()}"
    machine["run time"] = f"{took / 60:.1f} min (image generation included)"
    report = Report(
        rows=build_rows(plan, figures, containerd),
        command=command,
        date=started.strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine,
        notes=[
            *figures.notes,
            f"manifest load: {_load_note(figures)}",
            "medians over "
            f"{plan.reps} cold/warm repetitions (fresh proxy each), {plan.blob_reps} blob GETs, "
            f"{plan.client_reps} concurrent-client runs",
            cpu_note(figures),
            bound_note(plan, figures),
            "stowage cold-pull upstream blob GETs per run: "
            f"{_ints(figures.values['stowage']['cold_upstream_gets'])}; Distribution: "
            f"{_ints(figures.values['distribution']['cold_upstream_gets'])}",
        ],
        profile=profile,
        quick=args.quick,
    )
    console = Console(width=200)
    print_table(report, console)
    met, targets, beats, compared = summary(report)
    console.print(
        f"stowage meets {met} of {targets} targets; better than Distribution on "
        f"{beats} of {compared} figures"
    )
    if profile:
        console.print(profile)
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "benchmarks.png"
    chart(png, report)
    md = docs / "benchmarks.md"
    write_md(md, report, png.name)
    console.print(f"wrote {md} and {png}")
    if tmp is not None and args.quick and args.docs is None:
        keep = Path(tempfile.mkdtemp(prefix="stowage-bench-quick-"))
        shutil.copy(md, keep / md.name)
        shutil.copy(png, keep / png.name)
        console.print(f"(quick results copied to {keep})")
    if tmp is not None:
        tmp.cleanup()
    return 0


def cpu_note(f: Figures) -> str:
    def cpu(
        label: str, key: str, who_all: tuple[str, ...] = ("client", "upstream", "proxy")
    ) -> str:
        parts = []
        for who in who_all:
            v = f.values[label].get(f"cpu_{key}_{who}")
            if v:
                parts.append(f"{median(v):.2f}")
        return " / ".join(parts)

    text = (
        "CPU seconds per pull of the big image, client / upstream registry / proxy "
        f"(2 cores shared by all): direct {cpu('direct', 'direct')}"
    )
    for label in ("stowage", "distribution"):
        text += (
            f"; {label} cold {cpu(label, 'cold')}, warm {cpu(label, 'warm')}, "
            f"later {cpu(label, 'later')}"
        )
        clients = cpu(label, "clients", ("upstream", "proxy"))
        if clients:
            text += f", 20 clients (upstream / proxy) {clients}"
    return text


def bound_note(plan: Plan, f: Figures) -> str:
    rate = f.facts.get("disk_fsync_rate")
    if not rate or not f.direct:
        return ""
    big_bytes = plan.big_layer * plan.big_layers
    floor = big_bytes / rate
    text = (
        f"disk write + fsync on this machine: {rate / 1e6:.0f} MB/s, so persisting the big "
        f"image takes at least {floor:.2f} s = {floor / median(f.direct):.2f}x the direct pull "
        "(a floor for a cache that fsyncs a blob before releasing its last byte)"
    )
    one, many = f.med("nginx", "one_client"), f.med("nginx", "clients")
    if one and many:
        text += (
            f"; nginx sends one client the {plan.mid_layer // MiB} MiB blob of figure 5 from "
            f"page cache in {one:.2f} s and {plan.clients} concurrent clients in {many:.2f} s "
            f"({many / one:.1f}x): the cost of sending {plan.clients}x the bytes here"
        )
        s_many = f.med("stowage", "clients")
        if s_many:
            text += f"; stowage's {plan.clients} cold clients took {s_many / many:.2f}x that"

    return text


def _ints(values: list[float]) -> str:
    return ", ".join(str(int(v)) for v in values) or "—"


def _load_note(f: Figures) -> str:
    parts = []
    for label, load in f.load.items():
        parts.append(
            f"{label} answered {int(load['requests'])} requests and sent "
            f"{int(load['upstream'])} manifest requests upstream"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
