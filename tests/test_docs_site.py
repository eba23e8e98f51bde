"""The docs site: ``mkdocs build --strict`` passes, every page is in the navigation, the API
reference renders the public names, and links to repository files outside docs/ open on the
site."""

from __future__ import annotations

import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The modules whose __all__ the reference must render: the package, DESIGN.md's contract
# modules and the testing helpers.
REFERENCED_MODULES = [
    "sse_cache",
    "sse_cache.asgi",
    "sse_cache.httpx",
    "sse_cache.httpx2",
    "sse_cache.backends",
    "sse_cache.adapters",
    "sse_cache.errors",
    "sse_cache.testing",
]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = _build(ROOT / "mkdocs.yml", out)
    assert built.returncode == 0, built.stdout
    return out


def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def test_every_page_in_docs_is_in_the_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = list(_nav_pages(config["nav"]))
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(in_nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(in_nav) - set(pages)) == [], "nav entries without a page"
    assert len(in_nav) == len(set(in_nav)), "a page is in the nav twice"


def test_strict_build_rejects_a_forgotten_page_and_a_broken_link(tmp_path: Path) -> None:
    # A copy of the project's docs with one page left out of the nav and one link to a
    # repository file that does not exist: both must fail the build, not pass with a notice.
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(DOCS, project / "docs")
    (project / "scripts").mkdir()
    for hook in ("docs_griffe.py", "docs_repo_files.py"):
        shutil.copy(ROOT / "scripts" / hook, project / "scripts" / hook)
    for folder in ("src", "examples", "tests"):
        (project / folder).symlink_to(ROOT / folder)
    (project / "docs" / "forgotten.md").write_text(
        "# Forgotten\n\nSee [the example](../examples/no_such_example.py).\n", encoding="utf-8"
    )

    built = _build(project / "mkdocs.yml", tmp_path / "site")

    assert built.returncode != 0
    assert "Aborted with 2 warnings in strict mode!" in built.stdout, built.stdout
    assert 'not included in the "nav" configuration:\n  - forgotten.md' in built.stdout
    assert "'../examples/no_such_example.py'" in built.stdout


@pytest.mark.parametrize("module_name", REFERENCED_MODULES)
def test_the_reference_renders_every_public_name(site: Path, module_name: str) -> None:
    reference = "".join(
        page.read_text(encoding="utf-8") for page in (site / "reference").rglob("*.html")
    )
    anchors = set(re.findall(r'id="(sse_cache[\w.]*)"', reference))
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        # A name re-exported by the package is documented once, where it is defined
        # (sse_cache.Backend as sse_cache.protocols.Backend) or under the package.
        defined_in = getattr(getattr(module, name), "__module__", module_name)
        if not {f"{module_name}.{name}", f"{defined_in}.{name}"} & anchors:
            missing.append(name)
    assert missing == []


def test_the_contract_names_are_headings_of_the_reference(site: Path) -> None:
    asgi = _text(site / "reference" / "asgi" / "index.html")
    engine = _text(site / "reference" / "engine" / "index.html")
    backends = _text(site / "reference" / "backends" / "index.html")
    assert "sse_cache.asgi.CacheMiddleware" in asgi
    assert "CacheMiddleware(\n    app" in asgi  # the signature, backend after the app
    assert "sse_cache.StreamCache" in engine
    assert "Caches streamed answers" in engine  # the docstring, not only a heading
    assert "from_url" in backends
    # Sphinx roles in docstrings are turned into code, never shown raw.
    assert not re.search(r":(class|meth|func|attr|mod|data):", asgi + engine + backends)


def test_links_to_repository_files_open_the_file_on_the_site(site: Path) -> None:
    # docs/index.md links ../examples/engine_quickstart.py, which works on GitHub; on the
    # site the link leads to a generated page showing that file.
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="repository/examples/engine_quickstart.py/"' in index
    shown = _text(site / "repository" / "examples" / "engine_quickstart.py" / "index.html")
    source = (ROOT / "examples" / "engine_quickstart.py").read_text(encoding="utf-8")
    absent = [line for line in source.splitlines() if line.strip() and line not in shown]
    assert absent == []
