"""Deterministic material for the mock answers: seeded randomness, words, identifiers, and the
pieces a text is streamed in. Everything here is a pure function of its arguments."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Final

import msgspec

__all__ = [
    "BASE62",
    "chunks",
    "dumps",
    "hex_ident",
    "ident",
    "mock_text",
    "rng",
    "seeded",
    "split_every",
    "tokens",
    "words",
]

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKENS: Final = re.compile(r"\s*\S+")
# The vocabulary of mock_text: plain words, non-ASCII text and characters JSON must escape.
_VOCABULARY: Final = (
    *(  # noqa: SIM905 - a sentence reads better than 52 quoted words
        "the stream cache records every event while it is delivered and replays it later with "
        "the same bytes in the same order so a repeated request costs nothing upstream "
        "reasoning summaries keep their index tokens arrive one small delta at a time and "
        "gateways usually forward them unchanged café naïve 東京 quotes"
    ).split(),
    '"x"',
    "back\\slash",
)

_encoder: Final = msgspec.json.Encoder()


def dumps(value: object) -> str:
    """Compact JSON, as the providers send it."""
    return _encoder.encode(value).decode("utf-8")


def seeded(seed: bytes) -> random.Random:
    """A random generator whose sequence is a function of ``seed`` alone."""
    digest = hashlib.blake2b(seed, digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def mock_text(seed: object, words: int) -> str:
    """``words`` pseudo-random words, the same for the same ``seed``."""
    rng = seeded(repr(("text", seed)).encode())
    return " ".join(rng.choice(_VOCABULARY) for _ in range(words))


def rng(digest: str, tag: str) -> random.Random:
    """The random generator of one part (``tag``) of the answer identified by ``digest``."""
    return seeded(f"{digest}\0{tag}".encode())


def words(digest: str, tag: object, count: int) -> str:
    """``count`` words of the answer identified by ``digest``, for its part ``tag``."""
    return mock_text((digest, tag), count)


def split_every(text: str, size: int) -> list[str]:
    """``text`` in pieces of ``size`` characters (one empty piece for an empty text)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def tokens(text: str) -> list[str]:
    """Delta-sized pieces of ``text`` (one per word, leading space kept) that join back."""
    pieces: list[str] = _TOKENS.findall(text)
    rest = len(text) - sum(map(len, pieces))
    if rest:  # trailing whitespace only: \s*\S+ covers everything before it
        pieces.append(text[-rest:])
    return pieces


def chunks(text: str) -> list[str]:
    """Token-like pieces of JSON text (2-5 characters), as arguments are streamed."""
    sizes = (2, 5, 3, 4)
    out: list[str] = []
    i = 0
    while i < len(text):
        size = sizes[len(out) % len(sizes)]
        out.append(text[i : i + size])
        i += size
    return out


def ident(digest: str, tag: str, length: int, alphabet: str = BASE62) -> str:
    """``length`` characters of ``alphabet``, a function of ``digest`` and ``tag``."""
    raw = hashlib.blake2b(f"{digest}\0{tag}".encode(), digest_size=64).digest()
    return "".join(alphabet[b % len(alphabet)] for b in raw[:length])


def hex_ident(digest: str, tag: str, length: int) -> str:
    return ident(digest, tag, length, "0123456789abcdef")
