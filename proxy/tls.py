"""TLS for clients: Baton's certificate, reloaded in place, and the upgrade of a connection.

`ClientTls` holds the SSL context new connections get. A reload (SIGHUP, `baton ctl tls
reload`) reads the files again into a new context and swaps it in whole: sessions already
under TLS keep the context they started with and are never touched, and a file that cannot be
used leaves the old context in place, says why (the reply, a log line, a metric) and changes
nothing else.

`upgrade` turns a client's plain connection to TLS after its SSL request, with
`loop.start_tls`: the protocol (proxy/frontend.py's ClientConnection) gets a new transport and
nothing else changes, so the relay, holding and moving a session do not know about TLS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from proxy import metrics
from reparent.config import TlsSettings
from reparent.tls import TlsError, listener_context

log = logging.getLogger(__name__)


class ClientTls:
    """Baton's TLS for clients; raises TlsError at construction if the files cannot be used."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = listener_context(settings)
        self.loaded_at = time.time()
        self.error = ""  # why the last reload failed; empty after a good one

    @property
    def require(self) -> bool:
        return self.settings.require

    def reload(self) -> str | None:
        """Read the certificate and key again; None when the new ones are in use, else why
        not (the old ones stay)."""
        try:
            context = listener_context(self.settings)
        except TlsError as e:
            self.error = str(e)
            metrics.TLS_RELOADS.labels("failed").inc()
            log.error("TLS reload failed, still serving the certificate loaded before: %s", e)
            return self.error
        self.context = context
        self.loaded_at = time.time()
        self.error = ""
        metrics.TLS_RELOADS.labels("ok").inc()
        log.info("TLS certificate reloaded from %s", self.settings.cert)
        return None

    def status(self) -> dict[str, Any]:
        return {
            "cert": self.settings.cert,
            "loaded_at": self.loaded_at,
            "require": self.settings.require,
            "error": self.error or None,
        }


async def upgrade(
    transport: asyncio.Transport, protocol: asyncio.Protocol, context: Any, early: bytes
) -> asyncio.Transport:
    """Start TLS as the server on `transport`, whose reads go to `protocol` from now on; the
    TLS transport is returned once the handshake is done.

    `early` are bytes the client sent right behind its SSL request (its ClientHello, or the
    start of it) that were read with the request: `start_tls` reads only what comes from the
    socket after it, so they are handed to the TLS layer by hand, right after it is set up.
    The caller paused reading before it took them, so no byte can slip in between (start_tls
    itself runs one loop iteration later, in its task).
    start_tls pauses reading, puts the TLS layer on the transport and queues its setup and the
    resumption of reading as two callbacks; the hand-over is queued (from a callback that runs
    beside the task's first step) behind those two, so it runs after the setup and in the same
    loop iteration as the resumption, before any new byte can be read."""
    loop = asyncio.get_running_loop()
    handshake = loop.create_task(loop.start_tls(transport, protocol, context, server_side=True))
    if early:
        loop.call_soon(loop.call_soon, _hand_over, transport, early)
    return await handshake  # type: ignore[no-any-return]


def _hand_over(transport: asyncio.Transport, data: bytes) -> None:
    """Give the TLS layer (the transport's protocol now, a buffered one) bytes read before it."""
    tls_layer: Any = transport.get_protocol()
    view = memoryview(data)
    while view and not transport.is_closing():
        buf = tls_layer.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        tls_layer.buffer_updated(n)
        view = view[n:]
