"""CachePolicy: routes, tenant scopes and request controls (sans-IO)."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_cache import CacheOptions, ConfigError, Pacing
from sse_cache._logging import redact_query_key
from sse_cache.adapters import GenericSSE, OpenAIChat, OpenAIResponses
from sse_cache.http.policy import (
    MAX_BODY_CONTAINERS,
    MAX_TTL,
    SHARED_TENANT,
    CachePolicy,
    Controls,
    base_url_of,
    origin_of,
    parse_controls,
)
from sse_cache.keys import CREDENTIAL_HEADERS, tenant_scope

BODY = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()


def test_default_routes_and_prefixes() -> None:
    policy = CachePolicy()
    assert isinstance(policy.match("POST", "/v1/responses")[1], OpenAIResponses)  # type: ignore[index]
    assert isinstance(policy.match("POST", "/openai/v1/chat/completions/")[1], OpenAIChat)  # type: ignore[index]
    assert policy.match("GET", "/v1/responses") is None
    assert policy.match("POST", "/v1/models") is None
    assert policy.match("POST", "/v1/responses?x=1") is not None


def test_custom_routes_accept_classes_factories_and_instances() -> None:
    generic = GenericSSE()
    policy = CachePolicy(
        {"/events": generic, "/chat/completions": OpenAIChat, "/r": lambda: GenericSSE()}
    )
    assert policy.match("POST", "/events")[1] is generic  # type: ignore[index]
    assert isinstance(policy.match("POST", "/openai/deployments/x/chat/completions")[1], OpenAIChat)  # type: ignore[index]
    with pytest.raises(ConfigError, match="start with"):
        CachePolicy({"events": generic})
    with pytest.raises(ConfigError, match="not a StreamAdapter"):
        CachePolicy({"/x": 42})  # type: ignore[dict-item]


def test_decide_bypasses_what_it_cannot_key(caplog: pytest.LogCaptureFixture) -> None:
    policy = CachePolicy(max_body_bytes=100)
    headers = {"authorization": "Bearer k"}
    caplog.set_level(logging.INFO, logger="sse_cache")
    assert (
        policy.decide("POST", "/v1/responses", headers, b"not json").reason
        == "request body is not JSON"
    )
    # A string that is not UTF-8 (msgspec before 0.23 raised UnicodeDecodeError, which
    # escaped: the proxy answered 500; helper-127. The oldest-versions run checks the floor.)
    assert (
        policy.decide("POST", "/v1/responses", headers, b'{"input": "\xff"}').reason
        == "request body is not JSON"
    )
    assert "not a JSON object" in policy.decide("POST", "/v1/responses", headers, b"[1]").reason
    assert "over 100 bytes" in policy.decide("POST", "/v1/responses", headers, None).reason
    gz = {**headers, "content-encoding": "gzip"}
    assert policy.decide("POST", "/v1/responses", gz, BODY).reason == "compressed request body"
    # Each in one log line, as docs/asgi.md says (a large or compressed body was silent).
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 5 and "over 100 bytes" in logged[3], logged
    assert logged[4] == "sse_cache: POST /v1/responses forwarded uncached: compressed request body"
    # The query's credentials are not in the line: in an app's own logging, nothing else
    # redacts them (helper-123: ?access_token= and ?subscription-key= were written out).
    caplog.clear()
    query = "access_token=SECRET1&api-version=1&subscription-key=SECRET2"
    policy.decide("POST", "/v1/responses", headers, b"not json", query)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "SECRET" not in line and "access_token=***" in line and "api-version=1" in line
    decision = policy.decide("POST", "/v1/responses", headers, BODY)
    assert decision.cacheable and decision.streaming and decision.route == "POST /v1/responses"


@pytest.mark.parametrize(
    ("name", "masked"),
    [
        ("key", True),
        ("X-Amz-Signature", True),
        ("%6Bey", True),
        ("code", True),
        ("session", True),
        ("sessionId", True),
        ("sid", True),
        ("pass", True),
        ("client_secret", True),
        ("monkey", False),
        ("keys", False),
        ("codec", False),
        ("passage", False),
        ("api-version", False),
        ("alt", False),
    ],
)
def test_which_query_parameters_are_masked_in_log_lines(name: str, masked: bool) -> None:
    line = redact_query_key(f"POST /v1/models/m:streamGenerateContent?alt=sse&{name}=VALUE x")
    assert ("VALUE" not in line) is masked and line.startswith("POST /v1/models/m:stream")
    assert "alt=sse" in line or name == "alt"


def test_tenant_scopes() -> None:
    default = CachePolicy()
    a = default.tenant_of({"authorization": "Bearer a"})
    assert a != default.tenant_of({"authorization": "Bearer b"}) and a.startswith("t:")
    assert default.tenant_of({}) is None  # nobody to scope by: not cached
    assert default.tenant_of({"Authorization": "Bearer a"}) == a  # names in any case
    body = policy_body = json.dumps({"model": "m", "input": "x"}).encode()
    reason = default.decide("POST", "/v1/responses", {}, policy_body).reason
    # What to set, in code and on the proxy's command line (it named tenant= alone, which
    # the proxy's operators cannot set: helper-101).
    assert "no credential" in reason and "tenant=" in reason
    assert "--credential-header" in reason and "--shared-tenant" in reason
    assert CachePolicy(tenant=SHARED_TENANT).decide("POST", "/v1/responses", {}, body).cacheable
    assert CachePolicy(tenant=SHARED_TENANT).tenant_of({"authorization": "Bearer a"}) == ""
    custom = CachePolicy(tenant=lambda h: h.get("x-org", ""))
    assert custom.tenant_of({"x-org": "acme"}) == "c:acme"
    # A callable that cannot tell who is asking ("" or None) does not make one scope of
    # everyone it cannot tell apart: such requests are not cached, as by default.
    assert custom.tenant_of({}) is None
    assert custom.decide("POST", "/v1/responses", {}, body).reason == (
        "the tenant callable returned no scope"
    )
    assert CachePolicy(tenant=lambda h: h.get("x-org")).tenant_of({}) is None
    with pytest.raises(ConfigError, match="tenant"):
        CachePolicy(tenant="everyone")


@pytest.mark.parametrize("tenant", [True, ["x-org-id"], {"x-org-id": "a"}, 7, b"shared"])
def test_a_tenant_of_a_wrong_type_is_refused_at_construction(tenant: object) -> None:
    # Accepted before, it failed every cached request later (AssertionError, or a TypeError
    # under -O).
    with pytest.raises(ConfigError, match=r"^tenant must be None, a callable or 'shared', got"):
        CachePolicy(tenant=tenant)  # type: ignore[arg-type]


def test_a_tenant_callable_returning_a_non_string_is_logged_and_not_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server's callable is wrong, not the request: no ConfigError (which the HTTP layer
    # answers 400 invalid_request_error), but a warning and a request forwarded uncached.
    policy = CachePolicy(tenant=lambda h: 42)  # type: ignore[arg-type,return-value]
    body = json.dumps({"model": "m", "input": "x"}).encode()
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert policy.tenant_of({}) is None
        decision = policy.decide("POST", "/v1/responses", {}, body)
    assert not decision.cacheable
    assert "tenant callable" in decision.reason and "returned 42" in decision.reason
    assert decision.route == "POST /v1/responses"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "returned 42, not a string or None" in warned[0].getMessage()


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"routes": []}, "routes"),
        ({"routes": "/v1/responses"}, "routes"),
        ({"origin": 1.5}, "origin"),
        ({"max_body_bytes": float("nan")}, "max_body_bytes"),
        ({"max_body_bytes": "4MiB"}, "max_body_bytes"),
        ({"max_body_bytes": True}, "max_body_bytes"),
    ],
)
def test_bad_policy_options_are_refused_naming_them(options: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be .*, got "):
        CachePolicy(**options)  # type: ignore[arg-type]


def test_controls_parse() -> None:
    assert parse_controls({}) == Controls()
    c = parse_controls(
        {
            "cache-control": "no-cache, no-store",
            "x-sse-cache-ttl": "60",
            "x-sse-cache-max-age": "0",
            "x-sse-cache-namespace": "team-a",
            "x-sse-cache-refresh": "1",
            "x-sse-cache-variants": "3",
            "x-sse-cache-ignore-fields": "user, metadata",
            "x-sse-cache-replay": "2x",
        }
    )
    assert (c.lookup, c.store, c.refresh, c.ttl, c.max_age) == (False, False, True, 60.0, 0.0)
    assert c.namespace == "team-a" and c.variants == 3
    assert c.ignore_fields == {"user", "metadata"} and c.pacing == Pacing("original", factor=2.0)


@pytest.mark.parametrize(
    ("headers", "lookup", "max_age"),
    [
        ({"cache-control": "max-age=30"}, True, 30.0),
        ({"cache-control": 'max-age="30"'}, True, 30.0),
        ({"cache-control": "Max-Age = 0"}, True, 0.0),
        ({"cache-control": "max-age=soon"}, True, 0.0),  # (not delta-seconds: fresh, asked)
        ({"cache-control": "max-age=30", "x-sse-cache-max-age": "10"}, True, 10.0),
        ({"cache-control": "max-age=5", "x-sse-cache-max-age": "10"}, True, 5.0),
        ({"cache-control": "max-stale, private"}, True, None),
        ({"pragma": "no-cache"}, False, None),
        ({"pragma": "no-cache", "cache-control": "max-age=60"}, True, 60.0),  # (RFC 9111 §5.4)
    ],
)
def test_the_standard_request_directives(
    headers: dict[str, str], lookup: bool, max_age: float | None
) -> None:
    # A browser's fetch(cache: "no-cache") sends Pragma too; max-age=N asks for no answer
    # older than N seconds, as x-sse-cache-max-age does. Both were ignored (helper-157).
    controls = parse_controls(headers)
    assert (controls.lookup, controls.max_age) == (lookup, max_age)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-sse-cache-ttl", "abc"),
        ("x-sse-cache-ttl", "-5"),
        ("x-sse-cache-ttl", "inf"),
        ("x-sse-cache-ttl", "1e308"),
        ("x-sse-cache-max-age", "-1"),
        ("x-sse-cache-max-age", "nan"),
        ("x-sse-cache-namespace", "has space"),
        ("x-sse-cache-namespace", "x" * 200),
        ("x-sse-cache-variants", "0"),
        ("x-sse-cache-variants", "1000"),
        ("x-sse-cache-ignore-fields", "ok, b@d"),
        ("x-sse-cache-replay", "fast"),
        ("x-sse-cache-refresh", "maybe"),
    ],
)
def test_bad_control_values_name_the_header(header: str, value: str) -> None:
    with pytest.raises(ConfigError, match=header):
        parse_controls({header: value})


@pytest.mark.parametrize("value", ["1e308", "inf", "1e999", "Infinity", str(MAX_TTL + 1)])
def test_a_ttl_past_a_year_is_refused_naming_the_header_and_the_limit(value: str) -> None:
    # A TTL of 1e308 was stored, and each hit carried a 309-digit x-sse-cache-ttl. A max-age
    # that long only accepts any entry (one stored without a TTL may be older than a year).
    with pytest.raises(ConfigError) as info:
        parse_controls({"x-sse-cache-ttl": value})
    expected = f"x-sse-cache-ttl must be at most 31536000 seconds (one year), got {value!r}"
    assert str(info.value) == expected
    assert parse_controls({"x-sse-cache-max-age": value}).max_age == float(value)


def test_seconds_up_to_a_year_are_taken() -> None:
    assert MAX_TTL == 365 * 86400
    controls = parse_controls({"x-sse-cache-ttl": str(MAX_TTL), "x-sse-cache-max-age": "0"})
    assert (controls.ttl, controls.max_age) == (MAX_TTL, 0.0)
    assert parse_controls({"x-sse-cache-max-age": str(MAX_TTL)}).max_age == MAX_TTL
    for header in ("x-sse-cache-ttl", "x-sse-cache-max-age"):
        with pytest.raises(
            ConfigError, match=f"^{header} must be a .* number of seconds, got 'nan'"
        ):
            parse_controls({header: "nan"})


def test_a_url_in_an_error_message_never_shows_its_password() -> None:
    # Whatever precedes the last "@" goes, even in URLs no parser reads (a password with an
    # unencoded "/" or "?", an unclosed IPv6 bracket).
    from sse_cache._logging import redact_userinfo

    cases = {
        "redis://user:pa/ss?w@host:6379/0": "redis://***@host:6379/0",
        "redis://:s3cret@[::1": "redis://***@[::1",
        "user:pw@host": "***@host",
        "sqlite:///./x.db": "sqlite:///./x.db",
        "http://a@b@c/p": "http://***@c/p",
    }
    for url, shown in cases.items():
        assert redact_userinfo(url) == shown, url


def test_a_logged_path_is_the_path_as_sent_without_its_query_or_controls() -> None:
    # ASGI keeps the query apart (query_string), and the access line appends it; a server
    # (or test client) that leaves it in raw_path too had it logged twice.
    from sse_cache._logging import logged_path

    cases = {
        b"/v1/chat/completions?api-version=1": "/v1/chat/completions",
        b"/v1/chat%2Fcompletions": "/v1/chat%2Fcompletions",
        b"/x\nforged?q=1": "/x\\x0aforged",
    }
    for raw, shown in cases.items():
        assert logged_path({"raw_path": raw, "path": "/decoded"}) == shown, raw
    assert logged_path({"path": "/v1/messages"}) == "/v1/messages"


def test_variants_pick_within_range() -> None:
    picks = {CachePolicy.pick_variant(Controls(variants=3)) for _ in range(200)}
    assert picks == {0, 1, 2}
    assert CachePolicy.pick_variant(Controls()) == 0


def test_key_headers_are_taken_from_the_request() -> None:
    policy = CachePolicy()
    body = json.dumps({"model": "c", "messages": [], "max_tokens": 5}).encode()
    headers = {
        "x-api-key": "k",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "x",
        "other": "y",
    }
    decision = policy.decide("POST", "/v1/messages", headers, body)
    assert decision.key_headers == {"anthropic-version": "2023-06-01", "anthropic-beta": "x"}
    assert policy.decide("POST", "/v1/responses", headers, BODY).key_headers == {}
    # One API key in several OpenAI organisations or projects: each its own answers.
    # Gemini's response field mask: an answer without the fields it leaves out.
    openai = {"authorization": "Bearer k", "openai-organization": "org-1", "openai-project": "p"}
    for route in ("/v1/responses", "/v1/chat/completions"):
        keyed = policy.decide("POST", route, openai, BODY).key_headers
        assert keyed == {"openai-organization": "org-1", "openai-project": "p"}
    masked = {"x-goog-api-key": "k", "x-goog-fieldmask": "candidates.content"}
    gemini = policy.decide("POST", "/v1beta/models/g:generateContent", masked, b"{}")
    assert gemini.key_headers == {"x-goog-fieldmask": "candidates.content"}
    # One OAuth token, several Google Cloud projects (helper-123: they shared entries).
    billed = {"authorization": "Bearer ya29", "x-goog-user-project": "proj-a"}
    vertex = policy.decide("POST", "/v1beta/models/g:generateContent", billed, b"{}")
    assert vertex.key_headers == {"x-goog-user-project": "proj-a"}
    # A generic route (legacy completions, vLLM) reads the same headers: one key with two
    # projects shared an entry (helper-169).
    generic = CachePolicy({"/v1/completions": GenericSSE})
    for name in (
        "openai-organization",
        "openai-project",
        "openai-beta",
        "anthropic-version",
        "anthropic-beta",
    ):
        one, two = (
            generic.decide("POST", "/v1/completions", {"authorization": "k", name: v}, BODY)
            for v in ("one", "two")
        )
        assert one.cacheable and one.key_headers == {name: "one"}, name
        assert two.key_headers == {name: "two"}, name
    plain = generic.decide("POST", "/v1/completions", {"authorization": "k"}, BODY)
    assert plain.key_headers == {}


def test_the_request_path_and_query_are_part_of_the_route() -> None:
    policy = CachePolicy({"/chat/completions": OpenAIChat})
    body = json.dumps({"messages": [], "stream": True}).encode()
    a = policy.decide("POST", "/openai/deployments/a/chat/completions", {}, body, "api-version=1")
    b = policy.decide("POST", "/openai/deployments/b/chat/completions", {}, body, "api-version=1")
    assert a.route != b.route  # two deployments never share an entry
    c = policy.decide(
        "POST", "/openai/deployments/a/chat/completions/", {}, body, "x=2&api-version=1"
    )
    d = policy.decide(
        "POST", "/openai/deployments/a/chat/completions", {}, body, "api-version=1&x=2"
    )
    assert d.route == "POST /openai/deployments/a/chat/completions?api-version=1&x=2"
    # A trailing slash matches the route, but keys apart: the upstream may answer that path
    # otherwise (a 404, say).
    assert c.route == "POST /openai/deployments/a/chat/completions/?api-version=1&x=2"
    e = policy.decide(
        "POST", "/openai/deployments/a/chat/completions", {}, body, "x=2&api-version=1"
    )
    assert e.route == d.route  # the parameters' order never changes an answer
    assert (
        policy.decide("POST", "/v1/chat/completions", {}, body).route == "POST /v1/chat/completions"
    )


def test_queries_an_upstream_may_read_apart_never_share_a_route() -> None:
    # Keyed as the upstream reads them (helper-80): the order of a name's values (the first
    # or the last wins upstream, by its framework), and the bytes an escape stands for (any
    # invalid UTF-8 was one U+FFFD: %ff, %fe and %EF%BF%BD shared an entry).
    policy = CachePolicy({"/events": GenericSSE})
    body = json.dumps({"q": 1}).encode()

    def route(query: str) -> str:
        return policy.decide("POST", "/events", {}, body, query).route

    assert route("v=2024&v=2025") != route("v=2025&v=2024")
    assert route("v=2024&x=1&v=2025") == route("x=1&v=2024&v=2025")  # other names: any order
    escaped = {route(q) for q in ("x=%ff", "x=%fe", "x=%EF%BF%BD", "x=%C3%A9")}
    assert len(escaped) == 4
    assert route("x=%C3%A9") == "POST /events?x=%C3%A9"  # UTF-8 as before
    # A query given decoded (the public decide(); the integrations pass it raw): its
    # characters as their UTF-8 bytes, as a client sends them, never an error.
    assert route("x=café€") == route("x=caf%C3%A9%E2%82%AC") == "POST /events?x=caf%C3%A9%E2%82%AC"
    # The ?key= credential too: each key its own tenant.
    assert policy.tenant_of({}, "key=%ff") != policy.tenant_of({}, "key=%fe")
    # What decodes alike but a server may read apart (helper-157): a ";" (a separator to
    # some), a "+" (a space, or itself), an escape that is none (kept, or refused).
    for one, other in (("a=1;b=2", "a=1%3Bb=2"), ("a=b+c", "a=b%20c"), ("a=%zz", "a=%25zz")):
        assert route(one) != route(other), (one, other)
    assert route("b=1;x&a=2") == route("a=2&b=1;x")  # (other names: any order, still)
    assert route("€=a+b") != route("€=a%20b")  # (a name given decoded: helper-161)
    assert "SECRET" not in route("a=b+c&key=SECRET+1")  # (the credential is never in it)
    # What an adapter's route drops stays out of it: Gemini's stream (alt=sse) and JSON
    # requests still share one entry (helper-159).
    gemini, body = CachePolicy(), json.dumps({"contents": []}).encode()
    model = "/v1beta/models/gemini-2.0-flash"
    streamed = gemini.decide("POST", f"{model}:streamGenerateContent", {}, body, "alt=sse&l=a+b")
    plain = gemini.decide("POST", f"{model}:generateContent", {}, body, "l=a+b")
    assert streamed.route == plain.route and "as sent: l=a+b" in plain.route


def test_the_server_answering_is_part_of_the_route() -> None:
    body = json.dumps({"messages": [], "stream": True}).encode()
    proxy = CachePolicy({"/chat/completions": OpenAIChat}, origin="HTTPS://Api.Example.com:443/")
    assert proxy.origin == "https://api.example.com"
    assert (
        proxy.decide("POST", "/v1/chat/completions", {}, body, "x=1").route
        == "POST https://api.example.com/v1/chat/completions?x=1"
    )
    # A transport's request names its own server, whatever the policy's.
    mine = proxy.decide("POST", "/v1/chat/completions", {}, body, origin="http://127.0.0.1:8001")
    assert mine.route == "POST http://127.0.0.1:8001/v1/chat/completions"
    assert origin_of("http://user:secret@[::1]:8080/base/?q=1#f") == "http://[::1]:8080/base"
    assert origin_of("http://h:80") == origin_of("http://H/") == "http://h"
    assert origin_of("https://h:8443") == "https://h:8443"
    for bad in ("ftp://h", "http://", "http://h:99999", "/relative"):
        with pytest.raises(ConfigError, match="origin"):
            origin_of(bad)


def test_other_gateway_credential_headers_scope_tenants() -> None:
    policy = CachePolicy()
    for header in ("x-goog-api-key", "ocp-apim-subscription-key", "x-litellm-api-key"):
        assert policy.tenant_of({header: "a"}) != policy.tenant_of({header: "b"})
        assert policy.tenant_of({header: "a"}) != ""


def test_an_ai_gateways_own_credential_scopes_tenants_beside_a_placeholder_authorization() -> None:
    # Clients of an AI gateway send the SDK's (placeholder or shared) Authorization and their
    # own identity in the gateway's header: two Portkey users shared an entry (helper-88).
    policy = CachePolicy()
    placeholder = {"authorization": "Bearer placeholder"}
    for header in (
        "x-portkey-api-key",
        "x-portkey-virtual-key",
        "cf-aig-authorization",
        "helicone-auth",
        # No list names them: their names end like a credential's.
        "x-acme-api-key",
        "x-acme-authorization",
        "acme-auth",
        "x-acme-token",
        "x-acme-secret",
        "x-acme-apikey",
        # Azure Functions' key; a credential spelt with "_" (helper-123: both shared entries).
        "x-functions-key",
        "x_api_key",
        "x_acme_token",
        # Cloudflare's legacy key, an access key (helper-147).
        "x-auth-key",
        "x-access-key",
        "x_auth_key",
        # Who an identity-aware proxy in front authenticated (helper-169: its users, with one
        # placeholder Authorization, shared entries).
        "x-amzn-oidc-identity",
        "x-amzn-oidc-accesstoken",
        "cf-access-jwt-assertion",
        "cf-access-authenticated-user-email",
        "x-goog-authenticated-user-id",
        "x-goog-authenticated-user-email",
        "x-ms-client-principal",
        "x-ms-client-principal-id",
        "x-ms-client-principal-name",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-preferred-username",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-auth-request-preferred-username",
        "remote-user",
        "x-remote-user",
        "x-jwt-assertion",
    ):
        a = policy.tenant_of({**placeholder, header: "user-1"})
        b = policy.tenant_of({**placeholder, header: "user-2"})
        assert a != b and None not in (a, b), header
        assert a != policy.tenant_of(placeholder), header
        # Alone, it scopes a request that carries no other credential.
        assert policy.tenant_of({header: "user-1"}) not in (None, ""), header
    # Headers that only look alike are no credentials: no scope without one.
    for header in ("x-stainless-retry-count", "idempotency-key", "x-request-id", "x-tokens"):
        assert policy.tenant_of({header: "x"}) is None, header
        assert policy.tenant_of({**placeholder, header: "x"}) == policy.tenant_of(placeholder)


def test_more_credential_and_key_headers_are_options() -> None:
    from sse_cache.http.service import CacheService

    service = CacheService(
        "memory://", CacheOptions(credential_headers=["X-Session"], key_headers=["X-Account"])
    )
    policy = service.policy
    body = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()
    a = policy.decide("POST", "/v1/responses", {"x-session": "a"}, body)
    b = policy.decide("POST", "/v1/responses", {"x-session": "b"}, body)
    assert a.cacheable and b.cacheable and a.tenant != b.tenant
    one = policy.decide("POST", "/v1/responses", {"x-session": "a", "x-account": "1"}, body)
    two = policy.decide("POST", "/v1/responses", {"x-session": "a", "x-account": "2"}, body)
    assert one.key_headers == {"x-account": "1"} and two.key_headers == {"x-account": "2"}
    # A gateway's routing headers key every route already; the adapters' own stay keyed.
    routed = policy.decide(
        "POST",
        "/v1/responses",
        {"authorization": "k", "x-portkey-provider": "openai", "openai-project": "p"},
        body,
    )
    assert routed.key_headers == {"openai-project": "p", "x-portkey-provider": "openai"}
    # LiteLLM's tag-based routing picks the deployment (helper-147: a "paid" request was
    # answered from a "free" one's entry).
    tagged = policy.decide(
        "POST", "/v1/responses", {"authorization": "k", "x-litellm-tags": "a"}, body
    )
    assert tagged.key_headers == {"x-litellm-tags": "a"}
    # Helicone's choice of provider or resource, behind one Helicone-Auth (helper-169).
    for name in ("helicone-target-url", "helicone-openai-api-base", "helicone-target-provider"):
        one, two = (
            policy.decide("POST", "/v1/responses", {"helicone-auth": "h", name: v}, body)
            for v in ("https://a.example", "https://b.example")
        )
        assert one.key_headers == {name: "https://a.example"}, name
        assert two.key_headers == {name: "https://b.example"}, name
    # Alone, a routing header is no credential: such a request is not cached.
    assert not policy.decide("POST", "/v1/responses", {"x-account": "1"}, body).cacheable
    for bad in ("x-session", ["bad name"], [7]):
        with pytest.raises(ConfigError, match="^credential_headers must be a list of header"):
            CacheOptions(credential_headers=bad)
    with pytest.raises(ConfigError, match="^key_headers must be a list of header"):
        CacheOptions(key_headers="x-account")


@pytest.mark.parametrize("depth", [64, 500, 50_000])
def test_a_body_nested_too_deep_is_forwarded_uncached(
    depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Deeper than MAX_BODY_DEPTH: never keyed (canonicalising is recursive), never an error.
    body = ('{"model": "m", "input": ' + "[" * depth + "]" * depth + "}").encode()
    with caplog.at_level(logging.INFO, logger="sse_cache"):
        decision = CachePolicy().decide("POST", "/v1/responses", {"authorization": "k"}, body)
    assert not decision.cacheable and "nested deeper than 64" in decision.reason
    assert [r.getMessage() for r in caplog.records] == [
        f"sse_cache: POST /v1/responses forwarded uncached: {decision.reason}"
    ]
    shallow = ('{"model": "m", "input": ' + "[" * 63 + "]" * 63 + "}").encode()
    assert CachePolicy().decide("POST", "/v1/responses", {"authorization": "k"}, shallow).cacheable


def test_a_body_of_too_many_objects_is_forwarded_uncached_before_it_is_decoded() -> None:
    # Checking, keying and canonicalising walk every object in Python, on the event loop:
    # a 4 MiB body of empty objects held it for a second (helper-83). Counted in C first.
    policy = CachePolicy()
    headers = {"authorization": "k"}
    many = json.dumps({"model": "m", "input": [{}] * (MAX_BODY_CONTAINERS + 1)}).encode()
    decision = policy.decide("POST", "/v1/responses", headers, many)
    assert not decision.cacheable
    assert (
        decision.reason == f"request body holds more than {MAX_BODY_CONTAINERS} objects and arrays"
    )
    enough = json.dumps({"model": "m", "input": [{}] * (MAX_BODY_CONTAINERS - 2)}).encode()
    assert policy.decide("POST", "/v1/responses", headers, enough).cacheable


def test_every_credential_header_is_part_of_the_tenant_scope() -> None:
    # A gateway whose clients all send one constant Authorization, while the upstream
    # authenticates by x-api-key: their tenants must stay apart.
    policy = CachePolicy()
    constant = {"authorization": "Bearer gateway"}
    a = policy.tenant_of({**constant, "x-api-key": "tenant-a"})
    b = policy.tenant_of({**constant, "x-api-key": "tenant-b"})
    assert a != b and a != policy.tenant_of(constant)
    # One credential alone keeps the scope it always had (stored entries stay reachable).
    digest = hashlib.blake2b(b"authorization\0Bearer gateway", digest_size=16).hexdigest()
    assert policy.tenant_of(constant) == "t:" + digest


CREDENTIAL_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
)


@given(
    creds=st.dictionaries(st.sampled_from(CREDENTIAL_HEADERS), CREDENTIAL_VALUES, min_size=1),
    changed=st.sampled_from(CREDENTIAL_HEADERS),
    other=CREDENTIAL_VALUES,
)
def test_requests_differing_in_any_one_credential_never_share_a_scope(
    creds: dict[str, str], changed: str, other: str
) -> None:
    altered = {**creds, changed: other}
    if altered == creds:
        return
    assert tenant_scope(creds) != tenant_scope(altered)
    # Header names are case-insensitive, the order they came in does not matter.
    upper = {k.upper(): v for k, v in reversed(list(creds.items()))}
    assert tenant_scope(upper) == tenant_scope(creds)


def test_matching_is_remembered_per_path_and_bounded() -> None:
    # match() runs three times per request (middleware, access log, decide), so its answer is
    # remembered by path; clients choose paths, so what it remembers stays bounded.
    policy = CachePolicy()
    assert policy.match("POST", "/v1/responses") == policy.match("post", "/v1/responses/")
    assert policy.match("GET", "/v1/responses") is None  # the method is never remembered
    assert policy.match("POST", "/v1/responses") is not None
    for n in range(5_000):
        assert policy.match("POST", f"/not/cached/{n}") is None
    assert len(policy._matched) <= 1024
    route, _ = policy.match("POST", "/openai/v1/chat/completions") or ("", None)
    assert route == "/v1/chat/completions"


def test_a_bad_origin_is_a_config_error_without_its_password() -> None:
    for bad, why in (
        ("http://u:hunter2@h:99999", "bad port"),
        ("http://u:hunter2@[::1", "IPv6"),
        ("ftp://u:hunter2@h", "http"),
    ):
        with pytest.raises(ConfigError, match=why) as info:
            origin_of(bad)
        assert "origin" in str(info.value) and "***@" in str(info.value)
        assert "hunter2" not in str(info.value)
    # Another name for the same checks: the proxy's upstream.
    with pytest.raises(ConfigError, match=r"^upstream .*'http://\*\*\*@h:99999'"):
        origin_of("http://u:hunter2@h:99999", "upstream")


def test_an_upstream_is_a_base_url_without_query_or_fragment() -> None:
    assert base_url_of("HTTPS://u:pw@Host:8443/v1/") == "https://u:pw@Host:8443/v1"
    for bad in ("http://h?key=SECRET", "http://u:hunter2@h/v1#f", "http://h/?"):
        with pytest.raises(ConfigError, match=r"upstream must be a base URL .*query") as info:
            base_url_of(bad)
        assert "SECRET" not in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("route", "body", "why"),
    [
        ("/v1/chat/completions", {"stream": 1}, "stream is 1, not true or false"),
        ("/v1/responses", {"stream": "true"}, "stream is 'true', not true or false"),
        ("/v1/messages", {"stream": 0}, "stream is 0, not true or false"),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage is 1, not true or false",
        ),
        ("/v1/chat/completions", {"stream_options": "usage"}, "stream_options is not an object"),
        ("/v1/responses", {"conversation": "conv_1"}, "continues a conversation"),
        ("/v1/responses", {"conversation": {"id": "conv_1"}}, "continues a conversation"),
    ],
)
def test_requests_an_upstream_may_read_otherwise_than_the_key_are_not_cached(
    route: str, body: dict[str, object], why: str
) -> None:
    # The cache reads only true as true; a lenient upstream (vLLM, LiteLLM) reads 1 and
    # "true" as true too: "stream": 1 was keyed as a non-stream and streamed, and stored
    # under the key of the non-streams (helper-80). Such a request, and one whose answer
    # the upstream adds to a conversation (state a replay would skip), go uncached.
    policy = CachePolicy()
    request = json.dumps({"model": "m", "input": "hi", **body}).encode()
    decision = policy.decide("POST", route, {"authorization": "Bearer k"}, request)
    assert decision.adapter is None and why in decision.reason


@pytest.mark.parametrize("stream", [True, False, None])
def test_a_stream_flag_that_is_true_false_or_null_is_cached(stream: bool | None) -> None:
    policy = CachePolicy({"/events": GenericSSE, "/chat/completions": OpenAIChat})
    for route in ("/events", "/v1/chat/completions"):
        options = {"include_usage": stream}
        body = json.dumps({"model": "m", "stream": stream, "stream_options": options}).encode()
        decision = policy.decide("POST", route, {"authorization": "Bearer k"}, body)
        assert decision.adapter is not None, decision.reason
