"""The schema-agnostic adapter: any SSE stream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..events import Event
from ..protocols import Outcome
from ._common import unclear_flag

__all__ = ["TRANSPORT_FIELDS", "GenericSSE"]

#: Request fields that change how an answer is delivered, not what it is.
TRANSPORT_FIELDS = frozenset({"stream", "stream_options", "timeout", "request_timeout"})


class GenericSSE:
    """Any SSE stream: complete when the upstream ends cleanly (with a 2xx status).

    Keys on every request field except the transport-only ones (``stream``,
    ``stream_options`` but its ``include_usage``, ``timeout``, ``request_timeout``, plus
    ``ignore_fields``), and on the OpenAI and Anthropic headers that choose an account,
    project or API version (:attr:`key_headers`). There is no
    schema to recover a non-stream answer from, so cross-mode answers are not offered.
    """

    name = "generic"
    #: The OpenAI and Anthropic headers that choose whose account, project or API version
    #: answers (an OpenAI-compatible upstream reads them too; keyed only when a request
    #: carries them): one key with two projects shared an entry, where the upstream would
    #: answer one of them 404 (helper-169).
    key_headers: tuple[str, ...] = (
        "openai-beta",
        "openai-organization",
        "openai-project",
        "anthropic-version",
        "anthropic-beta",
    )

    def __init__(self, *, ignore_fields: Iterable[str] = ()) -> None:
        if isinstance(ignore_fields, str):
            # (A string is an iterable of its characters: "user" would drop u, s, e and r.)
            raise TypeError("ignore_fields must be an iterable of field names, not a string")
        ignored = frozenset(ignore_fields)
        self._drop = TRANSPORT_FIELDS | ignored
        self._usage_keyed = "stream_options" not in ignored

    def key_fields(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """Every field but the transport's and ``ignore_fields``; of ``stream_options``, its
        ``include_usage``: an OpenAI-compatible stream (legacy completions, vLLM) that asked
        for usage ends with a chunk of no choices, which the ``chunk.choices[0]`` loop of a
        client that did not ask fails on (helper-147)."""
        fields = {k: v for k, v in body.items() if k not in self._drop}
        options = body.get("stream_options")
        if isinstance(options, dict) and self._usage_keyed:
            usage = options.get("include_usage")
            if usage is not None and usage is not False:  # (false asks what absent does)
                fields["stream_options"] = {"include_usage": usage}
        return fields

    def is_streaming(self, body: Mapping[str, Any]) -> bool:
        return body.get("stream", True) is not False

    def uncached_reason(self, body: Mapping[str, Any]) -> str:
        """A ``stream`` that is neither true nor false (see :func:`unclear_flag`)."""
        return unclear_flag(body, "stream")

    def outcome(self, event: Event) -> Outcome:
        return Outcome.CONTINUE

    def end_outcome(self) -> Outcome:
        return Outcome.COMPLETE

    def body_outcome(self, body: bytes) -> Outcome:
        return Outcome.COMPLETE

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        return None

    def synthesize(self, body: bytes) -> list[Event] | None:
        return None

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        return {}
