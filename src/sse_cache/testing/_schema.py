"""Values made up from a JSON schema: tool-call arguments and structured (JSON) output."""

from __future__ import annotations

import random
from typing import Any, Final

from ._request import as_dict
from ._text import chunks, dumps, rng, tokens, words

__all__ = ["fake_object", "json_schema_format", "output_text"]

# Strings a made-up value is picked from: plain, non-ASCII, and characters JSON must escape.
_STRINGS: Final = ("Paris", "blue", "sse-cache", "東京", "42 Main St", "café", 'say "hi"', "a\\b")
_MAX_DEPTH: Final = 8


def _fake(schema: Any, rand: random.Random, root: Any, depth: int = 0) -> Any:
    """A value that validates against a (simple) JSON schema."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return rand.choice(_STRINGS)
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _fake(target, rand, root, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rand.randrange(len(enum))]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _fake((usable or options)[0], rand, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = as_dict(schema.get("properties"))
        return {name: _fake(sub, rand, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = rand.randint(1, 2)
        return [_fake(schema.get("items"), rand, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        return rand.randint(1, 100)
    if kind == "number":
        return round(rand.uniform(0, 100), 2)
    if kind == "boolean":
        return rand.random() < 0.5
    if kind == "null":
        return None
    return rand.choice(_STRINGS)


def fake_object(schema: Any, rand: random.Random) -> dict[str, Any]:
    """A JSON object for ``schema`` (tool arguments are always an object)."""
    value = _fake(schema, rand, schema) if isinstance(schema, dict) else {}
    return value if isinstance(value, dict) else {"value": value}


def json_schema_format(fmt: Any) -> tuple[str, Any] | None:
    """('json_schema', schema) or ('json_object', None) for a structured output format."""
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        inner = as_dict(fmt.get("json_schema")) or fmt
        return "json_schema", inner.get("schema")
    if fmt.get("type") == "json_object":
        return "json_object", None
    return None


def output_text(digest: str, tag: object, count: int, fmt: tuple[str, Any] | None) -> list[str]:
    """The answer text as its deltas: ``count`` words, or JSON pieces for a structured output
    format."""
    if fmt is None:
        return tokens(words(digest, tag, count))
    if fmt[0] == "json_schema":
        value: Any = _fake(fmt[1], rng(digest, f"json{tag}"), fmt[1])
    else:
        value = {"answer": words(digest, tag, count)}
    return chunks(dumps(value))
