"""The LiteLLM recipe (docs/recipes/litellm.md) over real loopback HTTP: ``CacheMiddleware``
in front of a LiteLLM-shaped FastAPI gateway (examples/fastapi_gateway.py) and, where
``litellm[proxy]`` is installed, in front of the LiteLLM proxy app itself. Both forward to the
deterministic mock upstream; the clients are the official ``openai`` and ``anthropic`` SDKs.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pytest

from sse_cache._uvicorn import serve
from sse_cache.asgi import CacheMiddleware
from sse_cache.proxy import ProxyApp
from sse_cache.testing import MockUpstream

Serve = Any  # the `serve` fixture (tests/integration/conftest.py)

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: Any = [{"role": "user", "content": "hello gateway"}]


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fastapi_gateway", ROOT / "examples" / "fastapi_gateway.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gateway = _load_example()


def doc_blocks(doc: str, marker: str) -> list[str]:
    """The ```python blocks of ``docs/<doc>`` preceded by ``<!-- test: <marker> -->``."""
    text = (ROOT / "docs" / doc).read_text()
    blocks = text.split(f"<!-- test: {marker} -->\n```python\n")[1:]
    return [block.split("\n```", 1)[0] for block in blocks]


def serve_with_lifespan(app: Any) -> AbstractAsyncContextManager[str]:
    """Like the ``serve`` fixture, but with the ASGI lifespan on: the gateway opens its
    upstream client at startup, and the cache closes its backend at shutdown."""
    return serve(app, lifespan="on", startup_timeout=60)


class Stack:
    """The mock upstream, and a cached app in front of it."""

    def __init__(self, upstream: str, base: str) -> None:
        self.upstream = upstream
        self.base = base

    async def upstream_calls(self) -> int:
        async with httpx2.AsyncClient(base_url=self.upstream) as client:
            return int((await client.get("/_mock/stats")).json()["total"])

    @asynccontextmanager
    async def openai(self, key: str = "sk-gw-a") -> AsyncIterator[openai.AsyncOpenAI]:
        async with openai.AsyncOpenAI(
            base_url=self.base + "/v1", api_key=key, max_retries=0
        ) as client:
            yield client

    @asynccontextmanager
    async def anthropic(self, key: str = "sk-gw-a") -> AsyncIterator[anthropic.AsyncAnthropic]:
        async with anthropic.AsyncAnthropic(
            base_url=self.base, api_key=key, max_retries=0
        ) as client:
            yield client


StackFactory = Callable[..., Any]


@pytest.fixture
def gateway_stack(serve: Serve, tmp_path: Path) -> StackFactory:
    """``async with gateway_stack(gateway_keys, **mock_options) as stack``: the example
    gateway (its own one-line ``CacheMiddleware``, SQLite in ``tmp_path``; ``gateway_keys``:
    the keys it takes, all by default) in front of the mock upstream."""

    @asynccontextmanager
    async def start(
        gateway_keys: frozenset[str] = frozenset(), **mock_options: Any
    ) -> AsyncIterator[Stack]:
        mock = MockUpstream(**{"delay": 0.001, "first_delay": 0.005, **mock_options})
        async with serve(mock) as upstream:
            app = gateway.create_app(
                upstream,
                upstream_key="sk-provider",
                gateway_keys=gateway_keys,
                backend=f"sqlite:///{tmp_path / 'cache.db'}",
                ttl=600,
            )
            async with serve_with_lifespan(app) as base:
                yield Stack(upstream, base)

    return start


async def stream_chat(client: openai.AsyncOpenAI, content: str = "hello gateway") -> Any:
    # With usage, as a gateway that bills asks: such a stream also answers a non-streamed
    # request for the same answer (a Chat stream without usage keys apart).
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk.model_dump_json() async for chunk in raw.parse()]
    return raw.headers["x-sse-cache"], chunks


# -- the FastAPI gateway (examples/fastapi_gateway.py) ----------------------------------------


async def test_gateway_streamed_twice_is_a_miss_then_a_hit(gateway_stack: StackFactory) -> None:
    async with gateway_stack() as stack, stack.openai() as client:
        first = await stream_chat(client)
        second = await stream_chat(client)
        assert (first[0], second[0]) == ("miss", "hit")
        assert first[1] == second[1] and len(first[1]) > 10
        assert await stack.upstream_calls() == 1
        # A non-stream request for the same answer comes from the recorded stream.
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=MESSAGES
        )
        completion = raw.parse()
        assert raw.headers["x-sse-cache"] == "hit"
        text = "".join(
            json.loads(c)["choices"][0]["delta"].get("content") or ""
            for c in first[1]
            if json.loads(c)["choices"]
        )
        assert completion.choices[0].message.content == text
        assert await stack.upstream_calls() == 1


async def test_gateway_responses_and_messages_routes(gateway_stack: StackFactory) -> None:
    async with gateway_stack() as stack:
        async with stack.openai() as client:
            runs = []
            for _ in range(2):
                raw = await client.responses.with_raw_response.create(
                    model="gpt-mock", input="gateway responses", stream=True
                )
                runs.append(
                    (raw.headers["x-sse-cache"], [e.model_dump_json() async for e in raw.parse()])
                )
            assert [status for status, _ in runs] == ["miss", "hit"]
            assert runs[0][1] == runs[1][1]
            response = await client.responses.create(model="gpt-mock", input="gateway responses")
            assert response.output_text and response.status == "completed"
        async with stack.anthropic() as client:
            finals = []
            for _ in range(2):
                async with client.messages.stream(
                    model="claude-mock", max_tokens=256, messages=MESSAGES
                ) as helper:
                    finals.append(await helper.get_final_message())
            assert finals[0] == finals[1]
        assert await stack.upstream_calls() == 2  # one /v1/responses, one /v1/messages


async def test_gateway_two_api_keys_do_not_share(gateway_stack: StackFactory) -> None:
    async with gateway_stack() as stack:
        async with stack.openai("sk-gw-a") as a, stack.openai("sk-gw-b") as b:
            assert (await stream_chat(a, "tenants"))[0] == "miss"
            assert (await stream_chat(b, "tenants"))[0] == "miss"
            assert (await stream_chat(a, "tenants"))[0] == "hit"
            assert (await stream_chat(b, "tenants"))[0] == "hit"
        assert await stack.upstream_calls() == 2


async def test_gateway_health_and_rejections_pass_through(gateway_stack: StackFactory) -> None:
    async with gateway_stack() as stack, httpx2.AsyncClient(base_url=stack.base) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert "x-sse-cache" not in health.headers
        body = {"model": "gpt-mock", "messages": MESSAGES, "stream": True}
        for _ in range(2):  # no key: refused in front of the cache, which never sees it
            denied = await http.post("/v1/chat/completions", json=body)
            assert denied.status_code == 401 and "x-sse-cache" not in denied.headers
        assert await stack.upstream_calls() == 0


async def test_gateway_a_revoked_key_gets_no_more_hits(gateway_stack: StackFactory) -> None:
    # The keys are checked in front of the cache: a key taken off the list gets no answer,
    # also none recorded for it (checked inside, behind the cache, it kept getting them as
    # hits until they expired; helper-156).
    async with gateway_stack(gateway_keys=frozenset({"sk-gw-a", "sk-gw-b"})) as stack:
        async with stack.openai("sk-gw-a") as a:
            assert [(await stream_chat(a, "revoked"))[0] for _ in range(2)] == ["miss", "hit"]
        async with stack.openai("sk-gw-unknown") as unknown:
            with pytest.raises(openai.AuthenticationError):
                await stream_chat(unknown, "revoked")
    async with gateway_stack(gateway_keys=frozenset({"sk-gw-b"})) as stack:  # sk-gw-a revoked
        async with stack.openai("sk-gw-a") as a:
            with pytest.raises(openai.AuthenticationError):
                await stream_chat(a, "revoked")


async def test_gateway_client_disconnect_stores_nothing(gateway_stack: StackFactory) -> None:
    async with (
        gateway_stack(delay=0.02) as stack,
        httpx2.AsyncClient(base_url=stack.base, timeout=30) as http,
    ):
        body = {"model": "gpt-mock", "messages": MESSAGES, "stream": True}
        headers = {"authorization": "Bearer sk-gw-a"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.headers["x-sse-cache"] == "miss"
            async for _ in r.aiter_raw():
                break  # leave after the first chunk: the connection is closed
        await anyio.sleep(0.5)  # let the gateway notice
        async with httpx2.AsyncClient(base_url=stack.upstream) as client:
            assert (await client.get("/_mock/stats")).json()["disconnects"] == 1
        again = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert again.headers["x-sse-cache"] == "miss"
        assert again.content.rstrip().endswith(b"data: [DONE]")


# -- the snippets of docs/asgi.md and docs/proxy.md ---------------------------------------------

DOC_SNIPPETS = [
    pytest.param(code, id=f"{doc}-{i}")
    for doc in ("asgi.md", "proxy.md")
    for i, code in enumerate(doc_blocks(doc, "run"))
]


@pytest.mark.parametrize("code", DOC_SNIPPETS)
async def test_doc_snippets_build_working_apps(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each marked snippet defines ``app``; served with its lifespan (which builds Starlette's
    middleware stack, so that bad options fail), it answers, and shuts down cleanly."""
    monkeypatch.chdir(tmp_path)  # the snippets' sqlite:///cache.db
    namespace: dict[str, Any] = {}
    exec(compile(code, "snippet.py", "exec"), namespace)
    app = namespace["app"]
    # The proxy serves its own metrics (and forwards everything else: not here, offline).
    path = "/_sse_cache/metrics" if isinstance(app, ProxyApp) else "/metrics"
    async with serve_with_lifespan(app) as base, httpx2.AsyncClient() as http:
        response = await http.get(base + path)
    if "metrics" in namespace or isinstance(app, ProxyApp):
        assert response.status_code == 200 and "sse_cache_requests_total" in response.text
    else:
        assert response.status_code == 404


async def test_docs_have_snippets() -> None:
    assert len(DOC_SNIPPETS) == 6
    assert len(doc_blocks("recipes/litellm.md", "litellm")) == 1


# -- the LiteLLM proxy app (runs only where litellm[proxy] is installed) -------------------------

LITELLM_CONFIG = """\
model_list:
  - model_name: gpt-mock
    litellm_params: {{model: openai/gpt-mock, api_base: "{upstream}/v1", api_key: sk-provider}}
  - model_name: claude-mock
    litellm_params: {{model: anthropic/claude-mock, api_base: "{upstream}", api_key: sk-provider}}
"""


@pytest.mark.litellm
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
async def test_litellm_proxy_behind_cache_middleware(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-list download
    # No master key: every key is accepted, so two keys can be told apart (loopback only).
    monkeypatch.setenv("LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY", "true")
    mock = MockUpstream(delay=0.001, first_delay=0.005)
    async with serve(mock) as upstream:
        config = tmp_path / "litellm.yaml"
        config.write_text(LITELLM_CONFIG.format(upstream=upstream))
        monkeypatch.setenv("CONFIG_FILE_PATH", str(config))
        # The recipe's app module, exactly as docs/recipes/litellm.md shows it.
        monkeypatch.setenv("SSE_CACHE_BACKEND", f"sqlite:///{tmp_path / 'cache.db'}")
        [module] = doc_blocks("recipes/litellm.md", "litellm")
        namespace: dict[str, Any] = {}
        exec(compile(module, "cached_litellm.py", "exec"), namespace)
        app = namespace["app"]
        assert isinstance(app, CacheMiddleware)
        async with serve_with_lifespan(app) as base:
            stack = Stack(upstream, base)
            before = await stack.upstream_calls()  # LiteLLM may list models at startup
            async with stack.openai("sk-a") as a, stack.openai("sk-b") as b:
                first, second = await stream_chat(a), await stream_chat(a)
                assert (first[0], second[0]) == ("miss", "hit") and first[1] == second[1]
                raw = await a.chat.completions.with_raw_response.create(
                    model="gpt-mock", messages=MESSAGES
                )
                assert raw.headers["x-sse-cache"] == "hit" and raw.parse().choices[0].message
                assert (await stream_chat(b))[0] == "miss"  # another key: its own entry
                statuses = []
                for _ in range(2):
                    raw_stream = await a.responses.with_raw_response.create(
                        model="gpt-mock", input="litellm", stream=True
                    )
                    statuses.append(raw_stream.headers["x-sse-cache"])
                    events = [e.type async for e in raw_stream.parse()]
                    assert events[-1] == "response.completed"
                assert statuses == ["miss", "hit"]
            async with (
                stack.anthropic("sk-a") as client,
                httpx2.AsyncClient(base_url=base) as http,
            ):
                statuses = []
                for _ in range(2):
                    raw_message = await client.messages.with_raw_response.create(
                        model="claude-mock", max_tokens=256, messages=MESSAGES, stream=True
                    )
                    statuses.append(raw_message.headers["x-sse-cache"])
                    kinds = [e.type async for e in await raw_message.parse()]
                    assert kinds[-1] == "message_stop"
                assert statuses == ["miss", "hit"]
                # LiteLLM's routes without /v1 are cached too (the recipe's suffix routes),
                # under their own path: keys hold the request's path, as the recipe says.
                body = {"model": "gpt-mock", "messages": MESSAGES, "stream": True}
                for status in ("miss", "hit"):
                    bare = await http.post(
                        "/chat/completions", json=body, headers={"authorization": "Bearer sk-a"}
                    )
                    assert bare.headers["x-sse-cache"] == status
                # Keys in LiteLLM's own header are told apart too (the default tenant scope).
                for key, status in (("sk-c", "miss"), ("sk-d", "miss"), ("sk-c", "hit")):
                    r = await http.post(
                        "/v1/chat/completions", json=body, headers={"x-litellm-api-key": key}
                    )
                    assert r.status_code == 200 and r.headers["x-sse-cache"] == status
                health = await http.get("/health/liveliness")
                assert health.status_code == 200 and "x-sse-cache" not in health.headers
            # chat for sk-a, sk-b, sk-c and sk-d and at /chat/completions, one /v1/responses,
            # one /v1/messages
            assert await stack.upstream_calls() - before == 7
