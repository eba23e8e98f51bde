#!/usr/bin/env bash
# Create a virtualenv (if needed) and install sse-cache into it with the given extras, every
# package at the version the committed lock names.
# Usage: bash scripts/venv.sh [EXTRAS]   e.g. "dev"; prints nothing when already up to date.
#   VENV=dir   the virtualenv (default .venv)
#   LOCK=file  the lock of library versions (default requirements/dev.lock; scripts/test-oldest.sh
#              passes requirements/oldest.lock, the oldest versions pyproject.toml allows)
# Only pip is needed: the lock is a fully pinned constraints file (made by uv, see
# scripts/upgrade-deps.sh), and pip installs from it without uv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
lock="${LOCK:-requirements/dev.lock}"
tools="requirements/dev.lock"  # pip and the build backend always come from the dev lock
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "sse-cache needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
    exit 1
fi
[ -f "$lock" ] || { echo "no lock file $lock" >&2; exit 1; }
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "${pip[@]}" install -c "$tools" pip
fi
# Reinstall only when pyproject.toml, a lock or the extras changed.
stamp="$venv/.sse-cache-installed"
want="$(cat pyproject.toml "$lock" "$tools" | sha256sum | cut -c1-16) ${extras}"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    spec="."
    [ -n "$extras" ] && spec=".[${extras}]"
    "${pip[@]}" install -c "$tools" hatchling editables
    # Without build isolation, so that the build backend is the locked one as well.
    "${pip[@]}" install --no-build-isolation -c "$lock" -e "$spec"
    echo "$want" >> "$stamp"
fi
