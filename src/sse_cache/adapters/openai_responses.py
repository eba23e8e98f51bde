"""The OpenAI Responses API (``POST /v1/responses``): the full stream event set.

Wire form: one ``event: <type>`` line and one compact JSON ``data:`` line per event, each
payload carrying ``type`` and (since mid-2025) a ``sequence_number`` counting from 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import msgspec

from .._checks import boolean
from ..events import Event
from ..protocols import Outcome
from ._common import (
    DEFAULT_DELTA_CHARS,
    STREAM_FLAGS,
    KeyedAdapter,
    is_truthy_raw,
    may_hold_error,
    probe,
)
from ._responses_body import events_from_response, response_with_output

__all__ = ["CONTINUE_EVENT_TYPES", "EXCLUDED_FIELDS", "OpenAIResponses"]

#: Request fields left out of the key. Only transport: a Response echoes nearly every request
#: field (``user``, ``metadata``, ``store``, ``prompt_cache_key``...), so each is part of the
#: answer. Add more with ``ignore_fields``.
EXCLUDED_FIELDS: Final = STREAM_FLAGS

#: Event types known not to end a stream: with an ``event:`` line naming one of these the
#: adapter answers CONTINUE without decoding the payload (the hot path: deltas).
CONTINUE_EVENT_TYPES: Final = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_text.annotation.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.audio.delta",
        "response.audio.done",
        "response.audio.transcript.delta",
        "response.audio.transcript.done",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_list_tools.failed",
        "response.shell_call_command.added",
        "response.shell_call_command.delta",
        "response.shell_call_command.done",
        "response.shell_call_output_content.delta",
        "response.shell_call_output_content.done",
        "response.apply_patch_call_operation_diff.delta",
        "response.apply_patch_call_operation_diff.done",
        "response.compaction.compacting",
    }
)

# Event types that end a stream, successfully or not. An `event:` line naming one of these is
# never trusted alone: the payload must agree, else the stream is not stored.
_TERMINAL: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "error"}
)


class _Status(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    status: str | None = None
    error: msgspec.Raw = msgspec.Raw()
    output: msgspec.Raw = msgspec.Raw()


class _Output(msgspec.Struct):
    output: msgspec.Raw = msgspec.Raw()


class _Sequenced(msgspec.Struct):
    type: str | None = None
    sequence_number: int | None = None


_status_decoder: Final = msgspec.json.Decoder(_Status)
_output_decoder: Final = msgspec.json.Decoder(_Output)
_seq_decoder: Final = msgspec.json.Decoder(_Sequenced)


def _decode_status(raw: bytes | str) -> _Status | None:
    try:
        return _status_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def _says_its_status(data: str) -> bool:
    # A completing event (outcome() read its type and an object response): its response's
    # status, if it has one, is the event's ("completed" for response.completed).
    p = probe(data)
    s = None if p is None or p.type is None else _decode_status(bytes(p.response))
    if p is None or p.type is None or s is None:
        return False
    return s.status is None or s.status == p.type.removeprefix("response.")


class OpenAIResponses(KeyedAdapter):
    """Adapter for the OpenAI Responses API.

    - **key**: every request field except ``stream``, ``stream_options`` (of a streamed
      request) and ``ignore_fields``.
    - **outcome**: ``response.completed`` completes; ``response.failed``, ``error`` (and any
      payload with a truthy top-level ``error``) fail; ``response.incomplete`` fails unless
      ``store_incomplete=True``. A terminal ``event:`` line whose payload is unreadable or
      disagrees fails. Everything else, known or not, continues.
    - **final_body**: the ``response`` object of the completing event, bytes as received
      (rebuilt from ``response.output_item.done`` items only when it carries no ``output``).
    - **synthesize**: the event sequence the API emits for the stored response, with
      ``sequence_number`` from 0 and text split into deltas of at most ``delta_chars``
      characters (``None``: one delta per text).
    """

    name = "openai-responses"
    #: Request headers that change the answer, or whose answer it is (an organisation or
    #: project of one API key): part of the key in the HTTP integrations.
    key_headers: tuple[str, ...] = ("openai-beta", "openai-organization", "openai-project")
    excluded_fields = EXCLUDED_FIELDS
    #: A request that continues a ``conversation``: the upstream adds every answer to it (its
    #: items are state on the server), and a replayed answer would neither be added nor
    #: follow what the conversation holds by then.
    stateful_fields = (
        ("conversation", "the request continues a conversation (its state is the upstream's)"),
    )

    def __init__(
        self,
        *,
        ignore_fields: Iterable[str] = (),
        delta_chars: int | None = DEFAULT_DELTA_CHARS,
        store_incomplete: bool = False,
    ) -> None:
        super().__init__(ignore_fields=ignore_fields, delta_chars=delta_chars)
        boolean("store_incomplete", store_incomplete)  # ("no" is truthy)
        self.store_incomplete = store_incomplete
        self._done: frozenset[str] = frozenset(
            {"response.completed", "response.incomplete"}
            if store_incomplete
            else {"response.completed"}
        )

    # -- outcome ---------------------------------------------------------------------------

    def outcome(self, event: Event) -> Outcome:
        name = event.event
        # Fast path: a payload that cannot have an `error` member is not decoded (the SDK
        # raises on a truthy one, whatever the event's name).
        if name is not None and name in CONTINUE_EVENT_TYPES and not may_hold_error(event.data):
            return Outcome.CONTINUE
        p = probe(event.data)
        if p is None:
            # Unreadable data passes through, unless it claims to end the stream.
            return Outcome.FAIL if name in _TERMINAL else Outcome.CONTINUE
        kind = p.type
        if name in _TERMINAL and kind != name:
            return Outcome.FAIL
        # The SDK raises on any payload with a truthy top-level `error`: so do we.
        if kind == "error" or is_truthy_raw(p.error):
            return Outcome.FAIL
        if kind in self._done:
            return Outcome.COMPLETE if bytes(p.response)[:1] == b"{" else Outcome.FAIL
        if kind in _TERMINAL:
            return Outcome.FAIL
        return Outcome.CONTINUE

    def verify(self, events: Sequence[Event]) -> Outcome:
        """Whole-stream check before storing: a completing event, no failing one, and
        ``sequence_number`` values (where present) that start at 0 (or with the stream's
        ``response.created``) and increase by exactly one, and a completing event whose
        response says as much, where it has a ``status`` (a ``response.completed`` of a
        response ``in_progress``, its output empty, closed a cut stream; helper-165: stored
        and replayed, answering ``stream=false`` with ``in_progress``). A gap means events were lost
        between the API and us; the recording is not faithful. (A gap at the start too:
        such a stream, without its ``response.created``, was stored, and the SDK's
        ``responses.stream()`` raises on it; helper-158. A resumed stream,
        ``starting_after=N``, begins later: it is a GET, never recorded.)"""
        verdict = Outcome.FAIL
        last: int | None = None
        for ev in events:
            outcome = self.outcome(ev)
            if outcome is Outcome.FAIL:
                return Outcome.FAIL
            if outcome is Outcome.COMPLETE:
                if not _says_its_status(ev.data):
                    return Outcome.FAIL
                verdict = Outcome.COMPLETE
            try:
                numbered = _seq_decoder.decode(ev.data)
            except msgspec.DecodeError:
                continue
            seq = numbered.sequence_number
            if seq is not None:
                if last is None:
                    # The first: 0, as the API numbers them, or the stream's own beginning
                    # (a hand-made stream may count from 1); else its first events are lost.
                    if seq != 0 and numbered.type != "response.created":
                        return Outcome.FAIL
                elif seq != last + 1:
                    return Outcome.FAIL
                last = seq
        return verdict

    def body_outcome(self, body: bytes) -> Outcome:
        s = _decode_status(body)
        if s is None or is_truthy_raw(s.error) or bytes(s.output)[:1] != b"[":
            return Outcome.FAIL
        if s.status == "completed" or (s.status == "incomplete" and self.store_incomplete):
            return Outcome.COMPLETE
        return Outcome.FAIL

    # -- stream -> body --------------------------------------------------------------------

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        # The completing event is (nearly always) the last one: scan from the end.
        for ev in reversed(events):
            name = ev.event
            if name is not None and name in CONTINUE_EVENT_TYPES:
                continue
            p = probe(ev.data)
            if p is None or p.type not in self._done:
                continue
            raw = bytes(p.response)
            if raw[:1] != b"{":
                return None
            try:
                output = bytes(_output_decoder.decode(raw).output)
            except msgspec.DecodeError:
                return None
            return raw if output[:1] == b"[" else response_with_output(raw, events)
        return None

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        """``response_id`` (for resume via ``GET /v1/responses/{id}``), ``model``."""
        for ev in events:
            p = probe(ev.data)
            if p is None or bytes(p.response)[:1] != b"{":
                continue
            s = _decode_status(bytes(p.response))
            if s is None:
                continue
            out: dict[str, str] = {}
            if s.id:
                out["response_id"] = s.id
            if s.model:
                out["model"] = s.model
            return out
        return {}

    def events_after(self, events: Sequence[Event], starting_after: int) -> list[Event]:
        """The events a client resuming with ``starting_after=N`` still needs: those whose
        ``sequence_number`` is greater than N (``GET /v1/responses/{id}?stream=true``)."""
        out: list[Event] = []
        for ev in events:
            try:
                seq = _seq_decoder.decode(ev.data).sequence_number
            except msgspec.DecodeError:
                seq = None
            if out or (seq is not None and seq > starting_after):
                out.append(ev)
        return out

    # -- body -> stream --------------------------------------------------------------------

    def synthesize(self, body: bytes) -> list[Event] | None:
        return events_from_response(body, self.delta_chars)
