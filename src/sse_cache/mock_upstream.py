"""A deterministic mock of the OpenAI, Anthropic and Gemini streaming APIs, as a plain ASGI 3 app.

:class:`MockUpstream` answers like the real providers do, from nothing but the request:

- ``POST /v1/responses`` (OpenAI Responses): ``"stream": true`` gives ``text/event-stream``
  with ``event: <type>`` + one compact JSON ``data:`` line per event and contiguous
  ``sequence_number`` values: ``response.created``, ``response.in_progress``, a reasoning item
  with several summary parts (``summary_index`` 0..n-1), then a message with ``output_text``
  deltas - or, when the request has function ``tools``, a ``function_call`` item streamed with
  ``response.function_call_arguments.delta/.done`` - and ``response.completed``. Without
  ``stream`` the answer is the ``application/json`` response object that
  ``response.completed`` carries, byte for byte.
- ``POST /v1/chat/completions``: ``data:``-only ``chat.completion.chunk`` events ending with
  ``data: [DONE]``; a usage chunk when ``stream_options.include_usage`` is true; tool calls
  when ``tools`` are given; ``n`` choices interleaved. Non-stream: a ``chat.completion``.
- ``POST /v1/messages`` (Anthropic): ``message_start``, ``content_block_start/delta/stop``
  (a ``thinking`` block with a ``signature_delta`` when ``thinking`` is enabled, a text block,
  a ``tool_use`` block with ``input_json_delta`` when ``tools`` are given), ``ping``,
  ``message_delta``, ``message_stop``. Non-stream: the ``message``.
- ``POST .../models/{model}:streamGenerateContent?alt=sse`` (Google Gemini, under any prefix:
  ``/v1beta/models/...``, Vertex AI's ``/v1/projects/p/locations/l/publishers/google/models/...``):
  data-only ``GenerateContentResponse`` chunks, one part each: thought summaries
  (``thought: true``) when ``generationConfig.thinkingConfig.includeThoughts`` is true, then a
  function call (with its ``thoughtSignature``) when ``tools`` declare functions, or the text
  ending in an empty part that carries the signature; ``candidateCount`` candidates;
  ``finishReason`` ``MAX_TOKENS`` when ``maxOutputTokens`` cut the answer short, else ``STOP``;
  a cumulative ``usageMetadata`` on every chunk. Without ``alt=sse``: the same chunks as one
  JSON array (``application/json``). ``:generateContent``: the answer as one JSON object.
  Request fields are read by their JSON or proto names (``includeThoughts`` /
  ``include_thoughts``), as the API does. Errors are Google-shaped
  (``{"error": {"code", "message", "status"}}``).
- ``GET /v1/models``: a tiny model list (Anthropic-shaped when the request carries an
  ``anthropic-version`` header). Anything else: ``404`` with a provider-shaped JSON error.
- ``GET /_mock/stats``: request counters as JSON (see :meth:`MockUpstream.stats`);
  ``POST /_mock/reset`` zeroes them. These two are not counted.

The LLM routes are matched by path suffix (``/responses``, ``/chat/completions``,
``/messages``, ``/models/{model}:...``), so the mock also answers under prefixes such as
``/openai/v1/...``.

**Determinism.** The answer (ids, timestamps, text, tool arguments, usage) is a function of
the app's ``seed``, the route and the canonical JSON of the request body without the fields
that only change how an answer is delivered or who asked (``stream``, ``stream_options``,
``timeout``, ``request_timeout``, ``user``, ``metadata``, ``safety_identifier``,
``prompt_cache_key``, ``prompt_cache_retention``): the same request always gets the same bytes,
a streamed and a non-streamed request for the same answer get the same answer in both forms,
and different prompts get different answers. Tool turns end: when the conversation's last item
is a tool result (``function_call_output``, a ``tool`` message, a ``tool_result`` block) the
answer is text. A JSON-schema output format (``text.format`` / ``response_format``) gets JSON
generated from the schema.

**Per-request controls** (request headers; each overrides the app's default):

- ``x-mock-delay-ms``: gap between events (alone, it sets the time to the first event too);
  ``x-mock-first-ms``: time to the first event.
- ``x-mock-deltas``: words in the answer text (one text delta each); a request's token limit
  (``max_output_tokens``, ``max_completion_tokens``/``max_tokens``, Anthropic ``max_tokens``)
  caps it - the answer still completes normally. ``x-mock-summaries``: reasoning summary parts.
- ``x-mock-error``: one of :data:`ERROR_MODES`:

  - ``fail-mid-stream``: after some events, the schema's own failure - ``response.failed``
    (Responses), an ``error`` event (Anthropic), a ``data: {"error": ...}`` chunk without
    ``[DONE]`` (Chat) - then a clean end. Non-stream: a ``200`` response object with
    ``status: failed`` (Responses) or a ``500`` error (Chat, Anthropic).
  - ``cut``: after some body bytes the app raises :class:`UpstreamCut`, so an HTTP server drops
    the connection without the final events (a non-stream body is cut in half).
  - ``bad-sse``: after some events, bytes that are not valid SSE over UTF-8 (invalid UTF-8 and a
    truncated JSON ``data`` line), then a clean end without the final events. Non-stream: a
    ``200`` ``application/json`` body that is truncated JSON.
  - ``500`` / ``429``: the provider's JSON error at once (``429`` with ``retry-after``, seconds
    from ``x-mock-retry-after``, default ``1``).

  ``x-mock-error-after``: how many events are sent before the failure (default: half).

Pacing: the response headers go out at once, the first event after ``first_delay``, every
other event ``delay`` seconds after the previous one. A non-stream answer is sent after the
time its stream would have taken. A client that disconnects stops the stream.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import urllib.parse
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Final

import anyio
import anyio.lowlevel
import msgspec

from .errors import SSECacheError
from .events import Event, serialize_sse
from .testing import mock_text

__all__ = ["DEFAULT_DELTAS", "DEFAULT_SUMMARIES", "ERROR_MODES", "MockUpstream", "UpstreamCut"]

#: Values of the ``x-mock-error`` request header.
ERROR_MODES: Final = frozenset({"fail-mid-stream", "cut", "bad-sse", "500", "429"})
#: Default number of words (text deltas) in an answer.
DEFAULT_DELTAS: Final = 24
#: Default number of reasoning summary parts of a Responses answer.
DEFAULT_SUMMARIES: Final = 3

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

# Request fields that never change a real answer: left out of the determinism seed, so that a
# streamed and a non-streamed request (or two callers) get the same answer.
_NOT_ANSWER: Final = frozenset(
    {
        "stream",
        "stream_options",
        "timeout",
        "request_timeout",
        "user",
        "metadata",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    }
)
_ROUTES: Final = (
    ("/responses", "responses"),
    ("/chat/completions", "chat"),
    ("/messages", "anthropic"),
)
# Gemini names the model and the method in the path (Gemini API and Vertex AI alike).
_GEMINI_PATH: Final = re.compile(
    r"/models/(?P<model>[^/:]+):(?P<method>streamGenerateContent|generateContent)$"
)
# Gemini's request metadata (billing labels): not part of the answer.
_GEMINI_NOT_ANSWER: Final = frozenset({"labels"})
_MAX_HEADER_COUNT: Final = 100_000
_MAX_CHOICES: Final = 8
_RECENT: Final = 100
# What `bad-sse` sends: invalid UTF-8 inside a data line whose JSON is cut short.
_BAD_SSE: Final = b'data: {"type":"response.output_text.delta","delta":"\xff\xfe\xfd\n\n'
_PING: Final = Event('{"type": "ping"}', "ping")
_DONE: Final = Event("[DONE]")
_BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKENS: Final = re.compile(r"\s*\S+")
_WORDS: Final = ("Paris", "blue", "sse-cache", "東京", "42 Main St", "café", 'say "hi"', "a\\b")

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()


class UpstreamCut(SSECacheError, ConnectionError):
    """Raised by :class:`MockUpstream` on purpose (``x-mock-error: cut``) after part of a
    response body was sent: an HTTP server then drops the connection mid-body. In-process
    (httpx2's ``ASGITransport``) the client sees this exception."""


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _dumps(value: Any) -> str:
    return _encoder.encode(value).decode("utf-8")


def _canonical(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def _tokens(text: str) -> list[str]:
    """Delta-sized pieces of ``text`` (one per word, leading space kept) that join back."""
    pieces: list[str] = _TOKENS.findall(text)
    rest = len(text) - sum(map(len, pieces))
    if rest:  # trailing whitespace only: \s*\S+ covers everything before it
        pieces.append(text[-rest:])
    return pieces


def _chunks(text: str) -> list[str]:
    """Token-like pieces of JSON text (2-5 characters), as arguments are streamed."""
    sizes = (2, 5, 3, 4)
    out: list[str] = []
    i = 0
    while i < len(text):
        size = sizes[len(out) % len(sizes)]
        out.append(text[i : i + size])
        i += size
    return out


def _ident(digest: str, tag: str, length: int, alphabet: str = _BASE62) -> str:
    raw = hashlib.blake2b(f"{digest}\0{tag}".encode(), digest_size=64).digest()
    return "".join(alphabet[b % len(alphabet)] for b in raw[:length])


def _hex(digest: str, tag: str, length: int) -> str:
    return _ident(digest, tag, length, "0123456789abcdef")


def _rng(digest: str, tag: str) -> random.Random:
    raw = hashlib.blake2b(f"{digest}\0{tag}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(raw, "big"))


def _words(digest: str, tag: object, count: int) -> str:
    return mock_text((digest, tag), count)


def _fake(schema: Any, rng: random.Random, root: Any, depth: int = 0) -> Any:
    """A value that validates against a (simple) JSON schema: tool arguments, JSON output."""
    if not isinstance(schema, dict) or depth > 8:
        return rng.choice(_WORDS)
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _fake(target, rng, root, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _fake((usable or options)[0], rng, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        return {name: _fake(sub, rng, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [_fake(schema.get("items"), rng, root, depth + 1) for _ in range(rng.randint(1, 2))]
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(_WORDS)


def _fake_object(schema: Any, rng: random.Random) -> dict[str, Any]:
    value = _fake(schema, rng, schema) if isinstance(schema, dict) else {}
    return value if isinstance(value, dict) else {"value": value}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _cap(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# -- per-request options ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Options:
    delay: float
    first_delay: float
    deltas: int
    summaries: int
    error: str | None
    error_after: int | None
    retry_after: str


def _header_number(headers: Mapping[str, str], name: str, *, integer: bool) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise _BadRequest(f"header {name} must be a number, got {raw!r}", name) from None
    if not 0 <= value <= _MAX_HEADER_COUNT:
        raise _BadRequest(f"header {name} must be between 0 and {_MAX_HEADER_COUNT}", name)
    return value


# -- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """Everything one request can be answered with; which part is sent depends on the mode."""

    events: list[Event]  # the complete stream
    body: bytes  # the non-stream answer
    failure: Callable[[int], list[Event]]  # fail-mid-stream events after n events were sent
    failed_unary: tuple[int, bytes]  # fail-mid-stream answer to a non-stream request


def _openai_error(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _encoder.encode({"error": error})


def _anthropic_error(message: str, kind: str, request_id: str) -> bytes:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return _encoder.encode(body)


def _error_body(
    flavour: str, status: int, message: str, request_id: str, param: str | None = None
) -> bytes:
    if flavour == "gemini":
        return _google_error(status, message)
    if flavour == "anthropic":
        kind = {
            400: "invalid_request_error",
            404: "not_found_error",
            405: "invalid_request_error",
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(status, "api_error")
        return _anthropic_error(message, kind, request_id)
    if status == 429:
        return _openai_error(message, "requests", "rate_limit_exceeded", param)
    if status >= 500:
        return _openai_error(message, "server_error", None, param)
    return _openai_error(message, "invalid_request_error", None, param)


def _last_input_item(body: Mapping[str, Any], key: str) -> Any:
    items = body.get(key)
    return items[-1] if isinstance(items, list) and items else None


# Responses ------------------------------------------------------------------------------------


def _responses_tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = _last_input_item(body, "input")
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        return None  # the tool answered: now the model writes its text
    tools = [
        t
        for t in _list(body.get("tools"))
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        named = [t for t in tools if t["name"] == choice["name"]]
        tools = named or tools
    return tools[0]["name"], tools[0].get("parameters")


def _echo_tool(tool: Any) -> Any:
    # The API echoes function tools normalised (description and strict always present).
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {
            "type": "function",
            "description": tool.get("description"),
            "name": tool.get("name"),
            "parameters": tool.get("parameters"),
            "strict": tool.get("strict", True),
        }
    return tool


def _json_schema_format(fmt: Any) -> tuple[str, Any] | None:
    """('json_schema', schema) or ('json_object', None) for a structured output format."""
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        inner = _dict(fmt.get("json_schema")) or fmt
        return "json_schema", inner.get("schema")
    if fmt.get("type") == "json_object":
        return "json_object", None
    return None


def _output_text(digest: str, tag: object, words: int, fmt: tuple[str, Any] | None) -> list[str]:
    """The answer text as its deltas: words, or JSON pieces for a structured output format."""
    if fmt is None:
        return _tokens(_words(digest, tag, words))
    if fmt[0] == "json_schema":
        value: Any = _fake(fmt[1], _rng(digest, f"json{tag}"), fmt[1])
    else:
        value = {"answer": _words(digest, tag, words)}
    return _chunks(_dumps(value))


def _responses_answer(
    body: Mapping[str, Any], opts: _Options, digest: str, tokens_in: int
) -> _Answer:
    model = body.get("model") if isinstance(body.get("model"), str) else "gpt-mock-1"
    created = 1_750_000_000 + int(digest[:6], 16) % 10_000_000
    reasoning_req = _dict(body.get("reasoning"))
    # Asking for no summary (or no reasoning) turns the summaries off; by default they are on.
    off = "summary" in reasoning_req and reasoning_req["summary"] is None
    summaries = 0 if off or reasoning_req.get("effort") == "none" else opts.summaries
    words = opts.deltas
    limit = _cap(body.get("max_output_tokens"))
    if limit is not None:
        words = max(1, min(words, limit))
    text_cfg = _dict(body.get("text"))
    fmt = _json_schema_format(text_cfg.get("format"))

    output: list[dict[str, Any]] = []
    reasoning_tokens = 0
    if summaries:
        parts: list[dict[str, Any]] = []
        for i in range(summaries):
            title = _words(digest, ("title", i), 3).capitalize()
            text = f"**{title}**\n\n{_words(digest, ('summary', i), 10)}"
            parts.append({"type": "summary_text", "text": text})
            reasoning_tokens += 4 * len(_tokens(text))
        item: dict[str, Any] = {"id": f"rs_{_hex(digest, 'rs', 50)}", "type": "reasoning"}
        include = body.get("include")
        if isinstance(include, list) and "reasoning.encrypted_content" in include:
            item["encrypted_content"] = "gAAAAAB" + _ident(digest, "enc", 120)
        item["summary"] = parts
        output.append(item)
    tool = _responses_tool(body)
    text_pieces: list[str] = []
    if tool is not None:
        arguments = _dumps(_fake_object(tool[1], _rng(digest, "args")))
        output.append(
            {
                "id": f"fc_{_hex(digest, 'fc', 50)}",
                "type": "function_call",
                "status": "completed",
                "arguments": arguments,
                "call_id": f"call_{_ident(digest, 'call', 24)}",
                "name": tool[0],
            }
        )
        out_tokens = len(_chunks(arguments))
    else:
        text_pieces = _output_text(digest, "answer", words, fmt)
        text = "".join(text_pieces)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        output.append(
            {
                "id": f"msg_{_hex(digest, 'msg', 50)}",
                "type": "message",
                "status": "completed",
                "content": [part],
                "role": "assistant",
            }
        )
        out_tokens = len(text_pieces)
    reasoning = {
        "effort": reasoning_req.get("effort", "medium"),
        "summary": reasoning_req.get("summary", "detailed"),
    }
    final: dict[str, Any] = {
        "id": f"resp_{_hex(digest, 'resp', 50)}",
        "object": "response",
        "created_at": created,
        "status": "completed",
        "background": False,
        "completed_at": created + 1 + (len(text_pieces) + reasoning_tokens) // 50,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": reasoning,
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **text_cfg},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_echo_tool(t) for t in _list(body.get("tools"))],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": tokens_in,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tokens + reasoning_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": tokens_in + out_tokens + reasoning_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }
    start = dict(final, status="in_progress", completed_at=None, output=[], usage=None)
    events = _responses_events(final, start, text_pieces)
    failed = dict(
        start,
        status="failed",
        error={
            "code": "server_error",
            "message": "The model failed to generate a response (x-mock-error: fail-mid-stream).",
        },
    )

    def failure(sent: int) -> list[Event]:
        payload = {"type": "response.failed", "sequence_number": sent, "response": failed}
        return [Event(_dumps(payload), "response.failed")]

    return _Answer(events, _encoder.encode(final), failure, (200, _encoder.encode(failed)))


def _responses_events(
    final: dict[str, Any], start: dict[str, Any], text_pieces: list[str]
) -> list[Event]:
    events: list[Event] = []

    def emit(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": len(events), **fields}
        events.append(Event(_dumps(payload), kind))

    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for oi, item in enumerate(final["output"]):
        where = {"item_id": item["id"], "output_index": oi}
        if item["type"] == "reasoning":
            emit("response.output_item.added", output_index=oi, item=dict(item, summary=[]))
            for si, part in enumerate(item["summary"]):
                at = {**where, "summary_index": si}
                emit("response.reasoning_summary_part.added", **at, part=dict(part, text=""))
                for piece in _tokens(part["text"]):
                    emit("response.reasoning_summary_text.delta", **at, delta=piece)
                emit("response.reasoning_summary_text.done", **at, text=part["text"])
                emit("response.reasoning_summary_part.done", **at, part=part)
        elif item["type"] == "function_call":
            added = dict(item, status="in_progress", arguments="")
            emit("response.output_item.added", output_index=oi, item=added)
            for piece in _chunks(item["arguments"]):
                emit("response.function_call_arguments.delta", **where, delta=piece)
            emit("response.function_call_arguments.done", **where, arguments=item["arguments"])
        else:
            added = dict(item, status="in_progress", content=[])
            emit("response.output_item.added", output_index=oi, item=added)
            part = item["content"][0]
            at = {**where, "content_index": 0}
            emit("response.content_part.added", **at, part=dict(part, text=""))
            for piece in text_pieces:
                emit("response.output_text.delta", **at, delta=piece, logprobs=[])
            emit("response.output_text.done", **at, text=part["text"], logprobs=[])
            emit("response.content_part.done", **at, part=part)
        emit("response.output_item.done", output_index=oi, item=item)
    emit("response.completed", response=final)
    return events


# Chat Completions -----------------------------------------------------------------------------


def _chat_tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = _last_input_item(body, "messages")
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        return None
    tools = [
        t["function"]
        for t in _list(body.get("tools"))
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = [t for t in tools if t["name"] == choice["function"].get("name")]
        tools = named or tools
    return tools[0]["name"], tools[0].get("parameters")


def _chat_answer(body: Mapping[str, Any], opts: _Options, digest: str, tokens_in: int) -> _Answer:
    model = body.get("model") if isinstance(body.get("model"), str) else "gpt-mock-1"
    created = 1_750_000_000 + int(digest[:6], 16) % 10_000_000
    n = _cap(body.get("n")) or 1
    n = min(n, _MAX_CHOICES)
    words = opts.deltas
    limit = _cap(body.get("max_completion_tokens")) or _cap(body.get("max_tokens"))
    if limit is not None:
        words = max(1, min(words, limit))
    fmt = _json_schema_format(body.get("response_format"))
    tool = _chat_tool(body)
    base: dict[str, Any] = {
        "id": f"chatcmpl-{_ident(digest, 'chat', 29)}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": f"fp_{_hex(digest, 'fp', 10)}",
    }
    include_usage = _dict(body.get("stream_options")).get("include_usage") is True
    # With include_usage the API sends "usage": null on every chunk but the last.
    tail = {"usage": None} if include_usage else {}

    choices: list[dict[str, Any]] = []
    streams: list[list[dict[str, Any]]] = []
    completion_tokens = 0
    for index in range(n):

        def entry(
            delta: dict[str, Any], finish: str | None = None, i: int = index
        ) -> dict[str, Any]:
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        if tool is not None:
            arguments = _dumps(_fake_object(tool[1], _rng(digest, f"args{index}")))
            call_id = f"call_{_ident(digest, f'call{index}', 24)}"
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool[0], "arguments": arguments},
                    }
                ],
                "refusal": None,
                "annotations": [],
            }
            head = {
                "index": 0,
                "id": call_id,
                "type": "function",
                "function": {"name": tool[0], "arguments": ""},
            }
            stream = [
                entry({"role": "assistant", "content": None, "refusal": None}),
                entry({"tool_calls": [head]}),
            ]
            pieces = _chunks(arguments)
            stream += [
                entry({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces
            ]
            finish = "tool_calls"
        else:
            pieces = _output_text(digest, ("answer", index), words, fmt)
            message = {
                "role": "assistant",
                "content": "".join(pieces),
                "refusal": None,
                "annotations": [],
            }
            stream = [entry({"role": "assistant", "content": "", "refusal": None})]
            stream += [entry({"content": p}) for p in pieces]
            finish = "stop"
        stream.append(entry({}, finish))
        streams.append(stream)
        completion_tokens += len(pieces)
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        )

    usage = {
        "prompt_tokens": tokens_in,
        "completion_tokens": completion_tokens,
        "total_tokens": tokens_in + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    events: list[Event] = []
    # Several choices are interleaved, one delta of each in turn, as the API sends them.
    for row in zip_longest(*streams):
        for choice in row:
            if choice is not None:
                events.append(Event(_dumps({**base, "choices": [choice], **tail})))
    if include_usage:
        events.append(Event(_dumps({**base, "choices": [], "usage": usage})))
    events.append(_DONE)
    completion = {
        "id": base["id"],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": base["system_fingerprint"],
    }
    error = _openai_error(
        "The server had an error while processing your request (x-mock-error: fail-mid-stream).",
        "server_error",
        None,
    )

    def failure(sent: int) -> list[Event]:
        return [Event(error.decode("utf-8"))]

    return _Answer(events, _encoder.encode(completion), failure, (500, error))


# Anthropic Messages ---------------------------------------------------------------------------


def _anthropic_tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = _last_input_item(body, "messages")
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, list) and any(_dict(b).get("type") == "tool_result" for b in content):
        return None
    tools = [
        t
        for t in _list(body.get("tools"))
        if isinstance(t, dict)
        and t.get("type") in (None, "custom")
        and isinstance(t.get("name"), str)
    ]
    choice = body.get("tool_choice")
    if not tools or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    if isinstance(choice, dict) and choice.get("type") == "tool":
        named = [t for t in tools if t["name"] == choice.get("name")]
        tools = named or tools
    return tools[0]["name"], tools[0].get("input_schema")


def _anthropic_answer(
    body: Mapping[str, Any], opts: _Options, digest: str, tokens_in: int, request_id: str
) -> _Answer:
    model = body.get("model") if isinstance(body.get("model"), str) else "claude-mock-1"
    words = opts.deltas
    limit = _cap(body.get("max_tokens"))
    if limit is not None:
        words = max(1, min(words, limit))
    thinking_req = body.get("thinking")
    thinking = isinstance(thinking_req, dict) and thinking_req.get("type") in (
        "enabled",
        "adaptive",
    )
    tool = _anthropic_tool(body)

    blocks: list[dict[str, Any]] = []
    deltas: list[list[dict[str, Any]]] = []  # per block, the deltas that stream it
    output_tokens = 0
    if thinking:
        paragraphs = [_words(digest, ("thinking", i), 12) for i in range(max(1, opts.summaries))]
        text = "\n\n".join(p.capitalize() for p in paragraphs)
        signature = "Eq" + _ident(digest, "signature", 200) + "=="
        blocks.append({"type": "thinking", "thinking": text, "signature": signature})
        pieces = _tokens(text)
        deltas.append(
            [{"type": "thinking_delta", "thinking": p} for p in pieces]
            + [{"type": "signature_delta", "signature": signature}]
        )
        output_tokens += len(pieces)
    pieces = _tokens(_words(digest, "answer", words))
    blocks.append({"type": "text", "text": "".join(pieces)})
    deltas.append([{"type": "text_delta", "text": p} for p in pieces])
    output_tokens += len(pieces)
    if tool is not None:
        arguments = _fake_object(tool[1], _rng(digest, "input"))
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_01{_ident(digest, 'toolu', 22)}",
                "name": tool[0],
                "input": arguments,
            }
        )
        # Anthropic's JSON text has spaces after separators; the first delta is empty.
        chunks = ["", *_chunks(msgspec.json.format(_dumps(arguments), indent=0))]
        deltas.append([{"type": "input_json_delta", "partial_json": c} for c in chunks])
        output_tokens += len(chunks)
    usage = {
        "input_tokens": tokens_in,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    stop_reason = "tool_use" if tool is not None else "end_turn"
    message = {
        "model": model,
        "id": f"msg_01{_ident(digest, 'msg', 22)}",
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
    events: list[Event] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append(Event(_dumps({"type": kind, **fields}), kind))

    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    emit("message_start", message=start)
    for index, (block, block_deltas) in enumerate(zip(blocks, deltas, strict=True)):
        empty = {k: ("" if k in ("text", "thinking", "signature") else v) for k, v in block.items()}
        if block["type"] == "tool_use":
            empty["input"] = {}
        emit("content_block_start", index=index, content_block=empty)
        if index == 0:
            events.append(_PING)  # the API pings once after the first block starts
        for delta in block_deltas:
            emit("content_block_delta", index=index, delta=delta)
        emit("content_block_stop", index=index)
    final_usage = {
        "input_tokens": tokens_in,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }
    emit(
        "message_delta",
        delta={"stop_reason": stop_reason, "stop_sequence": None},
        usage=final_usage,
    )
    emit("message_stop")
    overloaded = _anthropic_error("Overloaded", "overloaded_error", request_id)

    def failure(sent: int) -> list[Event]:
        return [Event(overloaded.decode("utf-8"), "error")]

    error = _anthropic_error(
        "Internal server error (x-mock-error: fail-mid-stream)", "api_error", request_id
    )
    return _Answer(events, _encoder.encode(message), failure, (500, error))


# Google Gemini -----------------------------------------------------------------------------

_GEMINI_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _google_error(status: int, message: str) -> bytes:
    error = {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "INTERNAL")}
    return _encoder.encode({"error": error})


def _field(obj: Mapping[str, Any], name: str) -> Any:
    """A request field by its JSON name (``includeThoughts``) or its proto name
    (``include_thoughts``): the API accepts both, and the SDK sends nested fields snake_case."""
    if name in obj:
        return obj[name]
    return obj.get(re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), name))


def _lower_types(schema: Any) -> Any:
    """A Gemini ``Schema`` (``"type": "OBJECT"``) as the JSON schema :func:`_fake` reads."""
    if isinstance(schema, dict):
        return {
            k: v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema


def _gemini_tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = _last_input_item(body, "contents")
    if any(
        _field(_dict(p), "functionResponse") is not None
        for p in _list(_field(_dict(last), "parts"))
    ):
        return None  # the tool answered: now the model writes its text
    decls = [
        d
        for t in _list(_field(body, "tools"))
        for d in _list(_field(_dict(t), "functionDeclarations"))
        if isinstance(d, dict) and isinstance(d.get("name"), str)
    ]
    calling = _dict(_field(_dict(_field(body, "toolConfig")), "functionCallingConfig"))
    if not decls or _field(calling, "mode") == "NONE":
        return None
    allowed = _field(calling, "allowedFunctionNames")
    if isinstance(allowed, list):
        decls = [d for d in decls if d["name"] in allowed] or decls
    schema = _field(decls[0], "parametersJsonSchema") or decls[0].get("parameters")
    return decls[0]["name"], _lower_types(schema)


def _gemini_answer(
    body: Mapping[str, Any], model: str, opts: _Options, digest: str, tokens_in: int
) -> _Answer:
    config = _dict(_field(body, "generationConfig"))
    n = min(_cap(_field(config, "candidateCount")) or 1, _MAX_CHOICES)
    words = opts.deltas
    limit = _cap(_field(config, "maxOutputTokens"))
    truncated = limit is not None and limit < words
    if limit is not None:
        words = max(1, min(words, limit))
    thoughts = _field(_dict(_field(config, "thinkingConfig")), "includeThoughts") is True
    fmt: tuple[str, Any] | None = None
    if _field(config, "responseMimeType") == "application/json":
        schema = _field(config, "responseJsonSchema") or _field(config, "responseSchema")
        fmt = ("json_schema", _lower_types(schema)) if schema else ("json_object", None)
    tool = _gemini_tool(body)
    finish = "MAX_TOKENS" if truncated and tool is None else "STOP"

    streams: list[list[dict[str, Any]]] = []  # per candidate, one part per chunk
    finals: list[dict[str, Any]] = []
    kinds: list[list[str]] = []  # per candidate and chunk: "thought" or "answer" (for usage)
    for index in range(n):
        parts: list[dict[str, Any]] = []
        final: list[dict[str, Any]] = []
        signature = None
        if thoughts:
            # Thought summaries (`thought: true` parts), then a signature (base64) for them.
            paragraphs = [
                f"**{_words(digest, ('title', index, i), 3).capitalize()}**\n\n"
                f"{_words(digest, ('thought', index, i), 10)}\n\n"
                for i in range(max(1, opts.summaries))
            ]
            thought = "".join(paragraphs)
            parts += [{"text": p, "thought": True} for p in _tokens(thought)]
            final.append({"text": thought, "thought": True})
            raw = hashlib.blake2b(f"{digest}\0signature{index}".encode(), digest_size=60)
            signature = base64.b64encode(raw.digest() * 2).decode("ascii")
        if tool is not None:
            call: dict[str, Any] = {
                "functionCall": {
                    "name": tool[0],
                    "args": _fake_object(tool[1], _rng(digest, f"args{index}")),
                }
            }
            if signature is not None:
                call["thoughtSignature"] = signature
            parts.append(call)
            final.append(call)
        else:
            pieces = _output_text(digest, ("answer", index), words, fmt)
            parts += [{"text": p} for p in pieces]
            text: dict[str, Any] = {"text": "".join(pieces)}
            if signature is not None:
                # As the API streams it: the signature in a last part of empty text.
                parts.append({"text": "", "thoughtSignature": signature})
                text["thoughtSignature"] = signature
            final.append(text)
        streams.append(parts)
        kinds.append(["thought" if p.get("thought") else "answer" for p in parts])
        finals.append(
            {
                "content": {"parts": final, "role": "model"},
                "finishReason": finish,
                "index": index,
            }
        )

    response_id = _ident(digest, "gemini-response", 23)
    counts = {"thought": 0, "answer": 0}

    def usage() -> dict[str, Any]:
        out: dict[str, Any] = {
            "promptTokenCount": tokens_in,
            "candidatesTokenCount": counts["answer"],
            "totalTokenCount": tokens_in + counts["answer"] + 4 * counts["thought"],
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens_in}],
        }
        if thoughts:
            out["thoughtsTokenCount"] = 4 * counts["thought"]
        return out

    events: list[Event] = []
    steps = max(len(p) for p in streams)
    for step in range(steps):
        entries: list[dict[str, Any]] = []
        for index, parts in enumerate(streams):
            entry: dict[str, Any] = {}
            if step < len(parts):
                entry["content"] = {"parts": [parts[step]], "role": "model"}
                counts[kinds[index][step]] += 1
            if step == steps - 1:
                entry["finishReason"] = finish
            if entry:
                entries.append({**entry, "index": index})
        chunk = {
            "candidates": entries,
            "usageMetadata": usage(),
            "modelVersion": model,
            "responseId": response_id,
        }
        events.append(Event(_dumps(chunk)))
    whole = {
        "candidates": finals,
        "usageMetadata": usage(),
        "modelVersion": model,
        "responseId": response_id,
    }
    error = _google_error(500, "An internal error has occurred (x-mock-error: fail-mid-stream).")

    def failure(sent: int) -> list[Event]:
        return [Event(error.decode("utf-8"))]

    return _Answer(events, _encoder.encode(whole), failure, (500, error))


# -- the app ----------------------------------------------------------------------------------


class _Watch:
    """Per-response state shared with the disconnect watcher."""

    __slots__ = ("disconnected", "done")

    def __init__(self) -> None:
        self.done = False
        self.disconnected = False


class MockUpstream:
    """A deterministic OpenAI/Anthropic/Gemini-compatible upstream, as a plain ASGI 3 application.

    ``delay``: seconds between events; ``first_delay``: seconds before the first event
    (``None``: the same as ``delay``); ``seed``: mixed into every answer (two apps with the
    same seed answer the same request identically); ``deltas``: words in an answer (one text
    delta each); ``summaries``: reasoning summary parts of a Responses answer (and paragraphs
    of an Anthropic thinking block); ``max_body_bytes``: larger request bodies get ``413``.
    Each can be overridden per request by ``x-mock-*`` headers (see the module docstring).

    The app keeps no per-request state on the instance, only the counters of
    :meth:`stats`. Raises :class:`ValueError` for negative delays or counts.
    """

    def __init__(
        self,
        *,
        delay: float = 0.02,
        first_delay: float | None = None,
        seed: int = 0,
        deltas: int = DEFAULT_DELTAS,
        summaries: int = DEFAULT_SUMMARIES,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        if delay < 0 or (first_delay is not None and first_delay < 0):
            raise ValueError("delay and first_delay must be >= 0 seconds")
        if deltas < 1 or summaries < 0 or max_body_bytes < 1:
            raise ValueError("deltas must be >= 1, summaries >= 0, max_body_bytes >= 1")
        self.delay = delay
        self.first_delay = delay if first_delay is None else first_delay
        self.seed = seed
        self.deltas = deltas
        self.summaries = summaries
        self.max_body_bytes = max_body_bytes
        self._requests: Counter[str] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self._streams = 0
        self._disconnects = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._serial = 0

    # -- counters -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters ``GET /_mock/stats`` returns: ``total`` requests and ``requests`` per
        ``"METHOD /path"`` (every request except ``/_mock/*``, errors and 404s included),
        ``streams`` (LLM requests with ``"stream": true``), ``in_flight`` and
        ``max_in_flight`` (LLM requests being answered at once, e.g. to check that a cache
        coalesced concurrent requests), ``disconnects`` (clients that left mid-answer) and
        ``recent``: the last 100 LLM requests as ``{"route", "stream", "error",
        "body_sha256", "headers"}`` (header names only, never values)."""
        return {
            "total": sum(self._requests.values()),
            "requests": dict(self._requests),
            "streams": self._streams,
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "disconnects": self._disconnects,
            "recent": list(self._recent),
        }

    def reset(self) -> None:
        """Zero the counters (``POST /_mock/reset``). Requests still being answered stay
        counted in ``in_flight``."""
        self._requests.clear()
        self._recent.clear()
        self._streams = self._disconnects = 0
        self._max_in_flight = self._in_flight

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            raise ValueError(f"MockUpstream serves HTTP only, not {kind!r}")
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/_mock/"):
            await self._control(method, path, send)
            return
        self._requests[f"{method} {path}"] += 1
        self._serial += 1
        if _GEMINI_PATH.search(path):
            schema: str | None = "gemini"
        else:
            schema = next((name for suffix, name in _ROUTES if path.endswith(suffix)), None)
        flavour = schema if schema in ("anthropic", "gemini") else "openai"
        request_id = f"req_mock{self._serial:020d}"  # unique per request, like the real ones
        if schema is not None and method == "POST":
            query = scope.get("query_string", b"").decode("latin-1")
            await self._llm(schema, path, headers, request_id, receive, send, query)
        elif schema is not None:
            message = f"Method {method} not allowed on {path}"
            await _send_json(
                send,
                405,
                _error_body(flavour, 405, message, request_id),
                request_id,
                flavour,
                extra=[(b"allow", b"POST")],
            )
        elif method == "GET" and path.rstrip("/").endswith("/models"):
            await _send_json(send, 200, self._models("anthropic-version" in headers), request_id)
        else:
            message = f"Invalid URL ({method} {path})"
            body = _error_body(flavour, 404, message, request_id)
            await _send_json(send, 404, body, request_id)

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _control(self, method: str, path: str, send: _Send) -> None:
        if method == "GET" and path == "/_mock/stats":
            await _send_json(send, 200, _encoder.encode(self.stats()), None)
        elif method == "POST" and path == "/_mock/reset":
            self.reset()
            await _send_json(send, 200, _encoder.encode(self.stats()), None)
        else:
            body = _openai_error(f"Invalid URL ({method} {path})", "invalid_request_error", None)
            await _send_json(send, 404, body, None)

    def _models(self, anthropic: bool) -> bytes:
        if anthropic:
            model = {
                "type": "model",
                "id": "claude-mock-1",
                "display_name": "Claude Mock 1",
                "created_at": "2025-06-01T00:00:00Z",
            }
            listing = {
                "data": [model],
                "has_more": False,
                "first_id": model["id"],
                "last_id": model["id"],
            }
            return _encoder.encode(listing)
        data = [
            {"id": name, "object": "model", "created": 1_750_000_000, "owned_by": "sse-cache"}
            for name in ("gpt-mock-1", "gpt-mock-1-mini")
        ]
        return _encoder.encode({"object": "list", "data": data})

    def _options(self, headers: Mapping[str, str]) -> _Options:
        delay = _header_number(headers, "x-mock-delay-ms", integer=False)
        first = _header_number(headers, "x-mock-first-ms", integer=False)
        deltas = _header_number(headers, "x-mock-deltas", integer=True)
        summaries = _header_number(headers, "x-mock-summaries", integer=True)
        after = _header_number(headers, "x-mock-error-after", integer=True)
        error = headers.get("x-mock-error")
        if error is not None:
            error = error.strip().lower()
            if error not in ERROR_MODES:
                known = ", ".join(sorted(ERROR_MODES))
                raise _BadRequest(
                    f"header x-mock-error must be one of {known}, got {error!r}", "x-mock-error"
                )
        retry = headers.get("x-mock-retry-after", "1").strip()
        gap = self.delay if delay is None else delay / 1000
        if first is not None:
            first_delay = first / 1000
        elif delay is not None:
            first_delay = gap  # x-mock-delay-ms alone paces the whole answer
        else:
            first_delay = self.first_delay
        return _Options(
            delay=gap,
            first_delay=first_delay,
            deltas=max(1, int(deltas)) if deltas is not None else self.deltas,
            summaries=int(summaries) if summaries is not None else self.summaries,
            error=error,
            error_after=int(after) if after is not None else None,
            retry_after=retry,
        )

    async def _llm(
        self,
        schema: str,
        path: str,
        headers: Mapping[str, str],
        request_id: str,
        receive: _Receive,
        send: _Send,
        query: str = "",
    ) -> None:
        flavour = schema if schema in ("anthropic", "gemini") else "openai"
        raw = await _read_body(receive, self.max_body_bytes)
        if raw is None:
            message = f"Request body is larger than {self.max_body_bytes} bytes"
            await _send_json(
                send, 413, _error_body(flavour, 413, message, request_id), request_id, flavour
            )
            return
        try:
            try:
                body = _decoder.decode(raw)
            except msgspec.DecodeError:
                raise _BadRequest("The request body is not valid JSON") from None
            except RecursionError:  # nested deeper than the decoder follows
                raise _BadRequest("The request body is nested too deeply") from None
            if not isinstance(body, dict):
                raise _BadRequest("The request body must be a JSON object")
            opts = self._options(headers)
        except _BadRequest as exc:
            error = _error_body(flavour, 400, exc.message, request_id, exc.param)
            await _send_json(send, 400, error, request_id, flavour)
            return
        gemini = _GEMINI_PATH.search(path) if schema == "gemini" else None
        array = False  # Gemini streamGenerateContent without alt=sse: a JSON array
        if gemini is not None:
            stream = gemini["method"] == "streamGenerateContent"
            params = urllib.parse.parse_qs(query)
            array = stream and (params.get("alt") or params.get("$alt") or [""])[-1] != "sse"
        else:
            stream = body.get("stream") is True
        self._streams += stream
        self._recent.append(
            {
                "route": f"POST {path}",
                "stream": stream,
                "error": opts.error,
                "body_sha256": hashlib.sha256(raw).hexdigest(),
                "headers": sorted(headers),
            }
        )
        if opts.error in ("500", "429"):
            status = int(opts.error)
            text = (
                "Rate limit reached for requests (x-mock-error: 429)"
                if status == 429
                else "The server had an error while processing your request (x-mock-error: 500)"
            )
            extra = [(b"retry-after", opts.retry_after.encode("latin-1"))] if status == 429 else []
            await _send_json(
                send,
                status,
                _error_body(flavour, status, text, request_id),
                request_id,
                flavour,
                extra=extra,
            )
            return
        not_answer = _NOT_ANSWER | _GEMINI_NOT_ANSWER if gemini is not None else _NOT_ANSWER
        answer_fields = {k: v for k, v in body.items() if k not in not_answer}
        canonical = _canonical(answer_fields)
        seed = f"{self.seed!r}\0{schema}\0{opts.deltas}\0{opts.summaries}\0".encode()
        if gemini is not None:
            seed += f"{gemini['model']}\0".encode()  # the model is in the path
        digest = hashlib.blake2b(seed + canonical, digest_size=16).hexdigest()
        tokens_in = 1 + len(canonical) // 4
        if schema == "responses":
            answer = _responses_answer(body, opts, digest, tokens_in)
        elif schema == "chat":
            answer = _chat_answer(body, opts, digest, tokens_in)
        elif gemini is not None:
            answer = _gemini_answer(body, gemini["model"], opts, digest, tokens_in)
        else:
            answer = _anthropic_answer(body, opts, digest, tokens_in, request_id)
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if stream:
                await self._stream(answer, opts, request_id, flavour, receive, send, array)
            else:
                await self._unary(answer, opts, request_id, flavour, receive, send)
        finally:
            self._in_flight -= 1

    def _cut_point(self, answer: _Answer, opts: _Options) -> int:
        total = len(answer.events)
        after = opts.error_after if opts.error_after is not None else total // 2
        return max(0, min(after, total - 1))  # never the whole stream: the end must be missing

    async def _stream(
        self,
        answer: _Answer,
        opts: _Options,
        request_id: str,
        flavour: str,
        receive: _Receive,
        send: _Send,
        array: bool = False,
    ) -> None:
        mode = opts.error
        events = answer.events
        if mode is not None:
            after = self._cut_point(answer, opts)
            events = events[:after]
            if mode == "fail-mid-stream":
                events = events + answer.failure(after)
        if array:
            # Gemini's streamGenerateContent without alt=sse: the chunks as one JSON array.
            chunks = [
                (b"[" if i == 0 else b",\r\n") + e.data.encode("utf-8")
                for i, e in enumerate(events)
            ]
            if mode in (None, "fail-mid-stream"):
                chunks.append(b"]" if chunks else b"[]")
        else:
            chunks = [serialize_sse([e]) for e in events]
        if mode == "bad-sse":
            chunks.append(_BAD_SSE)
        media = b"application/json; charset=UTF-8" if array else b"text/event-stream; charset=utf-8"
        headers = [
            (b"content-type", media),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            _request_id_header(flavour, request_id),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watch = _Watch()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, receive, watch, tg.cancel_scope)
            try:
                for i, chunk in enumerate(chunks):
                    await _pause(opts.first_delay if i == 0 else opts.delay)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                # Set before the last send: once the body is complete, a disconnect is the
                # normal end of the exchange, not a client leaving mid-stream.
                watch.done = True
                if mode != "cut":
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                self._gone(watch)  # some servers raise on a closed connection instead
            tg.cancel_scope.cancel()
        if mode == "cut" and watch.done:
            # Raised outside the task group so that it is not wrapped in an ExceptionGroup.
            raise UpstreamCut(f"mock upstream cut the stream after {len(chunks)} events")

    async def _unary(
        self,
        answer: _Answer,
        opts: _Options,
        request_id: str,
        flavour: str,
        receive: _Receive,
        send: _Send,
    ) -> None:
        mode = opts.error
        status, body = 200, answer.body
        events = len(answer.events) if mode is None else self._cut_point(answer, opts)
        if mode == "fail-mid-stream":
            status, body = answer.failed_unary
        watch = _Watch()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, receive, watch, tg.cancel_scope)
            # A non-stream answer takes as long as its stream would have: generation time.
            await _pause(opts.first_delay + opts.delay * max(0, events - 1))
            watch.done = True
            tg.cancel_scope.cancel()
        if watch.disconnected:
            return
        try:
            if mode == "cut":
                await send(_start(200, len(body), request_id, flavour))
                half = {"type": "http.response.body", "body": body[: len(body) // 2]}
                await send({**half, "more_body": True})
            else:
                if mode == "bad-sse":
                    body = body[: len(body) // 2]
                await send(_start(status, len(body), request_id, flavour))
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError:
            return  # the client left while the answer was being sent
        if mode == "cut":
            raise UpstreamCut("mock upstream cut the response body in half")

    async def _watch(self, receive: _Receive, watch: _Watch, scope: anyio.CancelScope) -> None:
        # The request body was read in full: the next message is the client going away.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not watch.done:
            self._gone(watch)
            scope.cancel()

    def _gone(self, watch: _Watch) -> None:
        if not (watch.done or watch.disconnected):
            watch.disconnected = True
            self._disconnects += 1


async def _pause(seconds: float) -> None:
    if seconds > 0:
        await anyio.sleep(seconds)
    else:
        await anyio.lowlevel.checkpoint()


async def _read_body(receive: _Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than ``limit`` (drained anyway)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts) if size <= limit else None


def _request_id_header(flavour: str, request_id: str) -> tuple[bytes, bytes]:
    name = b"request-id" if flavour == "anthropic" else b"x-request-id"
    return name, request_id.encode("ascii")


def _start(status: int, length: int, request_id: str | None, flavour: str = "openai") -> _Message:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    if request_id is not None:
        headers.append(_request_id_header(flavour, request_id))
    return {"type": "http.response.start", "status": status, "headers": headers}


async def _send_json(
    send: _Send,
    status: int,
    body: bytes,
    request_id: str | None,
    flavour: str = "openai",
    *,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    start = _start(status, len(body), request_id, flavour)
    start["headers"].extend(extra)
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
