"""The options the docs list are the options the code takes, with the defaults it has.

docs/asgi.md and docs/httpx.md show each constructor as a signature block and docs/asgi.md
lists every option in a table with its default; an option added to ``CacheOptions`` but not
to them (or a default changed in one place) fails here rather than in a user's hands.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

from sse_cache import CacheOptions
from sse_cache.asgi import CacheMiddleware
from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: The middleware's own options beside ``CacheOptions``.
MIDDLEWARE_OWN = ("finish_on_disconnect", "max_background", "background_timeout")


def defaults() -> dict[str, Any]:
    """Every caching option and the middleware's own, with their defaults in the code."""
    found: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(CacheOptions)}
    signature = inspect.signature(CacheMiddleware.__init__)
    found.update({name: signature.parameters[name].default for name in MIDDLEWARE_OWN})
    return found


def documented_value(text: str) -> Any:
    """``32 MiB`` -> 33554432, ``"instant"`` -> 'instant', ``None`` -> None."""
    text = text.strip().strip("`")
    if size := re.fullmatch(r"(\d+) MiB", text):
        return int(size.group(1)) * 2**20
    return ast.literal_eval(text)


def signature_block(page: str, call: str) -> dict[str, str]:
    """``name=default`` of the first ``call(...)`` in a Python block of ``page``."""
    text = (DOCS / page).read_text()
    start = text.index(f"```python\n{call}(")
    block = text[start : text.index("\n```", start)]
    inside = block[block.index("(") + 1 : block.index(")\n")]
    # Split on the commas between parameters (a default never holds one here).
    params = [p.strip() for p in inside.replace("\n", " ").split(",")]
    return dict(p.split("=", 1) for p in params if "=" in p)


def test_the_middleware_signature_block_lists_every_option_with_its_default() -> None:
    shown = signature_block("asgi.md", "CacheMiddleware")
    expected = defaults()
    assert set(shown) == set(expected)
    for name, text in shown.items():
        if name in ("keyer", "codec", "routes", "tenant"):  # None: the defaults the table names
            assert text == "None", name
            continue
        assert documented_value(text) == expected[name], name


def test_the_transport_signature_block_lists_every_caching_option_with_its_default() -> None:
    shown = signature_block("httpx.md", "AsyncCacheTransport")
    expected = {k: v for k, v in defaults().items() if k not in MIDDLEWARE_OWN}
    # The transports' own bound on the streams read on for a resume window.
    own = inspect.signature(AsyncCacheTransport.__init__).parameters["max_background"]
    expected["max_background"] = own.default
    assert set(shown) - {"transport"} == set(expected)
    for name, text in shown.items():
        if name != "transport":
            assert documented_value(text) == expected[name], name
    portal = inspect.signature(CacheTransport.__init__).parameters["portal_backend"].default
    assert f'portal_backend="{portal}"' in (DOCS / "httpx.md").read_text()


def test_the_options_table_lists_every_option_with_its_default() -> None:
    text = (DOCS / "asgi.md").read_text()
    table = text.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        names, default = line.split(" | ")[0:2]
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = default
    expected = defaults()
    assert set(rows) == {"backend", *expected}
    for name, default in rows.items():
        if name in ("backend", "routes", "keyer", "codec"):  # described, not a literal
            continue
        assert documented_value(default) == expected[name], name
