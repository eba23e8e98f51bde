"""Helpers shared by the schema adapters: lenient probes, key-field filtering, delta splitting.

Everything here is pure and tolerant: a probe returns ``None`` for data it cannot read instead
of raising, because a cache must pass through whatever an upstream sends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Protocol, TypeVar

import msgspec

from .._checks import integer
from ..events import Event
from ..protocols import Outcome

__all__ = [
    "DEFAULT_DELTA_CHARS",
    "STREAM_FLAGS",
    "KeyedAdapter",
    "Probe",
    "Typed",
    "dumps",
    "is_truthy_raw",
    "loads",
    "loads_object",
    "may_hold_error",
    "payloads_of_type",
    "probe",
    "split_text",
    "unclear_flag",
]

#: The providers' request fields that change how an answer is delivered, never what it is
#: (GenericSSE's TRANSPORT_FIELDS also has the timeouts). Not ``timeout``
#: or ``request_timeout`` (GenericSSE leaves them out): the providers' APIs refuse them (400),
#: so such a request keys apart and gets the upstream's error, never a valid request's entry;
#: a gateway that takes them (LiteLLM) answers it once and its entry serves it after.
STREAM_FLAGS: Final = frozenset({"stream", "stream_options"})

#: Default upper bound of characters per synthesised text delta. Real deltas are one token
#: (2-10 characters); splitting at word starts with this cap gives deltas of that size.
DEFAULT_DELTA_CHARS: Final = 16


class Probe(msgspec.Struct):
    """The few top-level fields an adapter classifies an event by. Everything else in the
    payload is skipped by the decoder without being materialised (the cheap path)."""

    type: str | None = None
    error: msgspec.Raw = msgspec.Raw()
    response: msgspec.Raw = msgspec.Raw()


# Decoders and encoders are built once: msgspec caches the type's decoding plan in them.
_probe_decoder: Final = msgspec.json.Decoder(Probe)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()

# JSON values the SDKs treat as "no error" (they test `data.get("error")` for truthiness).
_FALSY_JSON: Final = frozenset({b"", b"null", b"false", b"0", b'""', b"{}", b"[]"})


def probe(data: str) -> Probe | None:
    """Decode only ``type``/``error``/``response`` of a JSON object; None when ``data`` is not
    a JSON object of that shape (non-JSON, an array, a ``type`` that is not a string...)."""
    try:
        return _probe_decoder.decode(data)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return None


class Typed(Protocol):
    """A decoded payload that says its event type (``{"type": ...}``)."""

    @property
    def type(self) -> str | None: ...


T = TypeVar("T", bound=Typed)


def payloads_of_type(
    events: Iterable[Event], type_: str, decoder: msgspec.json.Decoder[T]
) -> Iterator[T]:
    """The payloads of the events of type ``type_``, decoded by ``decoder``: an ``event:``
    line, when there is one, must name ``type_`` and so must the payload's ``type``. Events
    whose payload ``decoder`` cannot read are skipped (a cache passes them through)."""
    for ev in events:
        if ev.event is not None and ev.event != type_:
            continue
        try:
            payload = decoder.decode(ev.data)
        except msgspec.DecodeError:
            continue
        if payload.type == type_:
            yield payload


# An escape that spells a letter of `error` (e, r, o): a JSON reader takes `"\u0065rror"` for
# `"error"`, so a member of that name may hide where the text `"error"` is not.
_ERROR_LETTER: Final = re.compile(r"\\u00(?:65|72|6[fF])")


def may_hold_error(data: str) -> bool:
    """Whether the JSON text ``data`` may have a member named ``error`` (the SDKs raise on a
    truthy one): it holds ``"error"``, or an escape that could spell it. False is sure; True
    means decode it (the fast path of every adapter's outcome: helper-109 found a chunk
    with ``{"\\u0065rror": ...}``, which the SDK raised on, stored and replayed)."""
    return '"error"' in data or ("\\u00" in data and _ERROR_LETTER.search(data) is not None)


def is_truthy_raw(raw: msgspec.Raw) -> bool:
    """Whether a raw JSON value is present and truthy (``{"error": null}`` is no error)."""
    return bytes(raw).strip() not in _FALSY_JSON


def loads(data: str | bytes) -> Any:
    """Any JSON value, or None when ``data`` is not JSON."""
    try:
        return _any_decoder.decode(data)
    except msgspec.DecodeError:
        return None


def loads_object(data: str | bytes) -> dict[str, Any] | None:
    """A JSON object as a dict, or None when ``data`` is not a JSON object."""
    value = loads(data)
    return value if isinstance(value, dict) else None


def dumps(value: Any) -> str:
    """Compact JSON text (the wire form the providers use for synthesised events)."""
    return _encoder.encode(value).decode("utf-8")


# A word start: optional whitespace, then a run of non-whitespace; or trailing whitespace.
# Every character of the input belongs to exactly one match, so the pieces join back exactly.
_WORDS: Final = re.compile(r"\s*\S+|\s+")


def split_text(text: str, max_chars: int | None) -> list[str]:
    """Split ``text`` into delta-sized pieces that join back to ``text``.

    Pieces start at word boundaries (like tokenizer output: ``"Hello"``, ``" world"``) and
    are at most ``max_chars`` characters; ``None`` (or a non-positive value) yields the
    whole text as one piece. The empty string yields no pieces.
    """
    if not text:
        return []
    if max_chars is None or max_chars <= 0:
        return [text]
    return _words(text, max_chars)


def _words(text: str, max_chars: int) -> list[str]:
    out: list[str] = []
    append = out.append
    for word in _WORDS.findall(text):
        if len(word) <= max_chars:
            append(word)
        else:
            for i in range(0, len(word), max_chars):
                append(word[i : i + max_chars])
    return out


def unclear_flag(fields: Mapping[str, Any], name: str, where: str = "") -> str:
    """Why the flag ``name`` of ``fields`` cannot be trusted to mean what the cache takes it
    to, or ``""``: present, not null, and neither true nor false. The cache reads only
    ``true`` as true; a lenient upstream (pydantic's lax mode: vLLM, LiteLLM) reads ``1`` or
    ``"yes"`` as true too, and its answer would be stored under the key of the other
    (helper-80: ``"stream": 1`` was keyed as a non-stream and streamed)."""
    value = fields.get(name)
    if value is None or isinstance(value, bool):
        return ""
    shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
    return f"{where}{name} is {shown}, not true or false"


class KeyedAdapter:
    """Common request-side behaviour: key fields, streaming flag, no completion at a bare end.

    Subclasses set :attr:`name` and :attr:`excluded_fields` (transport-only fields plus the
    client metadata their schema never echoes in an answer).
    """

    name: str = ""
    excluded_fields: frozenset[str] = STREAM_FLAGS
    #: Request fields that make the upstream change state it keeps (present and not null),
    #: each with why such a request is passed through uncached: a replay would skip that.
    stateful_fields: tuple[tuple[str, str], ...] = ()
    #: The excluded fields :meth:`excluded_but_read` may keep (it is asked only when the
    #: body has one of them).
    maybe_read: frozenset[str] = frozenset({"stream_options"})

    def __init__(
        self, *, ignore_fields: Iterable[str] = (), delta_chars: int | None = DEFAULT_DELTA_CHARS
    ) -> None:
        if isinstance(ignore_fields, str):
            raise TypeError("ignore_fields must be an iterable of field names, not a string")
        self._ignored = frozenset(ignore_fields)
        self._drop = self.excluded_fields | self._ignored
        if delta_chars is not None:  # (0, -1 or 8.5 failed in synthesize, or split nothing)
            delta_chars = integer("delta_chars", delta_chars, what="None or an int >= 1")
        self.delta_chars = delta_chars

    def key_fields(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """Every request field except the excluded ones: unknown new fields are kept, so a
        field that might change the answer never makes two requests share an entry. An
        excluded field whose value the upstream reads otherwise (:meth:`excluded_but_read`)
        is kept too, unless ``ignore_fields`` names it."""
        drop = self._drop
        fields = {k: v for k, v in body.items() if k not in drop}
        if not self.maybe_read.isdisjoint(body):  # (most bodies have none: no call)
            for name in self.excluded_but_read(body):
                if name not in self._ignored:
                    fields[name] = body[name]
        return fields

    def excluded_but_read(self, body: Mapping[str, Any]) -> tuple[str, ...]:
        """The excluded fields of ``body`` the upstream does not take as bookkeeping here:
        a ``stream_options`` on a request that does not stream (OpenAI answers it 400: left
        out, such a request was answered 200 from a valid request's entry; helper-88)."""
        # (A null is read as absent: it keys as one, helper-90.)
        if body.get("stream_options") is not None and body.get("stream") is not True:
            return ("stream_options",)
        return ()

    def is_streaming(self, body: Mapping[str, Any]) -> bool:
        """These APIs stream only when asked to (``"stream": true``)."""
        return body.get("stream") is True

    def uncached_reason(self, body: Mapping[str, Any]) -> str:
        """Why this request is passed through uncached, or ``""``: a ``stream`` flag that is
        neither true nor false (see :func:`unclear_flag`), or one of the
        :attr:`stateful_fields`."""
        stream = body.get("stream")
        if stream is not None and stream.__class__ is not bool:  # (every request: no call)
            return unclear_flag(body, "stream")
        for field, why in self.stateful_fields:
            if body.get(field) is not None:
                return why
        return ""

    def end_outcome(self) -> Outcome:
        """A stream that ended without its completing event is never stored."""
        return Outcome.FAIL
