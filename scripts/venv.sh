#!/usr/bin/env bash
# Create .venv (if needed) and install sse-cache into it with the given extras.
# Usage: bash scripts/venv.sh [EXTRAS]   e.g. "dev"; prints nothing when already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "sse-cache needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
# Reinstall only when pyproject.toml or the extras changed.
stamp=".venv/.sse-cache-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) ${extras}"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    spec="."
    [ -n "$extras" ] && spec=".[${extras}]"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    echo "$want" >> "$stamp"
fi
