"""The agent's OPC UA application instance certificate: making one, reading its identity.

OPC UA servers identify a client by its *application instance certificate*, and a
certificate is only accepted when its subjectAltName carries the same application URI
the client announces in CreateSession (OPC 10000-4 §6.1; most servers reject a
mismatch, asyncua logs it). Generating that by hand with openssl is where sites get
it wrong, so the agent makes its own: a 2048-bit RSA key and a self-signed
certificate built by asyncua's ``cert_gen`` (the same helper the stack uses, so key
usages match what the security policies need), written as DER (what OPC UA trust
lists exchange) with the key as PEM readable by its owner only. The operator then
copies ``cert.der`` into the server's trust list; the OPC UA driver reads the URI back
from the certificate, so the two can never disagree. The ``certs create`` command that
wraps this lives in :mod:`agent.cli.certs`; the library stays here because drivers may
import only ``agent.core``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

CERT_NAME = "cert.der"
KEY_NAME = "key.pem"


class CertError(ValueError):
    """Bad input for certificate creation (reported as exit code 2, never a traceback)."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


def application_uri(cert: x509.Certificate) -> str | None:
    """The application URI in a certificate's subjectAltName (the identity OPC UA checks)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def create_certificate(
    out: Path,
    uri: str,
    hostnames: Sequence[str] = (),
    *,
    days: int = 730,
    server: bool = False,
    force: bool = False,
) -> CertPaths:
    """Write ``cert.der`` and ``key.pem`` to ``out``; refuse to overwrite unless ``force``
    (replacing a certificate silently breaks every server that trusted the old one)."""
    from asyncua.crypto import cert_gen

    parsed = urlparse(uri)
    if not parsed.scheme or not (parsed.netloc or parsed.path):
        raise CertError(f"--uri {uri!r} is not a URI; write e.g. urn:site:line1:cleanroom-edge")
    if days < 1:
        raise CertError("--days must be at least 1")
    hosts = list(hostnames) or [socket.gethostname()]
    paths = CertPaths(out / CERT_NAME, out / KEY_NAME)
    existing = [p for p in (paths.cert, paths.key) if p.exists()]
    if existing and not force:
        raise CertError(f"{', '.join(map(str, existing))} already exists; pass --force to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create {out}: {exc.strerror}") from exc
    key = cert_gen.generate_private_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    alt_names += [_host_name(h) for h in hosts]
    cert = cert_gen.generate_self_signed_app_certificate(key, uri, {}, alt_names, extended=usages, days=days)
    try:
        fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_gen.dump_private_key_as_pem(key))
        paths.cert.write_bytes(cert.public_bytes(Encoding.DER))
    except OSError as exc:
        raise CertError(f"cannot write to {out}: {exc.strerror}") from exc
    return paths


def _host_name(host: str) -> x509.GeneralName:
    """An IP address goes in as one (servers reached by address check that), anything else as DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
