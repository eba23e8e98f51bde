"""Bad arguments are refused at construction (or at the command line) with a ConfigError or
a usage error that names what is wrong, and never shows a password from a URL."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any

import httpx
import httpx2
import pytest

import sse_cache.httpx
import sse_cache.httpx2
from sse_cache import ConfigError, DefaultKeyer, MsgpackCodec, Recorder, SSEParser
from sse_cache.adapters import (
    AnthropicMessages,
    GeminiGenerateContent,
    GenericSSE,
    OpenAIChat,
    OpenAIResponses,
)
from sse_cache.asgi import CacheMiddleware
from sse_cache.backends import from_url
from sse_cache.backends.sqlite import SQLiteBackend
from sse_cache.cli import _options as cli_options
from sse_cache.cli import build_parser
from sse_cache.cli._options import OPTIONS, resolve
from sse_cache.proxy import Forwarder, create_proxy_app

SECRET = "hunter2"


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


def _usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    # Parsed only, never run: a value wrongly accepted must not start a proxy.
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["proxy", *argv])
    assert info.value.code == 2
    return capsys.readouterr().err


# -- the proxy's upstream -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "why"),
    [
        (f"http://user:{SECRET}@host:99999", "bad port"),
        # No server answers on port 0, and urlsplit takes "h h" for a host and drops tabs.
        (f"http://user:{SECRET}@host:0", r"bad port \(0\)"),
        (f"http://user:{SECRET}@ho st", "bad host name or whitespace"),
        (f"http://user:{SECRET}@host/v\t1", "bad host name or whitespace"),
        (f"http://user:{SECRET}@[::1", "not a valid URL .*IPv6"),
        (f"ftp://user:{SECRET}@host", "must be an http"),
        (f"http://user:{SECRET}@host/v1?key={SECRET}", "without a query"),
        (f"http://user:{SECRET}@host/v1#frag", "without a query .* or fragment"),
    ],
)
def test_a_bad_upstream_is_refused_without_its_password(
    upstream: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(capsys, "--upstream", upstream)
    assert "argument --upstream: upstream" in err and "://***@" in err
    assert re.search(why, err) and SECRET not in err
    with pytest.raises(ConfigError, match=f"SSE_CACHE_UPSTREAM: upstream .*{why}") as info:
        resolve(argparse.Namespace(), {"SSE_CACHE_UPSTREAM": upstream})
    assert SECRET not in str(info.value)
    for build in (Forwarder, lambda url: create_proxy_app(url, "memory://")):
        with pytest.raises(ConfigError, match=f"^upstream .*{why}") as info:
            build(upstream)
        assert SECRET not in str(info.value)


def test_an_upstream_scheme_in_upper_case_is_accepted_everywhere() -> None:
    args = resolve(argparse.Namespace(), {"SSE_CACHE_UPSTREAM": f"HTTPS://u:{SECRET}@h/v1/"})
    forwarder = Forwarder(args.upstream)
    assert forwarder.upstream == f"https://u:{SECRET}@h/v1"  # (the upstream reads its password)


# -- the proxy's routes -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/a,b", "/v1/a b", "/v1/a\tb", "/v1/a "])
def test_a_route_path_with_a_comma_or_whitespace_is_refused(
    path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The workers of --workers N read the routes from SSE_CACHE_ROUTE, a list split on commas
    # and whitespace: such a path passed the flag's check and then killed every worker.
    err = _usage_error(capsys, "--upstream", "http://h", "--route", f"{path}=openai-chat")
    assert "argument --route: a route path cannot hold a comma or whitespace" in err
    assert repr(path) in err


def test_routes_given_as_flags_reach_the_workers_unchanged() -> None:
    (route,) = (opt for opt in OPTIONS if opt.flag == "--route")
    value = [("/v1/chat/completions", "openai-chat"), ("/a/{m}:x", "gemini")]
    assert route.from_text(route.to_text(value)) == value


# -- the proxy's --ttl and --workers ----------------------------------------------------------


@pytest.mark.parametrize("ttl", ["1e308", "inf", "31536001"])
def test_a_ttl_past_a_year_is_refused_naming_the_limit(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was stored, and each hit carried a 309-digit x-sse-cache-ttl.
    limit = f"expected a positive number of seconds of at most 31536000 (one year), got {ttl!r}"
    assert f"argument --ttl: {limit}" in _usage_error(
        capsys, "--upstream", "http://h", "--ttl", ttl
    )
    with pytest.raises(ConfigError) as info:
        resolve(argparse.Namespace(), {"SSE_CACHE_UPSTREAM": "http://h", "SSE_CACHE_TTL": ttl})
    assert str(info.value) == f"SSE_CACHE_TTL: {limit}"
    # (The proxy built in code takes its ttl through CacheOptions, checked the same way.)
    with pytest.raises(ConfigError, match=r"^ttl must be at most 31536000 seconds \(one year\)"):
        create_proxy_app("http://h", "memory://", ttl=float(ttl))


def test_a_ttl_of_a_year_is_taken() -> None:
    environ = {"SSE_CACHE_UPSTREAM": "http://h", "SSE_CACHE_TTL": "31536000"}
    assert resolve(argparse.Namespace(), environ).ttl == 31536000.0


def test_more_workers_than_eight_per_cpu_are_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --workers 100000 forked processes until the OOM killer came. Parsed only: no proxy
    # is started here.
    monkeypatch.setattr(cli_options, "usable_cpus", lambda: 4)
    err = _usage_error(capsys, "--upstream", "http://h", "--workers", "33")
    assert (
        "argument --workers: expected at most 32 workers (8 per CPU, 4 CPUs here), got '33'" in err
    )
    environ = {"SSE_CACHE_UPSTREAM": "http://h", "SSE_CACHE_WORKERS": "100000"}
    with pytest.raises(ConfigError, match=r"^SSE_CACHE_WORKERS: expected at most 32 workers"):
        resolve(argparse.Namespace(), environ)
    assert resolve(argparse.Namespace(), {**environ, "SSE_CACHE_WORKERS": "32"}).workers == 32
    monkeypatch.setattr(cli_options, "usable_cpus", lambda: 1)
    err = _usage_error(capsys, "--upstream", "http://h", "--workers", "9")
    assert "expected at most 8 workers (8 per CPU, 1 CPU here), got '9'" in err


def test_the_workers_bound_counts_the_cpus_this_process_may_use() -> None:
    cpus = cli_options.usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert cpus == len(os.sched_getaffinity(0))


# -- CacheMiddleware's own options -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("finish_on_disconnect", "no"),
        ("finish_on_disconnect", 1),
        ("max_background", "8"),
        ("max_background", 1.5),
        ("max_background", math.nan),
        ("max_background", -1),
        ("max_background", True),
        ("background_timeout", "5"),
        ("background_timeout", math.inf),
        ("background_timeout", math.nan),
        ("background_timeout", 0),
        ("background_timeout", -1),
    ],
)
def test_the_middleware_checks_its_own_options(name: str, value: object) -> None:
    # A number given as text says so: "got '5'" read as a range error (helper-126).
    shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
    with pytest.raises(ConfigError, match=f"^{name} must be .*, got {re.escape(shown)}$"):
        CacheMiddleware(_app, "memory://", **{name: value})  # type: ignore[arg-type]


def test_the_middleware_own_options_keep_their_good_values() -> None:
    mw = CacheMiddleware(
        _app, "memory://", finish_on_disconnect=True, max_background=0, background_timeout=0.5
    )
    assert (mw.finish_on_disconnect, mw.max_background, mw.background_timeout) == (True, 0, 0.5)
    assert type(CacheMiddleware(_app, "memory://", max_background=4.0).max_background) is int


def test_a_bad_origin_is_refused_without_its_password() -> None:
    for origin, why in (
        (f"http://u:{SECRET}@h:99999", "bad port"),
        (f"http://u:{SECRET}@[::1", "IPv6"),
    ):
        with pytest.raises(ConfigError, match=why) as info:
            CacheMiddleware(_app, "memory://", origin=origin)
        assert "origin" in str(info.value) and SECRET not in str(info.value)


# -- the transports' transport= ---------------------------------------------------------------


@pytest.mark.parametrize("module", [sse_cache.httpx2, sse_cache.httpx])
def test_a_transport_that_cannot_send_is_refused_at_construction(module: object) -> None:
    lib = httpx2 if module is sse_cache.httpx2 else httpx
    async_cls, sync_cls = module.AsyncCacheTransport, module.CacheTransport  # type: ignore[attr-defined]
    for bad in ("x", 5, lib.HTTPTransport(), lib.AsyncHTTPTransport):
        with pytest.raises(ConfigError, match=r"^transport must be .*handle_async_request"):
            async_cls("memory://", transport=bad)
    for bad in ("x", lib.AsyncHTTPTransport(), lib.HTTPTransport):
        with pytest.raises(ConfigError, match=r"^transport must be .*handle_request"):
            sync_cls("memory://", transport=bad)
    # What a transport is given in practice is still taken.
    mock = lib.MockTransport(lambda request: lib.Response(200))
    for good in (lib.AsyncHTTPTransport(), lib.ASGITransport(app=_app), mock, None):
        async_cls("memory://", transport=good)
    for good in (lib.HTTPTransport(), mock, None):
        sync_cls("memory://", transport=good).close()
    # The other library's transport has the method, but not its requests and responses:
    # every cached request failed inside it with a bare AssertionError (helper-82).
    other = httpx if lib is httpx2 else httpx2
    with pytest.raises(ConfigError, match=r"^transport is \w+'s AsyncHTTPTransport, and this"):
        async_cls("memory://", transport=other.AsyncHTTPTransport())
    with pytest.raises(ConfigError, match=r"^transport is \w+'s HTTPTransport, and this"):
        sync_cls("memory://", transport=other.HTTPTransport())
    # A portal on an event loop anyio does not have failed at the first request.
    with pytest.raises(ConfigError, match=r"^portal_backend must be one of 'asyncio', 'trio'"):
        sync_cls("memory://", portal_backend="curio")
    # A trio portal cannot run the Redis backend (redis-py's asyncio client): accepted, every
    # request's lookup failed, and the cache was never used (helper-170).
    for url in ("redis://127.0.0.1:1/0", "REDISS://127.0.0.1:1", "unix:///tmp/no.sock"):
        with pytest.raises(ConfigError, match=r"^portal_backend='trio' cannot run the Redis"):
            sync_cls(url, portal_backend="trio")
    from sse_cache.backends import RedisBackend

    class MyRedis(RedisBackend):  # (a subclass runs on redis-py's asyncio client too)
        pass

    import redis.asyncio

    mine = MyRedis(redis.asyncio.Redis(host="127.0.0.1", port=1))
    for backend in (from_url("redis://127.0.0.1:1/0"), mine):
        with pytest.raises(ConfigError, match=r"^portal_backend='trio' cannot run the Redis"):
            sync_cls(backend, portal_backend="trio")
    sync_cls("memory://", portal_backend="trio").close()


@pytest.mark.parametrize("lib", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_an_environment_proxy_the_transports_cannot_use_is_said_by_name(
    lib: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache transports' default reads the environment's proxies as the library's client
    # does: one it cannot use (an unknown scheme; SOCKS without socksio) failed with the
    # library's bare ValueError or ImportError (helper-172). Its password is never shown.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks4://user:s3cret@127.0.0.1:9")
    cached = sse_cache.httpx2 if lib is httpx2 else sse_cache.httpx
    for make, spelt in ((cached.AsyncCacheTransport, "Async"), (cached.CacheTransport, "")):
        with pytest.raises(ConfigError) as caught:
            make("memory://")
        said = str(caught.value)
        assert said.startswith("the environment's proxy (ALL_PROXY=socks4://***@127.0.0.1:9)")
        assert f"transport={lib.__name__}.{spelt}HTTPTransport()" in said
        assert "s3cret" not in said
    # A malformed one: the library's InvalidURL, which named no variable (helper-173).
    monkeypatch.setenv("ALL_PROXY", "http://[::1")
    with pytest.raises(ConfigError, match=r"^the environment's proxy \(ALL_PROXY=http://\[::1\)"):
        cached.CacheTransport("memory://")
    # Given a transport of its own, the cache reads no environment.
    cached.CacheTransport("memory://", lib.HTTPTransport()).close()


# -- backend URLs ---------------------------------------------------------------------------


def test_a_nul_in_a_sqlite_path_is_refused() -> None:
    # No file name can hold one: the backend failed open on every call, for ever.
    with pytest.raises(ConfigError, match=r"sqlite:// URL 'sqlite:///y%00.db'.*NUL"):
        from_url("sqlite:///y%00.db")
    with pytest.raises(ConfigError, match="path 'a\\\\x00b' holds a NUL"):
        SQLiteBackend("a\0b")


def test_an_unreadable_redis_url_is_a_config_error_without_its_password() -> None:
    from sse_cache.backends import from_url
    from sse_cache.backends._redis_client import cluster_client, standalone_client

    for client, scheme in ((standalone_client, "redis"), (cluster_client, "redis+cluster")):
        with pytest.raises(ConfigError, match=f"^{re.escape(scheme)}:// URL: .*IPv6") as info:
            client(f"{scheme}://:{SECRET}@[::1", scheme, {"socket_timeout": 1.0})
        assert SECRET not in str(info.value) and "***@" in str(info.value)
        # The way in users take: named as the URL's fault, not a plugin's failure.
        with pytest.raises(ConfigError, match=f"^{re.escape(scheme)}:// URL: .*IPv6") as info:
            from_url(f"{scheme}://:{SECRET}@[::1")
        assert SECRET not in str(info.value)


# -- the core's own classes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MsgpackCodec(secret="not bytes"), "secret must be bytes, got str"),  # type: ignore[arg-type]
        (lambda: MsgpackCodec(max_decoded_bytes=0), "max_decoded_bytes must be a positive"),
        (lambda: DefaultKeyer(salt=5), "salt must be a str, got int"),  # type: ignore[arg-type]
        (lambda: OpenAIResponses(delta_chars=0), "delta_chars must be None or an int >= 1"),
        (lambda: OpenAIChat(delta_chars=8.5), "delta_chars must be None or an int >= 1"),  # type: ignore[arg-type]
        (lambda: OpenAIResponses(store_incomplete="no"), "store_incomplete must be True or"),  # type: ignore[arg-type]
        (lambda: OpenAIChat(usage_chunk="false"), "usage_chunk must be True or False"),  # type: ignore[arg-type]
        (lambda: AnthropicMessages(ping=1), "ping must be True or False"),  # type: ignore[arg-type]
        (lambda: GeminiGenerateContent(store_blocked="yes"), "store_blocked must be True"),  # type: ignore[arg-type]
        (lambda: OpenAIChat(store_blocked="no"), "store_blocked must be True or False"),  # type: ignore[arg-type]
        (lambda: AnthropicMessages(store_blocked=1), "store_blocked must be True or False"),  # type: ignore[arg-type]
    ],
)
def test_the_cores_classes_refuse_bad_arguments_when_built(build: Any, message: str) -> None:
    # They were taken, and failed later: a str secret at the first encode (nothing was ever
    # stored), a salt at the first key, delta_chars in synthesize; "no" was a true
    # store_incomplete (helper-82).
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()


def test_the_parser_and_the_recorder_name_what_they_take() -> None:
    with pytest.raises(TypeError, match="feed\\(\\) takes bytes .* got str"):
        SSEParser().feed("data: x\n\n")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add\\(\\) takes an Event, got str"):
        Recorder(GenericSSE()).add("x", 0.0)  # type: ignore[arg-type]
