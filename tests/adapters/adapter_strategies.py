"""Hypothesis strategies: valid provider streams of arbitrary shape, built independently of
the adapters (they are the input the adapters are judged on), plus malformed events.

Each stream strategy returns a list of ``(type, payload)`` pairs; :func:`to_events` turns them
into wire events with stdlib ``json`` (sometimes ASCII-escaped, sometimes whitespace-padded as
Anthropic does), never with the library's own encoder.
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from hypothesis import strategies as st

from sse_cache import Event

Payloads = list[tuple[str | None, dict[str, Any]]]

# -- building blocks ----------------------------------------------------------------------

# Unicode (no lone surrogates: they are not valid UTF-8 on the wire), quotes, backslashes,
# newlines and control characters, so JSON escapes of every kind appear in payloads.
TEXT_ALPHABET = st.characters(codec="utf-8", exclude_categories=["Cs"])
texts = st.one_of(
    st.text(TEXT_ALPHABET, max_size=40),
    st.lists(
        st.sampled_from(["Hello", " world", "\n\n", '"q"', "\\", " café", " 東京", "🙂", "\t"]),
        max_size=12,
    ).map("".join),
)
nonempty_texts = texts.filter(bool)
ids = st.text("abcdef0123456789", min_size=8, max_size=12)
names = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.text(TEXT_ALPHABET, max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(names, json_values, max_size=4)


@st.composite
def chunked(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut at random places into non-empty pieces (no pieces for an empty text)."""
    if len(text) < 2:
        return [text] if text else []
    cuts = draw(st.sets(st.integers(1, len(text) - 1), max_size=min(8, len(text) - 1)))
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def to_events(
    payloads: Payloads, *, ascii: bool = False, pad: bool = False, named: bool = True
) -> list[Event]:
    """Wire events: ``event: <type>`` (when ``named``) + one JSON data line."""
    out = []
    for kind, payload in payloads:
        data = json.dumps(payload, ensure_ascii=ascii, separators=(",", ":"))
        if pad and data.endswith("}"):
            data = data[:-1] + "   }"  # Anthropic pads some objects like this
        out.append(Event(data, kind if named else None))
    return out


# -- OpenAI Responses ---------------------------------------------------------------------


class _Seq:
    def __init__(self) -> None:
        self.payloads: Payloads = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.payloads.append(
            (kind, {"type": kind, **fields, "sequence_number": len(self.payloads)})
        )


def _base_response(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "id": "resp_" + draw(ids),
        "object": "response",
        "created_at": draw(st.integers(1_700_000_000, 1_800_000_000)),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": draw(st.none() | texts),
        "max_output_tokens": draw(st.none() | st.integers(1, 4096)),
        "model": draw(st.sampled_from(["gpt-5", "o3-mini", "gpt-4o-2024-08-06"])),
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": draw(st.booleans()),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": draw(st.dictionaries(names, st.text(max_size=5), max_size=2)),
    }


_annotations = st.lists(
    st.builds(
        lambda title, s, n: {
            "type": "url_citation",
            "start_index": s,
            "end_index": s + n,
            "title": title,
            "url": "https://example.com/" + title.encode().hex()[:20],
        },
        texts,
        st.integers(0, 50),
        st.integers(0, 50),
    ),
    max_size=2,
)


@st.composite
def _message(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    iid = f"msg_{oi}_" + draw(ids)
    item: dict[str, Any] = {"id": iid, "type": "message", "status": "in_progress"}
    item |= {"content": [], "role": "assistant"}
    if draw(st.booleans()):
        item["phase"] = draw(st.sampled_from(["commentary", "final_answer"]))
    seq.emit("response.output_item.added", output_index=oi, item=dict(item))
    parts = []
    for ci in range(draw(st.integers(1, 3))):
        where = {"item_id": iid, "output_index": oi, "content_index": ci}
        if draw(st.integers(0, 4)) == 0:
            refusal = draw(texts)
            seq.emit(
                "response.content_part.added", **where, part={"type": "refusal", "refusal": ""}
            )
            for piece in draw(chunked(refusal)):
                seq.emit("response.refusal.delta", **where, delta=piece)
            seq.emit("response.refusal.done", **where, refusal=refusal)
            part: dict[str, Any] = {"type": "refusal", "refusal": refusal}
        else:
            text = draw(texts)
            empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            seq.emit("response.content_part.added", **where, part=empty)
            for piece in draw(chunked(text)):
                seq.emit("response.output_text.delta", **where, delta=piece, logprobs=[])
            annotations = draw(_annotations)
            for ai, annotation in enumerate(annotations):
                seq.emit(
                    "response.output_text.annotation.added",
                    **where,
                    annotation_index=ai,
                    annotation=annotation,
                )
            seq.emit("response.output_text.done", **where, text=text, logprobs=[])
            part = {"type": "output_text", "annotations": annotations, "logprobs": [], "text": text}
        seq.emit("response.content_part.done", **where, part=part)
        parts.append(part)
    item = {**item, "status": "completed", "content": parts}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


@st.composite
def _reasoning(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    iid = f"rs_{oi}_" + draw(ids)
    item: dict[str, Any] = {"id": iid, "type": "reasoning", "summary": []}
    if draw(st.booleans()):
        item["encrypted_content"] = "gAAAA" + draw(ids)
    seq.emit("response.output_item.added", output_index=oi, item=dict(item))
    summary = []
    for si in range(draw(st.integers(0, 4))):
        where = {"item_id": iid, "output_index": oi, "summary_index": si}
        text = draw(texts)
        seq.emit(
            "response.reasoning_summary_part.added",
            **where,
            part={"type": "summary_text", "text": ""},
        )
        for piece in draw(chunked(text)):
            seq.emit("response.reasoning_summary_text.delta", **where, delta=piece)
        seq.emit("response.reasoning_summary_text.done", **where, text=text)
        part = {"type": "summary_text", "text": text}
        seq.emit("response.reasoning_summary_part.done", **where, part=part)
        summary.append(part)
    item = {**item, "summary": summary}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


@st.composite
def _function_call(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    iid = f"fc_{oi}_" + draw(ids)
    arguments = json.dumps(draw(json_objects), ensure_ascii=draw(st.booleans()))
    item: dict[str, Any] = {"id": iid, "type": "function_call", "status": "in_progress"}
    item |= {"arguments": "", "call_id": f"call_{oi}_" + draw(ids), "name": draw(names)}
    seq.emit("response.output_item.added", output_index=oi, item=dict(item))
    for piece in draw(chunked(arguments)):
        seq.emit(
            "response.function_call_arguments.delta", item_id=iid, output_index=oi, delta=piece
        )
    seq.emit(
        "response.function_call_arguments.done", item_id=iid, output_index=oi, arguments=arguments
    )
    item = {**item, "status": "completed", "arguments": arguments}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


@st.composite
def _custom_tool_call(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    iid = f"ctc_{oi}_" + draw(ids)
    value = draw(texts)
    item: dict[str, Any] = {"id": iid, "type": "custom_tool_call", "status": "in_progress"}
    item |= {"call_id": f"call_{oi}_" + draw(ids), "input": "", "name": draw(names)}
    seq.emit("response.output_item.added", output_index=oi, item=dict(item))
    for piece in draw(chunked(value)):
        seq.emit("response.custom_tool_call_input.delta", item_id=iid, output_index=oi, delta=piece)
    seq.emit("response.custom_tool_call_input.done", item_id=iid, output_index=oi, input=value)
    item = {**item, "status": "completed", "input": value}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


@st.composite
def _hosted_call(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["web_search_call", "file_search_call", "image_generation_call"]))
    prefix = {"web_search_call": "ws", "file_search_call": "fs", "image_generation_call": "ig"}
    iid = f"{prefix[kind]}_{oi}_" + draw(ids)
    item: dict[str, Any] = {"id": iid, "type": kind, "status": "in_progress"}
    final: dict[str, Any]
    if kind == "web_search_call":
        item["action"] = {"type": "search", "query": draw(texts)}
        final = {**item, "status": "completed"}
        phases = ("in_progress", "searching", "completed")
    elif kind == "file_search_call":
        item["queries"] = draw(st.lists(texts, max_size=2))
        item["results"] = None
        results = [{"file_id": "file_" + draw(ids), "text": draw(texts), "score": 0.5}]
        final = {**item, "status": "completed", "results": results}
        phases = ("in_progress", "searching", "completed")
    else:
        item["result"] = None
        final = {**item, "status": "completed", "result": draw(ids), "size": "1024x1024"}
        phases = ("in_progress", "generating", "completed")
    seq.emit("response.output_item.added", output_index=oi, item=item)
    for phase in phases:
        seq.emit(f"response.{kind}.{phase}", item_id=iid, output_index=oi)
    seq.emit("response.output_item.done", output_index=oi, item=final)
    return final


@st.composite
def _code_interpreter(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    iid = f"ci_{oi}_" + draw(ids)
    code = draw(texts)
    item: dict[str, Any] = {"id": iid, "type": "code_interpreter_call", "status": "in_progress"}
    item |= {"code": "", "container_id": "cntr_" + draw(ids), "outputs": None}
    where = {"item_id": iid, "output_index": oi}
    seq.emit("response.output_item.added", output_index=oi, item=dict(item))
    seq.emit("response.code_interpreter_call.in_progress", **where)
    for piece in draw(chunked(code)):
        seq.emit("response.code_interpreter_call_code.delta", **where, delta=piece)
    seq.emit("response.code_interpreter_call_code.done", **where, code=code)
    seq.emit("response.code_interpreter_call.interpreting", **where)
    seq.emit("response.code_interpreter_call.completed", **where)
    outputs = [{"type": "logs", "logs": draw(texts)}]
    item = {**item, "status": "completed", "code": code, "outputs": outputs}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


@st.composite
def _mcp(draw: st.DrawFn, seq: _Seq, oi: int) -> dict[str, Any]:
    where: dict[str, Any]
    if draw(st.booleans()):
        iid = f"mcpl_{oi}_" + draw(ids)
        where = {"item_id": iid, "output_index": oi}
        item: dict[str, Any] = {"id": iid, "type": "mcp_list_tools", "server_label": "srv"}
        item["tools"] = []
        seq.emit("response.output_item.added", output_index=oi, item=dict(item))
        seq.emit("response.mcp_list_tools.in_progress", **where)
        seq.emit("response.mcp_list_tools.completed", **where)
        tools = [{"name": draw(names), "input_schema": {"type": "object"}}]
        item = {**item, "tools": tools}
    else:
        iid = f"mcp_{oi}_" + draw(ids)
        where = {"item_id": iid, "output_index": oi}
        arguments = json.dumps(draw(json_objects))
        item = {"id": iid, "type": "mcp_call", "status": "in_progress", "arguments": ""}
        item |= {"name": draw(names), "server_label": "srv", "output": None, "error": None}
        seq.emit("response.output_item.added", output_index=oi, item=dict(item))
        seq.emit("response.mcp_call.in_progress", **where)
        for piece in draw(chunked(arguments)):
            seq.emit("response.mcp_call_arguments.delta", **where, delta=piece)
        seq.emit("response.mcp_call_arguments.done", **where, arguments=arguments)
        seq.emit("response.mcp_call.completed", **where)
        item = {**item, "status": "completed", "arguments": arguments, "output": draw(texts)}
    seq.emit("response.output_item.done", output_index=oi, item=item)
    return item


_RESPONSE_ITEMS = [
    _message,
    _reasoning,
    _function_call,
    _custom_tool_call,
    _hosted_call,
    _code_interpreter,
    _mcp,
]


@st.composite
def responses_streams(draw: st.DrawFn, *, max_items: int = 5) -> Payloads:
    """A complete Responses stream: created, in_progress, 0..max_items output items of every
    kind (reasoning with several summary parts, multi-delta texts...), completed."""
    seq = _Seq()
    response = _base_response(draw)
    seq.emit("response.created", response=response)
    seq.emit("response.in_progress", response=response)
    output = []
    kinds = draw(st.lists(st.sampled_from(_RESPONSE_ITEMS), max_size=max_items))
    for oi, kind in enumerate(kinds):
        output.append(draw(kind(seq, oi)))
    tokens = draw(st.integers(0, 5000))
    usage = {
        "input_tokens": tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": tokens + 7,
    }
    final = {**response, "status": "completed", "output": output, "usage": usage}
    seq.emit("response.completed", response=final)
    return seq.payloads


# -- OpenAI Chat Completions ---------------------------------------------------------------


@st.composite
def _chat_choice(draw: st.DrawFn, index: int) -> list[dict[str, Any]]:
    """The ``choices[0]`` entries (delta, logprobs, finish_reason) of one choice, in order."""
    kind = draw(st.sampled_from(["text", "text", "refusal", "tools", "text+tools"]))
    with_logprobs = kind == "text" and draw(st.booleans())

    def entry(delta: dict[str, Any], logprobs: Any = None, finish: Any = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    first: dict[str, Any] = {"role": "assistant"}
    first["content"] = "" if "text" in kind else None
    first["refusal"] = "" if kind == "refusal" else None
    out = [entry(first, {"content": [], "refusal": None} if with_logprobs else None)]
    if "text" in kind:
        for piece in draw(chunked(draw(texts))):
            logprobs = None
            if with_logprobs:
                lp = {
                    "token": piece,
                    "logprob": draw(st.floats(-20, 0)),
                    "bytes": list(piece.encode()),
                    "top_logprobs": [],
                }
                logprobs = {"content": [lp], "refusal": None}
            out.append(entry({"content": piece}, logprobs))
    if kind == "refusal":
        for piece in draw(chunked(draw(texts))):
            out.append(entry({"refusal": piece}))
    if "tools" in kind:
        for ti in range(draw(st.integers(1, 3))):
            head = {"index": ti, "id": "call_" + draw(ids), "type": "function"}
            head["function"] = {"name": draw(names), "arguments": ""}
            out.append(entry({"tool_calls": [head]}))
            arguments = json.dumps(draw(json_objects))
            for piece in draw(chunked(arguments)):
                call = {"index": ti, "function": {"arguments": piece}}
                out.append(entry({"tool_calls": [call]}))
    finish = "tool_calls" if "tools" in kind else draw(st.sampled_from(["stop", "length"]))
    out.append(entry({}, None, finish))
    return out


@st.composite
def chat_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """``chat.completion.chunk`` objects of a complete stream (without ``[DONE]``): 1..3
    choices interleaved, content/refusal/tool-call deltas, optional logprobs and usage."""
    base: dict[str, Any] = {
        "id": "chatcmpl-" + draw(ids),
        "object": "chat.completion.chunk",
        "created": draw(st.integers(1_700_000_000, 1_800_000_000)),
        "model": draw(st.sampled_from(["gpt-4o-2024-08-06", "gpt-4o-mini"])),
        "system_fingerprint": draw(st.none() | st.just("fp_" + "a1b2c3")),
    }
    if draw(st.booleans()):
        base["service_tier"] = "default"
    include_usage = draw(st.booleans())
    if include_usage:
        base["usage"] = None
    streams = [draw(_chat_choice(i)) for i in range(draw(st.integers(1, 3)))]
    # The first chunk of each choice comes in index order (as the API sends them; the SDK
    # relies on it), the rest interleaved at random, each choice keeping its own order.
    turns = draw(st.permutations([i for i, s in enumerate(streams) for _ in s[1:]]))
    position = [1] * len(streams)
    order = [(i, 0) for i in range(len(streams))]
    for i in turns:
        order.append((i, position[i]))
        position[i] += 1
    chunks = []
    for i, j in order:
        chunk = {**base, "choices": [streams[i][j]]}
        if draw(st.booleans()):
            chunk["obfuscation"] = draw(ids)
        chunks.append(chunk)
    if include_usage:
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def chat_events(chunks: list[dict[str, Any]], *, ascii: bool = False) -> list[Event]:
    """``data:``-only events, then ``[DONE]``."""
    out = [Event(json.dumps(c, ensure_ascii=ascii, separators=(",", ":"))) for c in chunks]
    out.append(Event("[DONE]"))
    return out


# -- Anthropic Messages ------------------------------------------------------------------


@st.composite
def _anthropic_block(draw: st.DrawFn, index: int) -> Payloads:
    kind = draw(
        st.sampled_from(
            ["text", "text", "thinking", "redacted_thinking", "tool_use", "server_tool_use"]
        )
    )
    out: Payloads = []

    def start(block: dict[str, Any]) -> None:
        out.append(("content_block_start", {"type": "content_block_start", "index": index}))
        out[-1][1]["content_block"] = block

    def delta(d: dict[str, Any]) -> None:
        out.append(("content_block_delta", {"type": "content_block_delta", "index": index}))
        out[-1][1]["delta"] = d

    if kind == "text":
        citations = draw(st.booleans())
        start({"type": "text", "text": "", **({"citations": []} if citations else {})})
        if citations:
            for _ in range(draw(st.integers(1, 2))):
                citation = {
                    "type": "web_search_result_location",
                    "cited_text": draw(texts),
                    "url": "https://example.com/" + draw(ids),
                    "title": draw(texts),
                    "encrypted_index": draw(ids),
                }
                delta({"type": "citations_delta", "citation": citation})
        for piece in draw(chunked(draw(texts))):
            delta({"type": "text_delta", "text": piece})
    elif kind == "thinking":
        start({"type": "thinking", "thinking": "", "signature": ""})
        for piece in draw(chunked(draw(texts))):
            delta({"type": "thinking_delta", "thinking": piece})
        delta({"type": "signature_delta", "signature": "Er" + draw(ids)})
    elif kind == "redacted_thinking":
        start({"type": "redacted_thinking", "data": "EmwK" + draw(ids)})
    else:
        server = kind == "server_tool_use"
        prefix = "srvtoolu_" if server else "toolu_"
        name = "web_search" if server else draw(names)
        start({"type": kind, "id": prefix + draw(ids), "name": name, "input": {}})
        value = {"query": draw(texts)} if server else draw(json_objects)
        text = json.dumps(value, ensure_ascii=draw(st.booleans())) if value else ""
        pieces = draw(chunked(text))
        for piece in ["", *pieces] if draw(st.booleans()) or not pieces else pieces:
            delta({"type": "input_json_delta", "partial_json": piece})
    out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    if kind == "server_tool_use" and draw(st.booleans()):
        # The search results arrive as their own block, complete at start.
        result = {
            "type": "web_search_tool_result",
            "tool_use_id": out[0][1]["content_block"]["id"],
            "content": [
                {
                    "type": "web_search_result",
                    "title": draw(texts),
                    "url": "https://example.com/" + draw(ids),
                    "encrypted_content": draw(ids),
                    "page_age": None,
                }
            ],
        }
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index + 1, "content_block": result},
            )
        )
        out.append(("content_block_stop", {"type": "content_block_stop", "index": index + 1}))
    return out


@st.composite
def anthropic_streams(draw: st.DrawFn) -> Payloads:
    """A complete Messages stream: message_start, blocks of every kind (text with citations,
    thinking + signature, redacted thinking, tool use and server tool use with partial JSON,
    web search results), pings, message_delta with usage, message_stop."""
    usage: dict[str, Any] = {"input_tokens": draw(st.integers(1, 5000)), "output_tokens": 1}
    if draw(st.booleans()):
        usage |= {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        usage["service_tier"] = "standard"
    message = {
        "id": "msg_" + draw(ids),
        "type": "message",
        "role": "assistant",
        "model": draw(st.sampled_from(["claude-sonnet-4-20250514", "claude-opus-4-1"])),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    out: Payloads = [("message_start", {"type": "message_start", "message": message})]
    index = 0
    for _ in range(draw(st.integers(0, 5))):
        block = draw(_anthropic_block(index))
        index = max(p["index"] for _, p in block) + 1
        out.extend(block)
        if draw(st.integers(0, 3)) == 0:
            out.append(("ping", {"type": "ping"}))
    stop_reason = draw(st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence"]))
    final_usage: dict[str, Any] = {"output_tokens": draw(st.integers(1, 5000))}
    if draw(st.booleans()):
        final_usage |= {"input_tokens": usage["input_tokens"] + 10}
        final_usage["server_tool_use"] = {"web_search_requests": 1, "web_fetch_requests": 0}
    out.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": final_usage,
            },
        )
    )
    out.append(("message_stop", {"type": "message_stop"}))
    return out


# -- malformed input ------------------------------------------------------------------------

KNOWN_TYPES = [
    "response.created",
    "response.completed",
    "response.failed",
    "response.incomplete",
    "response.output_item.done",
    "response.output_text.delta",
    "error",
    "message_start",
    "content_block_start",
    "content_block_delta",
    "message_delta",
    "message_stop",
    "ping",
]

_garbage_data = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "[DONE]", "{", "null", "[]", '"x"', "{}", "1e999", '{"type":5}']),
    json_values.map(json.dumps),
    st.builds(
        lambda kind, fields: json.dumps({"type": kind, **fields}),
        st.sampled_from(KNOWN_TYPES) | names,
        st.dictionaries(
            st.sampled_from(
                [
                    "response",
                    "item",
                    "output_index",
                    "index",
                    "delta",
                    "content_block",
                    "message",
                    "choices",
                    "usage",
                    "error",
                    "sequence_number",
                    "output",
                ]
            ),
            json_values,
            max_size=4,
        ),
    ),
)

malformed_events = st.builds(
    lambda data, name: Event(data.replace("\r", ""), name),
    _garbage_data,
    st.none() | st.sampled_from(KNOWN_TYPES) | names,
)


# -- Google Gemini --------------------------------------------------------------------------

# Texts with the line separators a gateway must keep as data (U+2028, U+2029, U+0085 NEL),
# besides CR/LF (escaped in JSON) and the usual unicode.
gemini_texts = st.one_of(
    texts,
    st.lists(
        st.sampled_from(
            ["Hello", " world", "\u2028", "\u2029", "\u0085", "\r\n", " 東京", "🙂", '"q"', "\\"]
        ),
        max_size=10,
    ).map("".join),
)
signatures = st.binary(min_size=1, max_size=24).map(lambda b: base64.b64encode(b).decode())
_safety_ratings = st.lists(
    st.builds(
        lambda category, probability: {"category": category, "probability": probability},
        st.sampled_from(["HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_DANGEROUS_CONTENT"]),
        st.sampled_from(["NEGLIGIBLE", "LOW"]),
    ),
    min_size=1,
    max_size=2,
)
_other_parts = st.one_of(
    st.builds(lambda code: {"executableCode": {"language": "PYTHON", "code": code}}, texts),
    st.builds(lambda out: {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": out}}, texts),
    st.builds(lambda data: {"inlineData": {"mimeType": "image/png", "data": data}}, signatures),
)
_arg_values = st.one_of(texts, st.integers(-1000, 1000), st.booleans(), st.none())


@st.composite
def _streamed_call(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A function call with streamed arguments (Vertex AI ``streamFunctionCallArguments``):
    the name with ``willContinue``, ``partialArgs`` pieces (JSON path + value, strings cut
    into pieces continued while ``willContinue``), then an empty call that ends it."""
    head: dict[str, Any] = {"functionCall": {"name": draw(names), "willContinue": True}}
    if draw(st.booleans()):
        head["thoughtSignature"] = draw(signatures)
    parts = [head]
    args = draw(st.dictionaries(names, _arg_values, max_size=3))
    nested = draw(st.booleans())
    for key, value in args.items():
        path = f"$.o1.{key}" if nested and draw(st.booleans()) else f"$.{key}"
        if isinstance(value, str):
            pieces = draw(chunked(value)) or [""]
            if draw(st.booleans()):
                pieces.append("")  # as the API ends a string: an empty last piece
            for i, piece in enumerate(pieces):
                arg: dict[str, Any] = {"jsonPath": path, "stringValue": piece}
                if i < len(pieces) - 1:
                    arg["willContinue"] = True
                parts.append({"functionCall": {"partialArgs": [arg], "willContinue": True}})
            continue
        if isinstance(value, bool):
            arg = {"jsonPath": path, "boolValue": value}
        elif isinstance(value, int):
            arg = {"jsonPath": path, "numberValue": value}
        else:
            arg = {"jsonPath": path, "nullValue": "NULL_VALUE"}
        parts.append({"functionCall": {"partialArgs": [arg], "willContinue": True}})
    parts.append({"functionCall": {}})
    return parts


@st.composite
def _gemini_parts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """The parts one candidate streams, in order, in their streamed form."""
    parts: list[dict[str, Any]] = []
    if draw(st.booleans()):
        parts += [{"text": p, "thought": True} for p in draw(chunked(draw(nonempty_texts)))]
    kind = draw(st.sampled_from(["text", "calls", "streamed", "other"]))
    if kind == "text":
        parts += [{"text": p} for p in draw(chunked(draw(gemini_texts))) or [""]]
        signature = draw(st.none() | signatures)
        if signature is not None:
            if draw(st.booleans()):
                parts[-1]["thoughtSignature"] = signature
            else:  # as the API often sends it: a last part of empty text
                parts.append({"text": "", "thoughtSignature": signature})
    elif kind == "calls":
        for _ in range(draw(st.integers(1, 3))):
            call: dict[str, Any] = {"name": draw(names)}
            if draw(st.booleans()):
                call["args"] = draw(json_objects)
            if draw(st.booleans()):
                call["id"] = draw(ids)
            part: dict[str, Any] = {"functionCall": call}
            if draw(st.booleans()):
                part["thoughtSignature"] = draw(signatures)
            parts.append(part)
    elif kind == "streamed":
        for _ in range(draw(st.integers(1, 2))):
            parts += draw(_streamed_call())
    else:
        parts += draw(st.lists(_other_parts, min_size=1, max_size=2))
    return parts


@st.composite
def _groups(draw: st.DrawFn, parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``parts`` cut into the consecutive groups that chunks carry (1-3 parts each)."""
    groups: list[list[dict[str, Any]]] = []
    i = 0
    while i < len(parts):
        size = draw(st.integers(1, 3))
        groups.append(parts[i : i + size])
        i += size
    return groups


@st.composite
def gemini_streams(draw: st.DrawFn, max_candidates: int = 3) -> list[dict[str, Any]]:
    """``streamGenerateContent?alt=sse`` chunks of a completed answer: 1-``max_candidates``
    candidates (``index`` on each, or left out on candidate 0 as Vertex AI's proto JSON
    does), their parts cut into chunks, every candidate's ``finishReason`` in the last chunk,
    ``usageMetadata`` on every chunk or on the last only, safety ratings, citations."""
    n = draw(st.integers(1, max_candidates))
    explicit = draw(st.booleans())
    per_candidate = [draw(_groups(draw(_gemini_parts()))) for _ in range(n)]
    steps = max(len(groups) for groups in per_candidate)
    base: dict[str, Any] = {
        "modelVersion": draw(st.sampled_from(["gemini-2.5-flash", "gemini-3-pro-preview"])),
        "responseId": draw(ids),
    }
    vertex = draw(st.booleans())
    if vertex:
        base["createTime"] = "2026-04-02T17:03:50.399550Z"
    every_usage = draw(st.booleans())
    prompt_tokens = draw(st.integers(1, 500))
    out_tokens = 0
    chunks: list[dict[str, Any]] = []
    for step in range(steps):
        last = step == steps - 1
        entries: list[dict[str, Any]] = []
        for index, groups in enumerate(per_candidate):
            entry: dict[str, Any] = {}
            if step < len(groups):
                entry["content"] = {"parts": groups[step], "role": "model"}
            if last:
                entry["finishReason"] = draw(st.sampled_from(["STOP", "MAX_TOKENS"]))
                if draw(st.booleans()):
                    entry["safetyRatings"] = draw(_safety_ratings)
                if draw(st.integers(0, 3)) == 0:
                    citation = {"startIndex": 0, "endIndex": 4, "uri": "https://example.com/a"}
                    entry["citationMetadata"] = {"citations": [citation]}
                if draw(st.integers(0, 3)) == 0:
                    entry["avgLogprobs"] = draw(st.floats(-5, 0))
            elif entry and draw(st.integers(0, 3)) == 0:
                entry["safetyRatings"] = draw(_safety_ratings)
            if not entry:
                continue
            if explicit or index > 0:  # Vertex AI leaves index 0 out (its proto default)
                entry["index"] = index
            entries.append(entry)
        chunk: dict[str, Any] = {"candidates": entries}
        if step == 0 and draw(st.integers(0, 3)) == 0:
            chunk["promptFeedback"] = {"safetyRatings": draw(_safety_ratings)}
        out_tokens += draw(st.integers(0, 20))
        if every_usage or last:
            usage: dict[str, Any] = {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": out_tokens,
                "totalTokenCount": prompt_tokens + out_tokens,
            }
            if vertex:
                usage["trafficType"] = "ON_DEMAND"
            chunk["usageMetadata"] = usage
        chunk.update(base)
        chunks.append(chunk)
    return chunks


def gemini_events(chunks: list[dict[str, Any]], *, ascii: bool = False) -> list[Event]:
    """Data-only wire events, one compact JSON chunk each (no ``event:`` line)."""
    return [Event(json.dumps(c, ensure_ascii=ascii, separators=(",", ":"))) for c in chunks]


def gemini_wire(events: list[Event], newline: bytes = b"\n") -> bytes:
    """The SSE body of data-only events, framed with LF or CRLF line ends."""
    return b"".join(b"data: " + e.data.encode() + newline + newline for e in events)


_gemini_garbage = st.one_of(
    _garbage_data,
    st.builds(
        lambda candidates, extra: json.dumps({"candidates": candidates, **extra}),
        st.lists(
            st.one_of(
                json_values,
                st.dictionaries(
                    st.sampled_from(["finishReason", "index", "content", "safetyRatings"]),
                    json_values,
                    max_size=3,
                ),
                st.builds(
                    lambda parts: {"content": {"parts": parts}},
                    st.lists(
                        st.one_of(
                            json_values,
                            st.dictionaries(
                                st.sampled_from(["text", "thought", "functionCall"]),
                                json_values,
                                max_size=2,
                            ),
                            st.builds(
                                lambda call: {"functionCall": call},
                                st.dictionaries(
                                    st.sampled_from(
                                        ["name", "args", "partialArgs", "willContinue"]
                                    ),
                                    json_values,
                                    max_size=3,
                                ),
                            ),
                        ),
                        max_size=3,
                    ),
                ),
            ),
            max_size=3,
        ),
        st.dictionaries(
            st.sampled_from(["promptFeedback", "usageMetadata", "error", "modelVersion"]),
            json_values,
            max_size=2,
        ),
    ),
)

gemini_malformed_events = st.builds(
    lambda data, name: Event(data.replace("\r", ""), name),
    _gemini_garbage,
    st.none() | st.just("error") | names,
)
