"""TLS contexts built from the config, for both legs: Baton as the server its clients reach
(`listener_context`, from `[tls]`) and Baton as a client of the MariaDB servers
(`backend_context`, from `backend.tls` and `backend.ca`), which the sessions' raw connections,
the admin connections (PyMySQL) and replication's CHANGE MASTER all follow.

One context per setting, built once: OpenSSL reads the files and the CA bundle at build time,
which costs milliseconds (PyMySQL's own default builds one per connect, 21 ms each here), and a
context is safe to share between connections and threads. A file that cannot be used is a
`TlsError` naming the key and OpenSSL's reason.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

from reparent.config import BackendSettings, BackendTls, TlsSettings, TlsVersion


class TlsError(Exception):
    """A TLS file or setting that cannot be used; the message names the key and the reason."""


_VERSIONS = {TlsVersion.TLS1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS1_3: ssl.TLSVersion.TLSv1_3}


def listener_context(settings: TlsSettings) -> ssl.SSLContext:
    """What Baton presents to clients, read from the files now (a reload calls this again)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_version]
    if settings.ciphers:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise TlsError(f"tls.ciphers: OpenSSL takes no cipher from {settings.ciphers!r}")
    try:
        ctx.load_cert_chain(settings.cert, settings.key)
    except FileNotFoundError as e:
        raise TlsError(f"tls.cert/tls.key: {e.filename}: no such file")
    except (ssl.SSLError, OSError) as e:
        raise TlsError(
            f"tls.cert/tls.key: cannot use {settings.cert} with {settings.key}: {_reason(e)}"
        )
    if settings.ca:
        _load_ca(ctx, settings.ca, "tls.ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def backend_context(settings: BackendSettings) -> ssl.SSLContext | None:
    """The context for Baton's connections to the servers; None when backend.tls is off."""
    if settings.tls is BackendTls.OFF:
        return None
    return _backend_context(settings.tls, settings.ca)


@functools.cache
def _backend_context(mode: BackendTls, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = mode is BackendTls.VERIFY_IDENTITY
    if mode.verifies:
        _load_ca(ctx, ca, "backend.ca")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_ca(ctx: ssl.SSLContext, path: str, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TlsError(f"{key}: {path}: no such file")
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{key}: cannot use {path} as a CA file: {_reason(e)}")


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"{e.reason} ({e.library or 'ssl'})"
    return getattr(e, "strerror", None) or str(e)


def pymysql_options(settings: BackendSettings) -> dict[str, Any]:
    """PyMySQL's connect arguments for backend.tls: the shared context (PyMySQL then requires
    TLS of the server), or TLS off. `preferred` is the caller's to retry without TLS when the
    server has none (`server_lacks_tls`)."""
    ctx = backend_context(settings)
    if ctx is None:
        return {"ssl_disabled": True}
    return {"ssl": ctx}


def server_lacks_tls(e: BaseException) -> bool:
    """PyMySQL's refusal (CR_SSL_CONNECTION_ERROR) when TLS was asked of a server that does
    not offer it."""
    return len(e.args) == 2 and e.args[0] == 2026 and "doesn't support it" in str(e.args[1])


def replication_options(settings: BackendSettings) -> tuple[str, tuple[Any, ...]]:
    """CHANGE MASTER's TLS options for backend.tls, as SQL (with %s placeholders) and
    arguments. `off` and `preferred` say nothing, so what an operator set on the replica stays
    (MariaDB's replication has no "preferred": MASTER_SSL=1 fails against a server without
    TLS). The replica's IO thread checks the certificate against MASTER_SSL_CA whenever one is
    given, and the host name only with MASTER_SSL_VERIFY_SERVER_CERT."""
    mode = settings.tls
    if mode in (BackendTls.OFF, BackendTls.PREFERRED):
        return "", ()
    if mode is BackendTls.REQUIRED:
        return ", MASTER_SSL=1, MASTER_SSL_CA='', MASTER_SSL_VERIFY_SERVER_CERT=0", ()
    verify = int(mode is BackendTls.VERIFY_IDENTITY)
    return (
        f", MASTER_SSL=1, MASTER_SSL_CA=%s, MASTER_SSL_VERIFY_SERVER_CERT={verify}",
        (settings.ca,),
    )
