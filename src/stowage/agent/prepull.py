"""Pre-pull: keep the images of the ImageCaches that select this node in its runtime.

Each pass (every --sync-interval, and soon after an ImageCache or the node changes):
reads this node's labels and every ImageCache, pulls what is missing or due for a
refresh through the CRI (via the node proxy, so the cluster cache fetches each blob from
upstream once however many nodes pull), removes what it pulled that no ImageCache wants
any more (never an image a container uses), and writes this node's entry in each
ImageCache's status, only when it changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from kubernetes_asyncio import client as k8s
from prometheus_client import Counter, Gauge

from stowage.agent.cri import CRIClient, CRIError, Image, ImageInUseError
from stowage.agent.mirror import DEFAULT_HOST
from stowage.kubeclient import MERGE_PATCH
from stowage.metrics import new_registry
from stowage.oci.reference import InvalidReference, Reference, parse_reference, proxied_reference
from stowage.timing import backoff
from stowage.units import parse_duration
from stowage.upstream.auth import AuthFileError, parse_auth_config

log = structlog.get_logger("stowage.agent")

GROUP, VERSION, PLURAL = "stowage.dev", "v1alpha1", "imagecaches"
DEFAULT_REFRESH = 3600.0
RECHECK = 3600.0  # seconds until an image that is never refreshed is looked at again
RETRY_MIN, RETRY_MAX = 10.0, 600.0
STATE_FILE = "prepulled.json"


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Want:
    """One image some selected ImageCache lists."""

    image: str  # normalised reference, as reported
    registry: str
    tagged: bool
    refresh: float
    secrets: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)


@dataclass
class Pulled:
    """An image this agent pulls (persisted). ``owned``: it was not in the runtime before
    the agent's first pull; only those are ever removed."""

    image: str
    digest: str
    at: float
    owned: bool = True


@dataclass
class Outcome:
    image: str
    state: str  # Pulled, Pulling, Failed, Skipped
    digest: str = ""
    reason: str = ""
    at: float = 0.0

    def entry(self) -> dict[str, str]:
        out = {"image": self.image, "state": self.state, "time": iso(self.at)}
        if self.digest:
            out["digest"] = self.digest
        if self.reason:
            out["reason"] = self.reason[:1024]
        return out


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def pull_name(ref: Reference, mirrored: set[str], proxy_address: str) -> str:
    """The name the runtime pulls ``ref`` under: its own for a mirrored registry
    (containerd goes through the proxy by hosts.toml), else host-prefixed on the node
    proxy, the name the webhook gives pods, so that kubelet finds the image present."""
    if DEFAULT_HOST in mirrored or ref.registry in mirrored:
        return str(ref)
    return proxied_reference(ref, proxy_address)


def repo_digest(image: Image | None) -> str:
    """The manifest digest of the first of ``image``'s repo digests; "" when none."""
    for name in image.repo_digests if image is not None else ():
        _, at, digest = name.rpartition("@")
        if at:
            return digest
    return ""


def credentials_from_secret(secret: Mapping[str, Any], registry: str) -> tuple[str, str] | None:
    """(username, password) for ``registry`` from a dockerconfigjson (or legacy dockercfg,
    the bare ``auths`` map) Secret; None when it has none or cannot be read."""
    data = secret.get("data") or {}
    for key in (".dockerconfigjson", ".dockercfg"):
        if key not in data:
            continue
        try:
            doc = json.loads(base64.b64decode(data[key]))
            if key == ".dockercfg":
                doc = {"auths": doc}
            creds = parse_auth_config(doc, f"pull secret key {key}").get(registry)
        except (ValueError, TypeError, AuthFileError) as exc:
            log.warning("pull secret unreadable", registry=registry, error=str(exc))
            return None
        if creds is not None and creds.username and creds.password is not None:
            return creds.username, creds.password
    return None


class State:
    """What this agent pulled, in a JSON file that survives restarts."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self.pulled: dict[str, Pulled] = {}
        try:
            doc = json.loads(self.path.read_text())
            self.pulled = {k: Pulled(**v) for k, v in doc.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            log.warning(
                "pre-pull state unreadable, starting afresh", path=str(self.path), error=str(exc)
            )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({k: asdict(v) for k, v in self.pulled.items()}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = new_registry()
        self.pulls = Counter(
            "stowage_agent_pulls",
            "Pre-pulls through the CRI, by result (pulled, failed, skipped).",
            ["result"],
            registry=self.registry,
        )
        self.removals = Counter(
            "stowage_agent_removals",
            "Pre-pulled images removed because no ImageCache wants them any more.",
            registry=self.registry,
        )
        self.images = Gauge(
            "stowage_agent_images",
            "Images the ImageCaches selecting this node list, by state.",
            ["state"],
            registry=self.registry,
        )


class PrePuller:
    def __init__(
        self,
        api: k8s.ApiClient,
        cri: CRIClient,
        *,
        node: str,
        proxy_address: str,
        mirrored: set[str],
        disk_threshold: float,
        state_dir: Path,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.api = api
        self.cri = cri
        self.node = node
        self.proxy_address = proxy_address
        self.mirrored = mirrored
        self.disk_threshold = disk_threshold
        self.state = State(state_dir)
        self.outcomes: dict[str, Outcome] = {}  # pull name → last outcome
        self.retry_at: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.written: dict[tuple[str, str], list[dict[str, str]]] = {}  # what status holds
        self.metrics = metrics or AgentMetrics()

    @property
    def objects(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    async def reconcile(self) -> float:
        """One pass; returns seconds until something is due."""
        now = time.time()
        node = await k8s.CoreV1Api(self.api).read_node(self.node)
        labels = node.metadata.labels or {}
        listed = await self.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        every = listed.get("items", [])
        caches = [ic for ic in every if selects((ic.get("spec") or {}).get("nodeSelector"), labels)]
        wants, per_cache = self._wants(caches)

        due = [RECHECK]
        usage = await self._disk_usage()
        for name, want in wants.items():
            due.append(await self._ensure(name, want, usage, now))
        await self._remove_unwanted(set(wants))
        for state in ("Pulled", "Pulling", "Failed", "Skipped"):
            self.metrics.images.labels(state).set(
                sum(1 for n in wants if (o := self.outcomes.get(n)) and o.state == state)
            )
        await self._report(caches, per_cache, every)
        return max(1.0, min(due))

    def _wants(
        self, caches: Sequence[Mapping[str, Any]]
    ) -> tuple[dict[str, Want], dict[tuple[str, str], list[str]]]:
        wants: dict[str, Want] = {}
        per_cache: dict[tuple[str, str], list[str]] = {}
        for ic in caches:
            meta, spec = ic["metadata"], ic.get("spec") or {}
            key = (meta["namespace"], meta["name"])
            try:
                refresh = parse_duration(spec.get("refreshInterval") or DEFAULT_REFRESH)
            except ValueError:
                refresh = DEFAULT_REFRESH
            secrets = [
                (meta["namespace"], s["name"])
                for s in spec.get("imagePullSecrets") or []
                if isinstance(s, dict) and s.get("name")
            ]
            names: list[str] = []
            for image in spec.get("images") or []:
                try:
                    ref = parse_reference(str(image))
                    name = pull_name(ref, self.mirrored, self.proxy_address)
                except InvalidReference as exc:
                    self.outcomes[str(image)] = Outcome(
                        str(image), "Failed", reason=str(exc), at=time.time()
                    )
                    names.append(str(image))
                    continue
                want = wants.get(name)
                if want is None:
                    want = wants[name] = Want(str(ref), ref.registry, ref.digest is None, refresh)
                want.refresh = min(want.refresh, refresh)
                want.secrets += [s for s in secrets if s not in want.secrets]
                names.append(name)
            per_cache[key] = names
        return wants, per_cache

    async def _disk_usage(self) -> tuple[float, str] | None:
        """The fullest image filesystem: (fraction in use, mountpoint), if known."""
        try:
            filesystems = await self.cri.image_fs_info()
        except CRIError as exc:
            log.warning("image filesystem unknown", error=str(exc))
            return None
        known = [
            (fs.usage_fraction, fs.mountpoint)
            for fs in filesystems
            if fs.usage_fraction is not None
        ]
        return max(known) if known else None

    async def _ensure(
        self, name: str, want: Want, usage: tuple[float, str] | None, now: float
    ) -> float:
        """Pull ``want`` if missing, due for refresh, or retrying; returns seconds until
        it is next due."""
        pulled = self.state.pulled.get(name)
        image = await self._status(name)
        if image is not None and pulled is not None:
            age = now - pulled.at
            if not want.tagged or age < want.refresh:
                self.outcomes[name] = Outcome(want.image, "Pulled", pulled.digest, at=pulled.at)
                return want.refresh - age if want.tagged else RECHECK
        if image is not None and pulled is None and not want.tagged:
            # Pulled by someone else (kubelet): keep it, but do not claim it for removal.
            self.outcomes[name] = Outcome(want.image, "Pulled", repo_digest(image), at=now)
            return RECHECK
        # A tag someone else pulled is kept fresh, but stays theirs: never removed.
        owned = pulled.owned if pulled is not None else image is None
        if now < self.retry_at.get(name, 0.0):
            return self.retry_at[name] - now
        if usage is not None and usage[0] * 100 >= self.disk_threshold:
            reason = (
                f"image filesystem {usage[1]} is {usage[0] * 100:.0f}% full, at or above "
                f"the {self.disk_threshold:g}% threshold"
            )
            self.outcomes[name] = Outcome(want.image, "Skipped", reason=reason, at=now)
            self.metrics.pulls.labels("skipped").inc()
            return 60.0
        return await self._pull(name, want, owned)

    async def _status(self, name: str) -> Image | None:
        """The image ``name`` names in the runtime; None when absent or unknown."""
        try:
            return await self.cri.image_status(name)
        except CRIError:
            return None

    async def _pull(self, name: str, want: Want, owned: bool) -> float:
        auth = await self._auth(want)
        started = time.time()
        self.outcomes[name] = Outcome(want.image, "Pulling", at=started)
        log.info("pre-pulling", image=want.image, pull=name)
        try:
            await self.cri.pull_image(name, auth)
            digest = repo_digest(await self.cri.image_status(name))
        except CRIError as exc:
            n = self.failures[name] = self.failures.get(name, 0) + 1
            delay = backoff(n, RETRY_MIN, RETRY_MAX)
            self.retry_at[name] = time.time() + delay
            log.warning("pre-pull failed", image=want.image, error=str(exc), retry_in=round(delay))
            self.metrics.pulls.labels("failed").inc()
            self.outcomes[name] = Outcome(
                want.image, "Failed", reason=exc.details or str(exc), at=time.time()
            )
            return delay
        self.failures.pop(name, None)
        self.retry_at.pop(name, None)
        self.metrics.pulls.labels("pulled").inc()
        self.state.pulled[name] = Pulled(want.image, digest, started, owned)
        self.state.save()
        log.info(
            "pre-pulled", image=want.image, digest=digest, seconds=round(time.time() - started, 2)
        )
        self.outcomes[name] = Outcome(want.image, "Pulled", digest, at=started)
        return want.refresh if want.tagged else RECHECK

    async def _auth(self, want: Want) -> tuple[str, str] | None:
        core = k8s.CoreV1Api(self.api)
        for namespace, secret_name in want.secrets:
            try:
                secret = await core.read_namespaced_secret(secret_name, namespace)
            except k8s.ApiException as exc:
                log.warning(
                    "pull secret unreadable", secret=f"{namespace}/{secret_name}", status=exc.status
                )
                continue
            creds = credentials_from_secret(
                self.api.sanitize_for_serialization(secret), want.registry
            )
            if creds is not None:
                return creds
        return None

    async def _remove_unwanted(self, wanted: set[str]) -> None:
        unwanted = [n for n in self.state.pulled if n not in wanted]
        for name in [n for n in unwanted if not self.state.pulled[n].owned]:
            del self.state.pulled[name]  # someone else's: forgotten, left in the runtime
            self.outcomes.pop(name, None)
            self.state.save()
            unwanted.remove(name)
        if not unwanted:
            return
        try:
            in_use = await self.cri.images_in_use()  # once for the pass, not per image
        except CRIError as exc:
            log.warning("images not removed", pulls=unwanted, error=str(exc))
            return
        for name in unwanted:
            try:
                removed = await self.cri.remove_image(name, in_use=in_use)
            except ImageInUseError:
                log.info("not removing an image in use", pull=name)
                continue
            except CRIError as exc:
                log.warning("image not removed", pull=name, error=str(exc))
                continue
            log.info("removed", pull=name, present=removed)
            self.metrics.removals.inc()
            del self.state.pulled[name]
            self.outcomes.pop(name, None)
            self.state.save()

    async def _report(
        self,
        caches: Sequence[Mapping[str, Any]],
        per_cache: Mapping[tuple[str, str], list[str]],
        every: Sequence[Mapping[str, Any]],
    ) -> None:
        """This node's entry in each selected ImageCache's status (written on change), and
        none in those that no longer select it."""
        for ic in caches:
            meta = ic["metadata"]
            key = (meta["namespace"], meta["name"])
            entries = [
                self.outcomes[n].entry() for n in per_cache.get(key, []) if n in self.outcomes
            ]
            comparable = [{k: v for k, v in e.items() if k != "time"} for e in entries]
            if self.written.get(key) == comparable:
                continue
            if await self._patch_status(
                key,
                {
                    "images": len((ic.get("spec") or {}).get("images") or []),
                    "nodes": {self.node: {"updated": iso(time.time()), "images": entries}},
                },
            ):
                self.written[key] = comparable  # else written again next pass
        selected = {(ic["metadata"]["namespace"], ic["metadata"]["name"]) for ic in caches}
        for ic in every:
            key = (ic["metadata"]["namespace"], ic["metadata"]["name"])
            nodes = (ic.get("status") or {}).get("nodes") or {}
            if key not in selected and self.node in nodes:
                await self._patch_status(key, {"nodes": {self.node: None}})
                self.written.pop(key, None)

    async def _patch_status(self, key: tuple[str, str], status: Mapping[str, Any]) -> bool:
        """A merge patch of this node's key only (agents on other nodes never conflict);
        False, logged, when the API refused it."""
        try:
            await self.objects.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
                GROUP,
                VERSION,
                key[0],
                PLURAL,
                key[1],
                {"status": status},
                _content_type=MERGE_PATCH,
            )
        except k8s.ApiException as exc:
            log.warning(
                "ImageCache status not written",
                imagecache="/".join(key),
                status=exc.status,
                reason=exc.reason,
            )
            return False
        return True
