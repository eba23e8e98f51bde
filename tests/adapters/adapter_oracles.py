"""The official SDKs as judges: validate events against their types and accumulate streams
with their own stream-state machinery (not ours)."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import typing
import warnings
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import openai
from anthropic._models import construct_type as anthropic_construct
from anthropic.lib.streaming._messages import accumulate_event as anthropic_accumulate
from anthropic.types import Message, RawMessageStreamEvent
from google.genai import types as genai_types
from google.genai.models import (
    _GenerateContentResponse_from_mldev,
    _GenerateContentResponse_from_vertex,
)
from hypothesis import strategies as st
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from sse_cache import Event, Outcome

_SDK_ONLY_KEYS = frozenset({"parsed", "parsed_arguments", "parsed_output"})


@cache
def _responses_event() -> TypeAdapter[Any]:
    return TypeAdapter(ResponseStreamEvent)


@cache
def _responses_models() -> dict[str, Any]:
    # type -> model class, to validate against the one the payload names (clear errors).
    union = typing.get_args(ResponseStreamEvent)[0]
    return {m.model_fields["type"].annotation.__args__[0]: m for m in typing.get_args(union)}


@cache
def _anthropic_event() -> TypeAdapter[Any]:
    return TypeAdapter(RawMessageStreamEvent)


@contextlib.contextmanager
def _quiet_lenient_models() -> Iterator[None]:
    # Models built without validation (as the SDKs build real, non-strict events) make
    # pydantic warn when the SDK dumps them internally; the values are right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Pydantic serializer warnings", UserWarning)
        yield


def strip_sdk_keys(value: Any) -> Any:
    """A model dump without the SDK's client-side parse results (not part of the wire)."""
    if isinstance(value, dict):
        return {k: strip_sdk_keys(v) for k, v in value.items() if k not in _SDK_ONLY_KEYS}
    if isinstance(value, list):
        return [strip_sdk_keys(v) for v in value]
    return value


# -- Responses ----------------------------------------------------------------------------


def validate_responses(events: Sequence[Event]) -> list[Any]:
    """Every event parsed by the SDK's ``ResponseStreamEvent`` union (raises if invalid), and
    its SSE ``event:`` line agreeing with the payload type."""
    adapter = _responses_event()
    models = _responses_models()
    parsed = []
    for ev in events:
        kind = json.loads(ev.data).get("type")
        if kind in models:
            models[kind].model_validate_json(ev.data)
        model = adapter.validate_json(ev.data)
        assert ev.event in (None, model.type), (ev.event, model.type)
        parsed.append(model)
    return parsed


def sdk_responses_final(events: Sequence[Event], *, strict: bool = True) -> dict[str, Any]:
    """The final Response the SDK's ``ResponseStreamState`` builds from the stream.
    ``strict``: validate every event first; else build them leniently, as the SDK's own
    stream reader does (real streams omit fields the SDK declares required)."""
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    final = None
    if strict:
        models = validate_responses(events)
    else:
        models = [
            construct_type(type_=ResponseStreamEvent, value=json.loads(e.data)) for e in events
        ]
    with _quiet_lenient_models():
        for model in models:
            for out in state.handle_event(model):
                if out.type == "response.completed":
                    final = out.response
    assert final is not None, "the SDK saw no response.completed"
    return normalize_response(final.model_dump(mode="json", warnings=False), strict=strict)


def normalize_response(dump: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    dump = strip_sdk_keys(dump)
    # Lenient: built the way the SDK builds what it receives (no validation, every declared
    # field present), so both sides of a comparison have the same shape.
    model = Response.model_validate(dump) if strict else construct_type(type_=Response, value=dump)
    return strip_sdk_keys(model.model_dump(mode="json", warnings=False))


def stream_texts(payloads: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], str]:
    """Text rebuilt from the deltas alone, keyed by where it belongs (kind, output_index,
    content/summary index): a stream whose indexes are wrong rebuilds the wrong texts."""
    acc: dict[tuple[Any, ...], str] = {}
    for p in payloads:
        t = p["type"]
        oi = p.get("output_index")
        if t == "response.output_text.delta":
            key: tuple[Any, ...] = ("text", oi, p["content_index"])
        elif t == "response.refusal.delta":
            key = ("refusal", oi, p["content_index"])
        elif t == "response.reasoning_summary_text.delta":
            key = ("summary", oi, p["summary_index"])
        elif t == "response.reasoning_summary_part.added":
            acc.setdefault(("summary", oi, p["summary_index"]), "")
            continue
        elif t == "response.content_part.added" and p["part"]["type"] in ("output_text", "refusal"):
            kind = "text" if p["part"]["type"] == "output_text" else "refusal"
            acc.setdefault((kind, oi, p["content_index"]), "")
            continue
        elif t in (
            "response.function_call_arguments.delta",
            "response.custom_tool_call_input.delta",
            "response.mcp_call_arguments.delta",
            "response.code_interpreter_call_code.delta",
        ):
            key = ("call", oi)
        else:
            continue
        acc[key] = acc.get(key, "") + p["delta"]
    return acc


_CALL_FIELD = {
    "function_call": "arguments",
    "custom_tool_call": "input",
    "code_interpreter_call": "code",
    "mcp_call": "arguments",
}


def final_texts(response: dict[str, Any], payloads: Sequence[dict[str, Any]]) -> dict[Any, str]:
    """The same texts from the final response (calls only where the stream streamed them)."""
    streamed_calls = {k for k in stream_texts(payloads) if k[0] == "call"}
    out: dict[tuple[Any, ...], str] = {}
    for oi, item in enumerate(response["output"]):
        if item["type"] == "message":
            for ci, part in enumerate(item["content"]):
                if part["type"] == "output_text":
                    out[("text", oi, ci)] = part["text"]
                elif part["type"] == "refusal":
                    out[("refusal", oi, ci)] = part["refusal"]
        elif item["type"] == "reasoning":
            for si, part in enumerate(item["summary"]):
                out[("summary", oi, si)] = part["text"]
        elif ("call", oi) in streamed_calls:
            out[("call", oi)] = item[_CALL_FIELD[item["type"]]]
    return out


def check_responses_consistency(events: Sequence[Event]) -> dict[str, Any]:
    """Structural checks of a Responses stream; returns the final response payload."""
    payloads = [json.loads(ev.data) for ev in events]
    seqs = [p.get("sequence_number") for p in payloads]
    assert seqs == list(range(len(payloads))), seqs
    final = payloads[-1]["response"]
    item_ids = {oi: item.get("id") for oi, item in enumerate(final["output"])}
    added = []
    for p in payloads:
        if "item_id" in p and "output_index" in p:
            assert item_ids[p["output_index"]] == p["item_id"], p
        if p["type"] == "response.output_item.added":
            added.append(p["output_index"])
            assert p["item"].get("id") == item_ids[p["output_index"]]
    assert added == list(range(len(final["output"])))
    assert stream_texts(payloads) == final_texts(final, payloads)
    return final  # type: ignore[no-any-return]


# -- Chat Completions ---------------------------------------------------------------------


def sdk_chat_final(events: Sequence[Event], *, strict: bool = True) -> dict[str, Any]:
    """The ``ChatCompletion`` the SDK's ``ChatCompletionStreamState`` accumulates."""
    state = ChatCompletionStreamState()
    for ev in events:
        if ev.data.startswith("[DONE]"):
            break
        if strict:
            chunk = ChatCompletionChunk.model_validate_json(ev.data)
        else:
            chunk = construct_type(type_=ChatCompletionChunk, value=json.loads(ev.data))
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(): that one also parses the content and raises
    # on finish_reason "length", which is a client-side policy, not part of the stream.
    return normalize_chat(state.current_completion_snapshot.model_dump(mode="json", warnings=False))


def normalize_chat(dump: dict[str, Any]) -> dict[str, Any]:
    dump = strip_sdk_keys(dump)
    for choice in dump["choices"]:
        for call in choice["message"].get("tool_calls") or []:
            call.pop("index", None)  # the SDK keeps the stream's index on each tool call
        # No annotations: null in the SDK's accumulation of a stream (which sends them only
        # when there are), [] in the API's non-stream answer, and in a body built from a
        # stream (as a client asking non-stream gets it).
        if choice["message"].get("annotations") is None:
            choice["message"]["annotations"] = []
    return strip_sdk_keys(
        ChatCompletion.model_validate(dump).model_dump(mode="json", warnings=False)
    )


def validate_chat(events: Sequence[Event]) -> None:
    assert events[-1].data == "[DONE]"
    for ev in events[:-1]:
        assert ev.event is None
        ChatCompletionChunk.model_validate_json(ev.data)


# -- Anthropic Messages ---------------------------------------------------------------------


def validate_anthropic(events: Sequence[Event]) -> list[Any]:
    adapter = _anthropic_event()
    parsed = []
    for ev in events:
        if ev.event == "ping":
            assert json.loads(ev.data) == {"type": "ping"}
            continue
        model = adapter.validate_json(ev.data)
        assert ev.event == model.type, (ev.event, model.type)
        parsed.append(model)
    return parsed


def sdk_anthropic_final(events: Sequence[Event], *, strict: bool = True) -> dict[str, Any]:
    """The ``Message`` the SDK's ``accumulate_event`` builds (events without an ``event:``
    line and pings skipped, as the SDK's stream reader does)."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    adapter = _anthropic_event()
    for ev in events:
        if ev.event is None or ev.event == "ping":
            continue
        event = adapter.validate_json(ev.data) if strict else json.loads(ev.data)
        snapshot = anthropic_accumulate(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return normalize_message(snapshot.model_dump(mode="json", warnings=False), strict=strict)


def normalize_message(dump: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    dump = strip_sdk_keys(dump)
    if strict:
        model = Message.model_validate(dump)
    else:
        model = anthropic_construct(type_=Message, value=dump)
    return strip_sdk_keys(model.model_dump(mode="json", warnings=False))


def check_lenient(
    adapter: Any, events: Sequence[Event], garbage: Sequence[Event], data: st.DataObject
) -> None:
    """Malformed events (``garbage``, inserted among ``events`` at drawn places) never make
    an adapter raise: each is classified, the whole stream is judged, and a final body,
    meta and a synthesised stream are produced or declined (None), never crashed on."""
    mixed = list(events)
    for ev in garbage:
        mixed.insert(data.draw(st.integers(0, len(mixed))), ev)
    for ev in garbage:
        assert adapter.outcome(ev) in (Outcome.CONTINUE, Outcome.COMPLETE, Outcome.FAIL)
    assert adapter.verify(mixed) in (Outcome.COMPLETE, Outcome.FAIL)
    body = adapter.final_body(mixed)
    assert body is None or isinstance(body, bytes)
    adapter.meta(mixed)
    for ev in garbage:
        raw = ev.data.encode()
        assert adapter.body_outcome(raw) in (Outcome.COMPLETE, Outcome.FAIL)
        out = adapter.synthesize(raw)
        assert out is None or all(isinstance(e, Event) for e in out)


# -- Google Gemini ------------------------------------------------------------------------------


def gemini_parse(payload: dict[str, Any], *, strict: bool = True) -> Any:
    """One ``GenerateContentResponse`` chunk as the SDK builds it: the wire dict through the
    SDK's own converter (Vertex AI's when the payload has Vertex fields), then ``strict``
    validation (every field known to the SDK; ``extra='forbid'``) or the SDK's own lenient
    ``_from_response`` (unknown fields dropped, as the SDK's stream reader does)."""
    if "createTime" in payload:
        convert = _GenerateContentResponse_from_vertex
    else:
        convert = _GenerateContentResponse_from_mldev
    converted = convert(json.loads(json.dumps(payload)), None, None)
    if strict:
        return genai_types.GenerateContentResponse.model_validate(converted)
    return genai_types.GenerateContentResponse._from_response(response=converted, kwargs={})


def validate_gemini(events: Sequence[Event], *, strict: bool = True) -> list[Any]:
    """Every event a data-only chunk the SDK parses (its SSE reader ignores ``event:``)."""
    out = []
    for ev in events:
        assert ev.event is None, ev.event
        payload = json.loads(ev.data)
        assert isinstance(payload, dict)
        out.append(gemini_parse(payload, strict=strict))
    return out


def _json_path_segments(path: str) -> list[str | int]:
    assert path.startswith("$"), path
    out: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", path[1:]):
        out.append(int(index) if index else name)
    return out


def _put(root: dict[str, Any], path: str, value: Any, append: bool) -> None:
    segments = _json_path_segments(path)
    node: Any = root
    for seg, nxt in itertools.pairwise(segments):
        if isinstance(seg, int):
            while len(node) <= seg:
                node.append(None)
            if not isinstance(node[seg], list | dict):
                node[seg] = [] if isinstance(nxt, int) else {}
        elif not isinstance(node.get(seg), list | dict):
            node[seg] = [] if isinstance(nxt, int) else {}
        node = node[seg]
    last = segments[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
        previous = node[last]
    else:
        previous = node.get(last)
    if append and isinstance(previous, str):
        value = previous + value
    node[last] = value


def _new_candidate() -> dict[str, Any]:
    return {"text": "", "thoughts": "", "signatures": [], "calls": [], "parts": [], "last": {}}


def gemini_view(responses: Sequence[Any]) -> dict[str, Any]:
    """What a client accumulates from SDK ``GenerateContentResponse`` objects, built from the
    SDK's attributes only: per candidate the answer text and the thought text joined, the
    signatures in order, the function calls (streamed ``partial_args`` assembled the way the
    SDK documents them: JSON path + value, strings continued while ``will_continue``), other
    parts, the finish reason and the last of every other candidate field; the last usage,
    model version, response id and prompt feedback. Also the SDK's ``.text`` joined."""
    candidates: dict[int, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    texts: list[str] = []
    open_calls: dict[int, dict[str, Any]] = {}
    continuing: dict[int, set[str]] = {}
    for response in responses:
        for name in ("usage_metadata", "model_version", "response_id", "prompt_feedback"):
            value = getattr(response, name)
            if value is not None:
                top[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            texts.append(response.text or "")
        for position, cand in enumerate(response.candidates or []):
            index = cand.index if cand.index is not None else position
            acc = candidates.setdefault(index, _new_candidate())
            dump = cand.model_dump(mode="json", exclude={"content", "index"}, exclude_none=True)
            acc["last"].update(dump)
            parts = cand.content.parts if cand.content is not None else None
            for part in parts or []:
                if part.thought_signature is not None:
                    acc["signatures"].append(part.thought_signature)
                call = part.function_call
                if call is not None:
                    if call.name is not None:
                        new = {"name": call.name, "id": call.id, "args": call.args}
                        acc["calls"].append(new)
                        open_calls.pop(index, None)
                        continuing[index] = set()
                        if call.will_continue:
                            open_calls[index] = new
                    target = open_calls.get(index)
                    if target is not None:
                        for arg in call.partial_args or []:
                            if target["args"] is None:
                                target["args"] = {}
                            value: Any
                            if arg.string_value is not None:
                                value = arg.string_value
                            elif arg.number_value is not None:
                                value = arg.number_value
                            elif arg.bool_value is not None:
                                value = arg.bool_value
                            else:
                                value = None
                            path = arg.json_path or "$"
                            strings = continuing.setdefault(index, set())
                            _put(target["args"], path, value, path in strings)
                            if arg.will_continue:
                                strings.add(path)
                            else:
                                strings.discard(path)
                        if call.name is None and not call.will_continue:
                            open_calls.pop(index, None)
                elif part.text is not None:
                    acc["thoughts" if part.thought else "text"] += part.text
                else:
                    acc["parts"].append(part.model_dump(mode="json", exclude_none=True))
    # The SDK's `.text` reads candidates[0] by position: with several candidates a chunk may
    # hold another one there, so it is compared for single-candidate answers only.
    single = set(candidates) <= {0}
    return {"candidates": candidates, "top": top, "text": "".join(texts) if single else None}


def sdk_gemini_view(events: Sequence[Event], *, strict: bool = True) -> dict[str, Any]:
    """:func:`gemini_view` of a stream, every chunk parsed by the SDK."""
    return gemini_view(validate_gemini(events, strict=strict))


def sdk_gemini_body_view(body: bytes | str, *, strict: bool = True) -> dict[str, Any]:
    """:func:`gemini_view` of a non-stream answer (one response, parsed by the SDK)."""
    payload = json.loads(body)
    assert isinstance(payload, dict)
    return gemini_view([gemini_parse(payload, strict=strict)])
