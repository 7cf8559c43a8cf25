"""TLS towards the broker, one way for the SDK's HTTP, its result stream and the endpoint agent.

Certificates are always verified. A private CA is trusted through
``FARCALL_CA_BUNDLE`` (a PEM file) in addition to the system CAs; OpenSSL's own
``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` keep working. A certificate that is not
trusted becomes :class:`~farcall.errors.CertificateError` at once: waiting
does not make it trusted, so it is never retried. A credential sent over plain
``http://`` or ``ws://`` to a host that is not loopback warns once per host.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
import warnings
from urllib.parse import urlsplit

from farcall.errors import CertificateError, ConfigurationError

CA_BUNDLE_VARIABLE = "FARCALL_CA_BUNDLE"

_contexts: dict[tuple[str | None, ...], ssl.SSLContext] = {}
_warned: set[str] = set()
_lock = threading.Lock()


class InsecureBrokerWarning(UserWarning):
    """A token or endpoint credential is about to travel unencrypted to a host that is not loopback."""


def client_context() -> ssl.SSLContext:
    """A verifying client context: the system CAs plus ``FARCALL_CA_BUNDLE`` if set.

    The environment is read on every call (contexts are cached by what it
    says), so a bundle set after import is honoured. Raises
    :class:`ConfigurationError` naming the variable when the bundle is missing
    or holds no PEM certificate.
    """
    bundle = os.environ.get(CA_BUNDLE_VARIABLE) or None
    key = (bundle, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _lock:
        context = _contexts.get(key)
    if context is None:
        context = _build(bundle)
        with _lock:
            context = _contexts.setdefault(key, context)
    return context


def _build(bundle: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if bundle is None:
        return context
    if not os.path.isfile(bundle):
        raise ConfigurationError(
            f"{CA_BUNDLE_VARIABLE}={bundle!r} is not a file; set it to the PEM file of the CA "
            "that signed the broker's certificate, or unset it to trust the system CAs only")
    try:
        context.load_verify_locations(cafile=bundle)
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as e:
        raise ConfigurationError(
            f"{CA_BUNDLE_VARIABLE}={bundle!r} holds no PEM certificate ({e}); set it to a file "
            "with '-----BEGIN CERTIFICATE-----' blocks, the CA that signed the broker's "
            "certificate") from None
    return context


def certificate_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``error`` (itself or a cause), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def certificate_error(url: str, error: ssl.SSLCertVerificationError) -> CertificateError:
    """The :class:`CertificateError` to raise for a failed verification of the broker at ``url``."""
    parts = urlsplit(url)
    reason = (error.verify_message or error.reason or str(error)).rstrip(".")
    return CertificateError(
        f"the broker's certificate at {parts.netloc} is not trusted: {reason}. If the broker's "
        f"certificate comes from a private CA, set {CA_BUNDLE_VARIABLE} to that CA's certificate "
        "(a PEM file, trusted in addition to the system CAs) or SSL_CERT_FILE to a bundle that "
        "holds it; if the host name does not match, use a broker URL with a name the "
        "certificate was issued for.")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_insecure(url: str, stacklevel: int = 2) -> None:
    """Warn (once per host and process) that a credential sent to ``url`` travels in clear text.

    Call it where a connection carrying a token or credential is set up;
    ``https://``, ``wss://`` and loopback hosts are quiet.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "ws") or not host or is_loopback(host):
        return
    with _lock:
        if host in _warned:
            return
        _warned.add(host)
    warnings.warn(
        f"the farcall token for {host} travels unencrypted over {parts.scheme}://, readable by "
        f"anyone on the network path; use an https:// broker URL (see docs/deploy.md)",
        InsecureBrokerWarning,
        stacklevel=stacklevel + 1,
    )
