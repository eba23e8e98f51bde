"""The proxy command's server processes leave their startup objects out of the cycle
collector's work (``gc.freeze``): a full collection then walks what requests made, not the
~50,000 objects of the modules and the app (docs/performance.md). A library user's process
is never touched."""

from __future__ import annotations

import gc
import json
import logging.config
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import uvicorn

from sse_cache.asgi import CacheMiddleware
from sse_cache.backends.memory import MemoryBackend
from sse_cache.cli import main
from sse_cache.cli.proxy import app_from_environment
from sse_cache.metrics import Metrics
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import responses_text_pieces


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Each test starts with nothing frozen and leaves nothing frozen (pytest's process)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_single_process_proxy_freezes_its_startup_before_serving(
    unfrozen: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[tuple[Any, int]] = []

    def run(app: Any, **options: Any) -> None:  # instead of serving: what it would serve with
        served.append((app, gc.get_freeze_count()))

    monkeypatch.setattr(uvicorn, "run", run)
    # (The command's logging setup would outlive the test in pytest's process.)
    monkeypatch.setattr(logging.config, "dictConfig", lambda config: None)
    assert main(["proxy", "--upstream", "http://127.0.0.1:9", "--backend", "memory://"]) == 0
    ((app, frozen),) = served
    # Frozen by then: at least the app itself and the objects it was built from.
    assert frozen > 1_000
    assert type(app).__name__ == "ProxyApp"
    anyio.run(app.aclose)


def test_each_worker_freezes_what_it_built(unfrozen: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSE_CACHE_UPSTREAM", "http://127.0.0.1:9")
    monkeypatch.setenv("SSE_CACHE_BACKEND", "memory://")
    app = app_from_environment()
    assert gc.get_freeze_count() > 1_000
    assert type(app).__name__ == "ProxyApp"
    anyio.run(app.aclose)


def test_building_the_app_as_a_library_freezes_nothing(unfrozen: None) -> None:
    app = create_proxy_app("http://127.0.0.1:9", "memory://")
    assert gc.get_freeze_count() == 0
    anyio.run(app.aclose)


PIECES = responses_text_pieces(20, "hello")


async def upstream(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body", False):
        pass
    head = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    for piece in PIECES:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def ask(app: Any, prompt: str) -> tuple[str, bytes]:
    """One streamed request through ``app``: its x-sse-cache and its body."""
    body = json.dumps({"model": "m", "input": prompt, "stream": True}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/responses",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = dict(sent[0]["headers"])[b"x-sse-cache"].decode()
    return status, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.anyio
async def test_a_hit_leaves_no_garbage_for_the_cycle_collector(anyio_backend: str) -> None:
    # Objects in a reference cycle outlive their request until a collection finds them; a
    # hit made ~35 so (its whole request state hung off one bound method), and under load
    # the collections that found them were ~6 % of the proxy's CPU.
    metrics = Metrics()  # a hook: the path that notes the first byte
    app = CacheMiddleware(upstream, MemoryBackend(), tenant="shared", hooks=[metrics])
    assert await ask(app, "hi") == ("miss", b"".join(PIECES))
    assert await ask(app, "hi") == ("hit", b"".join(PIECES))
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            assert await ask(app, "hi") == ("hit", b"".join(PIECES))
        assert gc.collect() == 0
    finally:
        gc.enable()
    await app.aclose()


@pytest.mark.anyio
async def test_a_miss_leaves_no_garbage_for_the_cycle_collector(anyio_backend: str) -> None:
    # A miss's client gets its answer from a task of its own (the outbox), which held the
    # request's bound methods after it was done: the whole request (~72 objects: its
    # exchange, task group, recorder, flight) waited for the cycle collector.
    app = CacheMiddleware(upstream, MemoryBackend(), tenant="shared", hooks=[Metrics()])
    assert await ask(app, "warm") == ("miss", b"".join(PIECES))
    gc.collect()
    gc.disable()
    try:
        for n in range(5):
            assert await ask(app, f"new prompt {n}") == ("miss", b"".join(PIECES))
        assert gc.collect() == 0
    finally:
        gc.enable()
    await app.aclose()
