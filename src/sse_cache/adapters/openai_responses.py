"""The OpenAI Responses API (``POST /v1/responses``): the full stream event set.

Wire form: one ``event: <type>`` line and one compact JSON ``data:`` line per event, each
payload carrying ``type`` and (since mid-2025) a ``sequence_number`` counting from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from ..events import Event
from ..protocols import Outcome
from ._common import (
    DEFAULT_DELTA_CHARS,
    TRANSPORT_FIELDS,
    KeyedAdapter,
    dumps,
    is_truthy_raw,
    loads_object,
    probe,
    split_text,
)

__all__ = ["CONTINUE_EVENT_TYPES", "EXCLUDED_FIELDS", "OpenAIResponses"]

#: Request fields left out of the key. Only transport: a Response echoes nearly every request
#: field (``user``, ``metadata``, ``store``, ``prompt_cache_key``...), so each is part of the
#: answer. Add more with ``ignore_fields``.
EXCLUDED_FIELDS: Final = TRANSPORT_FIELDS

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


# The event that ends the stream of a response with this status (others cannot be streamed).
_FINAL_EVENT: Final = {"completed": "response.completed", "incomplete": "response.incomplete"}


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


class _ItemDone(msgspec.Struct):
    type: str | None = None
    output_index: int | None = None
    item: msgspec.Raw = msgspec.Raw()


_status_decoder: Final = msgspec.json.Decoder(_Status)
_output_decoder: Final = msgspec.json.Decoder(_Output)
_seq_decoder: Final = msgspec.json.Decoder(_Sequenced)
_item_done_decoder: Final = msgspec.json.Decoder(_ItemDone)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raw_encoder: Final = msgspec.json.Encoder()


def _decode_status(raw: bytes | str) -> _Status | None:
    try:
        return _status_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


class OpenAIResponses(KeyedAdapter):
    """Adapter for the OpenAI Responses API.

    - **key**: every request field except ``stream``, ``stream_options``, ``timeout``,
      ``request_timeout`` and ``ignore_fields``.
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
    #: Request headers that change the answer: part of the key in the HTTP integrations.
    key_headers: tuple[str, ...] = ("openai-beta",)
    excluded_fields = EXCLUDED_FIELDS

    def __init__(
        self,
        *,
        ignore_fields: Iterable[str] = (),
        delta_chars: int | None = DEFAULT_DELTA_CHARS,
        store_incomplete: bool = False,
    ) -> None:
        super().__init__(ignore_fields=ignore_fields, delta_chars=delta_chars)
        self.store_incomplete = store_incomplete
        self._done: frozenset[str] = frozenset(
            {"response.completed", "response.incomplete"}
            if store_incomplete
            else {"response.completed"}
        )

    # -- outcome ---------------------------------------------------------------------------

    def outcome(self, event: Event) -> Outcome:
        name = event.event
        if name is not None and name in CONTINUE_EVENT_TYPES:
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
        ``sequence_number`` values (where present) that increase by exactly one. A gap
        means events were lost between the API and us; the recording is not faithful."""
        verdict = Outcome.FAIL
        last: int | None = None
        for ev in events:
            outcome = self.outcome(ev)
            if outcome is Outcome.FAIL:
                return Outcome.FAIL
            if outcome is Outcome.COMPLETE:
                verdict = Outcome.COMPLETE
            try:
                seq = _seq_decoder.decode(ev.data).sequence_number
            except msgspec.DecodeError:
                continue
            if seq is not None:
                if last is not None and seq != last + 1:
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
            return raw if output[:1] == b"[" else _with_output(raw, events)
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
        resp = loads_object(body)
        if resp is None or not isinstance(resp.get("output"), list):
            return None
        status = resp.get("status", "completed")
        final = _FINAL_EVENT.get(status) if isinstance(status, str) else None
        if final is None:
            return None  # queued / in progress / failed: no successful stream to show
        b = _Builder(self.delta_chars)
        start = dict(resp)
        background = resp.get("background") is True
        start["status"] = "queued" if background else "in_progress"
        start["output"] = []
        for key in ("usage", "error", "incomplete_details", "completed_at"):
            if key in start:
                start[key] = None
        b.emit("response.created", response=start)
        if background:
            b.emit("response.queued", response=start)
            start = {**start, "status": "in_progress"}
        b.emit("response.in_progress", response=start)
        for index, item in enumerate(resp["output"]):
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(item, dict) and isinstance(kind, str):
                _ITEMS.get(kind, _other_item)(b, index, item)
            else:
                b.emit("response.output_item.added", output_index=index, item=item)
                b.emit("response.output_item.done", output_index=index, item=item)
        b.emit(final, response=resp)
        return b.events


def _with_output(raw: bytes, events: Sequence[Event]) -> bytes | None:
    """The response with ``output`` rebuilt from the ``output_item.done`` events (newer
    streams may leave ``output`` out of ``response.completed``); item bytes kept as sent."""
    try:
        fields = _fields_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    items: dict[int, msgspec.Raw] = {}
    for ev in events:
        if ev.event is not None and ev.event != "response.output_item.done":
            continue
        try:
            done = _item_done_decoder.decode(ev.data)
        except msgspec.DecodeError:
            continue
        if done.type == "response.output_item.done" and done.output_index is not None:
            items[done.output_index] = done.item
    fields["output"] = msgspec.Raw(_raw_encoder.encode([items[i] for i in sorted(items)]))
    return _raw_encoder.encode(fields)


class _Builder:
    """Collects synthesised events with contiguous sequence numbers."""

    __slots__ = ("chars", "events")

    def __init__(self, chars: int | None) -> None:
        self.events: list[Event] = []
        self.chars = chars

    def emit(self, type_: str, **fields: Any) -> None:
        payload: dict[str, Any] = {"type": type_}
        payload.update(fields)
        payload["sequence_number"] = len(self.events)
        self.events.append(Event(dumps(payload), type_))

    def deltas(self, type_: str, text: str, **fields: Any) -> None:
        for piece in split_text(text, self.chars):
            self.emit(type_, delta=piece, **fields)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _in_progress(item: dict[str, Any], **reset: Any) -> dict[str, Any]:
    added = {**item, **reset}
    if "status" in item:
        added["status"] = "in_progress"
    return added


def _message(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    iid = _text(item.get("id"))
    content = item.get("content")
    b.emit("response.output_item.added", output_index=oi, item=_in_progress(item, content=[]))
    for ci, part in enumerate(content if isinstance(content, list) else []):
        where = {"item_id": iid, "output_index": oi, "content_index": ci}
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "output_text":
            _output_text(b, where, part)
        elif kind == "refusal":
            refusal = _text(part.get("refusal"))
            b.emit("response.content_part.added", **where, part={**part, "refusal": ""})
            b.deltas("response.refusal.delta", refusal, **where)
            b.emit("response.refusal.done", **where, refusal=refusal)
        else:
            b.emit("response.content_part.added", **where, part=part)
        b.emit("response.content_part.done", **where, part=part)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _output_text(b: _Builder, where: dict[str, Any], part: dict[str, Any]) -> None:
    text = _text(part.get("text"))
    logprobs = part.get("logprobs")
    annotations = part.get("annotations")
    empty = {**part, "text": ""}
    if isinstance(annotations, list):
        empty["annotations"] = []
    if isinstance(logprobs, list):
        empty["logprobs"] = []
    b.emit("response.content_part.added", **where, part=empty)
    for piece, lp in _aligned(text, logprobs, b.chars):
        b.emit("response.output_text.delta", **where, delta=piece, logprobs=lp)
    for ai, annotation in enumerate(annotations if isinstance(annotations, list) else []):
        b.emit(
            "response.output_text.annotation.added",
            **where,
            annotation_index=ai,
            annotation=annotation,
        )
    done_logprobs = logprobs if isinstance(logprobs, list) else []
    b.emit("response.output_text.done", **where, text=text, logprobs=done_logprobs)


def _aligned(text: str, logprobs: Any, chars: int | None) -> list[tuple[str, list[Any]]]:
    """Deltas for a text: one per logprob token when the tokens spell the text exactly (so
    each delta carries its own logprob, as the API sends them), else split by size."""
    if isinstance(logprobs, list) and logprobs:
        tokens: list[str] = []
        for lp in logprobs:
            token = lp.get("token") if isinstance(lp, dict) else None
            if not isinstance(token, str) or not token:
                break
            tokens.append(token)
        else:
            if "".join(tokens) == text:
                return [(t, [lp]) for t, lp in zip(tokens, logprobs, strict=True)]
    return [(piece, []) for piece in split_text(text, chars)]


def _reasoning(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    iid = _text(item.get("id"))
    summary = item.get("summary")
    content = item.get("content")
    reset: dict[str, Any] = {"summary": []}
    if isinstance(content, list):
        reset["content"] = []
    b.emit("response.output_item.added", output_index=oi, item=_in_progress(item, **reset))
    for ci, part in enumerate(content if isinstance(content, list) else []):
        where = {"item_id": iid, "output_index": oi, "content_index": ci}
        if isinstance(part, dict) and part.get("type") == "reasoning_text":
            text = _text(part.get("text"))
            b.emit("response.content_part.added", **where, part={**part, "text": ""})
            b.deltas("response.reasoning_text.delta", text, **where)
            b.emit("response.reasoning_text.done", **where, text=text)
        else:
            b.emit("response.content_part.added", **where, part=part)
        b.emit("response.content_part.done", **where, part=part)
    # Each summary part has its own summary_index: clients rebuild the parts by it.
    for si, part in enumerate(summary if isinstance(summary, list) else []):
        where = {"item_id": iid, "output_index": oi, "summary_index": si}
        text = _text(part.get("text")) if isinstance(part, dict) else ""
        empty = {**part, "text": ""} if isinstance(part, dict) else part
        b.emit("response.reasoning_summary_part.added", **where, part=empty)
        b.deltas("response.reasoning_summary_text.delta", text, **where)
        b.emit("response.reasoning_summary_text.done", **where, text=text)
        b.emit("response.reasoning_summary_part.done", **where, part=part)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _streamed_field(
    field: str, delta: str, done: str, *, reset: Mapping[str, Any] | None = None
) -> Callable[[_Builder, int, dict[str, Any]], None]:
    """Items whose one string ``field`` is streamed as ``delta`` events, then ``done``."""

    def emit(b: _Builder, oi: int, item: dict[str, Any]) -> None:
        where = {"item_id": _text(item.get("id")), "output_index": oi}
        value = _text(item.get(field))
        added = _in_progress(item, **{field: ""}, **(reset or {}))
        b.emit("response.output_item.added", output_index=oi, item=added)
        b.deltas(delta, value, **where)
        b.emit(done, **where, **{field: value})
        b.emit("response.output_item.done", output_index=oi, item=item)

    return emit


def _phased(
    prefix: str, phases: Sequence[str], reset: Mapping[str, Any]
) -> Callable[[_Builder, int, dict[str, Any]], None]:
    """Hosted-tool items announced by status events (``<prefix>.in_progress`` ...)."""

    def emit(b: _Builder, oi: int, item: dict[str, Any]) -> None:
        where = {"item_id": _text(item.get("id")), "output_index": oi}
        b.emit("response.output_item.added", output_index=oi, item=_in_progress(item, **reset))
        for phase in phases:
            b.emit(f"{prefix}.{phase}", **where)
        b.emit("response.output_item.done", output_index=oi, item=item)

    return emit


def _code_interpreter(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    where = {"item_id": _text(item.get("id")), "output_index": oi}
    code = item.get("code")
    added = _in_progress(item, outputs=None, **({"code": ""} if isinstance(code, str) else {}))
    b.emit("response.output_item.added", output_index=oi, item=added)
    b.emit("response.code_interpreter_call.in_progress", **where)
    if isinstance(code, str):
        b.deltas("response.code_interpreter_call_code.delta", code, **where)
        b.emit("response.code_interpreter_call_code.done", **where, code=code)
    b.emit("response.code_interpreter_call.interpreting", **where)
    b.emit("response.code_interpreter_call.completed", **where)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _mcp_call(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    where = {"item_id": _text(item.get("id")), "output_index": oi}
    arguments = _text(item.get("arguments"))
    added = _in_progress(item, arguments="", output=None, error=None)
    b.emit("response.output_item.added", output_index=oi, item=added)
    b.emit("response.mcp_call.in_progress", **where)
    b.deltas("response.mcp_call_arguments.delta", arguments, **where)
    b.emit("response.mcp_call_arguments.done", **where, arguments=arguments)
    failed = bool(item.get("error")) or item.get("status") == "failed"
    b.emit("response.mcp_call.failed" if failed else "response.mcp_call.completed", **where)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _mcp_list_tools(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    where = {"item_id": _text(item.get("id")), "output_index": oi}
    b.emit("response.output_item.added", output_index=oi, item={**item, "tools": []})
    b.emit("response.mcp_list_tools.in_progress", **where)
    failed = bool(item.get("error"))
    b.emit(
        "response.mcp_list_tools.failed" if failed else "response.mcp_list_tools.completed",
        **where,
    )
    b.emit("response.output_item.done", output_index=oi, item=item)


def _apply_patch(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    operation = item.get("operation")
    if not isinstance(operation, dict) or not isinstance(operation.get("diff"), str):
        _other_item(b, oi, item)
        return
    where = {"item_id": _text(item.get("id")), "output_index": oi}
    diff: str = operation["diff"]
    added = _in_progress(item, operation={**operation, "diff": ""})
    b.emit("response.output_item.added", output_index=oi, item=added)
    b.deltas("response.apply_patch_call_operation_diff.delta", diff, **where)
    b.emit("response.apply_patch_call_operation_diff.done", **where, diff=diff)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _other_item(b: _Builder, oi: int, item: dict[str, Any]) -> None:
    # Items without sub-events (outputs, approvals, unknown kinds): added as final, done.
    b.emit("response.output_item.added", output_index=oi, item=item)
    b.emit("response.output_item.done", output_index=oi, item=item)


_ITEMS: Final[dict[str, Callable[[_Builder, int, dict[str, Any]], None]]] = {
    "message": _message,
    "reasoning": _reasoning,
    "function_call": _streamed_field(
        "arguments",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ),
    "custom_tool_call": _streamed_field(
        "input", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done"
    ),
    "web_search_call": _phased(
        "response.web_search_call", ("in_progress", "searching", "completed"), {}
    ),
    "file_search_call": _phased(
        "response.file_search_call", ("in_progress", "searching", "completed"), {"results": None}
    ),
    "image_generation_call": _phased(
        "response.image_generation_call",
        ("in_progress", "generating", "completed"),
        {"result": None},
    ),
    "code_interpreter_call": _code_interpreter,
    "mcp_call": _mcp_call,
    "mcp_list_tools": _mcp_list_tools,
    "apply_patch_call": _apply_patch,
}
