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

from .._checks import boolean
from ..events import Event
from ..protocols import Outcome
from ._common import DEFAULT_DELTA_CHARS, KeyedAdapter, is_truthy_raw
from ._gemini_body import answer_from_chunks, candidate_index, chunks_from_answer

__all__ = [
    "BLOCKED_FINISH_REASONS",
    "EXCLUDED_FIELDS",
    "STORED_FINISH_REASONS",
    "GeminiGenerateContent",
    "HttpRoute",
]

#: Request fields left out of the key: Vertex ``labels`` (billing metadata, never echoed in
#: an answer and never changing it). Not ``stream`` or ``stream_options``, which are no
#: fields of this API (a request streams by its path; it refuses them: such a request keys
#: apart, as any unknown field).
EXCLUDED_FIELDS: Final = frozenset({"labels"})

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
    #: Request headers that change the answer: a response field mask (the answer without
    #: the fields it leaves out) is part of the key in the HTTP integrations; so is the
    #: project a Vertex AI caller's request is billed to and authorised in
    #: (``x-goog-user-project``: one OAuth token may reach several projects, as one OpenAI
    #: key several ``openai-project`` s; helper-123).
    key_headers: tuple[str, ...] = ("x-goog-fieldmask", "x-goog-user-project")
    excluded_fields = EXCLUDED_FIELDS
    maybe_read: frozenset[str] = frozenset()  # (stream_options is no field of this API)

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
        boolean("store_blocked", store_blocked)  # ("no" is truthy)
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
            index = candidate_index(candidate.index, position)
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
        return answer_from_chunks(events)

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
        return chunks_from_answer(body, self.delta_chars)
