"""Request side of the adapters (key fields, streaming flag), the registry, delta splitting."""

from __future__ import annotations

import sys
import types

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sse_cache.adapters as adapters_pkg
from sse_cache import ConfigError, DefaultKeyer
from sse_cache.adapters import (
    AnthropicMessages,
    GenericSSE,
    OpenAIChat,
    OpenAIResponses,
    by_name,
    for_path,
)
from sse_cache.adapters._common import payloads_of_type, split_text
from sse_cache.events import Event
from sse_cache.keys import CacheRequest
from sse_cache.protocols import Outcome, StreamAdapter

ALL = [OpenAIResponses, OpenAIChat, AnthropicMessages]


@pytest.mark.parametrize("cls", ALL)
def test_adapters_satisfy_the_protocol(cls):
    adapter = cls()
    assert isinstance(adapter, StreamAdapter)
    assert adapter.end_outcome() is Outcome.FAIL
    assert by_name(adapter.name).name == adapter.name


def test_public_names():
    assert set(adapters_pkg.__all__) >= {
        "AnthropicMessages",
        "GenericSSE",
        "OpenAIChat",
        "OpenAIResponses",
        "by_name",
        "for_path",
    }
    for name in adapters_pkg.__all__:
        assert hasattr(adapters_pkg, name)


RESPONSES_BODY = {
    "model": "gpt-5",
    "input": [{"role": "user", "content": "hi"}],
    "instructions": "be brief",
    "tools": [{"type": "function", "name": "f", "parameters": {}}],
    "tool_choice": "auto",
    "temperature": 0.2,
    "top_p": 1,
    "max_output_tokens": 100,
    "reasoning": {"effort": "high", "summary": "auto"},
    "text": {"format": {"type": "text"}},
    "previous_response_id": "resp_1",
    "include": ["reasoning.encrypted_content"],
    "user": "u1",
    "metadata": {"a": "b"},
    "store": True,
    "some_future_field": 1,
    "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "timeout": 30,
}


@pytest.mark.parametrize(
    ("cls", "dropped"),
    [
        # (timeout is kept: the providers refuse it, 400; helper-147)
        (OpenAIResponses, {"stream", "stream_options"}),
        # (metadata is kept: refused without store: true, kept upstream with it)
        (OpenAIChat, {"stream", "stream_options", "user"}),
        # (stream_options is no field of this API; this metadata is not its shape)
        (AnthropicMessages, {"stream"}),
    ],
)
def test_key_fields_drop_only_transport_and_named_metadata(cls, dropped):
    fields = cls().key_fields(RESPONSES_BODY)
    assert set(fields) == set(RESPONSES_BODY) - dropped
    assert "some_future_field" in fields  # unknown fields are kept: safer to miss
    assert dict(fields) == {k: v for k, v in RESPONSES_BODY.items() if k not in dropped}


@pytest.mark.parametrize("cls", ALL)
def test_stream_and_non_stream_requests_share_a_key(cls):
    adapter = cls()
    keyer = DefaultKeyer()
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}

    def key(b):
        return keyer.key(CacheRequest(schema=adapter.name, route="r", fields=adapter.key_fields(b)))

    # (A Chat stream shares with a non-streamed request when it asks for usage, as the
    # body has it: tested with Chat. Anthropic has no stream_options.)
    options = {"include_usage": True, "include_obfuscation": False}
    openai = cls is not AnthropicMessages
    streamed = {**body, "stream": True, **({"stream_options": options} if openai else {})}
    assert key(streamed) == key(body)
    # A stream_options the API refuses (on a request that does not stream; any on
    # Anthropic) keys apart: the upstream answers it, never a valid request's entry.
    assert key({**body, "stream_options": options}) != key(body)
    assert adapter.is_streaming(streamed)
    assert not adapter.is_streaming(body)
    assert not adapter.is_streaming({**body, "stream": False})
    assert key({**body, "temperature": 1}) != key(body)
    assert key({**body, "model": "other"}) != key(body)


@pytest.mark.parametrize("cls", ALL)
def test_ignore_fields(cls):
    adapter = cls(ignore_fields=["seed", "user"])
    assert "seed" not in adapter.key_fields({"seed": 1, "model": "m"})
    with pytest.raises(TypeError):
        cls(ignore_fields="seed")


def test_generic_ignore_fields_refuses_a_string():
    # A string is an iterable of its characters: "user" dropped the fields u, s, e and r, so
    # requests differing only in a field "e" shared one entry.
    with pytest.raises(TypeError, match="not a string"):
        GenericSSE(ignore_fields="user")
    adapter = GenericSSE(ignore_fields=["user"])
    assert adapter.key_fields({"user": "a", "e": 1, "model": "m"}) == {"e": 1, "model": "m"}


def test_registry():
    assert isinstance(by_name("generic"), GenericSSE)
    assert by_name("openai-responses", store_incomplete=True).store_incomplete  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unknown adapter"):
        by_name("nope")
    with pytest.raises(ConfigError, match="invalid options"):
        by_name("openai-chat", bogus=1)
    assert isinstance(for_path("/v1/responses"), OpenAIResponses)
    assert isinstance(for_path("/openai/v1/chat/completions?x=1"), OpenAIChat)
    assert isinstance(for_path("/v1/messages/"), AnthropicMessages)
    assert for_path("/v1/embeddings") is None


@settings(max_examples=200, deadline=None)
@given(st.text(), st.none() | st.integers(-1, 20))
def test_split_text_joins_back(text, size):
    pieces = split_text(text, size)
    assert "".join(pieces) == text
    assert all(pieces)
    if size is not None and size > 0:
        assert all(len(p) <= size for p in pieces)
    else:
        assert len(pieces) == (1 if text else 0)


def test_payloads_of_type_trusts_neither_the_event_line_nor_the_payload_alone():
    class Typed(msgspec.Struct):
        type: str | None = None
        n: int = 0

    events = [
        Event('{"type":"done","n":1}'),  # no event: line, the payload names the type
        Event('{"type":"done","n":2}', "done"),
        Event('{"type":"done","n":3}', "delta"),  # the event: line names another type
        Event('{"type":"delta","n":4}', "done"),  # the payload names another type
        Event("not json", "done"),  # unreadable: skipped, not raised
        Event('{"type":"done","n":"five"}', "done"),  # of the wrong shape: skipped
    ]
    decoder = msgspec.json.Decoder(Typed)
    assert [p.n for p in payloads_of_type(events, "done", decoder)] == [1, 2]


def test_split_text_is_word_like():
    assert split_text("Hello brave new world", 16) == ["Hello", " brave", " new", " world"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]


def test_docs_example_adapter_runs():
    # docs/adapters.md shows a complete third-party adapter: it must keep working.
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "adapters.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    example = next(b for b in blocks if "class GeminiSSE" in b)
    # A real module: msgspec resolves the Structs' annotations through sys.modules.
    module = types.ModuleType("docs_adapters_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(example, "docs/adapters.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    adapter = module.adapter
    assert isinstance(adapter, StreamAdapter)
    assert "labels" not in adapter.key_fields({"labels": {}, "contents": []})  # type: ignore[attr-defined]


def test_anthropic_metadata_of_the_apis_shape_is_left_out_and_any_other_keys():
    # The API takes metadata {"user_id": str | null} and refuses any other member (400):
    # such a request was answered 200 from a valid request's entry (helper-88).
    adapter = AnthropicMessages()
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    plain = adapter.key_fields(body)
    for shape in ({"user_id": "u-1"}, {"user_id": None}, {}):
        assert adapter.key_fields({**body, "metadata": shape}) == plain, shape
    for refused in ({"user_id": "u", "foo": 1}, {"user_id": 7}, "u-1", ["u"]):
        fields = adapter.key_fields({**body, "metadata": refused})
        assert fields == {**plain, "metadata": refused}, refused
    assert AnthropicMessages(ignore_fields=["metadata"]).key_fields(
        {**body, "metadata": {"foo": 1}}
    ) == AnthropicMessages(ignore_fields=["metadata"]).key_fields(body)


@pytest.mark.parametrize("field", ["timeout", "request_timeout"])
@pytest.mark.parametrize("cls", ALL)
def test_a_timeout_in_the_body_keys_apart_except_for_generic_streams(cls, field):
    # The providers' APIs refuse a timeout in the body (400 "Unrecognized request argument",
    # "Extra inputs are not permitted", "Unknown name"): left out of the key, such a request
    # was answered 200 from a valid request's entry (helper-147). GenericSSE serves any
    # upstream: there it is transport.
    adapter = cls()
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    assert adapter.key_fields({**body, field: 30}) != adapter.key_fields(body)
    assert adapter.key_fields({**body, field: 30}) == adapter.key_fields({**body, field: 30})
    assert cls(ignore_fields=[field]).key_fields({**body, field: 30}) == adapter.key_fields(body)
    generic = GenericSSE()
    assert generic.key_fields({**body, field: 30}) == generic.key_fields(body)


def test_a_generic_stream_keys_whether_it_asked_for_usage():
    # An OpenAI-compatible stream that asked for usage (legacy completions, vLLM) ends with a
    # chunk of no choices, which a client that did not ask fails on (helper-147); the rest
    # of stream_options is transport, and ignore_fields still leaves all of it out.
    adapter = GenericSSE()
    body = {"model": "m", "prompt": "x", "stream": True}
    plain = adapter.key_fields(body)
    asked = adapter.key_fields({**body, "stream_options": {"include_usage": True}})
    declined = {"include_usage": False, "include_obfuscation": True}
    assert asked != plain
    assert adapter.key_fields({**body, "stream_options": declined}) == plain
    assert adapter.key_fields({**body, "stream_options": {"include_obfuscation": True}}) == plain
    ignoring = GenericSSE(ignore_fields=["stream_options"])
    assert ignoring.key_fields({**body, "stream_options": {"include_usage": True}}) == plain


@pytest.mark.parametrize("cls", [OpenAIResponses, OpenAIChat])
def test_a_null_left_out_field_keys_as_absent(cls):
    # A null is read as absent: keyed apart, it only lost hits (helper-90).
    adapter = cls()
    body = {"model": "m", "input": "x", "store": True}
    plain = adapter.key_fields(body)
    assert adapter.key_fields({**body, "stream_options": None}) == plain
    if cls is OpenAIChat:
        assert adapter.key_fields({**body, "metadata": None}) == plain


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["as is", "\\u%04x", "\\u%04X"]), min_size=5, max_size=5))
def test_an_error_member_spelled_with_escapes_fails_the_stream(spelling: list[str]) -> None:
    # The SDKs read `{"\u0065rror": {...}}` as an `error` member and raise; the adapters'
    # fast path looked for the text `"error"` only, and such a chunk was stored and replayed
    # (helper-109).
    import json

    name = "".join(
        letter if how == "as is" else how % ord(letter)
        for letter, how in zip("error", spelling, strict=True)
    )
    member = f'"{name}":{{"type":"overloaded_error","message":"Overloaded"}}'
    chat = Event("{" + member + "}")
    delta = "response.output_text.delta"
    responses = Event(f'{{"type":"{delta}","delta":"Hi",{member}}}', delta)
    anthropic = Event('{"type":"ping",' + member + "}")  # (unnamed: read for its error only)
    for event in (chat, responses, anthropic):
        assert "error" in json.loads(event.data)
    assert OpenAIChat().outcome(chat) is Outcome.FAIL
    assert OpenAIResponses().outcome(responses) is Outcome.FAIL
    assert AnthropicMessages().outcome(anthropic) is Outcome.FAIL
