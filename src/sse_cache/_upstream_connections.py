"""How the cache reaches its upstream: as the HTTP library's own client would (through the
proxy the environment names), never again on a connection holding bytes that no request
asked for, and never, in a forked child, on a connection its parent opened
(:class:`_ForgottenAtFork`).

An upstream that writes past the end of a response on a keep-alive connection (a body longer
than its ``Content-Length``, the response written twice, a body after a ``204``) leaves the
excess in the HTTP/1.1 parser's buffer when it arrives in the same read as the response's
end. httpcore and httpcore2 put such a connection back in their pool all the same: their
expiry check asks only whether the socket is readable, and those bytes were read off it
already. The next request sent on that connection — any tenant's — then reads them as its own
response, and the cache would relay and store them under that request's key. nginx closes
such a connection; so do the proxy's forwarder and the cache transports' inner transport (their
default, or an ``HTTPTransport`` / ``AsyncHTTPTransport`` given them): their connections
expire, as if the upstream had closed them, when they are idle with bytes left unread.

Those bytes may also wait below h11, read off the socket but not yet parsed: in a TLS layer
(a second TLS record in the TCP segment that brought the response's end) or in asyncio's
queue of received data. Bytes still in the kernel's buffer are httpcore's own check (the
socket is readable); bytes that arrive after the connection was handed to the next request
cannot be told from its response (HTTP/1.1 has no request ids): no check can catch those.

httpx and httpx2 read the environment's proxies only for a client given no transport, so the
cache transports' default (:class:`UpstreamTransport`, :class:`AsyncUpstreamTransport`)
keeps a client of the library only to pick, per request, the transport it would use.

This reaches into the HTTP libraries' internals (a client's ``_transport_for_url`` and
``_mounts``, a pool's ``create_connection``, ``_connections``, ``_requests`` and lock, a
connection's ``_connection``, h11's
``trailing_data``, anyio's, trio's and asyncio's buffers); the tests (an upstream's excess
never reaches the next request, plain and TLS, sync, asyncio and trio, httpx and httpx2; the
environment's proxy is used) run on every version CI installs.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._logging import redact_userinfo
from .backends._fork import keep, reopen_after_fork
from .errors import ConfigError

logger = logging.getLogger("sse_cache")

#: The HTTP libraries whose ``HTTPTransport`` / ``AsyncHTTPTransport`` are guarded.
_LIBRARIES = frozenset({"httpx", "httpx2"})
_TRANSPORTS = frozenset({"HTTPTransport", "AsyncHTTPTransport"})
_guarded_classes: dict[type, type] = {}


def expire_connections_holding_excess(transport: Any) -> Any:
    """Make ``transport`` close, rather than reuse, an idle connection holding bytes past its
    last response, if it is httpx's or httpx2's own ``HTTPTransport`` /
    ``AsyncHTTPTransport`` (others are left as they are); returned."""
    kind = type(transport)
    if kind.__name__ not in _TRANSPORTS or kind.__module__.split(".")[0] not in _LIBRARIES:
        return transport
    pool: Any = getattr(transport, "_pool", None)
    create = getattr(pool, "create_connection", None)
    if create is None or getattr(create, "expires_excess", False):  # (given to two caches)
        return transport

    def create_connection(origin: Any) -> Any:
        connection = create(origin)
        connection.__class__ = _guarded(type(connection))
        return connection

    create_connection.expires_excess = True  # type: ignore[attr-defined]
    pool.create_connection = create_connection
    pool.sse_cache_after_fork = forgotten = _ForgottenAtFork(pool)  # (held by its pool)
    reopen_after_fork(forgotten)
    return transport


def expire_client_connections_holding_excess(client: Any) -> Any:
    """:func:`expire_connections_holding_excess` for an httpx or httpx2 client's transport and
    those it mounted (the environment's ``HTTP_PROXY``, ``HTTPS_PROXY``...); returned."""
    for transport in (client._transport, *client._mounts.values()):
        if transport is not None:
            expire_connections_holding_excess(transport)
    return client


def _guarded(plain: type) -> type:
    guarded = _guarded_classes.get(plain)
    if guarded is None:

        class Guarded(plain):  # type: ignore[misc]
            def has_expired(self) -> bool:
                return bool(super().has_expired()) or _holds_excess(self)

        Guarded.__name__ = Guarded.__qualname__ = plain.__name__
        guarded = _guarded_classes[plain] = Guarded
    return guarded


class _ForgottenAtFork:
    """In a child forked from this process (a client built and used at import, then
    gunicorn or Celery workers forked), a guarded pool's connections are its parent's: each
    socket is shared with the parent, and the two processes' requests and answers would
    interleave on it — one tenant's answer read, and stored, as another's (helper-172; on
    trio and over HTTP/2 too, and through a connection a parent's thread was using at the
    fork: helper-173). The child forgets them — kept referenced, never closed as
    connections, which could end what the parent still uses (a sync one's copy of its
    socket is closed: that sends nothing) — with the parent's requests under way (their
    threads are not in the child) and the pool's lock (which one of them may have held),
    and opens its own. The parent keeps its."""

    __slots__ = ("__weakref__", "_pool")

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def _forked(self) -> None:
        pool = self._pool
        # (httpcore before 1.0.3 kept them in ``_pool``, its lock in ``_pool_lock``: the
        # layout missed, the child went on with the parent's connections; helper-174.)
        held = next((n for n in ("_connections", "_pool") if hasattr(pool, n)), None)
        if held is None or not hasattr(pool, "_requests"):
            logger.warning(
                "sse_cache: a forked process cannot tell which upstream connections its "
                "parent opened (%s of an unknown layout): it may use them too — build the "
                "HTTP client in each process after the fork",
                type(pool).__name__,
            )
            return
        inherited = getattr(pool, held)
        keep(inherited)
        setattr(pool, held, [])
        if not type(pool).__name__.startswith("Async"):
            for connection in inherited:
                _close_sockets_of(connection)
        pool._requests = []
        for name in ("_optional_thread_lock", "_pool_lock"):
            lock = getattr(pool, name, None)
            if lock is not None:
                # (The libraries' own lock classes; a bare threading lock cannot be made so.)
                kind = type(lock)
                setattr(pool, name, threading.Lock() if kind is type(threading.Lock()) else kind())


def _close_sockets_of(connection: Any) -> None:
    """Close this process's copy of a sync connection's socket (and of the one to its
    proxy): nothing is sent — the parent's copy keeps it open — but a child that kept it
    kept each connection its parent had at the fork open for its whole life, after the
    parent closed it (helper-174). (An async connection's is left: its event loop's
    selector, shared with the parent, must not be touched.)"""
    for inner in _inner_connections(connection):
        sock = getattr(getattr(inner, "_network_stream", None), "_sock", None)
        if isinstance(sock, socket.socket):
            sock.close()


def _holds_excess(connection: Any) -> bool:
    http11 = _http11_of(connection)
    if http11 is None:  # not connected yet, or HTTP/2 (whose frames carry their own ends)
        return False
    # Mid-response, buffered bytes are that response's; once idle, nothing asked for them.
    # The buffers are read first: a connection another thread takes meanwhile (the sync
    # transport) then reads as busy, never as idle with its new response's bytes.
    buffered = bool(http11._h11_state.trailing_data[0]) or _buffered_below(
        getattr(http11, "_network_stream", None)
    )
    return buffered and bool(http11.is_idle())


def _inner_connections(connection: Any) -> Iterator[Any]:
    """The connections under ``connection``, outermost first: its own (HTTP/1.1 or HTTP/2,
    once connected), or through a proxy's (a forward proxy's connection holds the one to the
    proxy, which holds the HTTP/1.1 one)."""
    inner = connection
    for _ in range(3):
        inner = getattr(inner, "_connection", None)
        if inner is None:
            return
        yield inner


def _http11_of(connection: Any) -> Any:
    """The HTTP/1.1 connection (the one with an h11 parser) under ``connection``; None if
    there is none (yet)."""
    return next(
        (c for c in _inner_connections(connection) if getattr(c, "_h11_state", None) is not None),
        None,
    )


def _buffered_below(stream: Any) -> bool:
    """Whether bytes read off the socket wait below h11: in a TLS layer (anyio's and trio's
    TLS streams take a whole TCP segment, which may hold a record after the one they
    decrypt; decrypted bytes not yet read) or in asyncio's queue of received data (a read
    of h11's size leaves the rest of a larger segment there). The kernel's buffer is
    httpcore's own check (its socket is readable)."""
    layer = getattr(stream, "_stream", None) or getattr(stream, "_sock", None)
    for _ in range(4):  # a TLS stream over a socket stream (over a proxy's TLS stream)
        if layer is None:
            return False
        for bio in ("_read_bio", "_incoming"):  # anyio's TLSStream, trio's SSLStream
            if getattr(getattr(layer, bio, None), "pending", 0):
                return True
        tls = getattr(layer, "_ssl_object", None)
        if isinstance(tls, ssl.SSLObject) and tls.pending():
            return True
        if isinstance(layer, ssl.SSLSocket) and layer.pending():  # the sync transports'
            return True
        if getattr(getattr(layer, "_protocol", None), "read_queue", None):  # anyio, asyncio
            return True
        layer = getattr(layer, "transport_stream", None)
    return False


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_GIVE_ONE = (
    "give the cache transport one of your own, which does not read the environment "
    "(transport={0}.{1}HTTPTransport(), with proxy= if you need one)"
)


def environment_client(make: Callable[[], Any], way_out: str) -> Any:
    """``make()``, a client of the library that reads the environment's proxies, with its
    transports guarded (:func:`expire_client_connections_holding_excess`); a proxy it cannot
    use (``socks5://`` without socksio, an unknown scheme, a malformed URL) is a ConfigError
    naming it, with ``way_out`` beside installing what it needs."""
    try:
        client = make()
    except Exception as exc:
        if not isinstance(exc, (ImportError, ValueError)) and type(exc).__name__ != "InvalidURL":
            raise
        named = [
            f"{name}={redact_userinfo(value)}"
            for name in _PROXY_VARIABLES
            for value in (os.environ.get(name) or os.environ.get(name.lower()),)
            if value
        ]
        raise ConfigError(
            f"the environment's proxy ({', '.join(named) or 'its settings'}) cannot be used: "
            f"{exc} — install what it needs, or {way_out}"
        ) from exc
    return expire_client_connections_holding_excess(client)


class UpstreamTransport:
    """A cache transport's default way to the upstream (``lib`` is httpx or httpx2): the
    library's own transport for the request's URL, chosen as its client chooses it — through
    the proxy the environment names (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, minus
    ``NO_PROXY``), else directly. The libraries read the environment only for a client given
    no transport: a cache transport's bare ``HTTPTransport()`` went around an egress proxy
    its program was told to use (helper-170). Its connections expire holding excess (see
    :func:`expire_connections_holding_excess`)."""

    def __init__(self, lib: Any) -> None:
        # (Only its transports are used: never its headers, cookies, timeouts or redirects.)
        self._client = environment_client(lib.Client, _GIVE_ONE.format(lib.__name__, ""))

    def handle_request(self, request: Any) -> Any:
        return self._client._transport_for_url(request.url).handle_request(request)

    def close(self) -> None:
        self._client.close()


class AsyncUpstreamTransport:
    """:class:`UpstreamTransport` for the async cache transports."""

    def __init__(self, lib: Any) -> None:
        self._client = environment_client(lib.AsyncClient, _GIVE_ONE.format(lib.__name__, "Async"))

    async def handle_async_request(self, request: Any) -> Any:
        transport = self._client._transport_for_url(request.url)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._client.aclose()
