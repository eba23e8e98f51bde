"""The Anthropic Messages API (``POST /v1/messages``).

Wire form: ``event: <type>`` + one JSON ``data:`` line per event (sometimes padded with
whitespace), ``ping`` keep-alives, and ``event: error`` for failures mid-stream. The official
SDK ignores events without an ``event:`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from .._checks import boolean
from ..events import Event
from ..protocols import Outcome
from ._common import (
    DEFAULT_DELTA_CHARS,
    STREAM_FLAGS,
    KeyedAdapter,
    dumps,
    is_truthy_raw,
    loads,
    loads_object,
    may_hold_error,
    payloads_of_type,
    probe,
    split_text,
)

__all__ = ["CONTINUE_EVENT_TYPES", "EXCLUDED_FIELDS", "AnthropicMessages"]

#: Request fields left out of the key: transport, plus ``metadata`` (``user_id``: who asked,
#: never echoed in the message and never changing it). Not ``stream_options``, which is no
#: field of this API (it refuses it: such a request keys apart, as any unknown field).
EXCLUDED_FIELDS: Final = (STREAM_FLAGS - {"stream_options"}) | frozenset({"metadata"})

#: ``event:`` names answered CONTINUE without decoding the payload.
CONTINUE_EVENT_TYPES: Final = frozenset(
    {
        "message_start",
        "message_delta",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "ping",
    }
)

# Block fields accumulated from deltas; synthesised blocks start with them empty.
_TEXT_FIELDS: Final = {"text_delta": "text", "thinking_delta": "thinking"}


class _StopReason(msgspec.Struct):
    type: str | None = None
    stop_reason: str | None = None
    error: msgspec.Raw = msgspec.Raw()


class _Info(msgspec.Struct):
    id: str | None = None
    model: str | None = None


class _Start(msgspec.Struct):
    type: str | None = None
    message: _Info | None = None


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct):
    delta: _StopDelta = msgspec.field(default_factory=_StopDelta)


class _Block(msgspec.Struct):
    index: int | None = None


class _StartStop(msgspec.Struct):
    message: _StopDelta | None = None


_stop_decoder: Final = msgspec.json.Decoder(_StopReason)
_delta_stop_decoder: Final = msgspec.json.Decoder(_MessageDelta)
_block_decoder: Final = msgspec.json.Decoder(_Block)
_start_stop_decoder: Final = msgspec.json.Decoder(_StartStop)
_start_decoder: Final = msgspec.json.Decoder(_Start)


class AnthropicMessages(KeyedAdapter):
    """Adapter for the Anthropic Messages API.

    - **key**: every request field except ``stream``, ``metadata`` (unless it holds more
      than a ``user_id`` string, which the API refuses) and ``ignore_fields``.
    - **outcome**: ``message_stop`` completes; ``event: error`` (or an ``error`` payload)
      fails; a ``message_stop`` whose payload is unreadable fails. Events without an
      ``event:`` line are passed through but never complete a stream (the SDK ignores them).
      :meth:`verify` and :meth:`body_outcome` also fail ``stop_reason: "refusal"`` (the
      streaming classifiers stopped the answer midway) unless ``store_blocked=True``.
    - **final_body**: the accumulated ``message``: text with citations, thinking with its
      signature, redacted thinking, tool use (client and server) with ``input`` parsed from
      the ``partial_json`` deltas, tool results, stop reason and usage from ``message_delta``.
    - **synthesize**: ``message_start``, a ``ping``, per block ``content_block_start`` /
      deltas / ``content_block_stop``, ``message_delta``, ``message_stop``.
    """

    name = "anthropic-messages"
    #: Request headers that change the answer: part of the key in the HTTP integrations.
    key_headers: tuple[str, ...] = ("anthropic-version", "anthropic-beta")
    excluded_fields = EXCLUDED_FIELDS
    # (Not stream_options: no field of this API, never left out, so never read back.)
    maybe_read = frozenset({"metadata"})

    def __init__(
        self,
        *,
        ignore_fields: Iterable[str] = (),
        delta_chars: int | None = DEFAULT_DELTA_CHARS,
        ping: bool = True,
        store_blocked: bool = False,
    ) -> None:
        super().__init__(ignore_fields=ignore_fields, delta_chars=delta_chars)
        boolean("ping", ping)  # ("no" is truthy)
        boolean("store_blocked", store_blocked)
        self.ping = ping
        self.store_blocked = store_blocked

    def excluded_but_read(self, body: Mapping[str, Any]) -> tuple[str, ...]:
        """A ``metadata`` that is more than ``{"user_id": ...}`` (a string or null):
        the API refuses any other member (400), and left out, such a request was answered
        200 from a valid request's entry (helper-88)."""
        metadata = body.get("metadata")
        if metadata is None or (
            isinstance(metadata, dict)
            and metadata.keys() <= {"user_id"}
            and isinstance(metadata.get("user_id", ""), str | None)
        ):
            return ()
        return ("metadata",)

    # -- outcome ---------------------------------------------------------------------------

    def outcome(self, event: Event) -> Outcome:
        name = event.event
        if name is not None and name in CONTINUE_EVENT_TYPES:
            return Outcome.CONTINUE
        if name == "error":
            return Outcome.FAIL
        if name is None and not may_hold_error(event.data):
            return Outcome.CONTINUE  # the SDK skips it; only an error payload matters here
        p = probe(event.data)
        if p is None:
            return Outcome.FAIL if name == "message_stop" else Outcome.CONTINUE
        if p.type == "error" or is_truthy_raw(p.error):
            return Outcome.FAIL
        if name is None:
            return Outcome.CONTINUE
        if p.type == "message_stop":
            return Outcome.COMPLETE
        return Outcome.FAIL if name == "message_stop" else Outcome.CONTINUE

    def verify(self, events: Sequence[Event]) -> Outcome:
        """Whole-stream check: a ``message_start`` before the completing ``message_stop``,
        a ``stop_reason`` (a ``message_delta`` gives it) and every content block started
        stopped before it, no failing event, and no ``stop_reason: "refusal"`` unless
        ``store_blocked``. (A gateway whose own upstream broke off midway may end the
        message all the same: ``message_stop`` after part of a block, no stop reason.)"""
        started = False
        stop_reason: str | None = None
        open_blocks: set[int | None] = set()
        verdict = Outcome.FAIL
        for ev in events:
            outcome = self.outcome(ev)
            if outcome is Outcome.FAIL:
                return Outcome.FAIL
            name = ev.event
            if outcome is Outcome.COMPLETE and started:
                whole = stop_reason is not None and not open_blocks
                verdict = Outcome.COMPLETE if whole else Outcome.FAIL
            elif name == "message_start":
                started = True
                try:
                    start = _start_stop_decoder.decode(ev.data).message
                except msgspec.DecodeError:
                    continue
                if start is not None and start.stop_reason is not None:
                    stop_reason = start.stop_reason
            elif name == "content_block_start" or name == "content_block_stop":
                try:
                    index = _block_decoder.decode(ev.data).index
                except msgspec.DecodeError:
                    return Outcome.FAIL  # (the SDK fails on it too)
                if name == "content_block_start":
                    open_blocks.add(index)
                else:
                    open_blocks.discard(index)
            elif name == "message_delta":
                try:
                    reason = _delta_stop_decoder.decode(ev.data).delta.stop_reason
                except msgspec.DecodeError:
                    continue
                if reason is not None:
                    stop_reason = reason
                if self._blocked(reason):
                    return Outcome.FAIL
        return verdict

    def body_outcome(self, body: bytes) -> Outcome:
        try:
            s = _stop_decoder.decode(body)
        except msgspec.DecodeError:
            return Outcome.FAIL
        if s.type != "message" or is_truthy_raw(s.error) or s.stop_reason is None:
            return Outcome.FAIL
        return Outcome.FAIL if self._blocked(s.stop_reason) else Outcome.COMPLETE

    def _blocked(self, stop_reason: str | None) -> bool:
        # The streaming classifiers stopped the answer midway (Claude's `refusal`): not
        # stored, as Gemini's SAFETY is not — asked again, it may pass (helper-109).
        return stop_reason == "refusal" and not self.store_blocked

    # -- stream -> body --------------------------------------------------------------------

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        message: dict[str, Any] | None = None
        blocks: dict[int, dict[str, Any]] = {}
        parts: dict[tuple[int, str], list[str]] = {}  # (block, field) -> text pieces
        for ev in events:
            if ev.event == "ping":
                continue
            data = loads_object(ev.data)
            if data is None:
                continue
            kind = data.get("type")
            if kind == "message_start":
                start = data.get("message")
                if isinstance(start, dict):
                    message = dict(start)
                    blocks.clear()
                    parts.clear()
                    content = start.get("content")
                    for i, block in enumerate(content if isinstance(content, list) else []):
                        if isinstance(block, dict):
                            blocks[i] = dict(block)
            elif message is None:
                continue
            elif kind == "content_block_start":
                index, block = data.get("index"), data.get("content_block")
                if isinstance(index, int) and isinstance(block, dict):
                    blocks[index] = dict(block)
                    for key in [k for k in parts if k[0] == index]:
                        del parts[key]
            elif kind == "content_block_delta":
                index, delta = data.get("index"), data.get("delta")
                if isinstance(index, int) and index in blocks and isinstance(delta, dict):
                    _apply_delta(blocks[index], delta, index, parts)
            elif kind == "message_delta":
                _apply_message_delta(message, data)
            elif kind == "message_stop":
                break
        if message is None:
            return None
        for (index, field), pieces in parts.items():
            block = blocks[index]
            if field == "partial_json":
                _set_input(block, "".join(pieces))
            else:
                prev = block.get(field)
                block[field] = (prev if isinstance(prev, str) else "") + "".join(pieces)
        message["content"] = [blocks[i] for i in sorted(blocks)]
        return dumps(message).encode("utf-8")

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        """``message_id`` and ``model`` from ``message_start``."""
        for start in payloads_of_type(events, "message_start", _start_decoder):
            if start.message is not None:
                out: dict[str, str] = {}
                if start.message.id:
                    out["message_id"] = start.message.id
                if start.message.model:
                    out["model"] = start.message.model
                return out
        return {}

    # -- body -> stream --------------------------------------------------------------------

    def synthesize(self, body: bytes) -> list[Event] | None:
        message = loads_object(body)
        if message is None or not isinstance(message.get("content"), list):
            return None
        events: list[Event] = []

        def emit(type_: str, **fields: Any) -> None:
            events.append(Event(dumps({"type": type_, **fields}), type_))

        usage = message.get("usage")
        start = {**message, "content": [], "stop_reason": None}
        for key in ("stop_sequence", "stop_details"):
            if key in start:
                start[key] = None
        if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
            # Like the API: message_start counts the first output token only; message_delta
            # carries the final (cumulative) counts.
            start["usage"] = {**usage, "output_tokens": min(usage["output_tokens"], 1)}
        emit("message_start", message=start)
        for index, block in enumerate(message["content"]):
            self._emit_block(emit, index, block)
            if index == 0 and self.ping:
                events.append(Event('{"type": "ping"}', "ping"))
        if self.ping and not message["content"]:
            events.append(Event('{"type": "ping"}', "ping"))
        delta: dict[str, Any] = {"stop_reason": message.get("stop_reason")}
        for key in ("stop_sequence", "stop_details", "container"):
            if key in message:
                delta[key] = message[key]
        final_usage: dict[str, Any] = {}
        if isinstance(usage, dict):
            final_usage = {k: v for k, v in usage.items() if v is not None and k in _DELTA_USAGE}
        emit("message_delta", delta=delta, usage=final_usage)
        emit("message_stop")
        return events

    def _emit_block(self, emit: Callable[..., None], index: int, block: Any) -> None:
        chars = self.delta_chars
        if not isinstance(block, dict):
            emit("content_block_start", index=index, content_block=block)
            emit("content_block_stop", index=index)
            return
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            citations = block.get("citations")
            start = {**block, "text": ""}
            if isinstance(citations, list) and citations:
                start["citations"] = []
            emit("content_block_start", index=index, content_block=start)
            if isinstance(citations, list):
                for citation in citations:
                    delta = {"type": "citations_delta", "citation": citation}
                    emit("content_block_delta", index=index, delta=delta)
            for piece in split_text(block["text"], chars):
                emit(
                    "content_block_delta", index=index, delta={"type": "text_delta", "text": piece}
                )
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            signature = block.get("signature")
            start = {**block, "thinking": ""}
            if isinstance(signature, str):
                start["signature"] = ""
            emit("content_block_start", index=index, content_block=start)
            for piece in split_text(block["thinking"], chars):
                delta = {"type": "thinking_delta", "thinking": piece}
                emit("content_block_delta", index=index, delta=delta)
            if isinstance(signature, str) and signature:
                delta = {"type": "signature_delta", "signature": signature}
                emit("content_block_delta", index=index, delta=delta)
        elif isinstance(block.get("input"), dict):
            # tool_use, server_tool_use, mcp_tool_use...: input streamed as JSON text.
            emit("content_block_start", index=index, content_block={**block, "input": {}})
            text = dumps(block["input"]) if block["input"] else ""
            for piece in split_text(text, chars) or [""]:
                delta = {"type": "input_json_delta", "partial_json": piece}
                emit("content_block_delta", index=index, delta=delta)
        else:
            # Redacted thinking, tool results, unknown blocks: complete at start.
            emit("content_block_start", index=index, content_block=block)
        emit("content_block_stop", index=index)


# Usage counts a message_delta carries (cumulative totals); the rest stays in message_start.
_DELTA_USAGE: Final = frozenset(
    {
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "server_tool_use",
        "output_tokens_details",
    }
)


def _apply_delta(
    block: dict[str, Any],
    delta: dict[str, Any],
    index: int,
    parts: dict[tuple[int, str], list[str]],
) -> None:
    kind = delta.get("type")
    field = _TEXT_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is not None:
        piece = delta.get(field)
        if isinstance(piece, str):
            parts.setdefault((index, field), []).append(piece)
    elif kind == "input_json_delta":
        piece = delta.get("partial_json")
        if isinstance(piece, str):
            parts.setdefault((index, "partial_json"), []).append(piece)
    elif kind == "signature_delta":
        block["signature"] = delta.get("signature")
    elif kind == "citations_delta":
        citations = block.get("citations")
        if not isinstance(citations, list):
            citations = block["citations"] = []
        citations.append(delta.get("citation"))
    else:
        # An unknown delta kind: strings append to the field of the same name, other values
        # replace it (the natural reading of a future `<field>_delta`).
        for key, value in delta.items():
            if key == "type":
                continue
            if isinstance(value, str):
                parts.setdefault((index, key), []).append(value)
            else:
                block[key] = value


def _set_input(block: dict[str, Any], text: str) -> None:
    if not text.strip():
        return  # no input streamed: keep the start block's (empty) input
    value = loads(text)
    if value is not None or text.strip() == "null":
        block["input"] = value


def _apply_message_delta(message: dict[str, Any], data: dict[str, Any]) -> None:
    delta = data.get("delta")
    if isinstance(delta, dict):
        for key, value in delta.items():
            # stop_* describe the end and always replace; others only when given.
            if value is not None or key.startswith("stop_"):
                message[key] = value
    usage = data.get("usage")
    if isinstance(usage, dict):
        current = message.get("usage")
        if not isinstance(current, dict):
            current = message["usage"] = {}
        for key, value in usage.items():
            if value is not None:  # cumulative totals; absent ones keep message_start's
                current[key] = value
