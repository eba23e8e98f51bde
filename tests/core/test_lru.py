"""SizedLRU, the byte-bounded LRU map behind the decoded-entry cache and the near cache,
against a plain model: any sequence of puts, reads and discards keeps the same items, drops
the least recently used first, and never holds more than its budget."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sse_cache._decoded import DecodedEntries
from sse_cache._lru import SizedLRU

BUDGET = 100
keys = st.sampled_from("abcdef")


class LRUMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lru: SizedLRU[int] = SizedLRU(BUDGET)
        self.model: list[tuple[str, int, int]] = []  # (key, value, size), oldest use first

    def _drop(self, key: str) -> None:
        self.model = [item for item in self.model if item[0] != key]

    @rule(key=keys, value=st.integers(), size=st.integers(0, 130))
    def put(self, key: str, value: int, size: int) -> None:
        self.lru.put(key, value, size)
        self._drop(key)
        if size <= BUDGET:
            self.model.append((key, value, size))
            while sum(s for _, _, s in self.model) > BUDGET:
                self.model.pop(0)

    @rule(key=keys)
    def read(self, key: str) -> None:
        found = [item for item in self.model if item[0] == key]
        assert self.lru.peek(key) == (found[0][1] if found else None)
        if found:
            self.lru.touch(key)
            self._drop(key)
            self.model.append(found[0])

    @rule(key=keys)
    def discard(self, key: str) -> None:
        self.lru.discard(key)
        self._drop(key)

    @rule()
    def clear(self) -> None:
        self.lru.clear()
        self.model = []

    @invariant()
    def same_items_within_budget(self) -> None:
        assert len(self.lru) == len(self.model)
        assert self.lru.size == sum(s for _, _, s in self.model) <= BUDGET
        for key, value, _ in self.model:
            assert key in self.lru and self.lru.peek(key) == value


TestSizedLRU = LRUMachine.TestCase


class _CountingBytes(bytes):
    """Bytes that count how often they are compared (``!=`` with plain bytes on the left
    asks this subclass first)."""

    comparisons = 0

    def __ne__(self, other: object) -> bool:
        type(self).comparisons += 1
        return bytes.__ne__(self, other)  # type: ignore[operator]


def test_equal_bytes_read_again_are_compared_once_then_trusted_by_identity() -> None:
    # A backend that reads an entry again returns a new bytes object with the same bytes: the
    # decoded entry is reused, and the new object kept, so that later hits are an identity
    # check and not a comparison of every byte (a 195 KB memcmp per hit).
    cache: DecodedEntries[str] = DecodedEntries(10_000)
    cache.put("k", b"x" * 100, "decoded", lambda _: 10)
    again = _CountingBytes(b"x" * 100)
    assert cache.get("k", again) == "decoded"
    assert cache.get("k", again) == "decoded"
    assert cache.get("k", again) == "decoded"
    assert _CountingBytes.comparisons == 1
    assert cache.get("k", b"y" * 100) is None  # other bytes: forgotten
    assert len(cache) == 0


def test_a_decoded_entry_counts_the_bytes_it_was_stored_as() -> None:
    # An entry stored with its own bytes (a stream not in the canonical form) holds them
    # too: 24 such entries of 8 MiB of comments each counted 35 KB against the 64 MiB budget
    # while holding 201 MB (helper-98).
    from sse_cache import Entry, Event
    from sse_cache._entries import _decoded_size

    events = (Event("a"), Event("b"))
    plain = Entry(schema="s", created_at=0.0, events=events)
    wire = b": ping\n\n" * 100_000 + b"data: a\n\ndata: b\n\n"
    kept = Entry(schema="s", created_at=0.0, events=events, wire=wire)
    assert _decoded_size(kept) == _decoded_size(plain) + len(wire)
