"""mkdocs hook: links from a docs page to a file elsewhere in the repository.

The pages link to examples and tests with relative paths (``../examples/engine_quickstart.py``),
which GitHub and an editor resolve within the repository. A built site has no such files, so
for each one a page links to, this hook adds a generated page that shows the file, and points
the link there. The same Markdown then works on GitHub, in a checkout and on the site. A link
to a file that does not exist is left alone, for ``mkdocs build --strict`` to report.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

# Inline links and images: ](target) or ](target "title"); reference definitions: [id]: target.
INLINE_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<rest>\s+\"[^\"]*\")?\)")
REFERENCE_DEFINITION = re.compile(r"^(?P<lead> {0,3}\[[^\]]+\]:\s*)(?P<target><?[^\s>]+>?)", re.M)
# Generated pages live under this folder of the site.
SOURCE_FOLDER = "repository"
# Highlighting by file suffix, or by whole name for files without one.
LANGUAGES = {
    ".py": "python",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".sh": "sh",
    ".md": "markdown",
    ".json": "json",
    "Dockerfile": "dockerfile",
}

# Repository path (POSIX, relative to the repository root) -> src_uri of its generated page.
_pages: dict[str, str] = {}


def on_files(files: Files, config: Any) -> Files:
    docs_dir = Path(os.path.abspath(config.docs_dir))
    root = docs_dir.parent
    _pages.clear()
    for file in list(files.documentation_pages()):
        if file.abs_src_path is None:
            continue
        for target in _link_targets(file.content_string):
            path = _repository_file(Path(file.abs_src_path).parent, target, docs_dir, root)
            if path is None or path in _pages:
                continue
            src_uri = f"{SOURCE_FOLDER}/{path}.md"
            files.append(
                File.generated(
                    config,
                    src_uri,
                    content=_source_page(path, (root / path).read_text(encoding="utf-8")),
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
            _pages[path] = src_uri
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.abs_src_path is None or not _pages:
        return markdown
    docs_dir = Path(os.path.abspath(config.docs_dir))
    here = Path(page.file.abs_src_path).parent
    page_folder = posixpath.dirname(page.file.src_uri)

    def rewrite(target: str) -> str:
        path = _repository_file(here, target, docs_dir, docs_dir.parent)
        if path is None or path not in _pages:
            return target
        return posixpath.relpath(_pages[path], page_folder or ".")

    markdown = INLINE_LINK.sub(lambda m: f"]({rewrite(m['target'])}{m['rest'] or ''})", markdown)
    return REFERENCE_DEFINITION.sub(lambda m: m["lead"] + rewrite(m["target"]), markdown)


def _link_targets(markdown: str) -> list[str]:
    return [m["target"] for m in INLINE_LINK.finditer(markdown)] + [
        m["target"] for m in REFERENCE_DEFINITION.finditer(markdown)
    ]


def _repository_file(folder: Path, target: str, docs_dir: Path, root: Path) -> str | None:
    """The repository path a relative link names, if it is a file outside ``docs/``."""
    target = target.strip("<>").split("#", 1)[0].split("?", 1)[0]
    if not target or "://" in target or target.startswith(("/", "mailto:")):
        return None
    # Normalised, not resolved: a link names a place in the tree, whatever a symlink points to.
    path = Path(os.path.normpath(folder / target))
    if path.is_relative_to(docs_dir) or not path.is_relative_to(root) or not path.is_file():
        return None
    return path.relative_to(root).as_posix()


def _source_page(path: str, text: str) -> str:
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    name = posixpath.basename(path)
    language = LANGUAGES.get(posixpath.splitext(name)[1] or name, "text")
    return (
        f"# `{path}`\n\n"
        "A file of the sse-cache repository, outside the documentation, as it was when this "
        "site was built.\n\n"
        f'{fence}{language} title="{path}"\n{text.rstrip()}\n{fence}\n'
    )


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)
