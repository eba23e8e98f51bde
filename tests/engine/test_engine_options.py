"""StreamCache's arguments are checked at construction, each error naming the argument."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from option_values import NAN, AsyncCallable, async_hook, metrics_hook
from sse_cache import ConfigError, DefaultKeyer, MsgpackCodec
from sse_cache.adapters import GenericSSE, OpenAIResponses
from sse_cache.breaker import Breaker
from sse_cache.engine import StreamCache

# (argument, value): each was accepted (a limit silently off, a string taken as true, a
# default silently used, a hook never awaited) or failed later without naming the argument.
BAD_ARGUMENTS = [
    ("breaker", 0),
    ("breaker", Breaker),
    ("max_entry_bytes", NAN),
    ("max_entry_bytes", "32MiB"),
    ("max_entry_bytes", 1.5),
    ("decoded_cache_bytes", NAN),
    ("decoded_cache_bytes", "64MiB"),
    ("ttl", True),
    ("ttl", "10"),
    ("ttl", NAN),
    ("backend_timeout", None),
    ("backend_timeout", NAN),
    ("join_timeout", NAN),
    ("join_timeout", "300"),
    ("single_flight", "false"),
    ("hooks", metrics_hook),
    ("hooks", [async_hook]),
    ("hooks", [functools.partial(async_hook)]),
    ("hooks", [AsyncCallable()]),
    ("hooks", [None]),
    ("keyer", ""),
    ("keyer", DefaultKeyer),
    ("codec", 0),
    ("codec", MsgpackCodec),
    ("pacing", NAN),
    ("pacing", "fast"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_them(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        StreamCache("memory://", GenericSSE(), **{name: value})


def test_the_adapter_class_is_refused_with_a_hint() -> None:
    # Accepted before: the first request then failed (its name is a property object, its
    # methods unbound).
    with pytest.raises(
        ConfigError,
        match=r"^adapter must be a StreamAdapter instance, got the "
        r"class OpenAIResponses \(call it: OpenAIResponses\(\)\)",
    ):
        StreamCache("memory://", OpenAIResponses)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^adapter must be a StreamAdapter, got None"):
        StreamCache("memory://", None)  # type: ignore[arg-type]


def test_a_backend_that_is_not_one_is_refused() -> None:
    # In the words the middleware and the transports use (docs/backends.md quotes them).
    with pytest.raises(ConfigError, match=r"^backend must be a URL string or a Backend, got"):
        StreamCache(object(), GenericSSE())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"got None \(NoneType\)"):
        StreamCache(None, GenericSSE())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.request(["m"]), TypeError, "body must be the decoded JSON object"),
        (lambda c: c.request({}, tenant="a", shared=True), TypeError, "not both"),
        (lambda c: c.request({}, shared="yes"), TypeError, "shared must be True or False"),
        (lambda c: c.request({}, tenant=7), TypeError, "tenant must be a str, got int"),
        (lambda c: c.request({}, tenant=0), TypeError, "tenant must be a str, got int"),
        (
            lambda c: c.request({}, route=b"/x", tenant="t"),
            TypeError,
            "route must be a str, got bytes",
        ),
        (lambda c: c.request({}, variant=-1, tenant="t"), ValueError, "variant must be an int"),
        (lambda c: c.request({}, variant=True, tenant="t"), ValueError, "variant must be an int"),
    ],
)
def test_a_request_of_the_wrong_shape_is_refused_naming_it(
    call: Any, error: type[Exception], message: str
) -> None:
    # They failed with AttributeError from deep inside ('list' object has no attribute
    # 'items'), or were accepted (variant=-1: helper-82).
    cache = StreamCache("memory://", GenericSSE())
    with pytest.raises(error, match=message):
        call(cache)


def test_good_arguments_still_pass() -> None:
    kept: list[Any] = []
    cache = StreamCache(
        "memory://",
        GenericSSE(),
        keyer=DefaultKeyer(),
        codec=MsgpackCodec(),
        ttl=5,
        max_entry_bytes=1024,
        pacing=2,
        hooks=[kept.append, metrics_hook],
        backend_timeout=0.5,
        single_flight=False,
        join_timeout=float("inf"),
        decoded_cache_bytes=0,
        breaker=Breaker(failures=0),
    )
    assert cache.pacing.factor == 2 and cache.ttl == 5 and cache.max_entry_bytes == 1024


@pytest.mark.anyio
async def test_max_entry_bytes_counts_utf8_bytes_on_the_live_path() -> None:
    # The engine's own recording loop counts what it keeps as the entry will store it, in
    # UTF-8: 400 characters of 3-byte text are 1,200 bytes, over a 1,000-byte limit, so
    # the answer is delivered but not stored (it was stored at up to 4x the limit).
    from sse_cache import Event

    text = "日本語の答え" * 50  # 300 characters, 900 bytes
    events = [Event(text, "delta"), Event(text[:100], "delta"), Event("", "done")]

    async def upstream() -> Any:
        for event in events:
            yield event

    class Done(GenericSSE):
        def outcome(self, event: Event) -> Any:
            from sse_cache.protocols import Outcome

            return Outcome.COMPLETE if event.event == "done" else Outcome.CONTINUE

    cache = StreamCache("memory://", Done(), max_entry_bytes=1000)
    async with cache.stream("k", upstream) as stream:
        got = [event.data async for event in stream]
    assert got == [e.data for e in events]
    assert not stream.stored and "max_entry_bytes=1000" in stream.reason
    assert await cache.lookup("k") is None
    # ASCII text of the same length in characters fits, as before.
    events = [Event("a" * 300, "delta"), Event("b" * 100, "delta"), Event("", "done")]
    async with cache.stream("k", upstream) as stream:
        assert [event.data async for event in stream] == [e.data for e in events]
    assert stream.stored
    await cache.aclose()
