"""What a user installs: the sdist and the wheel built from this tree by the build backend
(hatchling, as pip would run it) carry the licence text, the changelog and metadata that says
what the licence is."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

import sse_cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-t", "wheel", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def only(folder: Path, pattern: str) -> Path:
    [found] = folder.glob(pattern)
    return found


def metadata(text: str) -> Message:
    return Parser().parsestr(text)


def test_the_licence_is_mit_for_sse_cache_developers() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 sse_cache developers\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_the_wheel_carries_the_licence(dist: Path) -> None:
    wheel = only(dist, f"sse_cache-{sse_cache.__version__}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        info = f"sse_cache-{sse_cache.__version__}.dist-info"
        assert zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = metadata(zf.read(f"{info}/METADATA").decode())
        names = set(zf.namelist())
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Version"] == sse_cache.__version__
    assert "sse_cache/py.typed" in names and "sse_cache/cli/inspect.py" in names


def test_the_sdist_carries_the_licence_and_the_changelog(dist: Path) -> None:
    sdist = only(dist, f"sse_cache-{sse_cache.__version__}.tar.gz")
    top = f"sse_cache-{sse_cache.__version__}"
    with tarfile.open(sdist) as tf:

        def read(name: str) -> bytes:
            member = tf.extractfile(f"{top}/{name}")
            assert member is not None, name
            return member.read()

        assert read("LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert read("CHANGELOG.md") == (ROOT / "CHANGELOG.md").read_bytes()
        meta = metadata(read("PKG-INFO").decode())
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]


def test_the_changelog_has_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "\n## [Unreleased]\n" in text
    # Keep a Changelog's kinds of change, and the SQLite URL note users must not miss.
    assert "\n### Added\n" in text and "\n### Changed\n" in text
    assert "write `sqlite:////var/cache.db`" in text
