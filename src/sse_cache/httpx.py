"""Cache transports for **httpx** 0.28, for the many clients still built on it (the official
``openai`` 3.x and ``anthropic`` 2.x SDKs use httpx2: see :mod:`sse_cache.httpx2`)::

    import httpx
    from sse_cache.httpx import AsyncCacheTransport

    client = httpx.AsyncClient(transport=AsyncCacheTransport("sqlite:///cache.db"))

:class:`AsyncCacheTransport` wraps an ``httpx.AsyncBaseTransport``, :class:`CacheTransport` an
``httpx.BaseTransport`` (default: httpx's own, through the proxy the environment names, as
its client would go). The implementation is shared with :mod:`sse_cache.httpx2`; see
``docs/httpx.md``. Requires ``pip install 'sse-cache[httpx]'``.
"""

from __future__ import annotations

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sse_cache.httpx needs httpx: pip install 'sse-cache[httpx]'") from exc

from ._transport import AsyncCacheTransportBase, CacheTransportBase

__all__ = ["AsyncCacheTransport", "CacheTransport"]


class AsyncCacheTransport(AsyncCacheTransportBase, httpx.AsyncBaseTransport, library=httpx):
    __doc__ = AsyncCacheTransportBase.__doc__


class CacheTransport(CacheTransportBase, httpx.BaseTransport, library=httpx):
    __doc__ = CacheTransportBase.__doc__
