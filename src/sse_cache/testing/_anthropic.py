"""The mock upstream's Anthropic Messages answers: ``message_start``, content blocks (thinking
with its signature, text, ``tool_use`` with ``input_json_delta``), ``ping``, ``message_delta``,
``message_stop``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ..events import Event
from ._errors import anthropic_error
from ._request import Answer, Options, as_dict, as_list, fails_with, last_item, positive_int
from ._schema import fake_object
from ._text import chunks, dumps, ident, rng, tokens, words

__all__ = ["anthropic_answer"]

_PING: Final = Event('{"type": "ping"}', "ping")
_encode: Final = msgspec.json.Encoder().encode


def _tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = last_item(body, "messages")
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, list) and any(as_dict(b).get("type") == "tool_result" for b in content):
        return None
    tools = [
        t
        for t in as_list(body.get("tools"))
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


def _content(
    digest: str, opts: Options, word_count: int, thinking: bool, tool: tuple[str, Any] | None
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], int]:
    """The content blocks, the deltas that stream each, and the output tokens."""
    blocks: list[dict[str, Any]] = []
    deltas: list[list[dict[str, Any]]] = []
    output_tokens = 0
    if thinking:
        paragraphs = [words(digest, ("thinking", i), 12) for i in range(max(1, opts.summaries))]
        text = "\n\n".join(p.capitalize() for p in paragraphs)
        signature = "Eq" + ident(digest, "signature", 200) + "=="
        blocks.append({"type": "thinking", "thinking": text, "signature": signature})
        pieces = tokens(text)
        deltas.append(
            [{"type": "thinking_delta", "thinking": p} for p in pieces]
            + [{"type": "signature_delta", "signature": signature}]
        )
        output_tokens += len(pieces)
    pieces = tokens(words(digest, "answer", word_count))
    blocks.append({"type": "text", "text": "".join(pieces)})
    deltas.append([{"type": "text_delta", "text": p} for p in pieces])
    output_tokens += len(pieces)
    if tool is not None:
        arguments = fake_object(tool[1], rng(digest, "input"))
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_01{ident(digest, 'toolu', 22)}",
                "name": tool[0],
                "input": arguments,
            }
        )
        # Anthropic's JSON text has spaces after separators; the first delta is empty.
        json_pieces = ["", *chunks(msgspec.json.format(dumps(arguments), indent=0))]
        deltas.append([{"type": "input_json_delta", "partial_json": c} for c in json_pieces])
        output_tokens += len(json_pieces)
    return blocks, deltas, output_tokens


def _events(message: dict[str, Any], deltas: list[list[dict[str, Any]]]) -> list[Event]:
    """The stream of ``message``, each content block streamed by its ``deltas``."""
    events: list[Event] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append(Event(dumps({"type": kind, **fields}), kind))

    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    emit("message_start", message=start)
    for index, (block, block_deltas) in enumerate(zip(message["content"], deltas, strict=True)):
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
        "input_tokens": usage["input_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": usage["output_tokens"],
    }
    emit(
        "message_delta",
        delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
        usage=final_usage,
    )
    emit("message_stop")
    return events


def anthropic_answer(
    body: Mapping[str, Any], opts: Options, digest: str, tokens_in: int, request_id: str
) -> Answer:
    """The mock's answer to a ``/messages`` request."""
    model = body.get("model") if isinstance(body.get("model"), str) else "claude-mock-1"
    word_count = opts.words_within(positive_int(body.get("max_tokens")))
    thinking_req = body.get("thinking")
    thinking = isinstance(thinking_req, dict) and thinking_req.get("type") in (
        "enabled",
        "adaptive",
    )
    tool = _tool(body)
    blocks, deltas, output_tokens = _content(digest, opts, word_count, thinking, tool)
    usage = {
        "input_tokens": tokens_in,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    message = {
        "model": model,
        "id": f"msg_01{ident(digest, 'msg', 22)}",
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "stop_reason": "tool_use" if tool is not None else "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    overloaded = anthropic_error("Overloaded", "overloaded_error", request_id)
    error = anthropic_error(
        "Internal server error (x-mock-error: fail-mid-stream)", "api_error", request_id
    )
    failure = fails_with(Event(overloaded.decode("utf-8"), "error"))
    return Answer(_events(message, deltas), _encode(message), failure, (500, error))
