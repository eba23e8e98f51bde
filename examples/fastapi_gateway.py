"""A FastAPI LLM gateway shaped like a LiteLLM proxy, cached by ``CacheMiddleware`` in one line.

Clients call the gateway with their own gateway key (``Authorization: Bearer ...`` or
``x-api-key``); the gateway forwards ``POST /v1/chat/completions``, ``/v1/responses`` and
``/v1/messages`` to one upstream with its own provider key, streaming both ways with httpx2.
``GET /health`` answers locally. The cache sits in front of the routes: a repeated streamed
request is replayed from the cache without reaching them. The gateway keys are checked in
front of the cache (``GatewayKeys``), so that they are checked for hits too: a key taken off
the list gets no more answers, also none it was given before.

Try it (three shells)::

    sse-cache mock-upstream --port 8001
    UPSTREAM_URL=http://127.0.0.1:8001 uvicorn fastapi_gateway:app --app-dir examples --port 4000
    curl -sN localhost:4000/v1/chat/completions -H 'authorization: Bearer sk-gw-1' \\
        -H 'content-type: application/json' \\
        -d '{"model": "gpt-mock", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'

Environment: ``UPSTREAM_URL`` (default ``http://127.0.0.1:8001``), ``UPSTREAM_API_KEY``,
``GATEWAY_KEYS`` (comma-separated; unset: any non-empty key is accepted), ``SSE_CACHE_BACKEND``
(default ``sqlite:///./gateway-cache.db``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sse_cache.asgi import CacheMiddleware
from sse_cache.proxy import no_cookies

# Request headers that define or shape the answer and go upstream as they are. The client's
# credential does not: the gateway calls the upstream with its own key.
FORWARDED = frozenset(
    {"content-type", "accept", "anthropic-version", "anthropic-beta", "openai-beta"}
)
# Response headers not copied back (RFC 9110 hop-by-hop; the server sets its own framing).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "date", "server"}
)


class UpstreamResponse(StreamingResponse):
    """Streams an httpx2 response to the client and always closes it, also when the client
    leaves mid-stream (then the upstream request is cancelled)."""

    def __init__(self, upstream: httpx2.Response) -> None:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        super().__init__(upstream.aiter_raw(), upstream.status_code, headers=headers)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class GatewayKeys:
    """Refuses (401) a request to the LLM routes without a valid gateway key. Added after
    ``CacheMiddleware``, it runs outside the cache: for hits too (inside it, a hit never
    reaches it, and a revoked key kept getting the answers recorded for it)."""

    def __init__(self, app: Any, keys: frozenset[str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            key = auth.removeprefix("Bearer ").strip()
            key = key or headers.get(b"x-api-key", b"").decode("latin-1")
            if not key or (self.keys and key not in self.keys):
                denied = _error(401, "invalid or missing gateway key", "authentication_error")
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    upstream_url: str,
    *,
    upstream_key: str = "",
    gateway_keys: frozenset[str] = frozenset(),
    backend: str = "sqlite:///./gateway-cache.db",
    **cache_options: Any,
) -> FastAPI:
    """The gateway for ``upstream_url``, with ``CacheMiddleware`` on ``backend``
    (``cache_options``: its keyword options, e.g. ``ttl=3600``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Ask for identity encoding: a gzip-compressed answer passes through the cache
        # unstored. One client forwards every caller's requests: it keeps no cookie (its
        # default jar would send one caller's session cookie with everyone's requests).
        async with httpx2.AsyncClient(
            base_url=upstream_url,
            headers={"accept-encoding": "identity"},
            timeout=httpx2.Timeout(600.0, connect=10.0),
            cookies=no_cookies(),
        ) as client:
            app.state.upstream = client
            yield

    app = FastAPI(title="LLM gateway", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    @app.post("/v1/responses")
    @app.post("/v1/messages")
    async def forward(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        if upstream_key:
            headers["authorization"] = f"Bearer {upstream_key}"
            headers["x-api-key"] = upstream_key
        client: httpx2.AsyncClient = request.app.state.upstream
        upstream_request = client.build_request(
            "POST", request.url.path, headers=headers, content=await request.body()
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx2.TimeoutException as exc:
            return _error(504, f"upstream timed out: {exc!r}", "upstream_timeout")
        except httpx2.HTTPError as exc:
            return _error(502, f"upstream unreachable: {exc!r}", "upstream_error")
        return UpstreamResponse(upstream)

    app.add_middleware(CacheMiddleware, backend=backend, **cache_options)  # the cache
    app.add_middleware(GatewayKeys, keys=gateway_keys)  # added last: outside the cache
    return app


app = create_app(
    os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8001"),
    upstream_key=os.environ.get("UPSTREAM_API_KEY", ""),
    gateway_keys=frozenset(k for k in os.environ.get("GATEWAY_KEYS", "").split(",") if k),
    backend=os.environ.get("SSE_CACHE_BACKEND", "sqlite:///./gateway-cache.db"),
    ttl=3600,
)
