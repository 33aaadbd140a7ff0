"""Throwaway X.509 material for loopback TLS and registry token signing.

Everything is generated with ``cryptography`` at test time so no key material lives in the
repository and nothing depends on the host's trust store.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Small keys keep generation fast; these never leave the test run.
_KEY_BITS = 2048


@dataclass(frozen=True)
class CertPair:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    # Backdate a little so clock skew between processes never makes a cert "not yet valid".
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=2)


def make_ca(common_name: str = "stowage-test-ca") -> CertPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    not_before, not_after = _validity()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert, key)


def make_leaf(
    ca: CertPair,
    common_name: str,
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    server: bool = True,
) -> CertPair:
    """Issue a cert from ``ca``: a TLS server cert, or (server=False) a token-signing cert."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    not_before, not_after = _validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    return CertPair(cert, key)


@dataclass(frozen=True)
class TLSFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def write_server_tls(directory: Path) -> TLSFiles:
    """Create a CA plus a 127.0.0.1/localhost server cert in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    leaf = make_leaf(ca, "127.0.0.1")
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca.cert_pem)
    files.cert_file.write_bytes(leaf.cert_pem)
    files.key_file.write_bytes(leaf.key_pem)
    files.key_file.chmod(0o600)
    return files


@dataclass(frozen=True)
class TokenSigningFiles:
    root_bundle: Path  # what the registry trusts (auth.token.rootcertbundle)
    cert_file: Path  # signing cert, sent in the JWT x5c header
    key_file: Path


def write_token_signing(directory: Path) -> TokenSigningFiles:
    """A dedicated root + signing cert, so the x5c chain is genuinely verified by the registry."""
    directory.mkdir(parents=True, exist_ok=True)
    root = make_ca("stowage-test-token-root")
    signer = make_leaf(root, "stowage-test-token-signer", server=False)
    files = TokenSigningFiles(
        directory / "token-root.pem", directory / "token-signer.pem", directory / "token-signer.key"
    )
    files.root_bundle.write_bytes(root.cert_pem)
    files.cert_file.write_bytes(signer.cert_pem)
    files.key_file.write_bytes(signer.key_pem)
    files.key_file.chmod(0o600)
    return files
