"""Google Gemini ``generateContent`` (``POST .../models/{model}:streamGenerateContent?alt=sse``
streamed, ``POST .../models/{model}:generateContent`` not), on the Gemini API and Vertex AI.

Wire form: data-only SSE, one ``GenerateContentResponse`` JSON chunk per event, no
``event:`` lines and no ``[DONE]``. A chunk carries the new ``parts`` of each candidate; the
last chunk of a candidate carries its ``finishReason``; ``usageMetadata`` is cumulative (the
last one counts). A prompt refused by a safety filter is a 200 stream whose only chunk holds
``promptFeedback.blockReason`` and no candidates. The model is named in the path, not in the
body: the HTTP integrations key the request's path (see :meth:`GeminiGenerateContent.http_route`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

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
    split_text,
)

__all__ = [
    "BLOCKED_FINISH_REASONS",
    "EXCLUDED_FIELDS",
    "STORED_FINISH_REASONS",
    "GeminiGenerateContent",
    "HttpRoute",
]

#: Request fields left out of the key: transport, plus Vertex ``labels`` (billing metadata,
#: never echoed in an answer and never changing it).
EXCLUDED_FIELDS: Final = TRANSPORT_FIELDS | frozenset({"labels"})

#: Finish reasons of an answer that is stored by default: the model ended by itself, or at
#: the token limit the request set (both are what the same request gets again).
STORED_FINISH_REASONS: Final = frozenset({"STOP", "MAX_TOKENS"})

#: Finish reasons of a filtered answer: stored only with ``store_blocked=True`` (as is a
#: prompt refused with ``promptFeedback.blockReason``). Every other reason (``OTHER``,
#: ``MALFORMED_FUNCTION_CALL``, ``CONTINUATION``, unknown ones...) is never stored.
BLOCKED_FINISH_REASONS: Final = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)

# Top-level response fields that name the answer: repeated on every synthesised chunk.
_IDENTITY: Final = frozenset({"modelVersion", "responseId", "createTime"})
# Keys of a text part that streams as text deltas (and merges back when accumulated).
_TEXT_KEYS: Final = frozenset({"text", "thought", "thoughtSignature"})
# Substrings without which a chunk cannot end, fail or refuse anything: chunks lacking all
# of them are CONTINUE without decoding (the hot path). A `\u` escape could spell any key.
_MARKERS: Final = ('"finishReason"', '"error"', '"blockReason"', "\\u")
# The method a path ends with: .../models/{model}:{method} (also tunedModels/, endpoints/).
_METHOD: Final = re.compile(r":(?P<method>streamGenerateContent|generateContent)$")


# The few fields a chunk is judged by (everything else is skipped by the decoder). Values
# of a wrong type are judged, not rejected: a finishReason that is not a string fails.
class _ProbeCandidate(msgspec.Struct, rename="camel"):
    finish_reason: Any = None
    index: Any = None


class _ProbeFeedback(msgspec.Struct, rename="camel"):
    block_reason: Any = None


class _ProbeChunk(msgspec.Struct, rename="camel"):
    candidates: list[_ProbeCandidate] | None = None
    prompt_feedback: _ProbeFeedback | None = None
    error: msgspec.Raw = msgspec.Raw()


class _Names(msgspec.Struct, rename="camel"):
    model_version: Any = None
    response_id: Any = None


_probe_decoder: Final = msgspec.json.Decoder(_ProbeChunk)
_names_decoder: Final = msgspec.json.Decoder(_Names)


class HttpRoute(NamedTuple):
    """How the HTTP integrations key and treat one Gemini request (see
    :meth:`GeminiGenerateContent.http_route`)."""

    path: str
    """The path in the key: ``:streamGenerateContent`` keyed as ``:generateContent``, so a
    streamed and a non-streamed request for the same answer share an entry."""
    params: tuple[tuple[str, str], ...]
    """The query parameters in the key (``alt`` removed: it says how, not what)."""
    streaming: bool
    """Whether the request asks for an SSE stream."""
    reason: str = ""
    """Not empty: the request is passed through uncached, for this reason."""


class _Judged(NamedTuple):
    outcome: Outcome
    present: list[int]  # candidate indexes in the chunk
    finished: list[int]  # ... of those, the ones with a finish reason
    blocked: bool  # a prompt refused by promptFeedback.blockReason


_CONTINUE_CHUNK: Final = _Judged(Outcome.CONTINUE, [], [], False)


class GeminiGenerateContent(KeyedAdapter):
    """Adapter for Google Gemini ``generateContent`` / ``streamGenerateContent?alt=sse``.

    - **key**: every request field except ``labels``, the transport fields and
      ``ignore_fields`` (``contents``, ``systemInstruction``, ``tools``, ``toolConfig``,
      ``generationConfig``, ``safetySettings``, ``cachedContent``... in canonical JSON); the
      model is in the path, which the HTTP integrations key (:meth:`http_route`).
    - **outcome**: a chunk whose candidates all carry a ``finishReason`` completes when each
      reason is stored (``STOP``, ``MAX_TOKENS``; ``finish_reasons`` to change), and fails
      for any other reason. Safety-type reasons (:data:`BLOCKED_FINISH_REASONS`) and a
      ``promptFeedback.blockReason`` fail unless ``store_blocked=True``. A truthy ``error``
      fails. A stream without a ``finishReason`` is never stored; :meth:`verify` checks that
      every candidate (``candidateCount`` > 1) got its own.
    - **final_body**: the ``generateContent`` answer: per candidate the parts accumulated
      (consecutive text parts of the same kind joined, function calls with streamed
      ``partialArgs`` assembled into ``args``), the final ``finishReason`` and candidate
      fields, the last ``usageMetadata``.
    - **synthesize**: chunks of token-sized text deltas (thought summaries first, as they
      were), each function call whole, the finishing fields and ``usageMetadata`` on the
      last chunk; ``modelVersion``/``responseId`` on every chunk.
    """

    name = "gemini"
    excluded_fields = EXCLUDED_FIELDS

    def __init__(
        self,
        *,
        ignore_fields: Iterable[str] = (),
        delta_chars: int | None = DEFAULT_DELTA_CHARS,
        store_blocked: bool = False,
        finish_reasons: Iterable[str] = STORED_FINISH_REASONS,
    ) -> None:
        super().__init__(ignore_fields=ignore_fields, delta_chars=delta_chars)
        if isinstance(finish_reasons, str):
            raise TypeError("finish_reasons must be an iterable of finish reasons, not a string")
        self.store_blocked = store_blocked
        self.finish_reasons = frozenset(finish_reasons)
        self._stored = self.finish_reasons | (
            BLOCKED_FINISH_REASONS if store_blocked else frozenset()
        )

    # -- request ----------------------------------------------------------------------------

    def is_streaming(self, body: Mapping[str, Any]) -> bool:
        """Gemini requests say in their path, not their body, whether they stream: the HTTP
        integrations ask :meth:`http_route`. A body alone is never a streamed request."""
        return False

    def http_route(self, path: str, params: Sequence[tuple[str, str]]) -> HttpRoute:
        """How to key and treat a request to ``path`` with query ``params`` (the ``key``
        credential already removed by the caller).

        ``...:streamGenerateContent`` streams only with ``alt=sse``: without it the API
        answers a JSON array of chunks, which is passed through uncached. ``...:generateContent``
        is a JSON answer (``alt=json``, the default). Both are keyed as ``:generateContent``
        without ``alt``. A path ending otherwise (a custom route) streams when ``alt=sse``.
        """
        alts = [v for k, v in params if k in ("alt", "$alt")]
        rest = tuple((k, v) for k, v in params if k not in ("alt", "$alt"))
        match = _METHOD.search(path)
        if match is None:
            return HttpRoute(path, rest, alts == ["sse"])
        keyed = path[: match.start("method")] + "generateContent"
        if match["method"] == "streamGenerateContent":
            if alts != ["sse"]:
                reason = (
                    "streamGenerateContent without alt=sse (a JSON array, not SSE) is not cached"
                )
                return HttpRoute(keyed, rest, False, reason)
            return HttpRoute(keyed, rest, True)
        if alts and alts != ["json"]:
            return HttpRoute(
                keyed, rest, False, f"generateContent with alt={alts[-1]} is not cached"
            )
        return HttpRoute(keyed, rest, False)

    # -- outcome ----------------------------------------------------------------------------

    def outcome(self, event: Event) -> Outcome:
        if event.event == "error":
            return Outcome.FAIL
        data = event.data
        if not any(marker in data for marker in _MARKERS):
            return Outcome.CONTINUE
        return self._judge(data).outcome

    def _judge(self, data: str | bytes) -> _Judged:
        try:
            chunk = _probe_decoder.decode(data)
        except msgspec.DecodeError:
            text = data if isinstance(data, str) else data.decode("utf-8", "replace")
            # Unreadable: it may pass through, but never end (or refuse) a stream.
            if any(marker in text for marker in _MARKERS[:3]):
                return _Judged(Outcome.FAIL, [], [], False)
            return _CONTINUE_CHUNK
        if is_truthy_raw(chunk.error):
            return _Judged(Outcome.FAIL, [], [], False)
        feedback = chunk.prompt_feedback
        if feedback is not None and feedback.block_reason:
            readable = isinstance(feedback.block_reason, str)
            verdict = Outcome.COMPLETE if self.store_blocked and readable else Outcome.FAIL
            return _Judged(verdict, [], [], True)
        candidates = chunk.candidates or []
        present: list[int] = []
        finished: list[int] = []
        for position, candidate in enumerate(candidates):
            index = candidate.index
            if not isinstance(index, int) or isinstance(index, bool):
                index = position  # proto JSON leaves index 0 out
            present.append(index)
            reason = candidate.finish_reason
            if reason is None or reason == "":
                continue
            if not isinstance(reason, str) or reason not in self._stored:
                return _Judged(Outcome.FAIL, present, finished, False)
            finished.append(index)
        if finished and len(finished) == len(candidates):
            return _Judged(Outcome.COMPLETE, present, finished, False)
        return _Judged(Outcome.CONTINUE, present, finished, False)

    def verify(self, events: Sequence[Event]) -> Outcome:
        """Whole-stream check before storing: no failing chunk, and every candidate that
        appeared got a stored ``finishReason`` (candidates may finish in different chunks);
        or, with ``store_blocked``, a refused prompt."""
        done: dict[int, bool] = {}
        blocked = False
        for ev in events:
            if ev.event == "error":
                return Outcome.FAIL
            judged = self._judge(ev.data)
            if judged.outcome is Outcome.FAIL:
                return Outcome.FAIL
            blocked = blocked or judged.blocked
            for index in judged.present:
                done.setdefault(index, False)
            for index in judged.finished:
                done[index] = True
        if done:
            return Outcome.COMPLETE if all(done.values()) else Outcome.FAIL
        return Outcome.COMPLETE if blocked and self.store_blocked else Outcome.FAIL

    def body_outcome(self, body: bytes) -> Outcome:
        if body.lstrip()[:1] != b"{":
            return Outcome.FAIL
        # A non-stream answer holds every candidate: each needs its stored reason.
        done = self._judge(body).outcome is Outcome.COMPLETE
        return Outcome.COMPLETE if done else Outcome.FAIL

    # -- stream -> body ---------------------------------------------------------------------

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        top: dict[str, Any] = {}
        candidates: dict[int, _Candidate] = {}
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
                    index = cand.get("index")
                    if not isinstance(index, int) or isinstance(index, bool):
                        index = position
                    if index not in candidates:
                        candidates[index] = _Candidate()
                    candidates[index].add(cand)
            if not seen:
                return None
            body: dict[str, Any] = {}
            if candidates:
                body["candidates"] = [candidates[i].finish() for i in sorted(candidates)]
            body.update(top)
        except _Unrecoverable:
            return None  # e.g. a function call argument at a JSON path we cannot place
        return dumps(body).encode("utf-8")

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        """``model`` (the ``modelVersion``) and ``gemini_response_id``, from the last chunk
        that has them."""
        for ev in reversed(events):
            try:
                names = _names_decoder.decode(ev.data)
            except msgspec.DecodeError:
                continue
            out: dict[str, str] = {}
            if isinstance(names.model_version, str) and names.model_version:
                out["model"] = names.model_version
            if isinstance(names.response_id, str) and names.response_id:
                out["gemini_response_id"] = names.response_id
            if out:
                return out
        return {}

    # -- body -> stream ---------------------------------------------------------------------

    def synthesize(self, body: bytes) -> list[Event] | None:
        data = loads_object(body)
        if data is None:
            return None
        listed = data.get("candidates")
        if listed is None:
            # A refused prompt (promptFeedback, no candidates) streams as its one chunk.
            return [Event(dumps(data))] if isinstance(data.get("promptFeedback"), dict) else None
        if not isinstance(listed, list):
            return None
        plans = [self._plan(cand) for cand in listed]
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

    def _plan(self, cand: Any) -> _Plan:
        if not isinstance(cand, dict):
            return _Plan(cand, None, [])
        content = cand.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list) or not parts:
            return _Plan(cand, None, [])
        deltas: list[Any] = []
        for part in parts:
            deltas.extend(self._deltas(part))
        return _Plan(cand, content, deltas)

    def _deltas(self, part: Any) -> list[Any]:
        if not (_is_text(part) and set(part) <= _TEXT_KEYS):
            return [part]  # function calls, images, code...: whole, in one chunk
        kind = {"thought": part["thought"]} if "thought" in part else {}
        pieces = split_text(part["text"], self.delta_chars) or [""]
        out: list[Any] = [{"text": piece, **kind} for piece in pieces]
        # The signature (and anything else) arrives with the last piece, as the API sends it.
        out[-1].update({k: v for k, v in part.items() if k not in ("text", "thought")})
        return out


class _Plan:
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


class _Unrecoverable(Exception):
    """The stream cannot be turned into a non-stream answer faithfully."""


class _Candidate:
    """One candidate accumulated from the chunks of a stream."""

    __slots__ = ("call", "content", "fields", "parts")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.content: dict[str, Any] | None = None  # content fields other than parts
        self.parts: list[Any] | None = None
        self.call: _StreamedCall | None = None  # a function call whose arguments stream

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
            self.call = _StreamedCall(len(parts) - 1, args)
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


class _StreamedCall:
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
            raise _Unrecoverable("partialArgs is not a list")
        for arg in partial:
            if not isinstance(arg, dict) or not isinstance(arg.get("jsonPath"), str):
                raise _Unrecoverable("a partial argument without a jsonPath")
            path: str = arg["jsonPath"]
            segments = _json_path(path)
            if self.args is None:
                self.args = {}
            if "stringValue" in arg:
                piece = arg["stringValue"]
                if not isinstance(piece, str):
                    raise _Unrecoverable("stringValue is not a string")
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
                raise _Unrecoverable(f"a partial argument of an unknown kind at {path}")


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
        raise _Unrecoverable(f"unsupported JSON path {path!r}")
    out: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None:
            raise _Unrecoverable(f"unsupported JSON path {path!r}")
        if m["name"] is not None:
            out.append(m["name"])
        elif m["index"] is not None:
            out.append(int(m["index"]))
        else:
            quoted = m["sq"] if m["sq"] is not None else m["dq"]
            out.append(_ESCAPE.sub(r"\1", quoted))
        pos = m.end()
    if not out:
        raise _Unrecoverable("a partial argument for the whole arguments object")
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
                raise _Unrecoverable("a JSON path indexes a value that is not a list")
            node.extend([None] * (seg + 1 - len(node)))
        elif not isinstance(node, dict):
            raise _Unrecoverable("a JSON path names a field of a value that is not an object")
        elif seg not in node:
            node[seg] = None
        # Containers on the way are kept (other arguments live in them); the leaf replaces.
        if i == last or type(node[seg]) is not type(child):
            node[seg] = child
        node = node[seg]
