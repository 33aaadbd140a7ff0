"""The operator's own CA and the webhook's serving certificate.

Every replica serves the mutating admission webhook over HTTPS, so all replicas must serve
certificates the apiserver trusts. The shared state is one Secret in the operator's
namespace (``ca.crt``, ``ca.key``, ``tls.crt``, ``tls.key``, ``ca-bundle.crt``); each replica
reconciles it (``ensure``), copies it into a directory that kopf's ``WebhookServer`` watches,
and patches the CA bundle into the MutatingWebhookConfiguration.

Decisions:

- Secret type ``kubernetes.io/tls`` when we create it: the conventional type for a serving
  cert with ``ca.crt`` (cert-manager's layout), so tooling recognises it and the apiserver
  insists on ``tls.crt``/``tls.key``. An existing Secret keeps its type (it is immutable).
- ECDSA P-256 keys: generated in well under a millisecond (replicas racing at start-up all
  generate one), small, and accepted by Go's TLS (the apiserver) and OpenSSL.
- Renewal is decided from the certificates themselves (``needs_renewal``), never from a
  timestamp of our own, so replicas with different clocks or versions converge.
- CA rotation: a new CA is made when less than ``renew_fraction`` of the old one's life is
  left; ``ca-bundle.crt`` (and the webhooks' ``caBundle``, and the ``ca.crt`` file) lists the
  new CA first, then every previous CA until it expires, so serving certs issued by the old
  CA (still served by replicas that have not caught up) keep verifying.
- Order in a pass: Secret, then ``caBundle``, then files. A replica thus never switches to a
  cert whose CA the webhook configuration was not first told to trust (at first start, with
  nothing served yet, files are written even if the patch fails).
- Concurrency: create → 409 means another replica won, replace carries resourceVersion →
  409 means it changed under us; either way re-read and decide again on the new content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeAlias

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio import client as k8s

from stowage.kubeclient import describe
from stowage.timing import backoff, wait_any

log = structlog.get_logger("stowage.certs")

CA_COMMON_NAME = "stowage-webhook-ca"
CA_LIFETIME = timedelta(days=3650)
CERT_LIFETIME = timedelta(days=365)
RENEW_FRACTION = 1 / 3
# Backdated so a replica whose clock lags the issuer's never sees "not yet valid".
BACKDATE = timedelta(minutes=5)

# Secret keys (and file names).
CA_CRT = "ca.crt"
CA_KEY = "ca.key"
TLS_CRT = "tls.crt"
TLS_KEY = "tls.key"
CA_BUNDLE = "ca-bundle.crt"  # current CA, then previous ones until they expire
SECRET_TYPE = "kubernetes.io/tls"

_REQUEST_TIMEOUT = 30.0
_MAX_ATTEMPTS = 8  # conflicts in a row before a pass gives up (keep_fresh retries later)

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertError(Exception):
    """A reconcile pass kept losing races; the next pass starts afresh."""


@dataclass(frozen=True)
class CertConfig:
    namespace: str
    secret: str
    service: str
    webhook_config: str | None  # MutatingWebhookConfiguration name; None: don't patch
    cert_dir: Path
    extra_sans: tuple[str, ...] = ()  # DNS names or IP addresses
    ca_lifetime: timedelta = CA_LIFETIME
    cert_lifetime: timedelta = CERT_LIFETIME
    renew_fraction: float = RENEW_FRACTION

    @property
    def sans(self) -> tuple[str, ...]:
        return required_sans(self.service, self.namespace, self.extra_sans)


SecretAction: TypeAlias = Literal["created", "updated", "unchanged"]
BundleAction: TypeAlias = Literal["patched", "unchanged", "missing", "disabled"]


@dataclass(frozen=True)
class CertState:
    """What one ``ensure`` pass did and when the next one is due."""

    secret: SecretAction
    reasons: tuple[str, ...]  # why the Secret was (re)written; empty when unchanged
    ca_bundle: BundleAction  # "missing": the configuration does not exist (yet)
    files_changed: bool
    not_after: datetime  # serving cert
    ca_not_after: datetime
    renew_at: datetime  # earliest of: cert due, CA due, an old CA leaving the bundle


# --- pure helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def required_sans(service: str, namespace: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names the apiserver may use for the webhook Service, then ``extra``."""
    names = [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        *extra,
    ]
    return tuple(dict.fromkeys(names))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing (ECDSA); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def generate_ca(now: datetime, lifetime: timedelta = CA_LIFETIME) -> KeyPair:
    key = _new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_COMMON_NAME))
        .issuer_name(_name(CA_COMMON_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        # Same subject across rotations: the AKI/SKI pair lets verifiers pick the right one.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def issue_cert(
    ca: KeyPair, sans: Sequence[str], now: datetime, lifetime: timedelta = CERT_LIFETIME
) -> KeyPair:
    """A serving certificate for ``sans`` (the first is the CN when it fits), signed by ``ca``."""
    if not sans:
        raise ValueError("a serving certificate needs at least one name")
    key = _new_key()
    # Never outlive the issuer: clients would reject the chain past the CA's expiry anyway.
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    cn = next((s for s in sans if len(s) <= 64), sans[0][:64])
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:  # a CA not made here
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(aki, critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def renew_at(cert: x509.Certificate, renew_fraction: float = RENEW_FRACTION) -> datetime:
    """When less than ``renew_fraction`` of the certificate's lifetime is left."""
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - span * renew_fraction


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ca_needs_renewal(
    ca: x509.Certificate, now: datetime, renew_fraction: float = RENEW_FRACTION
) -> str | None:
    """Why the CA must be replaced, or None."""
    if not _is_ca(ca):
        return "CA certificate is not a CA"
    if now >= ca.not_valid_after_utc:
        return "CA expired"
    if now >= renew_at(ca, renew_fraction):
        return "CA due for renewal"
    return None


def needs_renewal(
    cert: x509.Certificate,
    ca: x509.Certificate,
    sans: Iterable[str],
    now: datetime,
    renew_fraction: float = RENEW_FRACTION,
) -> str | None:
    """Why the serving certificate must be reissued, or None when it is good to serve."""
    if not _signed_by(cert, ca):
        return "not signed by the current CA"
    if now >= cert.not_valid_after_utc:
        return "expired"
    if now >= renew_at(cert, renew_fraction):
        return "due for renewal"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        return "not a server certificate"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    have: set[x509.GeneralName] = {
        x509.DNSName(n.lower()) for n in san.get_values_for_type(x509.DNSName)
    }
    have.update(x509.IPAddress(ip) for ip in san.get_values_for_type(x509.IPAddress))
    missing = [s for s in sans if _general_name(s) not in have]
    if missing:
        return f"names not covered: {', '.join(missing)}"
    return None


def load_certs(pem: bytes | None) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; garbage yields an empty list."""
    if not pem:
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def load_pair(cert_pem: bytes | None, key_pem: bytes | None) -> KeyPair | None:
    """The certificate and its private key, or None if missing, unparsable or not a pair."""
    certs = load_certs(cert_pem)
    if not certs or not key_pem:
        return None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return None  # we only sign with these

    def spki(k: Any) -> bytes:
        return bytes(
            k.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    if spki(certs[0].public_key()) != spki(key.public_key()):
        return None
    return KeyPair(certs[0], key)


def make_bundle(
    current: x509.Certificate, previous: Iterable[x509.Certificate], now: datetime
) -> list[x509.Certificate]:
    """``current`` first, then each previous CA still valid at ``now`` (deduplicated)."""
    out = [current]
    seen = {current.fingerprint(hashes.SHA256())}
    for cert in previous:
        fp = cert.fingerprint(hashes.SHA256())
        if fp in seen or not _is_ca(cert) or now >= cert.not_valid_after_utc:
            continue
        seen.add(fp)
        out.append(cert)
    return out


def bundle_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Plan:
    """The Secret's desired content and why it differs from what was stored."""

    data: dict[str, bytes]
    reasons: tuple[str, ...]
    not_after: datetime
    ca_not_after: datetime
    renew_at: datetime


def plan(
    stored: Mapping[str, bytes],
    sans: Sequence[str],
    now: datetime,
    *,
    ca_lifetime: timedelta = CA_LIFETIME,
    cert_lifetime: timedelta = CERT_LIFETIME,
    renew_fraction: float = RENEW_FRACTION,
) -> Plan:
    """Decide the Secret's content from what is stored (pure, apart from key generation).

    What is still good is kept byte for byte, so an unchanged plan means no write.
    """
    reasons: list[str] = []
    data = {k: stored[k] for k in (CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, CA_BUNDLE) if k in stored}
    # Every CA clients may trust right now, the stored current one included.
    previous = load_certs(stored.get(CA_CRT)) + load_certs(stored.get(CA_BUNDLE))

    ca = load_pair(stored.get(CA_CRT), stored.get(CA_KEY))
    why = "no usable CA" if ca is None else ca_needs_renewal(ca.cert, now, renew_fraction)
    if ca is None or why:
        reasons.append(why or "no usable CA")
        ca = generate_ca(now, ca_lifetime)
        data[CA_CRT], data[CA_KEY] = ca.cert_pem, ca.key_pem

    serving = load_pair(stored.get(TLS_CRT), stored.get(TLS_KEY))
    why = (
        "no usable serving certificate"
        if serving is None
        else needs_renewal(serving.cert, ca.cert, sans, now, renew_fraction)
    )
    if serving is None or why:
        reasons.append(f"serving certificate: {why}")
        serving = issue_cert(ca, sans, now, cert_lifetime)
        data[TLS_CRT], data[TLS_KEY] = serving.cert_pem, serving.key_pem

    bundle = make_bundle(ca.cert, previous, now)
    pem = bundle_pem(bundle)
    if data.get(CA_BUNDLE) != pem:
        if not reasons:
            reasons.append("CA bundle out of date")
        data[CA_BUNDLE] = pem

    due = [renew_at(serving.cert, renew_fraction), renew_at(ca.cert, renew_fraction)]
    due += [c.not_valid_after_utc for c in bundle[1:]]  # an old CA leaves the bundle
    return Plan(
        data=data,
        reasons=tuple(reasons),
        not_after=serving.cert.not_valid_after_utc,
        ca_not_after=ca.cert.not_valid_after_utc,
        renew_at=min(due),
    )


def write_files(cert_dir: Path, files: Mapping[str, bytes]) -> bool:
    """Write each changed file atomically (temp file + rename); keys get mode 0600.

    Returns whether anything changed. All temp files are written before the first rename, so
    a reader (kopf polls the files) can see a new certificate with the old key only for the
    microseconds between two renames.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, Path]] = []
    try:
        for name, content in files.items():
            target = cert_dir / name
            with contextlib.suppress(FileNotFoundError):
                if target.read_bytes() == content:
                    continue
            fd, tmp = tempfile.mkstemp(dir=cert_dir, prefix=f".{name}.", suffix=".tmp")
            pending.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600 if name.endswith(".key") else 0o644)
        for tmp, target in pending:
            os.replace(tmp, target)
    finally:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return bool(pending)


# --- Kubernetes ----------------------------------------------------------------------------


def _decode(secret: k8s.V1Secret | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in ((secret.data if secret is not None else None) or {}).items():
        try:
            out[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError, TypeError):
            continue  # treated as missing: regenerated
    return out


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}


async def _sync_secret(
    api: k8s.ApiClient, cfg: CertConfig, now: datetime
) -> tuple[SecretAction, Plan]:
    core = k8s.CoreV1Api(api)
    for _ in range(_MAX_ATTEMPTS):
        try:
            secret = await core.read_namespaced_secret(
                cfg.secret, cfg.namespace, _request_timeout=_REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            if e.status != 404:
                raise
            secret = None
        stored = _decode(secret)
        p = plan(
            stored,
            cfg.sans,
            now,
            ca_lifetime=cfg.ca_lifetime,
            cert_lifetime=cfg.cert_lifetime,
            renew_fraction=cfg.renew_fraction,
        )
        try:
            if secret is None:
                body = k8s.V1Secret(
                    api_version="v1",
                    kind="Secret",
                    metadata=k8s.V1ObjectMeta(
                        name=cfg.secret,
                        namespace=cfg.namespace,
                        labels={
                            "app.kubernetes.io/name": "stowage",
                            "app.kubernetes.io/component": "webhook-cert",
                            "app.kubernetes.io/managed-by": "stowage",
                        },
                    ),
                    type=SECRET_TYPE,
                    data=_encode(p.data),
                )
                await core.create_namespaced_secret(
                    cfg.namespace, body, _request_timeout=_REQUEST_TIMEOUT
                )
                log.info("webhook certificate created", secret=cfg.secret, reasons=p.reasons)
                return "created", p
            if all(stored.get(k) == v for k, v in p.data.items()):
                return "unchanged", p
            # Replace the object as read: keeps labels, owners, other keys and its type;
            # its resourceVersion makes the write conditional.
            secret.data = _encode({**stored, **p.data})
            await core.replace_namespaced_secret(
                cfg.secret, cfg.namespace, secret, _request_timeout=_REQUEST_TIMEOUT
            )
            log.info("webhook certificate updated", secret=cfg.secret, reasons=p.reasons)
            return "updated", p
        except k8s.ApiException as e:
            if e.status != 409:
                raise
            # Another replica wrote first: decide again on what it wrote.
            log.debug("webhook certificate secret conflict, re-reading", secret=cfg.secret)
    raise CertError(f"secret {cfg.namespace}/{cfg.secret}: {_MAX_ATTEMPTS} conflicts in a row")


async def sync_ca_bundle(
    api: k8s.ApiClient, name: str, bundle: bytes
) -> Literal["patched", "unchanged", "missing"]:
    """Set ``caBundle`` of every webhook in MutatingWebhookConfiguration ``name``.

    A JSON patch that tests resourceVersion and each webhook's name at its index, so a
    concurrent edit (a webhook added or reordered, e.g. by a Helm upgrade) makes it fail
    rather than land on the wrong entry; then re-read and try again.
    """
    adm = k8s.AdmissionregistrationV1Api(api)
    value = base64.b64encode(bundle).decode("ascii")
    for _ in range(_MAX_ATTEMPTS):
        try:
            conf = await adm.read_mutating_webhook_configuration(
                name, _request_timeout=_REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            if e.status != 404:
                raise
            log.warning("webhook configuration not found, will retry", name=name)
            return "missing"
        hooks = conf.webhooks or []
        stale = [i for i, h in enumerate(hooks) if h.client_config.ca_bundle != value]
        if not stale:
            return "unchanged"
        rv = conf.metadata.resource_version
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv}
        ]
        for i in stale:
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hooks[i].name})
            # "add" also replaces, and works when caBundle is absent.
            path = f"/webhooks/{i}/clientConfig/caBundle"
            ops.append({"op": "add", "path": path, "value": value})
        try:
            await adm.patch_mutating_webhook_configuration(
                name, ops, _request_timeout=_REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            # A failed "test" is 422 (the object changed since we read it), 404 a deletion.
            if e.status not in (409, 422, 404):
                raise
            log.debug("webhook configuration changed, re-reading", name=name, status=e.status)
            continue
        log.info("webhook caBundle updated", name=name, webhooks=len(stale))
        return "patched"
    raise CertError(f"mutatingwebhookconfiguration {name}: {_MAX_ATTEMPTS} conflicts in a row")


async def ensure(api: k8s.ApiClient, cfg: CertConfig, now: datetime | None = None) -> CertState:
    """One reconcile pass: the Secret, then the webhooks' caBundle, then the files.

    ``api`` is a ``kubernetes_asyncio.client.ApiClient``; ``now`` is for tests.
    """
    now = now or datetime.now(UTC)
    action, p = await _sync_secret(api, cfg, now)
    bundle = p.data[CA_BUNDLE]
    files = {TLS_KEY: p.data[TLS_KEY], TLS_CRT: p.data[TLS_CRT], CA_CRT: bundle}
    ca_bundle: BundleAction = "disabled"
    if cfg.webhook_config is not None:
        try:
            ca_bundle = await sync_ca_bundle(api, cfg.webhook_config, bundle)
        except Exception:
            # Serving a cert the apiserver may not trust yet is only harmless when nothing
            # is served: then write the files so the webhook server can start at all.
            if not (cfg.cert_dir / TLS_CRT).exists():
                write_files(cfg.cert_dir, files)
            raise
    # ca.crt is the whole bundle: kopf passes ``cafile`` on as caBundle when it manages the
    # webhook configuration itself, and rotation needs the old CA there too.
    changed = write_files(cfg.cert_dir, files)
    if changed:
        log.info("webhook certificate files written", dir=str(cfg.cert_dir), not_after=p.not_after)
    return CertState(
        secret=action,
        reasons=p.reasons if action != "unchanged" else (),
        ca_bundle=ca_bundle,
        files_changed=changed,
        not_after=p.not_after,
        ca_not_after=p.ca_not_after,
        renew_at=p.renew_at,
    )


async def keep_fresh(
    api: k8s.ApiClient,
    cfg: CertConfig,
    interval: float = 3600.0,
    stop: asyncio.Event | None = None,
    *,
    ready: asyncio.Event | None = None,
    min_backoff: float = 1.0,
    max_backoff: float = 300.0,
) -> None:
    """``ensure`` now, then every ``interval`` seconds, sooner when something is due.

    ``ready`` is set once the certificate files are in place (the webhook server can
    start). Failures are logged and retried with exponential backoff; a missing webhook
    configuration is retried the same way. Returns when ``stop`` is set; never raises
    except on cancellation.
    """
    stop = stop or asyncio.Event()
    ceiling = min(max_backoff, interval)
    failures = 0  # passes in a row that failed or found no webhook configuration
    while not stop.is_set():
        try:
            state = await ensure(api, cfg)
        except Exception as e:
            failures += 1
            delay = backoff(failures, min_backoff, ceiling)
            log.warning("webhook certificate reconcile failed", error=describe(e), retry_in=delay)
        else:
            if ready is not None:
                ready.set()
            until_due = (state.renew_at - datetime.now(UTC)).total_seconds()
            delay = max(min_backoff, min(interval, until_due))
            if state.ca_bundle == "missing":
                failures += 1
                delay = min(delay, backoff(failures, min_backoff, ceiling))
            else:
                failures = 0
        await wait_any(stop.wait, seconds=delay)
