"""Cache transports for **httpx2**, the HTTP client of the official ``openai`` (3.x) and
``anthropic`` (2.x) SDKs. One line puts an SDK behind the cache::

    import httpx2
    from openai import AsyncOpenAI
    from sse_cache.httpx2 import AsyncCacheTransport

    client = AsyncOpenAI(
        http_client=httpx2.AsyncClient(transport=AsyncCacheTransport("sqlite:///cache.db"))
    )

:class:`AsyncCacheTransport` wraps an ``httpx2.AsyncBaseTransport``, :class:`CacheTransport` an
``httpx2.BaseTransport`` (default: httpx2's own, through the proxy the environment names, as
its client would go). The implementation is shared with :mod:`sse_cache.httpx`; see
``docs/httpx.md``. Requires ``pip install 'sse-cache[httpx2]'``.
"""

from __future__ import annotations

try:
    import httpx2
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sse_cache.httpx2 needs httpx2: pip install 'sse-cache[httpx2]'") from exc

from ._transport import AsyncCacheTransportBase, CacheTransportBase

__all__ = ["AsyncCacheTransport", "CacheTransport"]


class AsyncCacheTransport(AsyncCacheTransportBase, httpx2.AsyncBaseTransport, library=httpx2):
    __doc__ = AsyncCacheTransportBase.__doc__


class CacheTransport(CacheTransportBase, httpx2.BaseTransport, library=httpx2):
    __doc__ = CacheTransportBase.__doc__
