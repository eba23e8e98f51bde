"""A connection to the upstream holding bytes that no request asked for is not used again.

An upstream that writes past the end of a response on a keep-alive connection (a body longer
than its ``Content-Length``, the response written twice, a body after a ``204``) leaves the
excess in the HTTP/1.1 parser's buffer when it arrives in the same read as the response's
end. httpcore and httpcore2 put such a connection back in their pool all the same: their
expiry check asks only whether the socket is readable, and those bytes were read off it
already. The next request sent on that connection — any tenant's — then reads them as its own
response, and the cache would relay and store them under that request's key. nginx closes
such a connection; so do the proxy's forwarder and the cache transports' inner transport (their
default, or an ``HTTPTransport`` / ``AsyncHTTPTransport`` given them): their connections
expire, as if the upstream had closed them, when they are idle with bytes left in their
parser.

This reaches into the HTTP libraries' connection classes (the pool's ``create_connection``,
the connection's ``_connection`` and h11's ``trailing_data``); the test that an upstream's
excess never reaches the next request covers every library and version CI installs.
"""

from __future__ import annotations

from typing import Any

#: The libraries' plain HTTP connection classes (httpcore's and httpcore2's, sync and async):
#: proxied and HTTP/2-only connections are created as other classes and left as they are.
_PLAIN = frozenset({"HTTPConnection", "AsyncHTTPConnection"})
_PLAIN_POOLS = frozenset({"ConnectionPool", "AsyncConnectionPool"})
_guarded_classes: dict[type, type] = {}


def expire_connections_holding_excess(transport: Any) -> Any:
    """Make ``transport`` close, rather than reuse, an idle connection with unread bytes in
    its parser, if it is httpx's or httpx2's own ``HTTPTransport`` / ``AsyncHTTPTransport``
    without a proxy (others are left as they are); returned."""
    pool: Any = getattr(transport, "_pool", None)
    if type(pool).__name__ not in _PLAIN_POOLS:
        return transport
    create = pool.create_connection
    if getattr(create, "expires_excess", False):  # one transport given to two caches
        return transport

    def create_connection(origin: Any) -> Any:
        connection = create(origin)
        if type(connection).__name__ in _PLAIN:
            connection.__class__ = _guarded(type(connection))
        return connection

    create_connection.expires_excess = True  # type: ignore[attr-defined]
    pool.create_connection = create_connection
    return transport


def _guarded(plain: type) -> type:
    guarded = _guarded_classes.get(plain)
    if guarded is None:

        class Guarded(plain):  # type: ignore[misc]
            def has_expired(self) -> bool:
                return bool(super().has_expired()) or _holds_excess(self)

        Guarded.__name__ = Guarded.__qualname__ = plain.__name__
        guarded = _guarded_classes[plain] = Guarded
    return guarded


def _holds_excess(connection: Any) -> bool:
    http11: Any = getattr(connection, "_connection", None)
    parser = getattr(http11, "_h11_state", None)
    if parser is None:  # not connected yet, or HTTP/2 (whose frames carry their own ends)
        return False
    # Mid-response, buffered bytes are that response's; once idle, nothing was asked for.
    return bool(http11.is_idle() and parser.trailing_data[0])
