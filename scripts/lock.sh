#!/usr/bin/env bash
# Re-resolve the two locks from pyproject.toml (uv, installed into .venv from the dev lock):
#   requirements/dev.lock     every package of the dev and demo extras and the tools, pinned;
#                             resolved for every Python >= 3.11 and platform (--universal)
#   requirements/oldest.lock  the same extras at the lowest versions pyproject.toml allows for
#                             our direct dependencies (--resolution lowest-direct)
# Extra arguments go to the dev lock's `uv pip compile`, e.g. --upgrade or
# --upgrade-package redis. Used by scripts/upgrade-deps.sh; run it alone after editing the
# dependencies in pyproject.toml (a new dependency is added at its newest version, the rest
# stay where they are).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh dev
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/dev.lock uv
uv=(.venv/bin/uv pip compile --quiet --universal --python-version 3.11 --extra dev --extra demo)
"${uv[@]}" "$@" pyproject.toml requirements/tools.in -o requirements/dev.lock
"${uv[@]}" --resolution lowest-direct pyproject.toml -o requirements/oldest.lock
