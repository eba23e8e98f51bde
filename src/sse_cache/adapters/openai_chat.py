"""OpenAI Chat Completions (``POST /v1/chat/completions``) and compatible APIs.

Wire form: ``data:``-only events, one ``chat.completion.chunk`` JSON object each, then a final
``data: [DONE]``. No ``event:`` lines, no sequence numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import zip_longest
from typing import Any, Final

import msgspec

from .._checks import boolean
from ..events import Event
from ..protocols import Outcome
from ._common import (
    DEFAULT_DELTA_CHARS,
    STREAM_FLAGS,
    KeyedAdapter,
    dumps,
    is_truthy_raw,
    loads_object,
    may_hold_error,
    probe,
    split_text,
    unclear_flag,
)

__all__ = ["EXCLUDED_FIELDS", "FAILED_FINISH_REASONS", "OpenAIChat"]

#: Request fields left out of the key: transport, plus caller bookkeeping that a chat
#: completion never echoes and that cannot change the generated message. (Of ``metadata``,
#: what may change the answer keys all the same: see OpenAIChat.excluded_but_read.)
EXCLUDED_FIELDS: Final = STREAM_FLAGS | frozenset(
    {"user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
)

#: What keys a stream that did not ask for usage apart, in place of its ``stream_options``:
#: not an object, so no request's own ``stream_options`` (kept when it does not stream) is
#: ever equal to it — one that is not an object is passed through uncached. (It was
#: ``{"include_usage": false}``, which a non-streamed request could send: OpenAI refuses
#: that, and it was answered 200 from a stream's entry, without the usage its body always
#: has; helper-147.)
_STREAMED_WITHOUT_USAGE: Final = "streamed without usage"

_DONE: Final = "[DONE]"
#: Finish reasons (compared in lower case) of a generation that failed or was stopped
#: midway by the server, which some OpenAI-compatible servers send before their ``[DONE]``:
#: Mistral's ``error``, vLLM's ``abort``, DeepSeek's ``insufficient_system_resource``.
#: Never stored.
FAILED_FINISH_REASONS: Final = frozenset(
    {
        "error",
        "abort",
        "aborted",
        "cancelled",
        "canceled",
        "failed",
        "interrupted",
        "timeout",
        "insufficient_system_resource",
    }
)
_CHUNK: Final = "chat.completion.chunk"

# Message keys that identify rather than accumulate: a repeat replaces, never appends (some
# compatible servers resend `role` or a tool call's `id` in every chunk).
_IDENTITY: Final = frozenset({"role", "id", "type", "name", "index"})
# Top-level chunk keys handled explicitly when accumulating.
_TOP_SPECIAL: Final = frozenset({"choices", "object", "usage", "obfuscation"})
# Message keys synthesised as streamed text (the rest is sent once, in the first delta).
_STREAMED_MESSAGE_KEYS: Final = frozenset({"role", "content", "refusal", "tool_calls"})


class _ChoiceEnd(msgspec.Struct):
    index: int = 0
    finish_reason: str | None = None


class _ChunkEnds(msgspec.Struct):
    choices: list[_ChoiceEnd] | None = None
    error: msgspec.Raw = msgspec.Raw()


class _BodyStatus(msgspec.Struct):
    object: str | None = None
    choices: list[_ChoiceEnd] | None = None
    error: msgspec.Raw = msgspec.Raw()


_ends_decoder: Final = msgspec.json.Decoder(_ChunkEnds)
_body_decoder: Final = msgspec.json.Decoder(_BodyStatus)


class _Parts(list[str]):
    """A string being accumulated from deltas (joined once at the end: no quadratic +=)."""


class OpenAIChat(KeyedAdapter):
    """Adapter for OpenAI Chat Completions and OpenAI-compatible servers.

    - **key**: every request field except ``stream``, ``stream_options`` (of a streamed
      request), ``user``, ``metadata`` (but its ``tags``, a gateway's routing, and all of
      it when ``store`` is true), ``safety_identifier``, ``prompt_cache_key``,
      ``prompt_cache_retention`` and ``ignore_fields``; but a
      streamed request *without* ``stream_options.include_usage`` keys apart: a non-streamed
      request shares its entry with streams that carry usage, as its body does.
    - **outcome**: ``data: [DONE]`` completes; a payload with a truthy top-level ``error``
      (or an ``event: error``) fails; a stream that ends without ``[DONE]`` fails.
      :meth:`verify` adds the whole-stream rule that every choice got a ``finish_reason``,
      and none ``content_filter`` (an answer a filter cut off, which may pass when asked
      again) unless ``store_blocked=True``; so does :meth:`body_outcome`.
    - **final_body**: the accumulated ``chat.completion`` (every choice; content, refusal,
      tool calls with their arguments joined, logprobs, usage, unknown extensions).
    - **synthesize**: chunks as the API streams them, choices interleaved, a usage chunk
      when the body has usage (``usage_chunk=False`` to leave it out), then ``[DONE]``: a
      synthesised stream answers streams that asked for usage (above).
    """

    name = "openai-chat"
    #: Request headers that change the answer, or whose answer it is (an organisation or
    #: project of one API key): part of the key in the HTTP integrations.
    key_headers: tuple[str, ...] = ("openai-beta", "openai-organization", "openai-project")
    excluded_fields = EXCLUDED_FIELDS
    maybe_read = KeyedAdapter.maybe_read | {"metadata"}

    def __init__(
        self,
        *,
        ignore_fields: Iterable[str] = (),
        delta_chars: int | None = DEFAULT_DELTA_CHARS,
        usage_chunk: bool = True,
        store_blocked: bool = False,
    ) -> None:
        super().__init__(ignore_fields=ignore_fields, delta_chars=delta_chars)
        boolean("usage_chunk", usage_chunk)  # ("no" is truthy)
        boolean("store_blocked", store_blocked)
        self.usage_chunk = usage_chunk
        self.store_blocked = store_blocked

    def excluded_but_read(self, body: Mapping[str, Any]) -> tuple[str, ...]:
        """Also ``metadata`` when the completion is stored upstream (``store: true``): it is
        kept with it (listed, filtered by, used for evals), and a hit would hand the caller
        the id of a completion tagged with another caller's metadata (helper-88)."""
        read = super().excluded_but_read(body)
        if body.get("store") is True and body.get("metadata") is not None:
            return (*read, "metadata")
        return read

    def key_fields(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        fields = super().key_fields(body)
        if "metadata" not in fields and "metadata" not in self._ignored:
            metadata = body.get("metadata")
            if isinstance(metadata, dict) and metadata.get("tags") is not None:
                # A gateway's routing tags (LiteLLM's ``metadata.tags`` picks the deployment:
                # a "paid" request was answered from the "free" one's entry; helper-147).
                # The rest of it (a trace id per request, say) is bookkeeping: left out.
                fields = {**fields, "metadata": {"tags": metadata["tags"]}}
        if body.get("stream") is True:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # A stream without usage keys apart. Of the transport's options, usage alone
                # changes what a client gets and can take: with it, the stream ends with a
                # chunk of no choices (which the `chunk.choices[0]` loop of a client that did
                # not ask fails on); without it, a recording has no usage to answer a
                # non-streamed request with (whose body always has it). So a non-streamed
                # request shares its entry with streams that asked for usage, which carry
                # it. (include_obfuscation changes bytes too, in a field clients ignore.)
                fields = {**fields, "stream_options": _STREAMED_WITHOUT_USAGE}
        return fields

    def uncached_reason(self, body: Mapping[str, Any]) -> str:
        """Also a ``stream_options`` that is not an object, or whose ``include_usage`` is
        neither true nor false: usage keys apart (above), so it must mean what it says."""
        why = super().uncached_reason(body)
        options = body.get("stream_options")
        if why or options is None:
            return why
        if not isinstance(options, dict):
            return "stream_options is not an object"
        return unclear_flag(options, "include_usage", "stream_options.")

    # -- outcome ---------------------------------------------------------------------------

    def outcome(self, event: Event) -> Outcome:
        data = event.data
        if event.event == "error":
            return Outcome.FAIL
        if data.startswith(_DONE):  # the SDK stops at anything starting with [DONE]
            return Outcome.COMPLETE
        # Fast path: a payload that cannot have an `error` member is not decoded.
        if not may_hold_error(data):
            return Outcome.CONTINUE
        p = probe(data)
        return Outcome.FAIL if p is not None and is_truthy_raw(p.error) else Outcome.CONTINUE

    def verify(self, events: Sequence[Event]) -> Outcome:
        """Whole-stream check before storing: ``[DONE]`` came after at least one chunk, no
        error, and every choice index seen got a ``finish_reason`` (a stream cut by an
        upstream that still sent ``[DONE]`` is not an answer)."""
        open_choices: set[int] = set()
        finished: set[int] = set()
        for ev in events:
            outcome = self.outcome(ev)
            if outcome is Outcome.FAIL:
                return Outcome.FAIL
            if outcome is Outcome.COMPLETE:
                break
            try:
                chunk = _ends_decoder.decode(ev.data)
            except msgspec.DecodeError:
                continue
            for choice in chunk.choices or ():
                open_choices.add(choice.index)
                if choice.finish_reason is not None:
                    if self._blocked(choice.finish_reason):
                        return Outcome.FAIL
                    finished.add(choice.index)
        else:
            return Outcome.FAIL  # no [DONE]
        if not finished or open_choices - finished:
            return Outcome.FAIL
        return Outcome.COMPLETE

    def body_outcome(self, body: bytes) -> Outcome:
        try:
            s = _body_decoder.decode(body)
        except msgspec.DecodeError:
            return Outcome.FAIL
        if is_truthy_raw(s.error) or not s.choices or s.object not in (None, "chat.completion"):
            return Outcome.FAIL
        if any(c.finish_reason is None or self._blocked(c.finish_reason) for c in s.choices):
            return Outcome.FAIL
        return Outcome.COMPLETE

    def _blocked(self, finish_reason: str) -> bool:
        # A filter cut the answer off (Azure OpenAI's content filter, mostly): not stored, as
        # Gemini's SAFETY is not — asked again, it may pass (helper-109). A generation that
        # failed or was aborted midway, then closed with [DONE] (Mistral's "error", vLLM's
        # "abort"), is no answer at all (helper-165: stored and replayed).
        if finish_reason == "content_filter":
            return not self.store_blocked
        return finish_reason.lower() in FAILED_FINISH_REASONS

    # -- stream -> body --------------------------------------------------------------------

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        top: dict[str, Any] | None = None
        choices: dict[int, dict[str, Any]] = {}
        usage: Any = None
        for ev in events:
            data = ev.data
            if data.startswith(_DONE):
                break
            chunk = loads_object(data)
            if chunk is None or chunk.get("object", _CHUNK) != _CHUNK:
                continue  # errors, keep-alives, Azure content-filter notices
            if top is None:
                top = {}
            for key, value in chunk.items():
                if key not in _TOP_SPECIAL and (value is not None or key not in top):
                    top[key] = value
            if chunk.get("usage") is not None:
                usage = chunk["usage"]
            raw_choices = chunk.get("choices")
            for raw in raw_choices if isinstance(raw_choices, list) else ():
                if isinstance(raw, dict):
                    _add_choice(choices, raw)
        if top is None:
            return None
        out: dict[str, Any] = {
            "id": top.pop("id", None),
            "object": "chat.completion",
            "created": top.pop("created", None),
            "model": top.pop("model", None),
            "choices": [_finish_choice(choices[i]) for i in sorted(choices)],
            "usage": usage,
        }
        out.update(top)
        return dumps(out).encode("utf-8")

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        """``completion_id`` and ``model`` of the first chunk."""
        for ev in events:
            chunk = loads_object(ev.data)
            if chunk is None:
                continue
            out: dict[str, str] = {}
            if isinstance(chunk.get("id"), str):
                out["completion_id"] = chunk["id"]
            if isinstance(chunk.get("model"), str):
                out["model"] = chunk["model"]
            return out
        return {}

    # -- body -> stream --------------------------------------------------------------------

    def synthesize(self, body: bytes) -> list[Event] | None:
        completion = loads_object(body)
        if completion is None or not isinstance(completion.get("choices"), list):
            return None
        base: dict[str, Any] = {}
        for key, value in completion.items():
            if key not in ("choices", "usage", "object"):
                base[key] = value
        base["object"] = _CHUNK
        streams = [
            _choice_deltas(choice, self.delta_chars)
            for choice in completion["choices"]
            if isinstance(choice, dict)
        ]
        events: list[Event] = []
        # Interleave the choices (n > 1) the way the API does: one delta of each in turn.
        for row in zip_longest(*streams):
            for choice in row:
                if choice is not None:
                    events.append(Event(dumps({**base, "choices": [choice]})))
        usage = completion.get("usage")
        if self.usage_chunk and usage is not None:
            events.append(Event(dumps({**base, "choices": [], "usage": usage})))
        events.append(Event(_DONE))
        return events


def _add_choice(choices: dict[int, dict[str, Any]], raw: dict[str, Any]) -> None:
    index = raw.get("index", 0)
    if not isinstance(index, int):
        return
    acc = choices.get(index)
    if acc is None:
        acc = choices[index] = {"index": index, "message": {}, "logprobs": None}
        acc["finish_reason"] = None
    for key, value in raw.items():
        if key == "delta":
            if isinstance(value, dict):
                _merge(acc["message"], value)
        elif key == "logprobs":
            if isinstance(value, dict):
                _merge_logprobs(acc, value)
        elif key != "index" and (value is not None or key not in acc):
            acc[key] = value


def _merge_logprobs(acc: dict[str, Any], value: dict[str, Any]) -> None:
    current = acc.get("logprobs")
    if current is None:
        acc["logprobs"] = {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
        return
    for key, tokens in value.items():
        if isinstance(tokens, list):
            if isinstance(current.get(key), list):
                current[key].extend(tokens)
            else:
                current[key] = list(tokens)
        elif key not in current:
            current[key] = tokens


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Accumulate one delta into ``acc`` (strings append, objects merge, indexed lists merge
    by ``index``, other lists extend, anything else replaces) - the SDK's rules, except that
    identity keys replace instead of appending."""
    for key, value in delta.items():
        current = acc.get(key)
        if value is None:
            if key not in acc:
                acc[key] = None
        elif key in _IDENTITY:
            if value != "" or key not in acc:  # an empty repeat must not erase the id
                acc[key] = value
        elif isinstance(value, str):
            if isinstance(current, _Parts):
                current.append(value)
            else:
                acc[key] = _Parts((value,))
        elif isinstance(value, dict):
            if not isinstance(current, dict):
                current = acc[key] = {}
            _merge(current, value)
        elif isinstance(value, list):
            if not isinstance(current, list) or isinstance(current, _Parts):
                current = acc[key] = []
            if any(isinstance(v, dict) and isinstance(v.get("index"), int) for v in value):
                _merge_indexed(current, value)
            else:
                current.extend(value)
        else:
            acc[key] = value


def _merge_indexed(acc: list[Any], entries: list[Any]) -> None:
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
            acc.append(entry)
            continue
        for existing in acc:
            if isinstance(existing, dict) and existing.get("index") == entry["index"]:
                _merge(existing, entry)
                break
        else:
            fresh: dict[str, Any] = {}
            _merge(fresh, entry)
            acc.append(fresh)


def _finalize(value: Any) -> Any:
    if isinstance(value, _Parts):
        return "".join(value)
    if isinstance(value, dict):
        return {k: _finalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finalize(v) for v in value]
    return value


def _finish_choice(acc: dict[str, Any]) -> dict[str, Any]:
    message = _finalize(acc["message"])
    ordered: dict[str, Any] = {
        "role": message.pop("role", "assistant"),
        "content": message.pop("content", None),
        "refusal": message.pop("refusal", None),
    }
    if "tool_calls" in message:
        calls = message.pop("tool_calls")
        if isinstance(calls, list):
            calls.sort(key=_call_position)
            for call in calls:
                if isinstance(call, dict):
                    call.pop("index", None)  # a stream artefact, not in non-stream answers
        ordered["tool_calls"] = calls
    ordered.update(message)
    # OpenAI's non-stream message always has its annotations (a list, empty but for web
    # search); its stream sends them only when there are: a body built from a stream had
    # null, where code iterating message.annotations expects a list (helper-91).
    ordered.setdefault("annotations", [])
    out = dict(acc)
    out["message"] = ordered
    return out


def _call_position(call: Any) -> int:
    # A tool call's `index` orders the calls; one that is not a number (a server's null)
    # sorts first, never raises.
    index = call.get("index", 0) if isinstance(call, dict) else 0
    return index if isinstance(index, int) else 0


def _choice_deltas(choice: dict[str, Any], chars: int | None) -> list[dict[str, Any]]:
    """The per-chunk ``choices[0]`` entries that stream one choice of a completion."""
    index = choice.get("index", 0)
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    refusal = message.get("refusal")
    logprobs: Any = choice.get("logprobs")
    extra = {k: v for k, v in choice.items() if k not in ("index", "message", "logprobs")}
    extra.pop("finish_reason", None)

    def entry(delta: dict[str, Any], lp: Any = None, finish: Any = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    first: dict[str, Any] = {"role": message.get("role", "assistant")}
    first["content"] = "" if isinstance(content, str) else content
    first["refusal"] = "" if isinstance(refusal, str) else refusal
    # Everything else the message carries (annotations, audio, provider extensions) is sent
    # once; strings among them (e.g. `reasoning_content`) are streamed below.
    streamed_extra: list[tuple[str, str]] = []
    for key, value in message.items():
        if key in _STREAMED_MESSAGE_KEYS or (key == "annotations" and value == []):
            continue  # (an empty annotations list is not streamed: see _finish_choice)
        if isinstance(value, str):
            first[key] = ""
            streamed_extra.append((key, value))
        else:
            first[key] = value
    out: list[dict[str, Any]] = []
    per_token = _token_logprobs(content, logprobs)
    lp_rest = {k: v for k, v in logprobs.items() if k != "content"} if per_token else {}
    out.append(entry(first, {**lp_rest, "content": []} if per_token else logprobs))
    for key, text in streamed_extra:
        out.extend(entry({key: piece}) for piece in split_text(text, chars))
    if isinstance(content, str):
        if per_token:
            for token, lp in per_token:
                out.append(entry({"content": token}, {**lp_rest, "content": [lp]}))
        else:
            out.extend(entry({"content": piece}) for piece in split_text(content, chars))
    if isinstance(refusal, str):
        out.extend(entry({"refusal": piece}) for piece in split_text(refusal, chars))
    calls = message.get("tool_calls")
    for position, call in enumerate(calls if isinstance(calls, list) else []):
        out.extend(_tool_call_deltas(position, call, chars, entry))
    last = entry({}, None, choice.get("finish_reason"))
    last.update(extra)
    out.append(last)
    return out


def _token_logprobs(content: Any, logprobs: Any) -> list[tuple[str, Any]] | None:
    """(token, logprob) pairs when the content logprobs spell the content exactly and there
    are no refusal logprobs: then each content delta carries its own token's logprob."""
    if not isinstance(content, str) or not content or not isinstance(logprobs, dict):
        return None
    tokens = logprobs.get("content")
    if not isinstance(tokens, list) or not tokens or logprobs.get("refusal"):
        return None
    pairs: list[tuple[str, Any]] = []
    for lp in tokens:
        token = lp.get("token") if isinstance(lp, dict) else None
        if not isinstance(token, str) or not token:
            return None
        pairs.append((token, lp))
    return pairs if "".join(t for t, _ in pairs) == content else None


def _tool_call_deltas(
    position: int, call: Any, chars: int | None, entry: Any
) -> list[dict[str, Any]]:
    if not isinstance(call, dict):
        return [entry({"tool_calls": [call]})]
    function = call.get("function")
    # Streamed under its position: a non-stream call's own `index` (some servers keep it)
    # must not override it, or the head and its argument deltas name different calls.
    head = {"index": position, **{k: v for k, v in call.items() if k not in ("function", "index")}}
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        if function is not None:
            head["function"] = function
        return [entry({"tool_calls": [head]})]
    arguments: str = function["arguments"]
    head["function"] = {**function, "arguments": ""}
    out = [entry({"tool_calls": [head]})]
    for piece in split_text(arguments, chars):
        out.append(entry({"tool_calls": [{"index": position, "function": {"arguments": piece}}]}))
    return out
