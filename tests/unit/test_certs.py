"""The webhook's CA and serving certificate without Kubernetes: generation, renewal decisions,
bundles, file writes, real TLS handshakes across a CA rotation, kopf picking up renewed files
and the keep_fresh loop (the Kubernetes side is in tests/e2e/test_certs.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kopf
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio.client import ApiException
from structlog.testing import capture_logs

from stowage.operator import certs
from stowage.operator.certs import (
    CA_BUNDLE,
    CA_CRT,
    CA_KEY,
    TLS_CRT,
    TLS_KEY,
    CertConfig,
    CertState,
    KeyPair,
    ca_needs_renewal,
    generate_ca,
    issue_cert,
    load_certs,
    load_pair,
    make_bundle,
    needs_renewal,
    plan,
    renew_at,
    required_sans,
    write_files,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SANS = required_sans("stowage", "ops", ("127.0.0.1", "stowage.example"))
DAY = timedelta(days=1)


def _chain_ok(
    leaf: x509.Certificate, roots: list[x509.Certificate], name: str, at: datetime
) -> bool:
    """Verify like a TLS client would (webpki rules: SANs, EKU, CA flags, validity)."""
    subject: verification.Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(at)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(leaf, [])
    except verification.VerificationError:
        return False
    return True


# --- generation ----------------------------------------------------------------------------


def test_required_sans_cover_every_service_name_then_extras() -> None:
    assert required_sans("hook", "ns", ("127.0.0.1", "hook")) == (
        "hook",
        "hook.ns",
        "hook.ns.svc",
        "hook.ns.svc.cluster.local",
        "127.0.0.1",
    )


def test_generated_ca_is_a_p256_ca_for_ten_years() -> None:
    ca = generate_ca(NOW)
    cert = ca.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "stowage-webhook-ca"
    )
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    assert ca.key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
    assert cert.not_valid_before_utc < NOW  # backdated for clock skew
    cert.verify_directly_issued_by(cert)


def test_issued_cert_has_the_sans_server_auth_and_chains_to_the_ca() -> None:
    ca = generate_ca(NOW)
    leaf = issue_cert(ca, SANS, NOW).cert
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "stowage",
        "stowage.ops",
        "stowage.ops.svc",
        "stowage.ops.svc.cluster.local",
        "stowage.example",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc == NOW + timedelta(days=365)
    for name in ("stowage.ops.svc", "stowage.ops.svc.cluster.local", "127.0.0.1"):
        assert _chain_ok(leaf, [ca.cert], name, NOW)
    assert not _chain_ok(leaf, [ca.cert], "other.ops.svc", NOW)
    assert not _chain_ok(leaf, [generate_ca(NOW).cert], "stowage.ops.svc", NOW)


def test_issued_cert_never_outlives_its_ca() -> None:
    ca = generate_ca(NOW, timedelta(days=30))
    leaf = issue_cert(ca, SANS, NOW, timedelta(days=365)).cert
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_load_pair_refuses_garbage_and_mismatched_keys() -> None:
    a, b = generate_ca(NOW), generate_ca(NOW)
    pair = load_pair(a.cert_pem, a.key_pem)
    assert pair is not None and pair.cert == a.cert and pair.key_pem == a.key_pem
    assert load_pair(a.cert_pem, b.key_pem) is None
    assert load_pair(b"garbage", a.key_pem) is None
    assert load_pair(a.cert_pem, b"garbage") is None
    assert load_pair(None, None) is None
    assert load_certs(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") == []


# --- renewal decisions ---------------------------------------------------------------------


def test_fresh_cert_needs_no_renewal_until_a_third_of_its_life_is_left() -> None:
    ca = generate_ca(NOW)
    leaf = issue_cert(ca, SANS, NOW, timedelta(days=30)).cert
    due = renew_at(leaf)
    # Lifetime includes the backdating; the threshold is a third of the whole span.
    span = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert due == leaf.not_valid_after_utc - span / 3
    assert needs_renewal(leaf, ca.cert, SANS, NOW) is None
    assert needs_renewal(leaf, ca.cert, SANS, due - timedelta(seconds=1)) is None
    assert needs_renewal(leaf, ca.cert, SANS, due) == "due for renewal"
    assert needs_renewal(leaf, ca.cert, SANS, leaf.not_valid_after_utc) == "expired"
    # The threshold is a parameter.
    assert needs_renewal(leaf, ca.cert, SANS, NOW + 11 * DAY, renew_fraction=0.9) is not None


def test_cert_missing_a_required_name_needs_renewal() -> None:
    ca = generate_ca(NOW)
    leaf = issue_cert(ca, SANS, NOW).cert
    assert needs_renewal(leaf, ca.cert, [*SANS, "10.0.0.7"], NOW) == "names not covered: 10.0.0.7"
    assert needs_renewal(leaf, ca.cert, ["new.ops.svc"], NOW) == "names not covered: new.ops.svc"
    # DNS names compare case-insensitively; a subset is enough.
    assert needs_renewal(leaf, ca.cert, ["STOWAGE.ops.svc"], NOW) is None


def test_cert_from_another_ca_needs_renewal() -> None:
    ca, other = generate_ca(NOW), generate_ca(NOW)
    leaf = issue_cert(other, SANS, NOW).cert
    assert needs_renewal(leaf, ca.cert, SANS, NOW) == "not signed by the current CA"


def test_ca_needs_renewal_when_a_third_of_its_life_is_left() -> None:
    ca = generate_ca(NOW, timedelta(days=30)).cert
    assert ca_needs_renewal(ca, NOW) is None
    assert ca_needs_renewal(ca, NOW + 19 * DAY) is None
    assert ca_needs_renewal(ca, NOW + 21 * DAY) == "CA due for renewal"
    assert ca_needs_renewal(ca, NOW + 31 * DAY) == "CA expired"
    leaf = issue_cert(generate_ca(NOW), SANS, NOW).cert
    assert ca_needs_renewal(leaf, NOW) == "CA certificate is not a CA"


def test_bundle_keeps_previous_cas_until_they_expire() -> None:
    old, new = generate_ca(NOW, 10 * DAY).cert, generate_ca(NOW, 100 * DAY).cert
    leaf = issue_cert(generate_ca(NOW), SANS, NOW).cert
    assert make_bundle(new, [new, old, old, leaf], NOW) == [new, old]
    assert make_bundle(new, [old], NOW + 11 * DAY) == [new]


# --- plan: what the Secret should hold ------------------------------------------------------


def _plan(stored: dict[str, bytes], now: datetime, **kw: Any) -> certs.Plan:
    kw.setdefault("ca_lifetime", 90 * DAY)
    kw.setdefault("cert_lifetime", 30 * DAY)
    return plan(stored, kw.pop("sans", SANS), now, **kw)


def test_plan_generates_everything_from_nothing_and_is_then_stable() -> None:
    first = _plan({}, NOW)
    assert set(first.data) == {CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, CA_BUNDLE}
    assert first.reasons == ("no usable CA", "serving certificate: no usable serving certificate")
    assert first.data[CA_BUNDLE] == first.data[CA_CRT]
    assert first.not_after == NOW + 30 * DAY
    assert first.ca_not_after == NOW + 90 * DAY
    assert first.renew_at == renew_at(x509.load_pem_x509_certificate(first.data[TLS_CRT]))
    again = _plan(first.data, NOW + DAY)
    assert again.data == first.data  # byte for byte: nothing to write
    assert again.reasons == ()


def test_plan_renews_the_serving_cert_with_the_same_ca() -> None:
    first = _plan({}, NOW)
    later = _plan(first.data, NOW + 21 * DAY)
    assert later.reasons == ("serving certificate: due for renewal",)
    assert later.data[CA_CRT] == first.data[CA_CRT]
    assert later.data[CA_KEY] == first.data[CA_KEY]
    assert later.data[CA_BUNDLE] == first.data[CA_BUNDLE]
    assert later.data[TLS_CRT] != first.data[TLS_CRT]
    assert later.data[TLS_KEY] != first.data[TLS_KEY]
    assert later.not_after == NOW + 51 * DAY


def test_plan_reissues_when_names_change_or_key_does_not_match() -> None:
    first = _plan({}, NOW)
    more = _plan(first.data, NOW, sans=(*SANS, "10.1.2.3"))
    assert more.reasons == ("serving certificate: names not covered: 10.1.2.3",)
    leaf = x509.load_pem_x509_certificate(more.data[TLS_CRT])
    ca = x509.load_pem_x509_certificate(more.data[CA_CRT])
    assert more.data[CA_CRT] == first.data[CA_CRT]
    assert _chain_ok(leaf, [ca], "10.1.2.3", NOW)
    swapped = dict(first.data, **{TLS_KEY: generate_ca(NOW).key_pem})
    assert _plan(swapped, NOW).reasons == ("serving certificate: no usable serving certificate",)


def test_plan_rotates_a_ca_near_expiry_and_keeps_the_old_one_in_the_bundle() -> None:
    first = _plan({}, NOW)
    old_ca = x509.load_pem_x509_certificate(first.data[CA_CRT])
    rotated = _plan(first.data, NOW + 61 * DAY)
    assert rotated.reasons == (
        "CA due for renewal",
        "serving certificate: not signed by the current CA",
    )
    new_ca = x509.load_pem_x509_certificate(rotated.data[CA_CRT])
    assert new_ca != old_ca
    assert load_certs(rotated.data[CA_BUNDLE]) == [new_ca, old_ca]
    leaf = x509.load_pem_x509_certificate(rotated.data[TLS_CRT])
    leaf.verify_directly_issued_by(new_ca)
    # The old CA leaving the bundle is a due date too.
    assert rotated.renew_at == min(renew_at(leaf), old_ca.not_valid_after_utc)
    # Stable while the old CA is valid; dropped from the bundle once it expired.
    assert _plan(rotated.data, NOW + 62 * DAY).data == rotated.data
    after = _plan(rotated.data, NOW + 91 * DAY)
    assert load_certs(after.data[CA_BUNDLE]) == [new_ca]
    assert after.data[CA_CRT] == rotated.data[CA_CRT]


def test_plan_replaces_garbage() -> None:
    garbage = {k: b"garbage" for k in (CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, CA_BUNDLE)}
    fixed = _plan(garbage, NOW)
    assert fixed.reasons[0] == "no usable CA"
    ca = load_pair(fixed.data[CA_CRT], fixed.data[CA_KEY])
    tls = load_pair(fixed.data[TLS_CRT], fixed.data[TLS_KEY])
    assert ca is not None and tls is not None
    assert needs_renewal(tls.cert, ca.cert, SANS, NOW) is None
    assert fixed.data[CA_BUNDLE] == fixed.data[CA_CRT]


def test_plan_keeps_a_trusted_ca_whose_key_was_lost_in_the_bundle() -> None:
    first = _plan({}, NOW)
    lost = {k: v for k, v in first.data.items() if k != CA_KEY}
    fixed = _plan(lost, NOW)
    assert load_certs(fixed.data[CA_BUNDLE])[1:] == load_certs(first.data[CA_CRT])


# --- files ---------------------------------------------------------------------------------


def test_write_files_is_atomic_private_for_keys_and_only_on_change(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    files = {TLS_KEY: b"key", TLS_CRT: b"cert", CA_CRT: b"ca"}
    assert write_files(d, files) is True
    assert {p.name for p in d.iterdir()} == set(files)  # no temp files left behind
    assert stat.S_IMODE((d / TLS_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / TLS_CRT).stat().st_mode) == 0o644
    inode = (d / TLS_CRT).stat().st_ino
    assert write_files(d, files) is False
    assert (d / TLS_CRT).stat().st_ino == inode  # untouched
    assert write_files(d, {**files, TLS_CRT: b"cert2"}) is True
    assert (d / TLS_CRT).read_bytes() == b"cert2"
    assert (d / TLS_CRT).stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert {p.name for p in d.iterdir()} == set(files)


# --- real TLS handshakes -------------------------------------------------------------------


def _server_context(pair: KeyPair, tmp: Path) -> ssl.SSLContext:
    tmp.mkdir(parents=True, exist_ok=True)
    write_files(tmp, {TLS_CRT: pair.cert_pem, TLS_KEY: pair.key_pem})
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / TLS_CRT, tmp / TLS_KEY)
    return ctx


async def _handshake(server: ssl.SSLContext, bundle: bytes, name: str) -> bytes:
    """Serve with ``server``, connect as a client trusting only ``bundle``; the peer cert."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(4))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cadata=bundle.decode())
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=name
        )
        try:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert isinstance(peer, bytes)
            return peer
        finally:
            writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_tls_handshake_before_and_after_a_ca_rotation(tmp_path: Path) -> None:
    now = datetime.now(UTC)  # OpenSSL checks validity against the real clock
    # An old CA with a third of its life left, and a serving cert it issued yesterday.
    old_ca = generate_ca(now - timedelta(days=2435), timedelta(days=3650))
    old_tls = issue_cert(old_ca, SANS, now - DAY)
    stored = {
        CA_CRT: old_ca.cert_pem,
        CA_KEY: old_ca.key_pem,
        TLS_CRT: old_tls.cert_pem,
        TLS_KEY: old_tls.key_pem,
        CA_BUNDLE: old_ca.cert_pem,
    }
    old_server = _server_context(old_tls, tmp_path / "old")
    for name in ("stowage.ops.svc", "127.0.0.1"):
        assert await _handshake(old_server, old_ca.cert_pem, name) == old_tls.cert.public_bytes(
            serialization.Encoding.DER
        )

    rotated = plan(stored, SANS, now)
    assert rotated.reasons[0] == "CA due for renewal"
    new_bundle = rotated.data[CA_BUNDLE]
    new_tls = load_pair(rotated.data[TLS_CRT], rotated.data[TLS_KEY])
    assert new_tls is not None
    new_server = _server_context(new_tls, tmp_path / "new")
    # Clients given the new bundle accept both the replicas still serving the old cert
    # and those already serving the new one.
    await _handshake(old_server, new_bundle, "stowage.ops.svc.cluster.local")
    await _handshake(new_server, new_bundle, "stowage.ops.svc.cluster.local")
    await _handshake(new_server, new_bundle, "127.0.0.1")
    # Why the old CA stays in the bundle, and why caBundle is patched before files change:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(old_server, rotated.data[CA_CRT], "stowage.ops.svc")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(new_server, old_ca.cert_pem, "stowage.ops.svc")
    # A name the cert does not carry is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(new_server, new_bundle, "elsewhere.ops.svc")


async def test_kopf_webhook_server_serves_renewed_files(tmp_path: Path) -> None:
    """kopf re-reads the files we write and restarts its listener with the new cert."""
    now = datetime.now(UTC)
    d = tmp_path / "certs"
    # Issued two days ago for three: due now, still valid (OpenSSL checks the real clock).
    first = plan({}, SANS, now - 2 * DAY, cert_lifetime=3 * DAY)
    write_files(
        d,
        {TLS_KEY: first.data[TLS_KEY], TLS_CRT: first.data[TLS_CRT], CA_CRT: first.data[CA_BUNDLE]},
    )

    async def fn(*_: Any, **__: Any) -> dict[str, Any]:
        return {}

    server = kopf.WebhookServer(
        addr="127.0.0.1",
        host="127.0.0.1",
        certfile=d / TLS_CRT,
        pkeyfile=d / TLS_KEY,
        cafile=d / CA_CRT,
        file_check_interval=0.05,
    )
    # Consume the configs as kopf does: the generator resumes (and hashes the files) at once.
    configs: asyncio.Queue[Any] = asyncio.Queue()

    async def consume() -> None:
        async for conf in server(fn):  # type: ignore[arg-type]
            await configs.put(conf)

    task = asyncio.create_task(consume())
    try:
        conf = await asyncio.wait_for(configs.get(), 10)
        assert base64.b64decode(conf["caBundle"]) == first.data[CA_BUNDLE]
        served = await _served(conf["url"], first.data[CA_BUNDLE])
        assert served == x509.load_pem_x509_certificate(first.data[TLS_CRT])

        renewed = plan(first.data, SANS, now, cert_lifetime=3 * DAY)
        assert renewed.data[TLS_CRT] != first.data[TLS_CRT]
        await asyncio.sleep(0.2)  # kopf takes its first hash after the listener is up
        write_files(d, {TLS_KEY: renewed.data[TLS_KEY], TLS_CRT: renewed.data[TLS_CRT]})
        conf = await asyncio.wait_for(configs.get(), 10)
        served = await _served(conf["url"], renewed.data[CA_BUNDLE])
        assert served == x509.load_pem_x509_certificate(renewed.data[TLS_CRT])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _served(url: str, bundle: bytes) -> x509.Certificate:
    parts = urlsplit(url)
    client = ssl.create_default_context(cadata=bundle.decode())
    _, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=client)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


# --- keep_fresh ----------------------------------------------------------------------------


def _state(renew_in: timedelta) -> CertState:
    now = datetime.now(UTC)
    return CertState(
        secret="unchanged",
        reasons=(),
        ca_bundle="unchanged",
        files_changed=False,
        not_after=now + 30 * DAY,
        ca_not_after=now + 300 * DAY,
        renew_at=now + renew_in,
    )


def _cfg(tmp_path: Path) -> CertConfig:
    return CertConfig(
        namespace="ops", secret="s", service="stowage", webhook_config=None, cert_dir=tmp_path
    )


def _fake_ensure(
    results: list[CertState | Exception], stop: asyncio.Event
) -> tuple[Callable[..., Awaitable[CertState]], list[float]]:
    calls: list[float] = []

    async def ensure(api: Any, cfg: CertConfig, now: datetime | None = None) -> CertState:
        calls.append(asyncio.get_running_loop().time())
        result = results.pop(0) if results else _state(timedelta(days=1))
        if not results:
            stop.set()
        if isinstance(result, Exception):
            raise result
        return result

    return ensure, calls


async def test_keep_fresh_retries_failures_with_backoff_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = asyncio.Event()
    fake, calls = _fake_ensure(
        [
            RuntimeError("apiserver down"),
            ApiException(status=500, reason="boom"),
            RuntimeError("again"),
            _state(timedelta(days=1)),
        ],
        stop,
    )
    monkeypatch.setattr(certs, "ensure", fake)
    with capture_logs() as logs:
        await asyncio.wait_for(
            certs.keep_fresh(None, _cfg(tmp_path), interval=60, stop=stop, min_backoff=0.02),  # type: ignore[arg-type]
            10,
        )
    assert len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    # exponential: 0.02, 0.04, 0.08 s, each with up to 20 % jitter (stowage.timing.backoff)
    assert gaps[0] >= 0.016 and gaps[1] >= 0.032 and gaps[2] >= 0.064
    failures = [e for e in logs if e["event"] == "webhook certificate reconcile failed"]
    assert [e["error"] for e in failures] == ["apiserver down", "API error 500 boom", "again"]


async def test_keep_fresh_is_ready_after_its_first_good_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator starts its webhook on ``ready``: not while passes fail."""
    stop, ready = asyncio.Event(), asyncio.Event()
    fake, calls = _fake_ensure([RuntimeError("apiserver down"), _state(DAY)], stop)
    seen: list[bool] = []

    async def watch() -> None:
        while len(calls) < 2:
            seen.append(ready.is_set())
            await asyncio.sleep(0.001)

    monkeypatch.setattr(certs, "ensure", fake)
    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(
        certs.keep_fresh(
            None, _cfg(tmp_path), interval=60, stop=stop, ready=ready, min_backoff=0.05
        ),  # type: ignore[arg-type]
        10,
    )
    await watcher
    assert seen and not any(seen)  # not ready while the first pass had failed
    assert ready.is_set()


async def test_keep_fresh_wakes_early_when_the_cert_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = asyncio.Event()
    fake, calls = _fake_ensure(
        [_state(timedelta(seconds=0.1)), _state(timedelta(seconds=0.1)), _state(DAY)], stop
    )
    monkeypatch.setattr(certs, "ensure", fake)
    await asyncio.wait_for(
        certs.keep_fresh(None, _cfg(tmp_path), interval=3600, stop=stop, min_backoff=0.01),  # type: ignore[arg-type]
        10,
    )
    assert len(calls) == 3


async def test_keep_fresh_stops_on_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called = asyncio.Event()

    async def ensure(api: Any, cfg: CertConfig, now: datetime | None = None) -> CertState:
        called.set()
        return _state(DAY)

    monkeypatch.setattr(certs, "ensure", ensure)
    task = asyncio.create_task(certs.keep_fresh(None, _cfg(tmp_path), interval=3600))  # type: ignore[arg-type]
    await asyncio.wait_for(called.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cert_config_sans_and_defaults(tmp_path: Path) -> None:
    cfg = replace(_cfg(tmp_path), extra_sans=("127.0.0.1",))
    assert cfg.sans == required_sans("stowage", "ops", ("127.0.0.1",))
    assert cfg.ca_lifetime == timedelta(days=3650)
    assert cfg.cert_lifetime == timedelta(days=365)
    assert cfg.renew_fraction == pytest.approx(1 / 3)
