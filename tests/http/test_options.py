"""CacheOptions: the one list of options the middleware, the transports and the proxy take."""

from __future__ import annotations

import dataclasses
import inspect
from fractions import Fraction
from typing import Any

import pytest

from option_values import NAN, AsyncCallable, async_hook, metrics_hook
from sse_cache import CacheOptions, ConfigError, DefaultKeyer, MsgpackCodec, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.asgi import CacheMiddleware
from sse_cache.http.policy import SHARED_TENANT
from sse_cache.http.service import CacheService
from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport


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
    # The integration's own options are listed too: a misspelt one is shown its spelling.
    with pytest.raises(
        ConfigError, match=r"unknown option max_backround \(known: .*max_background"
    ):
        CacheMiddleware(_app, "memory://", max_backround=5)
    with pytest.raises(ConfigError, match=r"\(known: .*max_background.*portal_backend"):
        CacheTransport("memory://", max_backround=5)
    with pytest.raises(ConfigError, match=r"\(known: .*max_background"):
        AsyncCacheTransport("memory://", max_backround=5)


@pytest.mark.parametrize(
    ("name", "value"), [("cross_process_lease", 0), ("resume_window", -1), ("resume_window", 0)]
)
def test_bad_values_are_refused_once_with_their_name(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        CacheOptions(**{name: value})


@pytest.mark.parametrize("lease", [float("inf"), 1e300, 86400.5, float("nan")])
def test_cross_process_lease_must_be_finite_and_at_most_a_day(lease: float) -> None:
    # An infinite or astronomical lease cannot be given to the backend's lock: every
    # cross-process lock then failed, silently.
    with pytest.raises(ConfigError, match=r"^cross_process_lease must be .* at most 86400, got"):
        CacheOptions(cross_process_lease=lease)
    with pytest.raises(ConfigError, match="cross_process_lease"):
        CacheMiddleware(_app, "memory://", cross_process_lease=lease)
    assert CacheOptions(cross_process_lease=86400).cross_process_lease == 86400


# (option, value): each was accepted (a limit silently off, a string taken as true, a default
# silently used) or failed later with an error that did not name the option.
BAD_OPTIONS = [
    ("max_entry_bytes", NAN),
    ("max_entry_bytes", "32MiB"),
    ("max_entry_bytes", 0),
    ("max_entry_bytes", True),
    ("max_body_bytes", NAN),
    ("max_body_bytes", "4MiB"),
    ("decoded_cache_bytes", NAN),
    ("decoded_cache_bytes", -1),
    ("ttl", "10"),
    ("ttl", True),
    ("ttl", NAN),
    ("ttl", float("inf")),
    ("backend_timeout", None),
    ("backend_timeout", NAN),
    ("backend_timeout", "2"),
    ("breaker_failures", True),
    ("breaker_failures", 2.5),
    ("breaker_cooldown", NAN),
    ("resume_window", NAN),
    ("resume_window", "30"),
    ("single_flight", "false"),
    ("single_flight", 0),
    ("cross_process", "false"),
    ("cross_process", None),
    ("hooks", metrics_hook),
    ("hooks", [metrics_hook, "not callable"]),
    ("hooks", [async_hook]),
    ("hooks", [AsyncCallable()]),
    ("hooks", "metrics"),
    ("routes", []),
    ("routes", "/v1/responses"),
    ("origin", 1.5),
    ("origin", None),
    ("keyer", ""),
    ("keyer", DefaultKeyer),  # the class, not an instance
    ("codec", 0),
    ("codec", MsgpackCodec),
    ("pacing", NAN),
    ("pacing", "fast"),
    ("tenant", True),
    ("tenant", ["x-org-id"]),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_wrong_types_and_nan_are_refused_at_construction_naming_the_option(
    name: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        CacheOptions(**{name: value})
    # The middleware and the transports take the same options, checked the same way.
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        CacheMiddleware(_app, "memory://", **{name: value})
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        AsyncCacheTransport("memory://", **{name: value})


def test_good_values_still_pass() -> None:
    options = CacheOptions(
        ttl=60,
        max_entry_bytes=1024,
        pacing=2,
        hooks=[metrics_hook],
        backend_timeout=0.5,
        single_flight=False,
        keyer=DefaultKeyer(),
        codec=MsgpackCodec(),
        cross_process_lease=10,
        decoded_cache_bytes=0,
        breaker_failures=0,
        resume_window=30.0,
        tenant=SHARED_TENANT,
        routes={},
        origin="https://api.example.com",
    )
    assert options.hooks == (metrics_hook,)  # a list becomes a tuple, iterated once per notice
    assert CacheOptions(tenant=lambda headers: headers.get("x-org")).tenant is not None


def test_numbers_are_taken_in_any_exact_form_and_kept_as_the_parts_use_them() -> None:
    # Sizes written as floats (1e6), numbers of other real types (a Fraction, as a numpy
    # scalar is): accepted, and stored as the int or float the cache computes with. A
    # fraction of a byte is refused, never rounded.
    options = CacheOptions(
        max_entry_bytes=1e6, max_body_bytes=2.5e6, decoded_cache_bytes=0.0, ttl=Fraction(3, 2)
    )
    assert (options.max_entry_bytes, options.max_body_bytes) == (1_000_000, 2_500_000)
    assert type(options.max_entry_bytes) is int and options.decoded_cache_bytes == 0
    assert options.ttl == 1.5 and type(options.ttl) is float
    with pytest.raises(ConfigError, match=r"max_entry_bytes must be .*got 1000\.5"):
        CacheOptions(max_entry_bytes=1000.5)
    cache = StreamCache("memory://", GenericSSE(), max_entry_bytes=2e6, ttl=Fraction(1, 2))
    assert (cache.max_entry_bytes, cache.ttl) == (2_000_000, 0.5)


def test_the_option_list_exists_once() -> None:
    # The integrations take **keywords for it: none repeats a field in its own signature.
    fields = {field.name for field in dataclasses.fields(CacheOptions)}
    for constructor in (CacheMiddleware, AsyncCacheTransport, CacheService):
        parameters = set(inspect.signature(constructor).parameters)
        assert not parameters & fields, constructor


def test_options_must_be_a_cache_options_object() -> None:
    # A dict of options (a common slip) failed only later, with an AttributeError.
    for wrapper in (
        lambda options: CacheMiddleware(_app, "memory://", options=options),
        lambda options: AsyncCacheTransport("memory://", options=options),
    ):
        with pytest.raises(ConfigError, match=r"options must be a CacheOptions.*keywords.*'ttl'"):
            wrapper({"ttl": 5})
        with pytest.raises(ConfigError, match="options must be a CacheOptions"):
            wrapper(60)


@pytest.mark.parametrize("value", [0, -1, float("nan"), "300", True])
def test_join_timeout_is_a_positive_number_of_seconds(value: Any) -> None:
    with pytest.raises(ConfigError, match="join_timeout"):
        CacheOptions(join_timeout=value)
    assert CacheOptions(join_timeout=float("inf")).join_timeout == float("inf")
