"""The webhook certificate against a real kube-apiserver: the Secret, the files, the
MutatingWebhookConfiguration's caBundle, replicas racing, renewal and CA rotation."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from structlog.testing import capture_logs

from stowage.operator import certs
from stowage.operator.certs import (
    CA_BUNDLE,
    CA_CRT,
    CA_KEY,
    TLS_CRT,
    TLS_KEY,
    CertConfig,
    ensure,
    keep_fresh,
    load_certs,
    load_pair,
    needs_renewal,
)
from tests.support.kube import KubeAPI

DAY = timedelta(days=1)


async def _client(kube: KubeAPI) -> k8s.ApiClient:
    conf = k8s.Configuration()
    await k8s_config.load_kube_config(config_file=str(kube.kubeconfig), client_configuration=conf)
    return k8s.ApiClient(configuration=conf)


@pytest.fixture
async def api(kube: KubeAPI) -> AsyncIterator[k8s.ApiClient]:
    client = await _client(kube)
    yield client
    await client.close()


def _hook(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": {"url": "https://127.0.0.1:1/x"},
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["configmaps"],
            }
        ],
        # Never called: no namespace carries this label (and failures would be ignored).
        "namespaceSelector": {"matchLabels": {"stowage.test/never": "true"}},
        "failurePolicy": "Ignore",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    }


MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


@pytest.fixture
def webhook(kube: KubeAPI, namespace: str) -> Iterator[str]:
    """A MutatingWebhookConfiguration with two webhooks (cluster-scoped: unique name)."""
    name = f"stowage-certs-{namespace}"
    kube.ok(
        "POST",
        MWC,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [_hook("a.stowage.test"), _hook("b.stowage.test")],
        },
    )
    yield name
    kube.request("DELETE", f"{MWC}/{name}")


def _cfg(namespace: str, webhook: str | None, cert_dir: Path, **kw: Any) -> CertConfig:
    return CertConfig(
        namespace=namespace,
        secret="stowage-webhook-tls",
        service="stowage-webhook",
        webhook_config=webhook,
        cert_dir=cert_dir,
        extra_sans=("127.0.0.1",),
        **kw,
    )


def _secret(kube: KubeAPI, cfg: CertConfig) -> dict[str, Any]:
    doc: dict[str, Any] = kube.ok("GET", f"/api/v1/namespaces/{cfg.namespace}/secrets/{cfg.secret}")
    return doc


def _data(doc: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in doc["data"].items()}


def _bundles(kube: KubeAPI, name: str) -> list[bytes]:
    doc = kube.ok("GET", f"{MWC}/{name}")
    return [base64.b64decode(h["clientConfig"].get("caBundle", "")) for h in doc["webhooks"]]


def _files(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in (TLS_CRT, TLS_KEY, CA_CRT)}


async def test_ensure_creates_secret_files_and_ca_bundle(
    kube: KubeAPI, namespace: str, webhook: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    cfg = _cfg(namespace, webhook, tmp_path / "certs")
    state = await ensure(api, cfg)
    assert state.secret == "created"
    assert state.ca_bundle == "patched"
    assert state.files_changed

    doc = _secret(kube, cfg)
    assert doc["type"] == "kubernetes.io/tls"
    data = _data(doc)
    assert set(data) == {CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, CA_BUNDLE}
    ca = load_pair(data[CA_CRT], data[CA_KEY])
    tls = load_pair(data[TLS_CRT], data[TLS_KEY])
    assert ca is not None and tls is not None
    assert needs_renewal(tls.cert, ca.cert, cfg.sans, datetime.now(UTC)) is None
    assert state.not_after == tls.cert.not_valid_after_utc
    assert state.ca_not_after == ca.cert.not_valid_after_utc

    # Both webhooks trust the bundle; the files are what the Secret holds.
    assert _bundles(kube, webhook) == [data[CA_BUNDLE]] * 2
    assert _files(cfg.cert_dir) == {
        TLS_CRT: data[TLS_CRT],
        TLS_KEY: data[TLS_KEY],
        CA_CRT: data[CA_BUNDLE],
    }
    assert (cfg.cert_dir / TLS_KEY).stat().st_mode & 0o077 == 0


async def test_second_ensure_changes_nothing(
    kube: KubeAPI, namespace: str, webhook: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    cfg = _cfg(namespace, webhook, tmp_path / "certs")
    await ensure(api, cfg)
    secret_rv = _secret(kube, cfg)["metadata"]["resourceVersion"]
    hook_rv = kube.ok("GET", f"{MWC}/{webhook}")["metadata"]["resourceVersion"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in cfg.cert_dir.iterdir()}

    state = await ensure(api, cfg)
    assert (state.secret, state.ca_bundle, state.files_changed) == ("unchanged", "unchanged", False)
    assert state.reasons == ()
    assert _secret(kube, cfg)["metadata"]["resourceVersion"] == secret_rv
    assert kube.ok("GET", f"{MWC}/{webhook}")["metadata"]["resourceVersion"] == hook_rv
    assert {p.name: p.stat().st_mtime_ns for p in cfg.cert_dir.iterdir()} == mtimes


async def test_concurrent_replicas_agree_on_one_secret(
    kube: KubeAPI, namespace: str, webhook: str, tmp_path: Path
) -> None:
    clients = [await _client(kube) for _ in range(3)]
    try:
        for round_ in range(3):  # a few rounds: the race is real, its outcome varies
            cfgs = [
                replace(_cfg(namespace, webhook, tmp_path / f"r{round_}-{i}"), secret=f"s{round_}")
                for i in range(len(clients))
            ]
            states = await asyncio.gather(
                *(ensure(c, cfg) for c, cfg in zip(clients, cfgs, strict=True))
            )
            assert sorted(s.secret for s in states) == ["created", "unchanged", "unchanged"]
            data = _data(_secret(kube, cfgs[0]))
            for cfg in cfgs:
                assert _files(cfg.cert_dir)[TLS_CRT] == data[TLS_CRT]
                assert _files(cfg.cert_dir)[CA_CRT] == data[CA_BUNDLE]
            assert _bundles(kube, webhook) == [data[CA_BUNDLE]] * 2
    finally:
        for c in clients:
            await c.close()


async def test_create_conflict_adopts_the_winners_secret(
    kube: KubeAPI,
    namespace: str,
    api: k8s.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deterministic version of the race: this replica read "no Secret" just before another
    replica created it, so its create gets 409 and it must take the other's."""
    winner = _cfg(namespace, None, tmp_path / "winner")
    await ensure(api, winner)
    real_read = k8s.CoreV1Api.read_namespaced_secret
    reads = 0

    async def stale_read(self: k8s.CoreV1Api, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise k8s.ApiException(status=404, reason="Not Found")
        return await real_read(self, *args, **kwargs)

    monkeypatch.setattr(k8s.CoreV1Api, "read_namespaced_secret", stale_read)
    loser = replace(winner, cert_dir=tmp_path / "loser")
    with capture_logs() as logs:
        state = await ensure(api, loser)
    assert reads == 2
    assert [e["event"] for e in logs].count("webhook certificate secret conflict, re-reading") == 1
    assert state.secret == "unchanged"
    assert _files(loser.cert_dir) == _files(winner.cert_dir)


async def test_replace_conflict_rereads_and_keeps_foreign_metadata(
    kube: KubeAPI,
    namespace: str,
    api: k8s.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t0 = datetime.now(UTC)
    cfg = _cfg(namespace, None, tmp_path / "certs", cert_lifetime=3 * DAY)
    await ensure(api, cfg, now=t0)
    path = f"/api/v1/namespaces/{namespace}/secrets/{cfg.secret}"
    real_read = k8s.CoreV1Api.read_namespaced_secret
    reads = 0

    async def read_then_edit(self: k8s.CoreV1Api, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        secret = await real_read(self, *args, **kwargs)
        if reads == 1:  # someone edits the Secret between our read and our replace
            patch = {"metadata": {"labels": {"team": "x"}}}
            kube.ok("PATCH", path, patch, content_type="application/merge-patch+json")
        return secret

    monkeypatch.setattr(k8s.CoreV1Api, "read_namespaced_secret", read_then_edit)
    with capture_logs() as logs:
        state = await ensure(api, cfg, now=t0 + 2 * DAY + timedelta(hours=1))
    assert reads == 2
    assert [e["event"] for e in logs].count("webhook certificate secret conflict, re-reading") == 1
    assert state.secret == "updated"
    doc = _secret(kube, cfg)
    assert doc["metadata"]["labels"]["team"] == "x"
    assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "stowage"
    assert _data(doc)[TLS_CRT] == (cfg.cert_dir / TLS_CRT).read_bytes()


async def test_short_lifetime_cert_is_renewed_with_the_same_ca(
    kube: KubeAPI, namespace: str, webhook: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    t0 = datetime.now(UTC)
    cfg = _cfg(namespace, webhook, tmp_path / "certs", cert_lifetime=timedelta(hours=3))
    first = await ensure(api, cfg, now=t0)
    before = _data(_secret(kube, cfg))
    files_before = _files(cfg.cert_dir)

    # Two thirds of the way: still fine.
    assert (await ensure(api, cfg, now=t0 + timedelta(hours=1, minutes=50))).secret == "unchanged"

    state = await ensure(api, cfg, now=t0 + timedelta(hours=2, minutes=10))
    assert state.secret == "updated"
    assert state.reasons == ("serving certificate: due for renewal",)
    assert state.not_after > first.not_after
    assert state.ca_bundle == "unchanged"  # same CA: nothing for the apiserver to learn
    after = _data(_secret(kube, cfg))
    assert after[CA_CRT] == before[CA_CRT] and after[CA_KEY] == before[CA_KEY]
    assert after[TLS_CRT] != before[TLS_CRT]
    assert state.files_changed
    files_after = _files(cfg.cert_dir)
    assert files_after[TLS_CRT] == after[TLS_CRT] != files_before[TLS_CRT]
    assert files_after[TLS_KEY] == after[TLS_KEY] != files_before[TLS_KEY]
    assert files_after[CA_CRT] == files_before[CA_CRT]


async def test_ca_rotation_keeps_the_old_ca_in_ca_bundle_until_it_expires(
    kube: KubeAPI, namespace: str, webhook: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    t0 = datetime.now(UTC)
    cfg = _cfg(namespace, webhook, tmp_path / "certs", ca_lifetime=3 * DAY, cert_lifetime=DAY)
    await ensure(api, cfg, now=t0)
    old_ca = load_certs(_data(_secret(kube, cfg))[CA_CRT])[0]

    state = await ensure(api, cfg, now=t0 + 2 * DAY + timedelta(hours=1))
    assert state.reasons[0] == "CA due for renewal"
    assert state.ca_bundle == "patched"
    data = _data(_secret(kube, cfg))
    new_ca = load_certs(data[CA_CRT])[0]
    assert new_ca != old_ca
    assert load_certs(data[CA_BUNDLE]) == [new_ca, old_ca]
    assert _bundles(kube, webhook) == [data[CA_BUNDLE]] * 2
    assert (cfg.cert_dir / CA_CRT).read_bytes() == data[CA_BUNDLE]
    x509.load_pem_x509_certificate(data[TLS_CRT]).verify_directly_issued_by(new_ca)

    # Once the old CA expired it leaves the bundle, and the webhooks follow.
    state = await ensure(api, cfg, now=t0 + 3 * DAY + timedelta(hours=1))
    data = _data(_secret(kube, cfg))
    assert load_certs(data[CA_BUNDLE]) == [new_ca]
    assert state.ca_bundle == "patched"
    assert _bundles(kube, webhook) == [data[CA_BUNDLE]] * 2


async def test_secret_with_garbage_is_replaced(
    kube: KubeAPI, namespace: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    cfg = _cfg(namespace, None, tmp_path / "certs")
    junk = base64.b64encode(b"garbage").decode()
    kube.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "metadata": {"name": cfg.secret},
            "type": "Opaque",
            "data": {k: junk for k in (CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, CA_BUNDLE, "other")},
        },
    )
    state = await ensure(api, cfg)
    assert state.secret == "updated"
    assert state.reasons[0] == "no usable CA"
    doc = _secret(kube, cfg)
    assert doc["type"] == "Opaque"  # a Secret's type is immutable: kept as found
    data = _data(doc)
    assert data["other"] == b"garbage"  # keys that are not ours are left alone
    ca, tls = load_pair(data[CA_CRT], data[CA_KEY]), load_pair(data[TLS_CRT], data[TLS_KEY])
    assert ca is not None and tls is not None
    assert needs_renewal(tls.cert, ca.cert, cfg.sans, datetime.now(UTC)) is None
    assert load_certs(data[CA_BUNDLE]) == [ca.cert]


async def test_missing_webhook_configuration_is_not_an_error(
    namespace: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    cfg = _cfg(namespace, f"absent-{namespace}", tmp_path / "certs")
    state = await ensure(api, cfg)
    assert (state.secret, state.ca_bundle, state.files_changed) == ("created", "missing", True)


async def test_failed_ca_bundle_patch_writes_files_only_when_none_are_served(
    kube: KubeAPI,
    namespace: str,
    webhook: str,
    api: k8s.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a confirmed caBundle, a replica keeps serving what it serves; only a replica
    with nothing to serve yet writes the files (so its webhook server can start at all)."""

    async def forbidden(*_: Any, **__: Any) -> Any:
        raise k8s.ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(certs, "sync_ca_bundle", forbidden)
    t0 = datetime.now(UTC)
    cfg = _cfg(namespace, webhook, tmp_path / "certs", cert_lifetime=timedelta(hours=3))
    with pytest.raises(k8s.ApiException):
        await ensure(api, cfg, now=t0)
    first = _files(cfg.cert_dir)
    assert first[TLS_CRT] == _data(_secret(kube, cfg))[TLS_CRT]

    with pytest.raises(k8s.ApiException):
        await ensure(api, cfg, now=t0 + timedelta(hours=2, minutes=10))  # renewed in the Secret
    assert _data(_secret(kube, cfg))[TLS_CRT] != first[TLS_CRT]
    assert _files(cfg.cert_dir) == first

    monkeypatch.undo()
    state = await ensure(api, cfg, now=t0 + timedelta(hours=2, minutes=10))
    assert (state.secret, state.ca_bundle, state.files_changed) == ("unchanged", "patched", True)


async def test_ca_bundle_patch_survives_a_concurrent_edit(
    kube: KubeAPI,
    namespace: str,
    webhook: str,
    api: k8s.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The webhooks are reordered between our read and our patch (say, a Helm upgrade):
    the patch's tests fail and the next attempt patches the right entries."""
    cfg = _cfg(namespace, webhook, tmp_path / "certs")
    real_read = k8s.AdmissionregistrationV1Api.read_mutating_webhook_configuration
    reads = 0

    async def read_then_reorder(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        conf = await real_read(self, *args, **kwargs)
        if reads == 1:
            doc = kube.ok("GET", f"{MWC}/{webhook}")
            doc["webhooks"] = [_hook("c.stowage.test"), *reversed(doc["webhooks"])]
            kube.ok("PUT", f"{MWC}/{webhook}", doc)
        return conf

    monkeypatch.setattr(
        k8s.AdmissionregistrationV1Api, "read_mutating_webhook_configuration", read_then_reorder
    )
    with capture_logs() as logs:
        state = await ensure(api, cfg)
    assert reads == 2
    retries = [e for e in logs if e["event"] == "webhook configuration changed, re-reading"]
    assert [e["status"] for e in retries] == [422]  # the failed "test" op
    assert state.ca_bundle == "patched"
    bundle = _data(_secret(kube, cfg))[CA_BUNDLE]
    assert _bundles(kube, webhook) == [bundle] * 3


async def test_keep_fresh_waits_for_the_webhook_configuration(
    kube: KubeAPI, namespace: str, api: k8s.ApiClient, tmp_path: Path
) -> None:
    name = f"stowage-late-{namespace}"
    cfg = _cfg(namespace, name, tmp_path / "certs")
    stop = asyncio.Event()
    task = asyncio.create_task(keep_fresh(api, cfg, interval=3600, stop=stop, min_backoff=0.05))
    try:
        for _ in range(200):
            if (cfg.cert_dir / TLS_CRT).exists():
                break
            await asyncio.sleep(0.05)
        assert (cfg.cert_dir / TLS_CRT).exists()  # files first: nothing to patch yet
        kube.ok(
            "POST",
            MWC,
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": name},
                "webhooks": [_hook("a.stowage.test")],
            },
        )
        bundle = _data(_secret(kube, cfg))[CA_BUNDLE]
        for _ in range(200):
            if _bundles(kube, name) == [bundle]:
                break
            await asyncio.sleep(0.05)
        assert _bundles(kube, name) == [bundle]
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        kube.request("DELETE", f"{MWC}/{name}")
