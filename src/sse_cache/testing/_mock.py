"""The mock upstream: :class:`MockUpstream`, an ASGI app answering like the OpenAI, Anthropic
and Gemini streaming APIs. This module routes a request, reads its options and counts it; the
answers are built per API (``_responses``, ``_chat``, ``_anthropic``, ``_gemini``) and sent by
``_delivery``."""

from __future__ import annotations

import hashlib
import urllib.parse
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from ._anthropic import anthropic_answer
from ._asgi import Receive, Scope, Send, lifespan, read_body, send_json
from ._chat import chat_answer
from ._delivery import send_stream, send_unary
from ._errors import error_body, openai_error
from ._gemini import NOT_ANSWER as GEMINI_NOT_ANSWER
from ._gemini import PATH as GEMINI_PATH
from ._gemini import gemini_answer
from ._request import ERROR_MODES, Answer, BadRequest, Options, header_number
from ._responses import responses_answer

__all__ = ["DEFAULT_DELTAS", "DEFAULT_SUMMARIES", "MockUpstream"]

#: Default number of words (text deltas) in an answer.
DEFAULT_DELTAS: Final = 24
#: Default number of reasoning summary parts of a Responses answer.
DEFAULT_SUMMARIES: Final = 3

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
_RECENT: Final = 100

_encode: Final = msgspec.json.Encoder().encode
_decoder: Final = msgspec.json.Decoder()


def _request_id_header(flavour: str, request_id: str) -> tuple[bytes, bytes]:
    name = b"request-id" if flavour == "anthropic" else b"x-request-id"
    return name, request_id.encode("ascii")


async def _provider_error(
    send: Send, status: int, opts: Options, request_id: str, flavour: str
) -> None:
    """``x-mock-error: 500`` or ``429``: the provider's JSON error at once."""
    text = (
        "Rate limit reached for requests (x-mock-error: 429)"
        if status == 429
        else "The server had an error while processing your request (x-mock-error: 500)"
    )
    extra = [(b"retry-after", opts.retry_after.encode("latin-1"))] if status == 429 else []
    body = error_body(flavour, status, text, request_id)
    await _json_answer(send, status, body, request_id, flavour, extra=extra)


async def _json_answer(
    send: Send,
    status: int,
    body: bytes,
    request_id: str | None,
    flavour: str = "openai",
    *,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    head = [] if request_id is None else [_request_id_header(flavour, request_id)]
    await send_json(send, status, body, [*head, *extra])


class MockUpstream:
    """A deterministic OpenAI/Anthropic/Gemini-compatible upstream, as a plain ASGI 3 application.

    ``delay``: seconds between events; ``first_delay``: seconds before the first event
    (``None``: the same as ``delay``); ``seed``: mixed into every answer (two apps with the
    same seed answer the same request identically); ``deltas``: words in an answer (one text
    delta each); ``summaries``: reasoning summary parts of a Responses answer (and paragraphs
    of an Anthropic thinking block); ``max_body_bytes``: larger request bodies get ``413``.
    Each can be overridden per request by ``x-mock-*`` headers (below). The app keeps no
    per-request state on the instance, only the counters of :meth:`stats`. Raises
    :class:`ValueError` for negative delays or counts.

    :class:`MockUpstream` answers like the real providers do, from nothing but the request:

    - ``POST /v1/responses`` (OpenAI Responses): ``"stream": true`` gives ``text/event-stream`` with
      ``event: <type>`` + one compact JSON ``data:`` line per event and contiguous
      ``sequence_number`` values: ``response.created``, ``response.in_progress``, a reasoning item
      with several summary parts (``summary_index`` 0..n-1), then a message with ``output_text``
      deltas - or, when the request has function ``tools``, a ``function_call`` item streamed with
      ``response.function_call_arguments.delta/.done`` - and ``response.completed``. Without
      ``stream`` the answer is the ``application/json`` response object that ``response.completed``
      carries, byte for byte.
    - ``POST /v1/chat/completions``: ``data:``-only ``chat.completion.chunk`` events ending with
      ``data: [DONE]``; a usage chunk when ``stream_options.include_usage`` is true; tool calls when
      ``tools`` are given; ``n`` choices interleaved. Non-stream: a ``chat.completion``.
    - ``POST /v1/messages`` (Anthropic): ``message_start``, ``content_block_start/delta/stop`` (a
      ``thinking`` block with a ``signature_delta`` when ``thinking`` is enabled, a text block, a
      ``tool_use`` block with ``input_json_delta`` when ``tools`` are given), ``ping``,
      ``message_delta``, ``message_stop``. Non-stream: the ``message``.
    - ``POST .../models/{model}:streamGenerateContent?alt=sse`` (Google Gemini, under any prefix:
      ``/v1beta/models/...``, Vertex AI's
      ``/v1/projects/p/locations/l/publishers/google/models/...``): data-only
      ``GenerateContentResponse`` chunks, one part each: thought summaries (``thought: true``) when
      ``generationConfig.thinkingConfig.includeThoughts`` is true, then a function call (with its
      ``thoughtSignature``) when ``tools`` declare functions, or the text ending in an empty part
      that carries the signature; ``candidateCount`` candidates; ``finishReason`` ``MAX_TOKENS``
      when ``maxOutputTokens`` cut the answer short, else ``STOP``; a cumulative ``usageMetadata``
      on every chunk. Without ``alt=sse``: the same chunks as one JSON array (``application/json``).
      ``:generateContent``: the answer as one JSON object. Request fields are read by their JSON or
      proto names (``includeThoughts`` / ``include_thoughts``), as the API does. Errors are
      Google-shaped (``{"error": {"code", "message", "status"}}``).
    - ``GET /v1/models``: a tiny model list (Anthropic-shaped when the request carries an
      ``anthropic-version`` header). Anything else: ``404`` with a provider-shaped JSON error.
    - ``GET /_mock/stats``: request counters as JSON (see :meth:`MockUpstream.stats`);
      ``POST /_mock/reset`` zeroes them. These two are not counted.

    The LLM routes are matched by path suffix (``/responses``, ``/chat/completions``, ``/messages``,
    ``/models/{model}:...``), so the mock also answers under prefixes such as ``/openai/v1/...``.

    **Determinism.** The answer (ids, timestamps, text, tool arguments, usage) is a function of the
    app's ``seed``, the route and the canonical JSON of the request body without the fields that
    only change how an answer is delivered or who asked (``stream``, ``stream_options``,
    ``timeout``, ``request_timeout``, ``user``, ``metadata``, ``safety_identifier``,
    ``prompt_cache_key``, ``prompt_cache_retention``): the same request always gets the same bytes,
    a streamed and a non-streamed request for the same answer get the same answer in both forms, and
    different prompts get different answers. Tool turns end: when the conversation's last item is a
    tool result (``function_call_output``, a ``tool`` message, a ``tool_result`` block) the answer
    is text. A JSON-schema output format (``text.format`` / ``response_format``) gets JSON generated
    from the schema.

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
        - ``cut``: after some body bytes the app raises :class:`UpstreamCut`, so an HTTP server
          drops the connection without the final events (a non-stream body is cut in half).
        - ``bad-sse``: after some events, bytes that are not valid SSE over UTF-8 (invalid UTF-8 and
          a truncated JSON ``data`` line), then a clean end without the final events. Non-stream: a
          ``200`` ``application/json`` body that is truncated JSON.
        - ``500`` / ``429``: the provider's JSON error at once (``429`` with ``retry-after``,
          seconds from ``x-mock-retry-after``, default ``1``).

      ``x-mock-error-after``: how many events are sent before the failure (default: half).

    Pacing: the response headers go out at once, the first event after ``first_delay``, every other
    event ``delay`` seconds after the previous one. A non-stream answer is sent after the time its
    stream would have taken. A client that disconnects stops the stream.
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
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
        if GEMINI_PATH.search(path):
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
            await _json_answer(
                send,
                405,
                error_body(flavour, 405, message, request_id),
                request_id,
                flavour,
                extra=[(b"allow", b"POST")],
            )
        elif method == "GET" and path.rstrip("/").endswith("/models"):
            await _json_answer(send, 200, self._models("anthropic-version" in headers), request_id)
        else:
            message = f"Invalid URL ({method} {path})"
            body = error_body(flavour, 404, message, request_id)
            await _json_answer(send, 404, body, request_id)

    async def _control(self, method: str, path: str, send: Send) -> None:
        if method == "GET" and path == "/_mock/stats":
            await _json_answer(send, 200, _encode(self.stats()), None)
        elif method == "POST" and path == "/_mock/reset":
            self.reset()
            await _json_answer(send, 200, _encode(self.stats()), None)
        else:
            body = openai_error(f"Invalid URL ({method} {path})", "invalid_request_error", None)
            await _json_answer(send, 404, body, None)

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
            return _encode(listing)
        data = [
            {"id": name, "object": "model", "created": 1_750_000_000, "owned_by": "sse-cache"}
            for name in ("gpt-mock-1", "gpt-mock-1-mini")
        ]
        return _encode({"object": "list", "data": data})

    def _options(self, headers: Mapping[str, str]) -> Options:
        delay = header_number(headers, "x-mock-delay-ms", integer=False)
        first = header_number(headers, "x-mock-first-ms", integer=False)
        deltas = header_number(headers, "x-mock-deltas", integer=True)
        summaries = header_number(headers, "x-mock-summaries", integer=True)
        after = header_number(headers, "x-mock-error-after", integer=True)
        error = headers.get("x-mock-error")
        if error is not None:
            error = error.strip().lower()
            if error not in ERROR_MODES:
                known = ", ".join(sorted(ERROR_MODES))
                raise BadRequest(
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
        return Options(
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
        receive: Receive,
        send: Send,
        query: str = "",
    ) -> None:
        flavour = schema if schema in ("anthropic", "gemini") else "openai"
        request = await self._read_request(flavour, headers, request_id, receive, send)
        if request is None:
            return
        raw, body, opts = request
        gemini = GEMINI_PATH.search(path) if schema == "gemini" else None
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
            await _provider_error(send, int(opts.error), opts, request_id, flavour)
            return
        model = None if gemini is None else gemini["model"]
        answer = self._answer(schema, model, body, opts, request_id)
        head = [_request_id_header(flavour, request_id)]
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if stream:
                await send_stream(answer, opts, head, receive, send, self._gone, array=array)
            else:
                await send_unary(answer, opts, head, receive, send, self._gone)
        finally:
            self._in_flight -= 1

    async def _read_request(
        self,
        flavour: str,
        headers: Mapping[str, str],
        request_id: str,
        receive: Receive,
        send: Send,
    ) -> tuple[bytes, dict[str, Any], Options] | None:
        """The request's body (raw and decoded) and options, or None once a 413 or a 400 was
        sent for it."""
        raw = await read_body(receive, self.max_body_bytes)
        if raw is None:
            message = f"Request body is larger than {self.max_body_bytes} bytes"
            await _json_answer(
                send, 413, error_body(flavour, 413, message, request_id), request_id, flavour
            )
            return None
        try:
            try:
                body = _decoder.decode(raw)
            except msgspec.DecodeError:
                raise BadRequest("The request body is not valid JSON") from None
            except RecursionError:  # nested deeper than the decoder follows
                raise BadRequest("The request body is nested too deeply") from None
            if not isinstance(body, dict):
                raise BadRequest("The request body must be a JSON object")
            return raw, body, self._options(headers)
        except BadRequest as exc:
            error = error_body(flavour, 400, exc.message, request_id, exc.param)
            await _json_answer(send, 400, error, request_id, flavour)
            return None

    def _answer(
        self,
        schema: str,
        gemini_model: str | None,
        body: dict[str, Any],
        opts: Options,
        request_id: str,
    ) -> Answer:
        """The answer for the request: a function of the app's seed, the route, the options
        and the fields of the body that define an answer."""
        not_answer = _NOT_ANSWER if gemini_model is None else _NOT_ANSWER | GEMINI_NOT_ANSWER
        answer_fields = {k: v for k, v in body.items() if k not in not_answer}
        canonical = msgspec.json.encode(answer_fields, order="sorted")
        seed = f"{self.seed!r}\0{schema}\0{opts.deltas}\0{opts.summaries}\0".encode()
        if gemini_model is not None:
            seed += f"{gemini_model}\0".encode()  # the model is in the path
        digest = hashlib.blake2b(seed + canonical, digest_size=16).hexdigest()
        tokens_in = 1 + len(canonical) // 4
        if schema == "responses":
            return responses_answer(body, opts, digest, tokens_in)
        if schema == "chat":
            return chat_answer(body, opts, digest, tokens_in)
        if gemini_model is not None:
            return gemini_answer(body, gemini_model, opts, digest, tokens_in)
        return anthropic_answer(body, opts, digest, tokens_in, request_id)

    def _gone(self) -> None:
        self._disconnects += 1
