"""The HTTP layer shared by every integration: what is cached, how an answer is given.

The edges (:mod:`sse_cache.asgi`, :mod:`sse_cache.httpx`, :mod:`sse_cache.httpx2` and the
proxy) only translate between their framework and this layer:

- :mod:`~sse_cache.http.options`: :class:`CacheOptions`, the one list of caching options,
  validated once;
- :mod:`~sse_cache.http.policy`: which requests are cached and under which adapter, and the
  ``x-sse-cache-*`` request controls;
- :mod:`~sse_cache.http.service`: :class:`CacheService` and its :class:`Exchange`, one per
  request: decide, look up, answer (a hit, a joined live stream, a resumed one) or record
  the upstream's answer. It is built of private parts by job: ``_answers`` (the answers
  given from the cache), ``_tee`` (recording the upstream's answer while it is forwarded),
  ``_fanout`` (single-flight across processes) and ``_wire`` (headers and error bodies).

Only the engine's public methods are used from here; nothing here does schema work (that is
the adapters').
"""

from .options import CacheOptions
from .policy import CachePolicy, Decision
from .service import Answer, CacheService, Exchange, ResponseTee

__all__ = [
    "Answer",
    "CacheOptions",
    "CachePolicy",
    "CacheService",
    "Decision",
    "Exchange",
    "ResponseTee",
]
