"""The server fixtures' policy for a missing binary: skip (naming the apt package) outside
CI, fail with CI=true."""

from __future__ import annotations

import pytest

from servers import require_binary


def test_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt package 'pkg-xyz'"):
        require_binary("no-such-server-binary-xyz", "pkg-xyz")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true.*apt package 'pkg-xyz'"):
        require_binary("no-such-server-binary-xyz", "pkg-xyz")


def test_installed_binary_is_found() -> None:
    assert require_binary("sh", "dash").endswith("/sh")
