"""Adapter benchmark: synthesis, final_body and outcome as events/s, with ratios to a raw
baseline measured in the same run.

Inputs: a non-stream answer whose synthesis yields ~2,000 text deltas (per schema), and the
~2,000-event stream that synthesis produces.

- baseline: a plain loop msgspec-decoding every event's ``data`` (what any consumer of the
  stream pays at least once);
- synthesize(body): events/s of producing the whole stream (wire-ready JSON per event);
- final_body(events): events/s of recovering the non-stream answer from the recording
  (Responses reads only the completing event; Chat and Anthropic accumulate every delta);
- outcome(event): per-event classification rate, the cost the recorder adds on a miss.

Compare ratios, not absolute rates (docs/benchmarks.md: the machine is noisy). The engine's replay
rate for the same stream size is printed by ``benchmarks/bench_engine.py``.

    .venv/bin/python benchmarks/bench_adapters.py [--repeat 15] [--deltas 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import msgspec

from sse_cache import Event
from sse_cache.adapters import AnthropicMessages, OpenAIChat, OpenAIResponses
from sse_cache.protocols import StreamAdapter

_decode = msgspec.json.decode


def words(n: int) -> str:
    vocabulary = [" stream", " cache", " event", " café", " 東京", ' "quoted"', " delta", " done"]
    return "".join(vocabulary[i % len(vocabulary)] for i in range(n))


def responses_body(n: int) -> bytes:
    text = words(n)
    return json.dumps(
        {
            "id": "resp_bench",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": "gpt-5",
            "output": [
                {
                    "id": "rs_1",
                    "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": "thinking"}],
                },
                {
                    "id": "msg_1",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
                    ],
                },
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {"input_tokens": 10, "output_tokens": n, "total_tokens": n + 10},
        }
    ).encode()


def chat_body(n: int) -> bytes:
    message = {"role": "assistant", "content": words(n), "refusal": None}
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10},
        }
    ).encode()


def anthropic_body(n: int) -> bytes:
    return json.dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": "claude",
            "content": [{"type": "text", "text": words(n)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": n},
        }
    ).encode()


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def baseline(events: Sequence[Event]) -> None:
    for ev in events:
        if ev.data != "[DONE]":
            _decode(ev.data)


def classify(adapter: StreamAdapter, events: Sequence[Event]) -> None:
    outcome = adapter.outcome
    for ev in events:
        outcome(ev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--deltas", type=int, default=2000)
    args = parser.parse_args()
    cases: list[tuple[StreamAdapter, bytes]] = [
        (OpenAIResponses(), responses_body(args.deltas)),
        (OpenAIChat(), chat_body(args.deltas)),
        (AnthropicMessages(), anthropic_body(args.deltas)),
    ]
    print(f"{'schema':<20}{'events':>7}  {'step':<14}{'events/s':>12}  {'vs raw decode':>13}")
    for adapter, body in cases:
        events = adapter.synthesize(body)
        assert events is not None
        n = len(events)
        assert adapter.final_body(events) is not None
        t_raw = median_time(lambda ev=events: baseline(ev), args.repeat)
        steps = {
            "raw decode": t_raw,
            "synthesize": median_time(lambda a=adapter, b=body: a.synthesize(b), args.repeat),
            "final_body": median_time(lambda a=adapter, ev=events: a.final_body(ev), args.repeat),
            "outcome": median_time(lambda a=adapter, ev=events: classify(a, ev), args.repeat),
        }
        for step, seconds in steps.items():
            ratio = seconds / t_raw
            print(f"{adapter.name:<20}{n:>7}  {step:<14}{n / seconds:>12,.0f}  {ratio:>12.2f}x")
    print(
        "\n'vs raw decode': time relative to msgspec-decoding every event once (lower is faster)."
    )


if __name__ == "__main__":
    main()
