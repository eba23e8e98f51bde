"""A Responses API answer as one body and back: the adapter's ``final_body`` (the response
with its ``output`` rebuilt from the stream's items when it came without) and ``synthesize``
(the event sequence the API emits for a stored response).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from ..events import Event
from ._common import dumps, loads_object, payloads_of_type, split_text

__all__ = ["Builder", "events_from_response", "response_with_output"]

# The event that ends the stream of a response with this status (others cannot be streamed).
_FINAL_EVENT: Final = {"completed": "response.completed", "incomplete": "response.incomplete"}


class _ItemDone(msgspec.Struct):
    type: str | None = None
    output_index: int | None = None
    item: msgspec.Raw = msgspec.Raw()


_item_done_decoder: Final = msgspec.json.Decoder(_ItemDone)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_raw_encoder: Final = msgspec.json.Encoder()


# -- stream -> body -------------------------------------------------------------------------


def response_with_output(raw: bytes, events: Sequence[Event]) -> bytes | None:
    """The response with ``output`` rebuilt from the ``output_item.done`` events (newer
    streams may leave ``output`` out of ``response.completed``); item bytes kept as sent."""
    try:
        fields = _fields_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    items: dict[int, msgspec.Raw] = {}
    for done in payloads_of_type(events, "response.output_item.done", _item_done_decoder):
        if done.output_index is not None:
            items[done.output_index] = done.item
    fields["output"] = msgspec.Raw(_raw_encoder.encode([items[i] for i in sorted(items)]))
    return _raw_encoder.encode(fields)


# -- body -> stream -------------------------------------------------------------------------


def events_from_response(body: bytes, delta_chars: int | None) -> list[Event] | None:
    """The events that stream the response ``body`` (``sequence_number`` from 0, text in
    deltas of at most ``delta_chars`` characters); None when ``body`` is not a finished
    response."""
    resp = loads_object(body)
    if resp is None or not isinstance(resp.get("output"), list):
        return None
    status = resp.get("status", "completed")
    final = _FINAL_EVENT.get(status) if isinstance(status, str) else None
    if final is None:
        return None  # queued / in progress / failed: no successful stream to show
    b = Builder(delta_chars)
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


class Builder:
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


def _message(b: Builder, oi: int, item: dict[str, Any]) -> None:
    iid = _text(item.get("id"))
    content = item.get("content")
    b.emit("response.output_item.added", output_index=oi, item=_in_progress(item, content=[]))
    for ci, part in enumerate(content if isinstance(content, list) else []):
        where = {"item_id": iid, "output_index": oi, "content_index": ci}
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "output_text":
            _output_text(b, where, part)
        elif kind == "refusal":
            _streamed_part(
                b, where, part, "refusal", "response.refusal.delta", "response.refusal.done"
            )
        else:
            b.emit("response.content_part.added", **where, part=part)
        b.emit("response.content_part.done", **where, part=part)
    b.emit("response.output_item.done", output_index=oi, item=item)


def _streamed_part(
    b: Builder, where: dict[str, Any], part: dict[str, Any], field: str, delta: str, done: str
) -> None:
    """A content part whose one string ``field`` is streamed as ``delta`` events, then
    ``done`` (the part is announced with that field empty)."""
    value = _text(part.get(field))
    b.emit("response.content_part.added", **where, part={**part, field: ""})
    b.deltas(delta, value, **where)
    b.emit(done, **where, **{field: value})


def _output_text(b: Builder, where: dict[str, Any], part: dict[str, Any]) -> None:
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


def _reasoning(b: Builder, oi: int, item: dict[str, Any]) -> None:
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
            _streamed_part(
                b,
                where,
                part,
                "text",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
            )
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
) -> Callable[[Builder, int, dict[str, Any]], None]:
    """Items whose one string ``field`` is streamed as ``delta`` events, then ``done``."""

    def emit(b: Builder, oi: int, item: dict[str, Any]) -> None:
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
) -> Callable[[Builder, int, dict[str, Any]], None]:
    """Hosted-tool items announced by status events (``<prefix>.in_progress`` ...)."""

    def emit(b: Builder, oi: int, item: dict[str, Any]) -> None:
        where = {"item_id": _text(item.get("id")), "output_index": oi}
        b.emit("response.output_item.added", output_index=oi, item=_in_progress(item, **reset))
        for phase in phases:
            b.emit(f"{prefix}.{phase}", **where)
        b.emit("response.output_item.done", output_index=oi, item=item)

    return emit


def _code_interpreter(b: Builder, oi: int, item: dict[str, Any]) -> None:
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


def _mcp_call(b: Builder, oi: int, item: dict[str, Any]) -> None:
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


def _mcp_list_tools(b: Builder, oi: int, item: dict[str, Any]) -> None:
    where = {"item_id": _text(item.get("id")), "output_index": oi}
    b.emit("response.output_item.added", output_index=oi, item={**item, "tools": []})
    b.emit("response.mcp_list_tools.in_progress", **where)
    failed = bool(item.get("error"))
    b.emit(
        "response.mcp_list_tools.failed" if failed else "response.mcp_list_tools.completed",
        **where,
    )
    b.emit("response.output_item.done", output_index=oi, item=item)


def _apply_patch(b: Builder, oi: int, item: dict[str, Any]) -> None:
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


def _other_item(b: Builder, oi: int, item: dict[str, Any]) -> None:
    # Items without sub-events (outputs, approvals, unknown kinds): added as final, done.
    b.emit("response.output_item.added", output_index=oi, item=item)
    b.emit("response.output_item.done", output_index=oi, item=item)


_ITEMS: Final[dict[str, Callable[[Builder, int, dict[str, Any]], None]]] = {
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
