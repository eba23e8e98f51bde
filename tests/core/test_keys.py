"""DefaultKeyer and tenant scopes."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_cache import CacheRequest, ConfigError, DefaultKeyer
from sse_cache.adapters import GenericSSE
from sse_cache.entry import ENTRY_FORMAT_VERSION
from sse_cache.keys import (
    CREDENTIAL_HEADERS,
    CREDENTIAL_SUFFIXES,
    canonical_json,
    live_alias_target,
    lowered_tenant_scope,
    new_lease_token,
    parse_live_alias_target,
    tenant_scope,
)

keyer = DefaultKeyer()
adapter = GenericSSE()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(min_size=1), json_values, max_size=6)


def key_of(body: dict[str, object], **kw: str) -> str:
    fields = adapter.key_fields(body)
    return keyer.key(CacheRequest(schema=adapter.name, route="POST /v1/x", fields=fields, **kw))


@given(bodies, st.randoms())
def test_key_order_and_whitespace_never_change_the_key(body: dict[str, object], rnd) -> None:  # type: ignore[no-untyped-def]
    items = list(body.items())
    rnd.shuffle(items)
    reparsed = json.loads(json.dumps(dict(items), indent=3))
    assert key_of(reparsed) == key_of(body)


@given(bodies, st.booleans())
def test_stream_flag_never_changes_the_key(body: dict[str, object], stream: bool) -> None:
    assert key_of({**body, "stream": stream}) == key_of(
        {k: v for k, v in body.items() if k != "stream"}
    )


@given(bodies, st.text(min_size=1), st.text(min_size=1))
def test_tenants_and_namespaces_separate_keys(body: dict[str, object], a: str, b: str) -> None:
    if a != b:
        assert key_of(body, tenant=a) != key_of(body, tenant=b)
        assert key_of(body, namespace=a) != key_of(body, namespace=b)


def test_fields_that_define_the_answer_change_the_key() -> None:
    base = {"model": "m", "input": "hi", "temperature": 0.2}
    assert key_of(base) != key_of({**base, "input": "hi!"})
    assert key_of(base) != key_of({**base, "model": "n"})
    assert key_of(base) != key_of({**base, "temperature": 0.3})


def test_integral_floats_key_like_ints() -> None:
    assert canonical_json({"t": 1.0, "a": [2.0, 0.5]}) == b'{"a":[2,0.5],"t":1}'
    assert key_of({"temperature": 1}) == key_of({"temperature": 1.0})


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        ({1, 2}, "set"),
        (b"x", "bytes"),
        (decimal.Decimal("1.5"), "Decimal"),
        (datetime.date(2026, 12, 7), "date"),
        ("cut \ud83d", "lone surrogate"),
    ],
)
def test_a_value_no_json_body_can_hold_is_refused_not_keyed_as_another(
    value: object, named: str
) -> None:
    # Python code (the engine's callers: json.loads reads NaN and 1e999) may hand such
    # values over. msgspec wrote NaN and the infinities as null, a set as an array, bytes as
    # base64 text, a Decimal or a date as a string: each keyed as the request holding that
    # JSON value, and was answered from its entry (helper-158).
    with pytest.raises(ConfigError, match=re.escape(named)):
        key_of({"model": "m", "temperature": [value]})
    # Equal JSON in other Python shapes keys alike: a tuple as a list, a mapping as a dict.
    assert key_of({"a": (1, 2.0)}) == key_of({"a": [1, 2]})
    assert key_of({"a": types.MappingProxyType({"b": 1})}) == key_of({"a": {"b": 1}})


def test_no_part_can_bleed_into_its_neighbour() -> None:
    a = keyer.key(CacheRequest(schema="s", route="ab", fields={}, tenant="c"))
    b = keyer.key(CacheRequest(schema="s", route="a", fields={}, tenant="bc"))
    assert a != b


def test_key_is_hex_blake2b_256_and_salt_separates_deployments() -> None:
    k = key_of({"x": 1})
    assert len(k) == 64 and int(k, 16) >= 0
    salted = DefaultKeyer(salt="other").key(
        CacheRequest(schema="generic", route="POST /v1/x", fields={"x": 1})
    )
    assert salted != k


def test_tenant_scope_hashes_the_credential() -> None:
    a = tenant_scope({"Authorization": "Bearer sk-a"})
    b = tenant_scope([("authorization", "Bearer sk-b")])
    assert a != b and a.startswith("t:") and "sk-a" not in a
    assert tenant_scope({"x-api-key": "k"}) == tenant_scope({"X-API-Key": "k"})
    assert tenant_scope({"content-type": "x"}) == ""


@given(st.text(min_size=1), st.text(min_size=1), bodies)
def test_different_credentials_never_share_a_key(c1: str, c2: str, body: dict[str, object]) -> None:
    if c1 != c2:
        t1 = tenant_scope({"authorization": c1})
        t2 = tenant_scope({"authorization": c2})
        assert key_of(body, tenant=t1) != key_of(body, tenant=t2)


def test_answer_defining_headers_change_the_key_only_when_present() -> None:
    base = CacheRequest(schema="s", route="r", fields={"a": 1})
    assert keyer.key(base) == keyer.key(
        CacheRequest(schema="s", route="r", fields={"a": 1}, headers={})
    )
    v1 = CacheRequest(schema="s", route="r", fields={"a": 1}, headers={"anthropic-version": "1"})
    v2 = CacheRequest(schema="s", route="r", fields={"a": 1}, headers={"anthropic-version": "2"})
    assert len({keyer.key(base), keyer.key(v1), keyer.key(v2)}) == 3


def test_keys_are_stable_across_releases() -> None:
    # Stored entries are found by these digests: a change to how a key is computed would turn
    # every stored answer into a miss after an upgrade, and keep processes of two releases
    # sharing one backend from ever sharing an entry. (Values computed by the release before
    # the key was built in one buffer instead of one update per part; ENTRY_FORMAT_VERSION is
    # part of the key, so bumping it changes them on purpose.)
    plain = CacheRequest(
        schema="openai-responses",
        route="POST /v1/responses",
        fields={"model": "o3-mini", "input": "hi", "temperature": 1.0},
        tenant="t:abc",
    )
    full = CacheRequest(
        schema="anthropic-messages",
        route="POST /v1/messages",
        fields={"model": "claude", "messages": [{"role": "user", "content": "x"}]},
        namespace="ns",
        variant=2,
        headers={"anthropic-version": "2023-06-01"},
        ignored=("metadata", "user"),
    )
    assert ENTRY_FORMAT_VERSION == 2
    assert DefaultKeyer().key(plain) == (
        "090239905347f5f99c1db34fda25079259b46ac60d2e5317231b08cab9046cc6"
    )
    assert DefaultKeyer(salt="s1").key(plain) == (
        "8a4c81704e9650118e0355a582b09947443f047ebd9ab7fda6c0970713c372ae"
    )
    assert DefaultKeyer().key(full) == (
        "c1afa49aed3b51a88b3a230bb2fd3da4cc433bdfda02f102c1f600764e9e429d"
    )
    assert DefaultKeyer(salt="s1").key(full) == (
        "423bd362af53d158f7836afe3b0da4b9affaa500f22dd16d15b3e9c0e0be90e5"
    )
    credentials = {"Authorization": "Bearer sk-1", "X-Api-Key": "k"}
    assert tenant_scope(credentials) == "t:f99efe68013b5682acad13d2046870a3"
    lowered = tuple(dict.fromkeys(h.lower() for h in CREDENTIAL_HEADERS))
    assert lowered_tenant_scope({k.lower(): v for k, v in credentials.items()}, lowered) == (
        "t:f99efe68013b5682acad13d2046870a3"
    )
    # tenant_scope hands the default lists on as they are: lower-case, without repeats.
    assert lowered == CREDENTIAL_HEADERS
    assert tuple(s.lower() for s in CREDENTIAL_SUFFIXES) == CREDENTIAL_SUFFIXES


def test_the_credential_names_remembered_are_those_of_the_lists_asked_about() -> None:
    # Remembered per list object (by identity, each kept with its memo): two lists, each
    # asked about again as a new tuple of the same or other names, never answer for each
    # other — whatever object ids Python reuses.
    headers = {"authorization": "a", "x-session": "s", "x-acme-token": "t"}
    for _ in range(3):
        only_sessions = tuple(name for name in ["x-session"])  # (a new tuple each time)
        assert lowered_tenant_scope(headers, only_sessions, ()) == lowered_tenant_scope(
            {"x-session": "s"}, ("x-session",), ()
        )
        assert lowered_tenant_scope(
            headers, tuple(name for name in ["authorization"]), ("-token",)
        ) == (
            lowered_tenant_scope(
                {"authorization": "a", "x-acme-token": "t"}, ("authorization",), ("-token",)
            )
        )


def test_a_keyer_that_remembers_many_key_heads_keys_as_a_new_one() -> None:
    # The keyer remembers the fixed head of a key (schema, route, tenant, namespace, variant)
    # and forgets them all when it holds too many: a remembered head, and one written again
    # after that, give the key a new keyer gives; a head is never another request's.
    used = DefaultKeyer(salt="s1")

    def request(tenant: str, variant: int = 0) -> CacheRequest:
        return CacheRequest(
            schema="openai-responses",
            route="POST /v1/responses",
            fields={"model": "o3-mini", "input": "hi"},
            tenant=tenant,
            variant=variant,
        )

    for round_ in range(3):  # fresh, remembered, then after the memory was cleared (twice)
        for n in range(1500):
            tenant = f"t:{n:032x}"
            assert used.key(request(tenant, n % 3)) == DefaultKeyer(salt="s1").key(
                request(tenant, n % 3)
            ), (round_, n)
    assert used.key(request("t:a")) != used.key(request("t:b"))
    assert used.key(request("t:a", 1)) != used.key(request("t:a", 2))


def test_a_key_never_depends_on_the_requests_keyed_before_it() -> None:
    # Equal values of other types share a remembered head's slot (True == 1, 1.0 == 1,
    # -0.0 == 0.0) but not their text: a key must still be what a new keyer computes.
    def request(variant: object) -> CacheRequest:
        return CacheRequest(schema="s", route="r", fields={"a": 1}, tenant="t", variant=variant)  # type: ignore[arg-type]

    for first, second in [(1, True), (True, 1), (1, 1.0), (0, False), (0.0, -0.0)]:
        used = DefaultKeyer()
        used.key(request(first))
        assert used.key(request(second)) == DefaultKeyer().key(request(second)), (first, second)


def test_a_list_of_credential_headers_of_ones_own_says_all_there_is() -> None:
    # tenant_scope(h, [...]) with a list of one's own (a tenant callable's) scopes by that
    # list alone: names ending like a credential's join only the default list (helper-90).
    mine = ["x-my-key"]
    a = {"x-my-key": "k", "authorization": "Bearer one", "x-acme-token": "t1"}
    b = {"x-my-key": "k", "authorization": "Bearer two", "x-acme-token": "t2"}
    assert tenant_scope(a, mine) == tenant_scope(b, mine) != ""
    assert tenant_scope(a) != tenant_scope(b)
    assert tenant_scope(a, mine, suffixes=["-token"]) != tenant_scope(b, mine, suffixes=["-token"])


@given(st.text(st.characters(codec="ascii", categories=("L", "N", "P", "Zs")), min_size=1))
def test_a_live_alias_gives_back_the_key_and_token_it_was_made_of(key: str) -> None:
    # A live alias ("KEY TOKEN") is read on the resuming side and by inspection alike; a
    # custom keyer's key may hold spaces, and a plain alias (an entry's key) is none.
    token = new_lease_token()
    assert parse_live_alias_target(live_alias_target(key, token)) == (key, token)
    entry_key = DefaultKeyer().key(CacheRequest(schema="s", route="POST /v1/x", fields={}))
    assert parse_live_alias_target(entry_key) is None
    assert parse_live_alias_target(key + " not-a-token") is None
