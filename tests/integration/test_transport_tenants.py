"""Property: through a cache transport, two tenants (two API keys) never share a key.

Requests go through :class:`sse_cache.httpx2.CacheTransport` to an in-memory upstream
(``httpx2.MockTransport``); the key is read from the ``x-sse-cache-key`` response header, as a
client would see it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_cache.httpx2 import CacheTransport

ROUTES = ("/v1/responses", "/v1/chat/completions", "/v1/messages", "/openai/v1/responses")
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(st.text(max_size=12), _json, max_size=6).map(lambda d: {"model": "m", **d})
secrets = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1
)
credentials = st.none() | st.tuples(st.sampled_from(CREDENTIAL_HEADERS), secrets)


def _answer(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(500, json={"error": {"message": "not stored"}})


@pytest.fixture(scope="module")
def client() -> Iterator[httpx2.Client]:
    transport = CacheTransport("memory://", httpx2.MockTransport(_answer))
    with httpx2.Client(transport=transport, base_url="http://upstream") as client:
        yield client


def _key(
    client: httpx2.Client, route: str, body: dict[str, Any], credential: tuple[str, str] | None
) -> str | None:
    """The request's cache key; None when it is not cached (no credential to scope it by)."""
    headers = {"content-type": "application/json"}
    if credential is not None:
        name, secret = credential
        headers[name] = f"Bearer {secret}" if name == "authorization" else secret
    response = client.post(route, content=json.dumps(body), headers=headers)
    if credential is None:
        assert response.headers["x-sse-cache"] == "bypass"
        assert "x-sse-cache-key" not in response.headers
        return None
    return response.headers["x-sse-cache-key"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(ROUTES), body=bodies, a=credentials, b=credentials)
def test_different_tenants_never_share_a_key(
    client: httpx2.Client,
    route: str,
    body: dict[str, Any],
    a: tuple[str, str] | None,
    b: tuple[str, str] | None,
) -> None:
    key_a = _key(client, route, body, a)
    assert _key(client, route, dict(reversed(body.items())), a) == key_a  # deterministic
    if a == b:
        assert _key(client, route, body, b) == key_a
    elif a is not None and b is not None:
        assert _key(client, route, body, b) != key_a
