"""A Gemini answer as one body and back: the adapter's ``final_body`` and ``synthesize``.

Accumulation folds the chunks of a stream into the ``generateContent`` answer: per candidate
the parts (consecutive text parts of the same kind joined, a function call whose arguments
stream as ``partialArgs`` assembled into ``args``), the last candidate fields, the last
top-level fields. Synthesis plans a stored answer as the chunks that stream it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..events import Event
from ._common import dumps, loads_object, split_text

__all__ = [
    "Candidate",
    "Plan",
    "StreamedCall",
    "Unrecoverable",
    "answer_from_chunks",
    "candidate_index",
    "chunks_from_answer",
]

# Top-level response fields that name the answer: repeated on every synthesised chunk.
_IDENTITY: Final = frozenset({"modelVersion", "responseId", "createTime"})
# Keys of a text part that streams as text deltas (and merges back when accumulated).
_TEXT_KEYS: Final = frozenset({"text", "thought", "thoughtSignature"})


def candidate_index(index: Any, position: int) -> int:
    """A candidate's ``index``, or its position in the chunk when it has none (proto JSON
    leaves index 0 out) or one that is not an integer."""
    if not isinstance(index, int) or isinstance(index, bool):
        return position
    return index


# -- stream -> body -------------------------------------------------------------------------


def answer_from_chunks(events: Sequence[Event]) -> bytes | None:
    """The ``generateContent`` answer the stream's chunks add up to; None when there is no
    chunk, or the stream cannot be turned into an answer faithfully."""
    top: dict[str, Any] = {}
    candidates: dict[int, Candidate] = {}
    seen = False
    try:
        for ev in events:
            data = loads_object(ev.data)
            if data is None or data.get("error"):
                continue  # not a chunk, or a failure: nothing of the answer
            seen = True
            for key, value in data.items():
                if key != "candidates":
                    top[key] = value
            listed = data.get("candidates")
            if not isinstance(listed, list):
                continue
            for position, cand in enumerate(listed):
                if not isinstance(cand, dict):
                    continue
                index = candidate_index(cand.get("index"), position)
                if index not in candidates:
                    candidates[index] = Candidate()
                candidates[index].add(cand)
        if not seen:
            return None
        body: dict[str, Any] = {}
        if candidates:
            body["candidates"] = [candidates[i].finish() for i in sorted(candidates)]
        body.update(top)
    except Unrecoverable:
        return None  # e.g. a function call argument at a JSON path we cannot place
    return dumps(body).encode("utf-8")


def _is_text(part: Any) -> bool:
    return isinstance(part, dict) and isinstance(part.get("text"), str)


def _mergeable(prev: Any, part: dict[str, Any]) -> bool:
    """Whether text ``part`` continues text part ``prev`` (same kind, prev not yet signed)."""
    return (
        _is_text(prev)
        and set(prev) <= _TEXT_KEYS
        and set(part) <= _TEXT_KEYS
        and bool(prev.get("thought")) == bool(part.get("thought"))
        and "thoughtSignature" not in prev
    )


class Unrecoverable(Exception):
    """The stream cannot be turned into a non-stream answer faithfully."""


class Candidate:
    """One candidate accumulated from the chunks of a stream."""

    __slots__ = ("call", "content", "fields", "parts")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.content: dict[str, Any] | None = None  # content fields other than parts
        self.parts: list[Any] | None = None
        self.call: StreamedCall | None = None  # a function call whose arguments stream

    def add(self, cand: dict[str, Any]) -> None:
        for key, value in cand.items():
            if key != "content":
                self.fields[key] = value  # finishReason, safetyRatings...: the last counts
                continue
            if not isinstance(value, dict):
                self.fields[key] = value
                continue
            if self.content is None:
                self.content = {}
            for k, v in value.items():
                if k != "parts":
                    self.content[k] = v
            parts = value.get("parts")
            if isinstance(parts, list):
                if self.parts is None:
                    self.parts = []
                for part in parts:
                    self._add_part(part)

    def _add_part(self, part: Any) -> None:
        parts = self.parts
        assert parts is not None
        if isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
            self._add_call(part, part["functionCall"])
            return
        if _is_text(part) and parts and _mergeable(parts[-1], part):
            prev = parts[-1]
            prev["text"] += part["text"]
            prev.update({k: v for k, v in part.items() if k != "text"})
            return
        parts.append(dict(part) if isinstance(part, dict) else part)

    def _add_call(self, part: dict[str, Any], call: dict[str, Any]) -> None:
        parts = self.parts
        assert parts is not None
        open_ = self.call
        if open_ is not None and "name" not in call:
            # The next piece of the call being streamed (Vertex streamFunctionCallArguments).
            target = parts[open_.position]
            target.update({k: v for k, v in part.items() if k != "functionCall"})
            open_.take(call)
            if call.get("willContinue") is not True:
                self._close()
            return
        self._close()
        whole = {k: v for k, v in part.items() if k != "functionCall"}
        fc = dict(call)
        whole["functionCall"] = fc
        parts.append(whole)
        if fc.get("willContinue") is True or "partialArgs" in fc:
            args = fc.pop("args", None)
            partial = fc.pop("partialArgs", None)
            self.call = StreamedCall(len(parts) - 1, args)
            self.call.take({"partialArgs": partial} if partial is not None else {})
            if fc.pop("willContinue", None) is not True:
                self._close()

    def _close(self) -> None:
        open_, self.call = self.call, None
        if open_ is None:
            return
        assert self.parts is not None
        fc = self.parts[open_.position]["functionCall"]
        fc.pop("willContinue", None)
        fc.pop("partialArgs", None)
        if open_.args is not None:
            fc["args"] = open_.args

    def finish(self) -> dict[str, Any]:
        self._close()
        out: dict[str, Any] = {}
        if self.content is not None or self.parts is not None:
            content = dict(self.content or {})
            if self.parts is not None:
                content = {"parts": self.parts, **content}
            out["content"] = content
        for key, value in self.fields.items():
            out[key] = value
        return out


class StreamedCall:
    """A function call whose arguments arrive as ``partialArgs`` (JSON path + value)."""

    __slots__ = ("args", "continuing", "position")

    def __init__(self, position: int, args: Any) -> None:
        self.position = position
        self.args: dict[str, Any] | None = dict(args) if isinstance(args, dict) else None
        self.continuing: set[str] = set()  # string arguments whose next piece is to come

    def take(self, call: Mapping[str, Any]) -> None:
        args = call.get("args")
        if isinstance(args, dict):
            self.args = {**(self.args or {}), **args}
        partial = call.get("partialArgs")
        if partial is None:
            return
        if not isinstance(partial, list):
            raise Unrecoverable("partialArgs is not a list")
        for arg in partial:
            if not isinstance(arg, dict) or not isinstance(arg.get("jsonPath"), str):
                raise Unrecoverable("a partial argument without a jsonPath")
            path: str = arg["jsonPath"]
            segments = _json_path(path)
            if self.args is None:
                self.args = {}
            if "stringValue" in arg:
                piece = arg["stringValue"]
                if not isinstance(piece, str):
                    raise Unrecoverable("stringValue is not a string")
                if path in self.continuing:
                    current = _get(self.args, segments)
                    piece = (current if isinstance(current, str) else "") + piece
                _set(self.args, segments, piece)
                if arg.get("willContinue") is True:
                    self.continuing.add(path)
                else:
                    self.continuing.discard(path)
            elif "numberValue" in arg:
                _set(self.args, segments, arg["numberValue"])
            elif "boolValue" in arg:
                _set(self.args, segments, arg["boolValue"])
            elif "nullValue" in arg:
                _set(self.args, segments, None)
            else:
                raise Unrecoverable(f"a partial argument of an unknown kind at {path}")


# JSON path (RFC 9535) segments as the API writes them: .name, ['name'], ["name"], [0].
_SEGMENT: Final = re.compile(
    r"\.(?P<name>[^.\[\]]+)|\[(?P<index>\d+)\]|\['(?P<sq>(?:[^'\\]|\\.)*)'\]"
    r'|\["(?P<dq>(?:[^"\\]|\\.)*)"\]'
)
_ESCAPE: Final = re.compile(r"\\(.)")
# Function-call arguments are small: a list index beyond this is not an argument we place.
_MAX_INDEX: Final = 10_000


def _json_path(path: str) -> list[str | int]:
    if not path.startswith("$"):
        raise Unrecoverable(f"unsupported JSON path {path!r}")
    out: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None:
            raise Unrecoverable(f"unsupported JSON path {path!r}")
        if m["name"] is not None:
            out.append(m["name"])
        elif m["index"] is not None:
            out.append(int(m["index"]))
        else:
            quoted = m["sq"] if m["sq"] is not None else m["dq"]
            out.append(_ESCAPE.sub(r"\1", quoted))
        pos = m.end()
    if not out:
        raise Unrecoverable("a partial argument for the whole arguments object")
    return out


def _get(root: Any, segments: list[str | int]) -> Any:
    node = root
    for seg in segments:
        if isinstance(seg, int) and isinstance(node, list) and seg < len(node):
            node = node[seg]
        elif isinstance(seg, str) and isinstance(node, dict):
            node = node.get(seg)
        else:
            return None
    return node


def _set(root: dict[str, Any], segments: list[str | int], value: Any) -> None:
    """Put ``value`` at ``segments`` under ``root``, creating the objects and lists on the
    way (a list is padded with nulls up to an index)."""
    node: Any = root
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        container: Any = [] if i < last and isinstance(segments[i + 1], int) else {}
        child = value if i == last else container
        if isinstance(seg, int):
            if not isinstance(node, list) or seg > _MAX_INDEX:
                raise Unrecoverable("a JSON path indexes a value that is not a list")
            node.extend([None] * (seg + 1 - len(node)))
        elif not isinstance(node, dict):
            raise Unrecoverable("a JSON path names a field of a value that is not an object")
        elif seg not in node:
            node[seg] = None
        # Containers on the way are kept (other arguments live in them); the leaf replaces.
        if i == last or type(node[seg]) is not type(child):
            node[seg] = child
        node = node[seg]


# -- body -> stream -------------------------------------------------------------------------


def chunks_from_answer(body: bytes, delta_chars: int | None) -> list[Event] | None:
    """The chunks that stream the answer ``body``, text in deltas of at most ``delta_chars``
    characters; None when ``body`` is not an answer."""
    data = loads_object(body)
    if data is None:
        return None
    listed = data.get("candidates")
    if listed is None:
        # A refused prompt (promptFeedback, no candidates) streams as its one chunk.
        return [Event(dumps(data))] if isinstance(data.get("promptFeedback"), dict) else None
    if not isinstance(listed, list):
        return None
    plans = [_plan(cand, delta_chars) for cand in listed]
    steps = max([len(p.deltas) for p in plans] + [1])
    several = len(plans) > 1
    events: list[Event] = []
    for step in range(steps):
        last = step == steps - 1
        entries: list[Any] = []
        for plan in plans:
            entry = plan.entry(step, last)
            if entry is not None or several:
                # Several candidates: each has its place in every chunk, so that those
                # without an explicit ``index`` keep theirs.
                entries.append(entry if entry is not None else plan.blank())
        chunk: dict[str, Any] = {}
        for key, value in data.items():
            if key == "candidates":
                chunk[key] = entries
            elif key in _IDENTITY or (key == "promptFeedback" and step == 0) or last:
                chunk[key] = value
        events.append(Event(dumps(chunk)))
    return events


def _plan(cand: Any, delta_chars: int | None) -> Plan:
    if not isinstance(cand, dict):
        return Plan(cand, None, [])
    content = cand.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        return Plan(cand, None, [])
    deltas: list[Any] = []
    for part in parts:
        deltas.extend(_deltas(part, delta_chars))
    return Plan(cand, content, deltas)


def _deltas(part: Any, delta_chars: int | None) -> list[Any]:
    if not (_is_text(part) and set(part) <= _TEXT_KEYS):
        return [part]  # function calls, images, code...: whole, in one chunk
    kind = {"thought": part["thought"]} if "thought" in part else {}
    pieces = split_text(part["text"], delta_chars) or [""]
    out: list[Any] = [{"text": piece, **kind} for piece in pieces]
    # The signature (and anything else) arrives with the last piece, as the API sends it.
    out[-1].update({k: v for k, v in part.items() if k not in ("text", "thought")})
    return out


class Plan:
    """One candidate of a stored answer, as the chunks that stream it."""

    __slots__ = ("cand", "content", "deltas")

    def __init__(self, cand: Any, content: dict[str, Any] | None, deltas: list[Any]) -> None:
        self.cand = cand
        self.content = content
        self.deltas = deltas

    def blank(self) -> Any:
        cand = self.cand
        if isinstance(cand, dict) and "index" in cand:
            return {"index": cand["index"]}
        return {}

    def entry(self, step: int, last: bool) -> Any:
        cand = self.cand
        if not isinstance(cand, dict):
            return cand if last else None
        has_delta = step < len(self.deltas)
        if not has_delta and not last:
            return None
        out: dict[str, Any] = {}
        for key, value in cand.items():
            if key == "content":
                if self.content is None:
                    if last:
                        out[key] = value  # no parts to stream: the content as it is
                elif has_delta:
                    rest = {k: v for k, v in self.content.items() if k != "parts"}
                    out[key] = {"parts": [self.deltas[step]], **rest}
            elif key == "index" or last:
                out[key] = value
        return out
