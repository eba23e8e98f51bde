"""A program that uses the sync transports the usual way — a client built once, never closed —
exits when it is done: the cache's event loop runs in a daemon thread that does not keep the
interpreter alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest

from sse_cache.testing import MockUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

OPENAI_SDK = """
    import sys, httpx2, openai
    from sse_cache.httpx2 import CacheTransport
    client = openai.OpenAI(
        base_url=sys.argv[1] + "/v1", api_key="sk-exit",
        http_client=httpx2.Client(transport=CacheTransport("memory://")),
    )
    for _ in range(2):
        stream = client.responses.create(model="gpt-mock", input="exit", stream=True)
        print([event.type for event in stream][-1], flush=True)
    # no client.close(): the usual way the sync SDK is used
"""

HTTPX = """
    import sys, httpx
    from sse_cache.httpx import CacheTransport
    client = httpx.Client(transport=CacheTransport("memory://"), base_url=sys.argv[1])
    body = {"model": "gpt-mock", "input": "exit", "stream": True}
    for _ in range(2):
        r = client.post("/v1/responses", json=body, headers={"authorization": "Bearer sk-exit"})
        print(r.headers["x-sse-cache"], flush=True)
"""


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (OPENAI_SDK, ["response.completed", "response.completed"]),
        (HTTPX, ["miss", "hit"]),
    ],
    ids=["openai-httpx2", "httpx"],
)
async def test_an_unclosed_sync_transport_does_not_keep_the_program_alive(
    serve: Any, script: str, expected: list[str]
) -> None:
    async with serve(MockUpstream(delay=0)) as upstream:

        def run() -> subprocess.CompletedProcess[str]:
            # The timeout only catches a hang (the bug made the process wait forever).
            return subprocess.run(
                [sys.executable, "-c", textwrap.dedent(script), upstream],
                capture_output=True,
                text=True,
                timeout=60,
            )

        done = await anyio.to_thread.run_sync(run)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected


# A caller that stops reading a streamed response and leaves it unclosed (a `break` out of
# the SDK's stream): the garbage collector closes it as the interpreter exits, when the
# portal's daemon thread runs no more.
LEFT_OPEN = """
    import sys, httpx2, openai
    from sse_cache.httpx2 import CacheTransport
    client = openai.OpenAI(
        base_url=sys.argv[1] + "/v1", api_key="sk-exit", max_retries=0,
        http_client=httpx2.Client(transport=CacheTransport("memory://")),
    )
    ask = dict(model="gpt-mock", messages=[{"role": "user", "content": "exit"}], stream=True)
    if sys.argv[2] == "hit":
        for _ in client.chat.completions.create(**ask):
            pass  # stored
    for chunk in client.chat.completions.create(**ask):
        break
    print("main done", flush=True)
"""


@pytest.mark.parametrize("status", ["miss", "hit"])
async def test_a_stream_left_unclosed_does_not_keep_the_program_alive(
    serve: Any, status: str
) -> None:
    async with serve(MockUpstream(delay=0)) as upstream:

        def run() -> subprocess.CompletedProcess[str]:
            # The timeout only catches a hang (closing it through the portal waited for ever).
            return subprocess.run(
                [sys.executable, "-c", textwrap.dedent(LEFT_OPEN), upstream, status],
                capture_output=True,
                text=True,
                timeout=60,
            )

        done = await anyio.to_thread.run_sync(run)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "main done\n"


# Clients made per call and never closed: each transport's portal thread, its loop and its
# backend's connections went on for the life of the process (helper-131: 20 dropped, 20
# threads and 60-100 descriptors). They go with the transport and its last open response.
DROPPED = """
    import gc, os, sys, threading, time, httpx2
    from sse_cache.httpx2 import CacheTransport
    url, backend = sys.argv[1], sys.argv[2]
    body, key = {"model": "gpt-mock", "input": "dropped", "stream": True}, {"authorization": "k"}
    fds = lambda: len(os.listdir("/proc/self/fd"))
    portals = lambda: sum(t.name == "sse-cache-portal" for t in threading.enumerate())
    with httpx2.Client(transport=CacheTransport(backend), base_url=url) as client:
        client.post("/v1/responses", json=body, headers=key)  # (imports, first connections)
    before = fds()
    # A response that outlives its client: read whole, however the client went.
    client = httpx2.Client(transport=CacheTransport(backend), base_url=url)
    held = client.send(client.build_request("POST", "/v1/responses", json=body, headers=key),
                       stream=True)
    del client
    gc.collect()
    print(portals(), b"response.completed" in held.read())
    held.close()
    del held
    for _ in range(10):
        client = httpx2.Client(transport=CacheTransport(backend), base_url=url)
        client.post("/v1/responses", json=body, headers=key).read()
        del client  # never closed
    deadline = time.monotonic() + 30  # a deadlock guard: before, never
    while portals() or fds() > before:
        gc.collect()
        assert time.monotonic() < deadline, (portals(), fds(), before)
        time.sleep(0.02)  # (a condition polled: the stopping threads run on their own)
    print("released", flush=True)
"""


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
async def test_a_sync_transport_dropped_unclosed_lets_go_of_its_thread_and_sockets(
    serve: Any, backend: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'c.db'}"}.get(backend)
    if url is None:
        url = request.getfixturevalue("redis_server").url
    async with serve(MockUpstream(delay=0)) as upstream:

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", textwrap.dedent(DROPPED), upstream, url],
                capture_output=True,
                text=True,
                timeout=120,
            )

        done = await anyio.to_thread.run_sync(run)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["1 True", "released"]
