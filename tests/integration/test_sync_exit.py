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
