"""The mock upstream's OpenAI Chat Completions answers: ``chat.completion.chunk`` events ending
with ``data: [DONE]``, ``n`` choices interleaved, tool calls, an optional usage chunk."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import zip_longest
from typing import Any, Final

import msgspec

from ..events import Event
from ._errors import openai_error
from ._request import Answer, Options, as_dict, as_list, fails_with, last_item, positive_int
from ._schema import fake_object, json_schema_format, output_text
from ._text import chunks, dumps, hex_ident, ident, rng

__all__ = ["MAX_CHOICES", "chat_answer"]

#: The most choices (``n``, Gemini's ``candidateCount``) an answer has.
MAX_CHOICES: Final = 8
_DONE: Final = Event("[DONE]")
_encode: Final = msgspec.json.Encoder().encode


def _tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = last_item(body, "messages")
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        return None
    tools = [
        t["function"]
        for t in as_list(body.get("tools"))
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


def _tool_call_choice(
    index: int, tool: tuple[str, Any], digest: str
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(message, deltas, tokens) of a choice that calls ``tool``."""
    arguments = dumps(fake_object(tool[1], rng(digest, f"args{index}")))
    call_id = f"call_{ident(digest, f'call{index}', 24)}"
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
    pieces = chunks(arguments)
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "refusal": None},
        {"tool_calls": [head]},
    ]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    return message, deltas, len(pieces)


def _text_choice(
    index: int, digest: str, word_count: int, fmt: tuple[str, Any] | None
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(message, deltas, tokens) of a choice that answers with text."""
    pieces = output_text(digest, ("answer", index), word_count, fmt)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(pieces),
        "refusal": None,
        "annotations": [],
    }
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas += [{"content": p} for p in pieces]
    return message, deltas, len(pieces)


def _usage(tokens_in: int, completion_tokens: int) -> dict[str, Any]:
    return {
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


def chat_answer(body: Mapping[str, Any], opts: Options, digest: str, tokens_in: int) -> Answer:
    """The mock's answer to a ``/chat/completions`` request."""
    model = body.get("model") if isinstance(body.get("model"), str) else "gpt-mock-1"
    created = 1_750_000_000 + int(digest[:6], 16) % 10_000_000
    n = min(positive_int(body.get("n")) or 1, MAX_CHOICES)
    limit = positive_int(body.get("max_completion_tokens")) or positive_int(body.get("max_tokens"))
    word_count = opts.words_within(limit)
    fmt = json_schema_format(body.get("response_format"))
    tool = _tool(body)
    base: dict[str, Any] = {
        "id": f"chatcmpl-{ident(digest, 'chat', 29)}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": f"fp_{hex_ident(digest, 'fp', 10)}",
    }
    include_usage = as_dict(body.get("stream_options")).get("include_usage") is True
    # With include_usage the API sends "usage": null on every chunk but the last.
    tail = {"usage": None} if include_usage else {}

    choices: list[dict[str, Any]] = []
    streams: list[list[dict[str, Any]]] = []
    completion_tokens = 0
    for index in range(n):
        if tool is not None:
            message, deltas, tokens = _tool_call_choice(index, tool, digest)
            finish = "tool_calls"
        else:
            message, deltas, tokens = _text_choice(index, digest, word_count, fmt)
            finish = "stop"
        entries: list[dict[str, Any]] = [
            {"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
        ]
        entries.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})
        streams.append(entries)
        completion_tokens += tokens
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        )

    usage = _usage(tokens_in, completion_tokens)
    events: list[Event] = []
    # Several choices are interleaved, one delta of each in turn, as the API sends them.
    for row in zip_longest(*streams):
        for choice in row:
            if choice is not None:
                events.append(Event(dumps({**base, "choices": [choice], **tail})))
    if include_usage:
        events.append(Event(dumps({**base, "choices": [], "usage": usage})))
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
    error = openai_error(
        "The server had an error while processing your request (x-mock-error: fail-mid-stream).",
        "server_error",
        None,
    )
    return Answer(
        events, _encode(completion), fails_with(Event(error.decode("utf-8"))), (500, error)
    )
