"""CacheOptions: the one list of options the middleware, the transports and the proxy take."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sse_cache import CacheOptions, ConfigError
from sse_cache.asgi import CacheMiddleware
from sse_cache.http.service import CacheService
from sse_cache.httpx2 import AsyncCacheTransport


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


def test_keywords_and_an_options_object_configure_the_same_service() -> None:
    by_keywords = CacheMiddleware(_app, "memory://", ttl=60, resume_window=5, max_background=2)
    options = CacheOptions(ttl=60, resume_window=5)
    by_object = CacheMiddleware(_app, "memory://", options=options, max_background=2)
    assert by_keywords.service.options == by_object.service.options == options
    assert by_keywords.service.ttl == 60 and by_keywords.service.options.resume_window == 5
    transport = AsyncCacheTransport("memory://", ttl=60, resume_window=5)
    assert transport.service.options == options


def test_an_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown option resume_windw \(known: .*resume_window"):
        CacheMiddleware(_app, "memory://", resume_windw=5)
    with pytest.raises(ConfigError, match="either options= or keyword options"):
        CacheService("memory://", CacheOptions(), ttl=5)


@pytest.mark.parametrize(
    ("name", "value"), [("cross_process_lease", 0), ("resume_window", -1), ("resume_window", 0)]
)
def test_bad_values_are_refused_once_with_their_name(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        CacheOptions(**{name: value})


def test_the_option_list_exists_once() -> None:
    # The integrations take **keywords for it: none repeats a field in its own signature.
    fields = {field.name for field in dataclasses.fields(CacheOptions)}
    for constructor in (CacheMiddleware, AsyncCacheTransport, CacheService):
        parameters = set(inspect.signature(constructor).parameters)
        assert not parameters & fields, constructor
