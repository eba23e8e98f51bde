"""Real recorded API streams, read from the shared fixtures directory (never copied here).

``*.sse`` files are raw ``text/event-stream`` bodies; ``*.jsonl`` files hold one event payload
per line without the ``event:`` line (the source dropped it), so they are loaded both with
the ``event: <type>`` line the API sends (``named``) and without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sse_cache import Event, SSEParser
from sse_cache.adapters import AnthropicMessages, OpenAIChat, OpenAIResponses
from sse_cache.protocols import Outcome, StreamAdapter
from sse_cache.recorder import Recorder, RecorderState

# ../shared/real-streams beside the clone (as in CI), unless the environment says otherwise.
_BESIDE = Path(__file__).resolve().parents[3] / "shared" / "real-streams"
REAL_STREAMS = Path(os.environ.get("SSE_CACHE_REAL_STREAMS", str(_BESIDE)))

C, F = Outcome.COMPLETE, Outcome.FAIL

#: file -> (verdict of outcome()/end_outcome() over the stream, verdict of verify()).
EXPECTED: dict[str, tuple[Outcome, Outcome]] = {
    "anthropic_redacted-thinking_claude-sonnet-4.5.sse": (C, C),
    "anthropic_thinking_claude-sonnet-4.sse": (C, C),
    # No final blank line: the last event (message_stop) is never dispatched (WHATWG), so the
    # stream has not completed.
    "anthropic_tool-use_sdk-fixture.sse": (F, F),
    "anthropic_web-search-thinking-citations_claude-sonnet-4.sse": (C, C),
    "openai-chat_logprobs_gpt-4o.sse": (C, C),
    "openai-chat_n3-choices_gpt-4o.sse": (C, C),
    "openai-chat_parallel-tool-calls-usage_gpt-4o.sse": (C, C),
    "openai-chat_refusal_gpt-4o.sse": (C, C),
    "openai-chat_tool-call-obfuscation_gpt-4o-mini.sse": (C, C),
    # Event types the SDK does not know: passed through, the stream completes.
    "openai-responses_apply-patch_gpt-5.1.jsonl": (C, C),
    "openai-responses_background-queued_gpt-4o.sse": (C, C),
    # A resumed stream (GET .../responses/{id}?starting_after=0): starts at sequence 1.
    # Completes, but verify() refuses to store it: without its first events (no
    # response.created), the SDK's responses.stream() raises on it. The cache records
    # POSTs, whose streams start at 0; a resume is answered from them, never recorded.
    "openai-responses_background-resume-starting_after-0_gpt-4o.sse": (C, F),
    # Trimmed by its source: sequence_number gaps. Completes, but verify() refuses to store a
    # recording with lost events.
    "openai-responses_custom-tool-input_gpt-5.2-codex.jsonl": (C, F),
    "openai-responses_error-then-failed_gpt-5-nano.jsonl": (F, F),
    "openai-responses_function-call_legacy-no-seqnum_gpt-4o.sse": (C, C),
    "openai-responses_image-generation-partial-image_gpt-5.jsonl": (C, C),
    "openai-responses_mcp-call_o4-mini.sse": (C, C),
    "openai-responses_phase-commentary-function-call_gpt-5.5.sse": (C, C),
    "openai-responses_reasoning-4-summaries_o3-mini.sse": (C, C),
    "openai-responses_reasoning-6-summaries-encrypted_azure-gpt-5.4.jsonl": (C, C),
    "openai-responses_reasoning-code-interpreter_gpt-5.sse": (C, C),
    "openai-responses_reasoning-function-call_gpt-5.sse": (C, C),
    "openai-responses_shell-container_gpt-5.2.jsonl": (C, C),
    "openai-responses_text_legacy-no-seqnum_gpt-4o.sse": (C, C),
    "openai-responses_web-search-2calls-annotation_gpt-5.2.sse": (C, C),
    "openai-responses_web-search_gpt-5.sse": (C, C),
}


def require_dir() -> Path:
    """The fixtures directory; skip when absent, except under CI (``CI=true``): fail."""
    if not REAL_STREAMS.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real streams directory {REAL_STREAMS} is missing on CI")
        pytest.skip(f"real streams directory {REAL_STREAMS} not present")
    return REAL_STREAMS


def adapter_for(name: str) -> StreamAdapter:
    if name.startswith("openai-responses"):
        return OpenAIResponses()
    if name.startswith("openai-chat"):
        return OpenAIChat()
    return AnthropicMessages()


class Recording:
    def __init__(self, name: str, *, named: bool = True) -> None:
        self.name = name
        self.path = require_dir() / name
        if not self.path.exists():
            pytest.fail(f"{self.path} is missing from the real streams directory")
        self.raw = self.path.read_bytes()
        self.adapter = adapter_for(name)
        if name.endswith(".jsonl"):
            lines = [line for line in self.raw.decode().splitlines() if line.strip()]
            self.events = [
                Event(line, json.loads(line)["type"] if named else None) for line in lines
            ]
            self.discarded = False
        else:
            parser = SSEParser()
            self.events = parser.feed(self.raw)
            parser.close()
            self.discarded = parser.discarded

    @property
    def is_sse(self) -> bool:
        return self.name.endswith(".sse")

    def record(self, *, whole_stream_check: bool = True) -> Recorder:
        """The library's own :class:`Recorder` fed this stream, which then ended cleanly
        (``finish(clean_end=True)``): its ``state`` and ``reason`` say what it concluded.
        ``whole_stream_check=False``: judged by the per-event rules alone (``outcome`` and
        ``end_outcome``), without the adapter's ``verify``."""
        adapter: Any = self.adapter if whole_stream_check else _EventRules(self.adapter)
        recorder = Recorder(adapter)
        for i, ev in enumerate(self.events):
            recorder.add(ev, i / 1000)
        recorder.finish(clean_end=True)
        return recorder

    def verdict(self) -> Outcome:
        """What the recorder concludes from the events alone (``outcome`` of each, a later
        failure overriding a completion; ``end_outcome`` at a clean end without the
        completing event): COMPLETE or FAIL."""
        state = self.record(whole_stream_check=False).state
        return Outcome.COMPLETE if state is RecorderState.COMPLETE else Outcome.FAIL


class _EventRules:
    """An adapter's per-event rules without its whole-stream check: the :class:`Recorder`
    runs ``verify`` only for an adapter that has one (``VerifyingAdapter``), so this view
    lets the tests tell the two verdicts apart."""

    def __init__(self, adapter: StreamAdapter) -> None:
        self._adapter = adapter
        self.name = adapter.name

    def outcome(self, event: Event) -> Outcome:
        return self._adapter.outcome(event)

    def end_outcome(self) -> Outcome:
        return self._adapter.end_outcome()

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        return self._adapter.meta(events)
