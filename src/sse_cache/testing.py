"""Deterministic, realistic mock streams for the demo, tests and benchmarks.

:func:`responses_stream` builds an OpenAI Responses API event sequence (``response.created``,
``response.in_progress``, a reasoning item with several summary parts, a message with many
``output_text`` deltas, ``response.completed``) in the wire form the API uses: ``event: <type>``
plus one compact JSON ``data`` line. The same arguments always give the same bytes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from .events import Event

__all__ = ["mock_text", "paced", "responses_body", "responses_stream"]

_encode = msgspec.json.Encoder().encode

_WORDS = [
    "the",
    "stream",
    "cache",
    "records",
    "every",
    "event",
    "while",
    "it",
    "is",
    "delivered",
    "and",
    "replays",
    "it",
    "later",
    "with",
    "the",
    "same",
    "bytes",
    "in",
    "the",
    "same",
    "order",
    "so",
    "a",
    "repeated",
    "request",
    "costs",
    "nothing",
    "upstream",
    "reasoning",
    "summaries",
    "keep",
    "their",
    "index",
    "tokens",
    "arrive",
    "one",
    "small",
    "delta",
    "at",
    "a",
    "time",
    "and",
    "gateways",
    "usually",
    "forward",
    "them",
    "unchanged",
    "café",
    "naïve",
    "東京",
    "quotes",
    '"x"',
    "back\\slash",
]


def _rng(*parts: object) -> random.Random:
    seed = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(seed, "big"))


def mock_text(seed: object, words: int) -> str:
    """``words`` pseudo-random words, the same for the same ``seed``."""
    rng = _rng("text", seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


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
    ident = hashlib.blake2b(f"{model}\0{prompt}".encode(), digest_size=12).hexdigest()
    summary_texts = [mock_text((prompt, "summary", i), 12) for i in range(summaries)]
    answer = mock_text((prompt, "answer"), 1 + text_deltas * delta_chars // 6)
    answer = answer[: max(1, text_deltas * delta_chars)]
    output: list[dict[str, Any]] = []
    if summaries:
        output.append(
            {
                "id": f"rs_{ident}",
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": t} for t in summary_texts],
            }
        )
    output.append(
        {
            "id": f"msg_{ident}",
            "type": "message",
            "status": "completed",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": answer}],
            "role": "assistant",
        }
    )
    return {
        "id": f"resp_{ident}",
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
    events: list[Event] = []

    def emit(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": len(events), **fields}
        events.append(Event(_encode(payload).decode(), kind))

    start = dict(final, status="in_progress", output=[], usage=None)
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for index, item in enumerate(final["output"]):
        item_id = item["id"]
        where = {"item_id": item_id, "output_index": index}
        if item["type"] == "reasoning":
            emit("response.output_item.added", output_index=index, item=dict(item, summary=[]))
            for s, part in enumerate(item["summary"]):
                empty = {"type": "summary_text", "text": ""}
                emit("response.reasoning_summary_part.added", **where, summary_index=s, part=empty)
                for piece in _split(part["text"], delta_chars):
                    emit(
                        "response.reasoning_summary_text.delta",
                        **where,
                        summary_index=s,
                        delta=piece,
                    )
                emit(
                    "response.reasoning_summary_text.done",
                    **where,
                    summary_index=s,
                    text=part["text"],
                )
                emit("response.reasoning_summary_part.done", **where, summary_index=s, part=part)
            emit("response.output_item.done", output_index=index, item=item)
        else:
            added = dict(item, status="in_progress", content=[])
            emit("response.output_item.added", output_index=index, item=added)
            part = item["content"][0]
            text = part["text"]
            emit(
                "response.content_part.added",
                **where,
                content_index=0,
                part=dict(part, text=""),
            )
            for piece in _split(text, delta_chars):
                emit(
                    "response.output_text.delta",
                    **where,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                )
            emit("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            emit("response.content_part.done", **where, content_index=0, part=part)
            emit("response.output_item.done", output_index=index, item=item)
    emit("response.completed", response=final)
    return events


async def paced(
    events: Iterable[Event],
    *,
    delay: float = 0.0,
    first_delay: float | None = None,
    jitter: float = 0.0,
    seed: object = 0,
    fail_after: int | None = None,
) -> AsyncIterator[Event]:
    """Yield ``events`` like an upstream would: ``first_delay`` before the first (time to
    first token; defaults to ``delay``), then ``delay`` seconds (± ``jitter``) between
    events. ``fail_after=n`` raises :class:`ConnectionError` after ``n`` events (a cut
    stream)."""
    rng = _rng("pace", seed)
    for i, event in enumerate(events):
        if fail_after is not None and i >= fail_after:
            raise ConnectionError(f"mock upstream cut after {fail_after} events")
        wait = (first_delay if first_delay is not None else delay) if i == 0 else delay
        if jitter:
            wait = max(0.0, wait + rng.uniform(-jitter, jitter))
        if wait:
            await anyio.sleep(wait)
        else:
            await anyio.lowlevel.checkpoint()
        yield event
