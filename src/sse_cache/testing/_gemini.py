"""The mock upstream's Google Gemini answers: data-only ``GenerateContentResponse`` chunks, one
part each (thought summaries, a function call or the text with its thought signature),
``candidateCount`` candidates, a cumulative ``usageMetadata`` on every chunk."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ..events import Event
from ._chat import MAX_CHOICES
from ._errors import google_error
from ._request import Answer, Options, as_dict, as_list, fails_with, last_item, positive_int
from ._schema import fake_object, output_text
from ._text import dumps, ident, rng, tokens, words

__all__ = ["NOT_ANSWER", "PATH", "gemini_answer"]

# Gemini names the model and the method in the path (Gemini API and Vertex AI alike).
PATH: Final = re.compile(
    r"/models/(?P<model>[^/:]+):(?P<method>streamGenerateContent|generateContent)$"
)
# Gemini's request metadata (billing labels): not part of the answer.
NOT_ANSWER: Final = frozenset({"labels"})
_encode: Final = msgspec.json.Encoder().encode


def _field(obj: Mapping[str, Any], name: str) -> Any:
    """A request field by its JSON name (``includeThoughts``) or its proto name
    (``include_thoughts``): the API accepts both, and the SDK sends nested fields snake_case."""
    if name in obj:
        return obj[name]
    return obj.get(re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), name))


def _lower_types(schema: Any) -> Any:
    """A Gemini ``Schema`` (``"type": "OBJECT"``) as the JSON schema :func:`_fake` reads."""
    if isinstance(schema, dict):
        return {
            k: v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema


def _tool(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    last = last_item(body, "contents")
    if any(
        _field(as_dict(p), "functionResponse") is not None
        for p in as_list(_field(as_dict(last), "parts"))
    ):
        return None  # the tool answered: now the model writes its text
    decls = [
        d
        for t in as_list(_field(body, "tools"))
        for d in as_list(_field(as_dict(t), "functionDeclarations"))
        if isinstance(d, dict) and isinstance(d.get("name"), str)
    ]
    calling = as_dict(_field(as_dict(_field(body, "toolConfig")), "functionCallingConfig"))
    if not decls or _field(calling, "mode") == "NONE":
        return None
    allowed = _field(calling, "allowedFunctionNames")
    if isinstance(allowed, list):
        decls = [d for d in decls if d["name"] in allowed] or decls
    schema = _field(decls[0], "parametersJsonSchema") or decls[0].get("parameters")
    return decls[0]["name"], _lower_types(schema)


def _candidate(
    index: int,
    digest: str,
    opts: Options,
    word_count: int,
    fmt: tuple[str, Any] | None,
    thoughts: bool,
    tool: tuple[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Candidate ``index``: the parts it is streamed in (one per chunk), and its final parts."""
    parts: list[dict[str, Any]] = []
    final: list[dict[str, Any]] = []
    signature = None
    if thoughts:
        # Thought summaries (`thought: true` parts), then a signature (base64) for them.
        paragraphs = [
            f"**{words(digest, ('title', index, i), 3).capitalize()}**\n\n"
            f"{words(digest, ('thought', index, i), 10)}\n\n"
            for i in range(max(1, opts.summaries))
        ]
        thought = "".join(paragraphs)
        parts += [{"text": p, "thought": True} for p in tokens(thought)]
        final.append({"text": thought, "thought": True})
        raw = hashlib.blake2b(f"{digest}\0signature{index}".encode(), digest_size=60)
        signature = base64.b64encode(raw.digest() * 2).decode("ascii")
    if tool is not None:
        call: dict[str, Any] = {
            "functionCall": {
                "name": tool[0],
                "args": fake_object(tool[1], rng(digest, f"args{index}")),
            }
        }
        if signature is not None:
            call["thoughtSignature"] = signature
        parts.append(call)
        final.append(call)
    else:
        pieces = output_text(digest, ("answer", index), word_count, fmt)
        parts += [{"text": p} for p in pieces]
        text: dict[str, Any] = {"text": "".join(pieces)}
        if signature is not None:
            # As the API streams it: the signature in a last part of empty text.
            parts.append({"text": "", "thoughtSignature": signature})
            text["thoughtSignature"] = signature
        final.append(text)
    return parts, final


class _Usage:
    """The cumulative ``usageMetadata``: thought and answer parts streamed so far."""

    def __init__(self, tokens_in: int, thoughts: bool) -> None:
        self.tokens_in = tokens_in
        self.thoughts = thoughts
        self.counts = {"thought": 0, "answer": 0}

    def count(self, part: Mapping[str, Any]) -> None:
        self.counts["thought" if part.get("thought") else "answer"] += 1

    def metadata(self) -> dict[str, Any]:
        counts, tokens_in = self.counts, self.tokens_in
        out: dict[str, Any] = {
            "promptTokenCount": tokens_in,
            "candidatesTokenCount": counts["answer"],
            "totalTokenCount": tokens_in + counts["answer"] + 4 * counts["thought"],
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens_in}],
        }
        if self.thoughts:
            out["thoughtsTokenCount"] = 4 * counts["thought"]
        return out


def gemini_answer(
    body: Mapping[str, Any], model: str, opts: Options, digest: str, tokens_in: int
) -> Answer:
    """The mock's answer to a ``generateContent`` / ``streamGenerateContent`` request."""
    config = as_dict(_field(body, "generationConfig"))
    n = min(positive_int(_field(config, "candidateCount")) or 1, MAX_CHOICES)
    limit = positive_int(_field(config, "maxOutputTokens"))
    truncated = limit is not None and limit < opts.deltas
    word_count = opts.words_within(limit)
    thoughts = _field(as_dict(_field(config, "thinkingConfig")), "includeThoughts") is True
    fmt: tuple[str, Any] | None = None
    if _field(config, "responseMimeType") == "application/json":
        schema = _field(config, "responseJsonSchema") or _field(config, "responseSchema")
        fmt = ("json_schema", _lower_types(schema)) if schema else ("json_object", None)
    tool = _tool(body)
    finish = "MAX_TOKENS" if truncated and tool is None else "STOP"
    candidates = [
        _candidate(index, digest, opts, word_count, fmt, thoughts, tool) for index in range(n)
    ]
    response_id = ident(digest, "gemini-response", 23)
    usage = _Usage(tokens_in, thoughts)
    events: list[Event] = []
    steps = max(len(parts) for parts, _ in candidates)
    for step in range(steps):  # one chunk per step: one part of each candidate
        entries: list[dict[str, Any]] = []
        for index, (parts, _) in enumerate(candidates):
            entry: dict[str, Any] = {}
            if step < len(parts):
                entry["content"] = {"parts": [parts[step]], "role": "model"}
                usage.count(parts[step])
            if step == steps - 1:
                entry["finishReason"] = finish
            if entry:
                entries.append({**entry, "index": index})
        chunk = {
            "candidates": entries,
            "usageMetadata": usage.metadata(),
            "modelVersion": model,
            "responseId": response_id,
        }
        events.append(Event(dumps(chunk)))
    finals = [
        {"content": {"parts": final, "role": "model"}, "finishReason": finish, "index": index}
        for index, (_, final) in enumerate(candidates)
    ]
    whole = {
        "candidates": finals,
        "usageMetadata": usage.metadata(),
        "modelVersion": model,
        "responseId": response_id,
    }
    error = google_error(500, "An internal error has occurred (x-mock-error: fail-mid-stream).")
    return Answer(events, _encode(whole), fails_with(Event(error.decode("utf-8"))), (500, error))
