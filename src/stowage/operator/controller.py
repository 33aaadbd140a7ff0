"""The operator's kopf handlers: the pod webhook, pods → CachedImage, and each
CachedImage's lifecycle (prefetch, usage, expiry, freshness).

Nothing is written onto pods: which pods use which image lives in a kopf index
(memory), rebuilt from the watch after a restart or a leader change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
import structlog
from kubernetes_asyncio import client as k8s

from stowage.kubeclient import MERGE_PATCH
from stowage.oci.manifest import UPSTREAM_ACCEPT, Platform
from stowage.oci.reference import InvalidReference, Reference, parse_reference
from stowage.operator.config import OperatorSettings
from stowage.operator.metrics import OperatorMetrics
from stowage.operator.names import cached_image_name
from stowage.operator.rewrite import (
    CONTAINER_FIELDS,
    ORIGINAL_IMAGES,
    RewritePolicy,
    merged_annotation,
    plan,
    skip_reason,
    source_images,
)
from stowage.pull import PlatformMissing, PullError, pull
from stowage.timing import backoff, wait_any

log = structlog.get_logger("stowage.operator")

GROUP, VERSION, PLURAL = "stowage.dev", "v1alpha1", "cachedimages"
MAX_LISTED_PODS = 20
TICK = 5.0  # seconds between two looks at a CachedImage with nothing else due
RETRY_MIN, RETRY_MAX = 5.0, 600.0
LAST_USED_EVERY = 300.0  # refresh lastUsed of an image in use at most this often


_UNWRITTEN = object()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class Pacer:
    """At most one tag check per registry every ``interval`` seconds (a HEAD is free
    against Docker Hub's quota, but a burst of them still trips rate limits)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, float] = {}

    async def wait(self, registry: str) -> None:
        lock = self._locks.setdefault(registry, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            delay = self._last.get(registry, -1e9) + self.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._last[registry] = loop.time()


@dataclass
class Runtime:
    """What the handlers share; built once per process by ``stowage.operator.main``."""

    settings: OperatorSettings
    policy: RewritePolicy
    api: k8s.ApiClient
    http: aiohttp.ClientSession
    pacer: Pacer
    cache_token: str | None = None
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)

    def wake(self, image: str) -> None:
        event = self.wakeups.get(image)
        if event is not None:
            event.set()

    @property
    def objects(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)


# --- webhook ------------------------------------------------------------------------------


def mutate_pod(
    policy: RewritePolicy,
    body: Mapping[str, Any],
    patch: kopf.Patch,
    operation: str | None,
    subresource: str | None,
) -> tuple[str, list[str]]:
    """Rewrite a pod's images in ``patch``. Returns the outcome (rewritten, unchanged,
    skipped: the whole pod) and what was done, for the log."""
    if operation == "CREATE" and subresource is None:
        fields: tuple[str, ...] = CONTAINER_FIELDS
    elif operation == "UPDATE" and subresource == "ephemeralcontainers":
        fields = ("ephemeralContainers",)  # `kubectl debug` adds them to a running pod
    else:
        return "unchanged", []
    meta = body.get("metadata") or {}
    reason = skip_reason(policy, meta.get("namespace"), meta.get("labels") or {})
    if reason:
        return "skipped", [reason]
    rewrite = plan(policy, body.get("spec") or {}, fields)
    if not rewrite.changed:
        return "unchanged", rewrite.skipped
    existing = (meta.get("annotations") or {}).get(ORIGINAL_IMAGES)
    annotation = merged_annotation(existing, rewrite.originals)

    def apply(pod: kopf.RawBody) -> None:
        for fld, images in rewrite.images.items():
            for i, image in images.items():
                pod["spec"][fld][i]["image"] = image
        meta = pod.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ORIGINAL_IMAGES] = annotation

    patch.fns.append(apply)
    done = [f"{name}: {image}" for name, image in rewrite.originals.items()]
    return "rewritten", done + rewrite.skipped


# --- CachedImage lifecycle ----------------------------------------------------------------


@dataclass
class Lifecycle:
    """One CachedImage's loop; ``body`` is kopf's live view of the object."""

    rt: Runtime
    name: str
    body: Mapping[str, Any]
    users: Any  # kopf.Index[str, str]: image → "namespace/pod"
    retries: int = 0
    # The phase this loop last wrote: kopf's live body shows our own writes only once
    # their watch event arrives, and acting on a stale phase would prefetch twice.
    phase: str | None = None
    written_expiry: dt.datetime | object | None = _UNWRITTEN  # likewise for spec.expiresAt
    expiring: bool = False  # step's verdict (from its view of expiresAt), for cache()
    retry_at: float = 0.0
    check_at: float = 0.0
    last_used_write: float = -1e9

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.body.get("spec") or {}

    @property
    def status(self) -> Mapping[str, Any]:
        return self.body.get("status") or {}

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        source = str(self.spec.get("sourceImage", ""))
        event = self.rt.wakeups.setdefault(source, asyncio.Event())
        try:
            ref = parse_reference(source)
        except InvalidReference as exc:
            await self.set_status(phase="Failed", lastError=f"invalid sourceImage: {exc}")
            await stopped.wait()
            return
        while not stopped:
            event.clear()
            delay = await self.step(ref, source)
            if delay is None:
                return  # deleted
            await wait_any(event.wait, stopped.wait, seconds=delay)

    async def step(self, ref: Reference, source: str) -> float | None:
        """One look at the object: returns seconds until the next is due, None once
        the object is deleted."""
        loop = asyncio.get_running_loop()
        now = utcnow()
        users = sorted(self.users.get(source, ()))
        due = [TICK]

        # Usage.
        used_by = {"count": len(users), "pods": users[:MAX_LISTED_PODS]}
        changes: dict[str, Any] = {}
        if used_by != self.status.get("usedBy"):
            changes["usedBy"] = used_by
        if (users and loop.time() - self.last_used_write >= LAST_USED_EVERY) or (
            "usedBy" in changes and (self.status.get("usedBy") or {}).get("count")
        ):
            changes["lastUsed"] = iso(now)
            self.last_used_write = loop.time()

        # Expiry: the clock starts when the last user goes away.
        retain = bool(self.spec.get("retain"))
        expires = parse_time(self.spec.get("expiresAt"))
        if self.written_expiry is not _UNWRITTEN:
            if expires == self.written_expiry:
                self.written_expiry = _UNWRITTEN  # the watch caught up with our write
            else:
                expires = self.written_expiry  # type: ignore[assignment]
        new_expiry: dt.datetime | object | None = _UNWRITTEN
        if users and expires is not None:
            new_expiry = expires = None
        elif not users and expires is None:
            new_expiry = expires = now + dt.timedelta(seconds=self.rt.settings.expiry)

        # Status first, so that whoever sees expiresAt also sees the usage that set it.
        self.expiring = expires is not None and not retain
        phase = self.phase or self.status.get("phase")
        if self.expiring and phase == "Cached":
            changes["phase"] = "Expiring"
        elif not self.expiring and phase == "Expiring":
            changes["phase"] = "Cached"
        if changes:
            await self.set_status(**changes)
        if new_expiry is not _UNWRITTEN:
            self.written_expiry = new_expiry
            await self.patch_spec(
                {"expiresAt": iso(new_expiry) if isinstance(new_expiry, dt.datetime) else None}
            )
        if self.expiring and expires is not None:
            if expires <= now:
                self.rt.metrics.expired.inc()
                await self.delete()
                return None
            due.append((expires - now).total_seconds())

        # Caching, retries and freshness.
        phase = self.phase or phase
        if phase in (None, "Pending", "Caching") or (
            phase == "Failed" and loop.time() >= self.retry_at
        ):
            await self.cache(ref, source)
        elif phase == "Failed":
            due.append(self.retry_at - loop.time())
        elif ref.digest is None:
            if loop.time() >= self.check_at:
                await self.check_freshness(ref, source)
            due.append(self.check_at - loop.time())
        return max(0.05, min(due))

    async def cache(self, ref: Reference, source: str) -> None:
        loop = asyncio.get_running_loop()
        await self.set_status(phase="Caching", conditions=_ready("False", "Caching", ""))
        try:
            digest, size = await prefetch(self.rt, ref)
        except (PullError, aiohttp.ClientError, TimeoutError) as exc:
            self.retries += 1
            delay = backoff(self.retries, RETRY_MIN, RETRY_MAX)
            self.retry_at = loop.time() + delay
            message = str(exc) or type(exc).__name__
            log.warning("prefetch failed", image=source, error=message, retry_in=round(delay))
            self.rt.metrics.prefetches.labels("failed").inc()
            await self.set_status(
                phase="Failed",
                lastError=message,
                retries=self.retries,
                conditions=_ready("False", "PrefetchFailed", message),
            )
            return
        self.retries = 0
        self.rt.metrics.prefetches.labels("ok").inc()
        await cache_admin(self.rt, "PUT", "pins", ref)
        now = utcnow()
        self.check_at = loop.time() + self.rt.settings.freshness_interval
        log.info("cached", image=source, digest=digest, size=size)
        await self.set_status(
            phase="Expiring" if self.expiring else "Cached",
            digest=digest,
            size=size,
            upstreamDigest=digest,
            upToDate=True,
            lastChecked=iso(now),
            lastError=None,
            retries=0,
            conditions=_ready("True", "Cached", f"{digest}, {size} bytes"),
        )

    async def check_freshness(self, ref: Reference, source: str) -> None:
        loop = asyncio.get_running_loop()
        # Jitter spreads the checks of images cached together.
        self.check_at = loop.time() + self.rt.settings.freshness_interval * random.uniform(0.9, 1.1)
        await self.rt.pacer.wait(ref.registry)
        try:
            upstream = await head_digest(self.rt, ref)
        except (aiohttp.ClientError, TimeoutError, PullError) as exc:
            log.info("tag check failed", image=source, error=str(exc) or type(exc).__name__)
            self.rt.metrics.tag_checks.labels("failed").inc()
            return
        current = self.status.get("digest")
        await self.set_status(
            upstreamDigest=upstream, upToDate=upstream == current, lastChecked=iso(utcnow())
        )
        if upstream == current:
            self.rt.metrics.tag_checks.labels("current").inc()
            # Idempotent: a cache that lost its pins (index rebuilt, replaced volume) gets
            # them back within one interval.
            await cache_admin(self.rt, "PUT", "pins", ref)
        else:
            self.rt.metrics.tag_checks.labels("moved").inc()
            log.info("tag moved", image=source, cached=current, upstream=upstream)
            await self.cache(ref, source)  # keep the cache on what pods will pull next

    # A merge patch: the client would send a dict as a JSON patch. Its stubs omit the
    # generated `_content_type` parameter, hence the ignores.
    async def set_status(self, **fields: Any) -> None:
        if "phase" in fields:
            self.phase = fields["phase"]
        await self.rt.objects.patch_cluster_custom_object_status(  # type: ignore[call-arg]
            GROUP, VERSION, PLURAL, self.name, {"status": fields}, _content_type=MERGE_PATCH
        )

    async def patch_spec(self, fields: Mapping[str, Any]) -> None:
        await self.rt.objects.patch_cluster_custom_object(  # type: ignore[call-arg]
            GROUP, VERSION, PLURAL, self.name, {"spec": dict(fields)}, _content_type=MERGE_PATCH
        )

    async def delete(self) -> None:
        log.info("expired", name=self.name, image=self.spec.get("sourceImage"))
        try:
            await self.rt.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, self.name)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise


def _ready(status: str, reason: str, message: str) -> list[dict[str, str]]:
    return [
        {
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message[:1024],
            "lastTransitionTime": iso(utcnow()),
        }
    ]


async def prefetch(rt: Runtime, ref: Reference) -> tuple[str, int]:
    """Pull ``ref`` through the cluster cache (every configured platform of an index), so
    its manifests and blobs are cached there; returns (manifest digest, blob bytes)."""
    sizes: dict[str, int] = {}
    digest = ""
    platforms: list[Platform] = rt.settings.platforms
    for platform in platforms:
        try:
            result = await pull(
                rt.http, rt.settings.cache_url, ref.prefixed_name, ref.ref, platform
            )
        except PlatformMissing:
            if len(platforms) > 1:
                continue  # this index lacks one of several wanted platforms
            raise
        digest = result.manifest_digest
        for blob in result.blobs:
            sizes[blob.digest] = blob.size
    if not digest:
        raise PullError(f"{ref} has none of the platforms {', '.join(map(str, platforms))}")
    return digest, sum(sizes.values())


async def cache_admin(rt: Runtime, method: str, action: str, ref: Reference) -> bool:
    """Pin or release ``ref`` in the cluster cache (its admin API). Best effort: a cache
    that cannot be told only keeps evicting by least-recent use, which is safe."""
    if rt.cache_token is None:
        return False
    url = f"{rt.settings.cache_url}/_stowage/v1/{action}"
    try:
        async with rt.http.request(
            method,
            url,
            params={"image": str(ref)},
            headers={"Authorization": f"Bearer {rt.cache_token}"},
        ) as resp:
            if resp.status == 200:
                return True
            log.warning("cache admin call refused", url=url, image=str(ref), status=resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("cache admin call failed", url=url, image=str(ref), error=str(exc))
    return False


async def release(rt: Runtime, name: str, body: Mapping[str, Any], others: Any) -> None:
    """A CachedImage is gone: release its image in the cluster cache, unless another
    CachedImage holds the same content (then only its pin goes)."""
    try:
        ref = parse_reference(str((body.get("spec") or {}).get("sourceImage", "")))
    except InvalidReference:
        return
    digest = (body.get("status") or {}).get("digest")
    shared = bool(digest) and any(
        other_digest == digest
        for other_name, store in others.items()
        if other_name != name
        for _, other_digest in store
    )
    done = await cache_admin(
        rt, "DELETE" if shared else "POST", "pins" if shared else "release", ref
    )
    if done:
        log.info("released in the cache", name=name, image=str(ref), shared=shared)


async def head_digest(rt: Runtime, ref: Reference) -> str:
    """The digest the tag resolves to now, by HEAD through the cluster cache (which
    revalidates against upstream once its tag TTL is over)."""
    url = f"{rt.settings.cache_url}/v2/{ref.prefixed_name}/manifests/{ref.ref}"
    async with rt.http.head(url, headers={"Accept": UPSTREAM_ACCEPT}) as resp:
        digest = resp.headers.get("Docker-Content-Digest")
        if resp.status != 200 or not digest:
            raise PullError(f"HEAD {url}: {resp.status}")
        return digest


# --- pods → CachedImage -------------------------------------------------------------------


async def ensure_cached_image(rt: Runtime, image: str, known: Any) -> None:
    """Create the CachedImage for ``image`` unless the index says it exists."""
    name = cached_image_name(image)
    if name in known:
        return
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CachedImage",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "stowage"}},
        "spec": {"sourceImage": image},
    }
    try:
        await rt.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        log.info("cachedimage created", name=name, image=image)
    except k8s.ApiException as exc:
        if exc.status != 409:  # another event (or replica) was first
            raise


async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's API credentials: the ones the operator's own client was configured with
    (in-cluster service account, or --kubeconfig), asked again on every re-login so that
    rotated service-account tokens are picked up."""
    cfg = k8s.Configuration.get_default_copy()
    found: Any = cfg.get_api_key_with_prefix("BearerToken")
    header = str((await found if inspect.isawaitable(found) else found) or "")
    scheme, _sep, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=str(cfg.host),
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Register every handler of the operator with ``registry``."""
    policy = rt.policy
    kopf.on.login(registry=registry)(login)

    @kopf.on.mutate(
        "pods",
        id="mutate-pods",
        subresource="*",
        ignore_failures=True,
        side_effects=False,
        registry=registry,
    )
    def mutate(
        *, body: kopf.Body, patch: kopf.Patch, subresource: str | None, dryrun: bool, **kw: Any
    ) -> None:
        operation = kw.get("operation")
        outcome, done = mutate_pod(policy, body, patch, operation, subresource)
        rt.metrics.admissions.labels(outcome).inc()
        if done:
            meta = body.get("metadata") or {}
            log.info(
                "pod admitted",
                outcome=outcome,
                namespace=meta.get("namespace"),
                pod=meta.get("name") or meta.get("generateName"),
                operation=operation,
                subresource=subresource,
                dryrun=dryrun,
                images=done,
            )

    @kopf.index("pods", id="pod_users", registry=registry)
    def pod_users(*, body: kopf.Body, name: str, namespace: str | None, **_: Any) -> dict[str, str]:
        phase = (body.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return {}
        return {image: f"{namespace}/{name}" for image in source_images(policy, body)}

    @kopf.index(GROUP, VERSION, PLURAL, id="cached_images", registry=registry)
    def cached_images(*, name: str, body: kopf.Body, **_: Any) -> dict[str, tuple[str, str]]:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        return {name: (str(spec.get("sourceImage", "")), str(status.get("digest") or ""))}

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="release", registry=registry)
    async def released(*, name: str, body: kopf.Body, **kw: Any) -> None:
        await release(rt, name, body, kw["cached_images"])

    @kopf.on.event("pods", registry=registry)
    async def pod_event(*, body: kopf.Body, type: str, **kw: Any) -> None:
        # kopf passes every index by its function's name.
        cached_images = kw["cached_images"]
        images = source_images(policy, body)
        if type != "DELETED":
            for image in images:
                await ensure_cached_image(rt, image, cached_images)
        for image in images:
            rt.wake(image)

    @kopf.daemon(
        GROUP, VERSION, PLURAL, id="lifecycle", cancellation_timeout=10.0, registry=registry
    )
    async def lifecycle(
        *, name: str, body: kopf.Body, stopped: kopf.DaemonStopped, **kw: Any
    ) -> None:
        await Lifecycle(rt, name, body, kw["pod_users"]).run(stopped)
