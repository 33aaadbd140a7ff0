"""``stowage bench IMAGE``: how long pulling an image takes directly from its
registry versus through a running stowage, cold and warm, blob by blob.

Three pulls, in this order, each with :func:`stowage.pull.pull` (the code
``stowage cache warm`` and the benchmark harness use: manifest, then config and
layers three at a time, every byte verified):

1. **direct**: from the image's registry (anonymous, or an anonymous Bearer
   token when the registry asks for one);
2. **first pass through stowage**: *cold* only if stowage did not have the
   blobs yet. stowage cannot be asked to forget an image from here, so the
   first pass is classified by stowage's own ``/metrics``: the increase of
   ``stowage_requests_total{route="blobs",result="miss"}`` during the pass;
3. **warm pass through stowage**: everything served from its cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from stowage.oci.manifest import Platform
from stowage.oci.reference import Reference, api_host
from stowage.pull import PullError, PullResult, pull
from stowage.units import format_size
from stowage.upstream.auth import parse_challenge

DEFAULT_URL = "http://127.0.0.1:7439"
MISS_METRIC = "stowage_requests_total"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

State = Literal["cold", "partly cached", "warm only", "unknown"]


class BenchError(Exception):
    """A benchmark that could not run; the message names what failed and where."""


@dataclass(slots=True)
class Pass:
    """One timed pull: wall time, manifest time and each blob's time."""

    seconds: float
    manifest_seconds: float
    blob_seconds: dict[str, float]
    total_bytes: int

    @classmethod
    def of(cls, result: PullResult) -> Pass:
        return cls(
            seconds=result.seconds,
            manifest_seconds=result.manifest_seconds,
            blob_seconds={b.digest: b.seconds for b in result.blobs},
            total_bytes=result.total_bytes,
        )

    @property
    def bytes_per_second(self) -> float:
        return self.total_bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 6),
            "manifest_seconds": round(self.manifest_seconds, 6),
            "bytes_per_second": round(self.bytes_per_second),
        }


@dataclass(slots=True)
class BlobRow:
    digest: str
    size: int


@dataclass(slots=True)
class BenchReport:
    image: str
    platform: str
    registry_url: str
    stowage_url: str
    manifest_digest: str
    blobs: list[BlobRow]
    direct: Pass
    first: Pass
    warm: Pass
    state: State
    first_pass_misses: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def cold(self) -> Pass | None:
        """The first pass, when it did fetch from upstream (fully or partly)."""
        return self.first if self.state in ("cold", "partly cached") else None

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    def to_json(self) -> dict[str, Any]:
        cold = self.cold
        return {
            "image": self.image,
            "platform": self.platform,
            "registry": self.registry_url,
            "stowage": self.stowage_url,
            "manifest_digest": self.manifest_digest,
            "state": self.state,
            "cold_measured": self.state == "cold",
            "first_pass_blob_misses": self.first_pass_misses,
            "bytes": self.total_bytes,
            "direct": self.direct.to_json(),
            "cold": cold.to_json() if cold else None,
            "first_pass": self.first.to_json(),
            "warm": self.warm.to_json(),
            "speedup": {
                "cold": _ratio(self.direct.seconds, cold.seconds) if cold else None,
                "warm": _ratio(self.direct.seconds, self.warm.seconds),
            },
            "layers": [
                {
                    "digest": b.digest,
                    "size": b.size,
                    "direct_seconds": _round(self.direct.blob_seconds.get(b.digest)),
                    "cold_seconds": _round(cold.blob_seconds.get(b.digest)) if cold else None,
                    "warm_seconds": _round(self.warm.blob_seconds.get(b.digest)),
                }
                for b in self.blobs
            ],
            "notes": self.notes,
        }


Say = Callable[[str], None]


def registry_url(ref: Reference, insecure: bool) -> str:
    return f"{'http' if insecure else 'https'}://{api_host(ref.registry)}"


async def measure(
    ref: Reference,
    platform: Platform,
    stowage_url: str = DEFAULT_URL,
    *,
    insecure: bool = False,
    say: Say = lambda message: None,
) -> BenchReport:
    """Pull ``ref`` directly, then twice through the stowage at ``stowage_url``.

    Raises BenchError with a message naming the unreachable or failing address.
    """
    stowage = stowage_url.rstrip("/")
    direct_base = registry_url(ref, insecure)
    reference = ref.ref
    proxied_name = ref.prefixed_name
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _probe_stowage(session, stowage)

        say(f"pulling {ref} directly from {direct_base}")
        try:
            headers = await _anonymous_auth(session, direct_base, ref.repository)
            direct = await pull(
                session, direct_base, ref.repository, reference, platform, headers=headers
            )
        except PullError as exc:
            raise BenchError(f"direct pull from {direct_base} failed: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(
                f"cannot reach registry {ref.registry} at {direct_base}: {_describe(exc)}"
            ) from None

        before = await _blob_misses(session, stowage)
        say(f"pulling {ref} through stowage at {stowage} (first pass)")
        first = await _through_stowage(session, stowage, proxied_name, reference, platform)
        after = await _blob_misses(session, stowage)
        say(f"pulling {ref} through stowage at {stowage} (warm)")
        warm = await _through_stowage(session, stowage, proxied_name, reference, platform)

    blobs = [BlobRow(b.digest, b.size) for b in direct.blobs]
    misses = None if before is None or after is None else max(0, round(after - before))
    state: State
    notes: list[str] = []
    if misses is None:
        state = "unknown"
        notes.append(f"{stowage}/metrics is not stowage's: cannot tell cold from warm")
    elif misses == 0:
        state = "warm only"
        notes.append("the image was already cached: cold was not measured")
    elif misses >= len(blobs):
        state = "cold"
    else:
        state = "partly cached"
        notes.append(f"{misses} of {len(blobs)} blobs were fetched from upstream on the first pass")
    if first.manifest_digest != direct.manifest_digest:
        notes.append(
            f"stowage served manifest {first.manifest_digest}, the registry "
            f"{direct.manifest_digest} (the tag moved, or stowage's copy is within its tag TTL)"
        )
    return BenchReport(
        image=str(ref),
        platform=str(platform),
        registry_url=direct_base,
        stowage_url=stowage,
        manifest_digest=direct.platform_digest or direct.manifest_digest,
        blobs=blobs,
        direct=Pass.of(direct),
        first=Pass.of(first),
        warm=Pass.of(warm),
        state=state,
        first_pass_misses=misses,
        notes=notes,
    )


async def _probe_stowage(session: aiohttp.ClientSession, base: str) -> None:
    try:
        async with session.get(f"{base}/v2/") as resp:
            await resp.read()
            if resp.status >= 500:
                raise BenchError(f"stowage at {base} answered /v2/ with {resp.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"cannot reach stowage at {base}: {_describe(exc)}") from None


async def _through_stowage(
    session: aiohttp.ClientSession, base: str, name: str, reference: str, platform: Platform
) -> PullResult:
    try:
        return await pull(session, base, name, reference, platform)
    except PullError as exc:
        raise BenchError(f"pull through stowage at {base} failed: {exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"cannot reach stowage at {base}: {_describe(exc)}") from None


async def _blob_misses(session: aiohttp.ClientSession, base: str) -> float | None:
    """stowage's blob miss counter, or None when ``base`` serves no stowage metrics."""
    try:
        async with session.get(f"{base}/metrics") as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"cannot reach stowage at {base}: {_describe(exc)}") from None
    found = False
    total = 0.0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == MISS_METRIC and sample.labels.get("route") == "blobs":
                    found = True
                    if sample.labels.get("result") == "miss":
                        total += sample.value
    except ValueError:
        return None
    # A stowage that never served a blob has no series yet: still stowage's metrics.
    if not found and "stowage_" not in text:
        return None
    return total


async def _anonymous_auth(
    session: aiohttp.ClientSession, base: str, repository: str
) -> dict[str, str]:
    """Headers for anonymous pulls: none, or a Bearer token when the registry asks."""
    async with session.get(f"{base}/v2/") as resp:
        await resp.read()
        if resp.status != 401:
            return {}
        challenge = resp.headers.get("WWW-Authenticate", "")
    parsed = parse_challenge(challenge)
    if parsed is None or parsed.scheme != "bearer":
        scheme = parsed.scheme if parsed else "unknown"
        raise BenchError(
            f"registry at {base} asks for {scheme} credentials; "
            "stowage bench pulls directly only anonymously"
        )
    params = parsed.params
    if "realm" not in params:
        raise BenchError(f"registry at {base} sent a Bearer challenge without a realm")
    query = {"scope": f"repository:{repository}:pull"}
    if "service" in params:
        query["service"] = params["service"]
    async with session.get(params["realm"], params=query) as resp:
        if resp.status != 200:
            raise BenchError(
                f"token service {params['realm']} refused an anonymous pull token ({resp.status})"
            )
        body = await resp.json(content_type=None)
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not token:
        raise BenchError(f"token service {params['realm']} returned no token")
    return {"Authorization": f"Bearer {token}"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# --- rendering ----------------------------------------------------------------------------


def format_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _rate(p: Pass | None) -> str:
    return f"{format_size(p.bytes_per_second)}/s" if p else "—"


def _speedup(direct: float | None, other: float | None) -> str:
    if direct is None or other is None or other <= 0:
        return "—"
    return f"{direct / other:.2f}x"


def render(report: BenchReport, console: Console) -> None:
    cold = report.cold
    cold_title = {
        "cold": "COLD",
        "partly cached": "FIRST (partly cached)",
        "warm only": "COLD",
        "unknown": "FIRST (unknown)",
    }[report.state]
    table = Table(
        title=f"{report.image} ({report.platform}) — {report.state}",
        caption=f"direct: {report.registry_url}   stowage: {report.stowage_url}   "
        "speed-up: direct / warm",
    )
    table.add_column("BLOB", no_wrap=True, min_width=12)
    table.add_column("SIZE", no_wrap=True, justify="right")
    for heading in ("DIRECT", cold_title, "WARM"):
        table.add_column(heading, justify="right")
    table.add_column("SPEED-UP", justify="right", no_wrap=True)
    first_shown = cold if cold else (report.first if report.state == "unknown" else None)
    for b in report.blobs:
        d = report.direct.blob_seconds.get(b.digest)
        w = report.warm.blob_seconds.get(b.digest)
        c = first_shown.blob_seconds.get(b.digest) if first_shown else None
        table.add_row(
            b.digest.split(":", 1)[-1][:12],
            format_size(b.size),
            format_seconds(d),
            format_seconds(c),
            format_seconds(w),
            _speedup(d, w),
        )
    table.add_section()
    table.add_row(
        "manifest",
        "",
        format_seconds(report.direct.manifest_seconds),
        format_seconds(first_shown.manifest_seconds if first_shown else None),
        format_seconds(report.warm.manifest_seconds),
        _speedup(report.direct.manifest_seconds, report.warm.manifest_seconds),
    )
    table.add_row(
        "image",
        format_size(report.total_bytes),
        format_seconds(report.direct.seconds),
        format_seconds(first_shown.seconds if first_shown else None),
        format_seconds(report.warm.seconds),
        _speedup(report.direct.seconds, report.warm.seconds),
        style="bold",
    )
    table.add_row(
        "throughput",
        "",
        _rate(report.direct),
        _rate(first_shown),
        _rate(report.warm),
        "",
    )
    console.print(table)
    if cold is not None and report.state == "cold":
        console.print(
            f"cold through stowage: {cold.seconds / report.direct.seconds:.2f}x the direct time; "
            f"warm: {report.warm.seconds / report.direct.seconds:.2f}x"
        )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")


def run(
    ref: Reference,
    platform: Platform,
    stowage_url: str,
    *,
    insecure: bool,
    say: Say = lambda message: None,
) -> BenchReport:
    """Synchronous entry point for the command line."""
    started = time.perf_counter()
    report = asyncio.run(measure(ref, platform, stowage_url, insecure=insecure, say=say))
    say(f"done in {time.perf_counter() - started:.1f}s")
    return report
