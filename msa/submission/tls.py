"""Server TLS contexts for the submission edge, and certificate reload.

- TLS 1.2 or newer (RFC 8314 §4.1 for submission), the ``ssl`` module's
  default server ciphers; no client certificates are asked for.
- :func:`reload_into` first loads the new certificate and key into a
  throw-away context, so a bad pair (a typo, a key that does not match)
  leaves the live context as it was; only then the live context is
  loaded. OpenSSL copies the certificate into each connection when the
  connection starts, so sessions already running keep theirs and new
  handshakes get the new one.
"""

from __future__ import annotations

import ssl
from typing import Any


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(certfile, keyfile or None)
    return ctx


def context_from(tls: Any) -> ssl.SSLContext | None:
    """The tutorial's ``{'keyfile': ..., 'certfile': ...}``, an
    :class:`ssl.SSLContext`, or None."""
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    if isinstance(tls, dict):
        return server_context(tls["certfile"], tls.get("keyfile"))
    raise TypeError(f"tls must be a dict or an ssl.SSLContext, not {type(tls).__name__}")


def reload_into(ctx: ssl.SSLContext, certfile: str, keyfile: str | None = None) -> None:
    """Load a new certificate into a live context (see module docstring)."""
    server_context(certfile, keyfile)          # raises on a bad pair
    ctx.load_cert_chain(certfile, keyfile or None)


def describe(ssl_object: Any) -> str:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for the envelope and logs."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
