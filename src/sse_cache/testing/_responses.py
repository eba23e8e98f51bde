"""The OpenAI Responses API stream: :func:`responses_events`, the one builder of its events,
used by the public builders (:func:`responses_body`, :func:`responses_stream`) and by the mock
upstream's ``/responses`` route (:func:`responses_answer`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from ..events import Event
from ._request import Answer, Options, as_dict, as_list, last_item, positive_int
from ._schema import fake_object, json_schema_format, output_text
from ._text import chunks, dumps, hex_ident, ident, mock_text, rng, split_every, tokens, words

__all__ = [
    "responses_answer",
    "responses_body",
    "responses_events",
    "responses_stream",
    "responses_text_pieces",
]

_encode: Final = msgspec.json.Encoder().encode


def responses_events(
    final: Mapping[str, Any],
    start: Mapping[str, Any],
    split: Callable[[str], Sequence[str]],
    text_pieces: Sequence[str] | None = None,
) -> list[Event]:
    """The stream that ends in the response object ``final``: ``response.created`` and
    ``response.in_progress`` carrying ``start``, each output item of ``final`` streamed (a
    reasoning item's summary parts, a function call's arguments, a message's text), then
    ``response.completed``; ``sequence_number`` counts from 0. ``split`` cuts a text into its
    deltas; ``text_pieces``, when given, are the message text's deltas."""
    events: list[Event] = []

    def emit(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": len(events), **fields}
        events.append(Event(dumps(payload), kind))

    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for oi, item in enumerate(final["output"]):
        where = {"item_id": item["id"], "output_index": oi}
        if item["type"] == "reasoning":
            emit("response.output_item.added", output_index=oi, item=dict(item, summary=[]))
            for si, part in enumerate(item["summary"]):
                at = {**where, "summary_index": si}
                emit("response.reasoning_summary_part.added", **at, part=dict(part, text=""))
                for piece in split(part["text"]):
                    emit("response.reasoning_summary_text.delta", **at, delta=piece)
                emit("response.reasoning_summary_text.done", **at, text=part["text"])
                emit("response.reasoning_summary_part.done", **at, part=part)
        elif item["type"] == "function_call":
            added = dict(item, status="in_progress", arguments="")
            emit("response.output_item.added", output_index=oi, item=added)
            for piece in chunks(item["arguments"]):
                emit("response.function_call_arguments.delta", **where, delta=piece)
            emit("response.function_call_arguments.done", **where, arguments=item["arguments"])
        else:
            added = dict(item, status="in_progress", content=[])
            emit("response.output_item.added", output_index=oi, item=added)
            part = item["content"][0]
            at = {**where, "content_index": 0}
            emit("response.content_part.added", **at, part=dict(part, text=""))
            pieces = split(part["text"]) if text_pieces is None else text_pieces
            for piece in pieces:
                emit("response.output_text.delta", **at, delta=piece, logprobs=[])
            emit("response.output_text.done", **at, text=part["text"], logprobs=[])
            emit("response.content_part.done", **at, part=part)
        emit("response.output_item.done", output_index=oi, item=item)
    emit("response.completed", response=final)
    return events


# -- the public builders ------------------------------------------------------------------------


def responses_body(
    prompt: str = "Hello",
    *,
    model: str = "gpt-mock-1",
    text_deltas: int = 40,
    delta_chars: int = 12,
    summaries: int = 2,
    created_at: int = 1_750_000_000,
) -> dict[str, Any]:
    """The final ``response`` object for ``prompt`` (what ``response.completed`` carries)."""
    digest = hashlib.blake2b(f"{model}\0{prompt}".encode(), digest_size=12).hexdigest()
    summary_texts = [mock_text((prompt, "summary", i), 12) for i in range(summaries)]
    answer = mock_text((prompt, "answer"), 1 + text_deltas * delta_chars // 6)
    answer = answer[: max(1, text_deltas * delta_chars)]
    output: list[dict[str, Any]] = []
    if summaries:
        output.append(
            {
                "id": f"rs_{digest}",
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": t} for t in summary_texts],
            }
        )
    output.append(
        {
            "id": f"msg_{digest}",
            "type": "message",
            "status": "completed",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": answer}],
            "role": "assistant",
        }
    )
    return {
        "id": f"resp_{digest}",
        "object": "response",
        "created_at": created_at,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": "detailed"},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": 1 + len(prompt) // 4,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 1 + len(answer) // 4,
            "output_tokens_details": {"reasoning_tokens": 8 * summaries},
            "total_tokens": 2 + len(prompt) // 4 + len(answer) // 4,
        },
        "user": None,
        "metadata": {},
    }


def responses_stream(
    prompt: str = "Hello",
    *,
    model: str = "gpt-mock-1",
    text_deltas: int = 40,
    delta_chars: int = 12,
    summaries: int = 2,
    created_at: int = 1_750_000_000,
) -> list[Event]:
    """The Responses API stream that produces :func:`responses_body` for the same arguments:
    ``summaries`` reasoning summary parts (``summary_index`` 0..n-1) and about ``text_deltas``
    output-text deltas of ``delta_chars`` characters."""
    final = responses_body(
        prompt,
        model=model,
        text_deltas=text_deltas,
        delta_chars=delta_chars,
        summaries=summaries,
        created_at=created_at,
    )
    start = dict(final, status="in_progress", output=[], usage=None)
    return responses_events(final, start, lambda text: split_every(text, delta_chars))


# -- the mock upstream's answer -----------------------------------------------------------------


def _tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(name, parameters) of the function the answer calls, or None for a text answer."""
    last = last_item(body, "input")
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        return None  # the tool answered: now the model writes its text
    tools = [
        t
        for t in as_list(body.get("tools"))
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


def _reasoning_item(
    body: Mapping[str, Any], digest: str, summaries: int
) -> tuple[dict[str, Any], int]:
    """The reasoning output item with ``summaries`` summary parts, and its reasoning tokens."""
    parts: list[dict[str, Any]] = []
    reasoning_tokens = 0
    for i in range(summaries):
        title = words(digest, ("title", i), 3).capitalize()
        text = f"**{title}**\n\n{words(digest, ('summary', i), 10)}"
        parts.append({"type": "summary_text", "text": text})
        reasoning_tokens += 4 * len(tokens(text))
    item: dict[str, Any] = {"id": f"rs_{hex_ident(digest, 'rs', 50)}", "type": "reasoning"}
    include = body.get("include")
    if isinstance(include, list) and "reasoning.encrypted_content" in include:
        item["encrypted_content"] = "gAAAAAB" + ident(digest, "enc", 120)
    item["summary"] = parts
    return item, reasoning_tokens


def _function_call_item(tool: tuple[str, Any], digest: str) -> dict[str, Any]:
    return {
        "id": f"fc_{hex_ident(digest, 'fc', 50)}",
        "type": "function_call",
        "status": "completed",
        "arguments": dumps(fake_object(tool[1], rng(digest, "args"))),
        "call_id": f"call_{ident(digest, 'call', 24)}",
        "name": tool[0],
    }


def _message_item(text: str, digest: str) -> dict[str, Any]:
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {
        "id": f"msg_{hex_ident(digest, 'msg', 50)}",
        "type": "message",
        "status": "completed",
        "content": [part],
        "role": "assistant",
    }


def responses_answer(body: Mapping[str, Any], opts: Options, digest: str, tokens_in: int) -> Answer:
    """The mock's answer to a ``/responses`` request."""
    model = body.get("model") if isinstance(body.get("model"), str) else "gpt-mock-1"
    created = 1_750_000_000 + int(digest[:6], 16) % 10_000_000
    reasoning_req = as_dict(body.get("reasoning"))
    # Asking for no summary (or no reasoning) turns the summaries off; by default they are on.
    off = "summary" in reasoning_req and reasoning_req["summary"] is None
    summaries = 0 if off or reasoning_req.get("effort") == "none" else opts.summaries
    count = opts.words_within(positive_int(body.get("max_output_tokens")))
    text_cfg = as_dict(body.get("text"))
    fmt = json_schema_format(text_cfg.get("format"))

    output: list[dict[str, Any]] = []
    reasoning_tokens = 0
    if summaries:
        item, reasoning_tokens = _reasoning_item(body, digest, summaries)
        output.append(item)
    tool = _tool(body)
    text_pieces: list[str] = []
    if tool is not None:
        item = _function_call_item(tool, digest)
        output.append(item)
        out_tokens = len(chunks(item["arguments"]))
    else:
        text_pieces = output_text(digest, "answer", count, fmt)
        output.append(_message_item("".join(text_pieces), digest))
        out_tokens = len(text_pieces)
    reasoning = {
        "effort": reasoning_req.get("effort", "medium"),
        "summary": reasoning_req.get("summary", "detailed"),
    }
    final: dict[str, Any] = {
        "id": f"resp_{hex_ident(digest, 'resp', 50)}",
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
        "tools": [_echo_tool(t) for t in as_list(body.get("tools"))],
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
    events = responses_events(final, start, tokens, text_pieces)
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
        return [Event(dumps(payload), "response.failed")]

    return Answer(events, _encode(final), failure, (200, _encode(failed)))


def responses_text_pieces(
    deltas: int, text: str | Callable[[int], str], *, response_id: str = "resp_test"
) -> list[bytes]:
    """The smallest complete Responses stream, as SSE bytes one event a piece (what
    :class:`~sse_cache.testing.GatedUpstream` sends one body message each):
    ``response.created``, ``deltas`` text deltas (``text``, or ``text(i)`` for the i-th) and
    ``response.completed``. For tests that need a stream of a known size or shape rather than
    a realistic one (:func:`responses_stream`)."""
    response = {"id": response_id, "object": "response", "model": "gpt-mock", "output": []}

    def piece(kind: str, number: int, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": number, **fields}
        return f"event: {kind}\ndata: {dumps(payload)}\n\n".encode()

    out = [piece("response.created", 0, response=response)]
    for i in range(deltas):
        delta = text(i) if callable(text) else text
        out.append(
            piece(
                "response.output_text.delta",
                i + 1,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta=delta,
            )
        )
    done = {**response, "status": "completed"}
    out.append(piece("response.completed", deltas + 1, response=done))
    return out
