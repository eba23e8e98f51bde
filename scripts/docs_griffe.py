"""Griffe extensions for the API reference: docstrings as Python shows them, roles as links.

``CopiedDocstrings``: a class whose body says ``__doc__ = Other.__doc__`` (the httpx and httpx2
transports share one implementation and its docstring) gets that docstring in the reference, as
``help()`` shows it; static analysis alone would find none and hide the class.

``CommentDocstrings``: an attribute documented by ``#:`` comment lines right above it (the
Sphinx convention this code base uses for constants) gets them as its docstring.

``SphinxRoles``: the docstrings are written for readers of the source and use Sphinx roles
(:class:`StreamCache`, :meth:`~sse_cache.recorder.Recorder.feed`). Markdown has no roles, so
each becomes a code span wrapped in an *optional* autorefs reference: a link where the target
is rendered somewhere in the reference, plain code where it is not (a private module, another
library) — so a docstring never breaks ``mkdocs build --strict`` by naming something the
reference leaves out.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import griffe

# :role:`target`, :role:`~a.b.target` (show the last part), :role:`!target` (no link),
# :role:`title <target>`.
ROLE = re.compile(r":(?:class|meth|func|attr|mod|exc|data|obj|const|type):`(?P<text>[^`]+)`")
EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


class CopiedDocstrings(griffe.Extension):
    """Give a class the docstring its ``__doc__ = Other.__doc__`` assignment copies."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        assigned = obj.members.get("__doc__") if obj.is_class else None
        if obj.docstring is not None or not isinstance(assigned, griffe.Attribute):
            return
        value = assigned.value
        if not isinstance(value, griffe.ExprAttribute) or value.last.name != "__doc__":
            return
        source_path = value.canonical_path.removesuffix(".__doc__")
        try:
            source = loader.modules_collection[source_path]
        except (KeyError, griffe.AliasResolutionError):
            return
        if source.docstring is not None:
            obj.docstring = griffe.Docstring(source.docstring.value, parent=obj)


class CommentDocstrings(griffe.Extension):
    """Give an attribute the ``#:`` comment lines right above its assignment as docstring."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if not obj.is_attribute or obj.docstring is not None or obj.lineno is None:
            return
        if not isinstance(obj.filepath, Path) or obj.filepath not in obj.lines_collection:
            return
        lines = obj.lines_collection[obj.filepath]
        comment: list[str] = []
        index = obj.lineno - 2  # the line above the assignment (lineno counts from 1)
        while index >= 0 and lines[index].lstrip().startswith("#:"):
            comment.insert(0, lines[index].lstrip()[2:].removeprefix(" "))
            index -= 1
        if comment:
            obj.docstring = griffe.Docstring("\n".join(comment), parent=obj)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None or ":" not in obj.docstring.value:
            return
        obj.docstring.value = ROLE.sub(
            lambda match: _reference(obj, match["text"]), obj.docstring.value
        )


def _reference(obj: griffe.Object, text: str) -> str:
    explicit = EXPLICIT_TITLE.match(text)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    elif text.startswith("~"):
        target = text[1:]
        title = target.rsplit(".", 1)[-1]
    else:
        title = target = text
    code = f"<code>{html.escape(title)}</code>"
    if target.startswith("!"):
        return code
    identifier = _resolve(obj, target.removesuffix("()"))
    if identifier is None:
        return code
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path ``target`` names as seen from ``obj``'s scope, or None."""
    if target.startswith("sse_cache"):
        return target
    head, _, rest = target.partition(".")
    # A method's docstring names its siblings and its module's names: resolve from its class.
    scope = obj if obj.is_class or obj.is_module else obj.parent
    if scope is None:
        return None
    try:
        path = scope.resolve(head)
    except griffe.NameResolutionError:
        return None
    return f"{path}.{rest}" if rest else path
