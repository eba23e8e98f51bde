#!/usr/bin/env bash
# The deliberate upgrade: re-resolve requirements/dev.lock to the newest versions that
# pyproject.toml allows, reinstall .venv from it, and run the whole suite (and the oldest-
# versions run). Prints what changed; commit the lock only when everything passed.
# Usage: bash scripts/upgrade-deps.sh [--upgrade-package NAME ...]   (default: everything)
set -euo pipefail
cd "$(dirname "$0")/.."
before="$(mktemp)"
grep -E '^[A-Za-z0-9_.-]+==' requirements/dev.lock | sort > "$before"
if [ "$#" -eq 0 ]; then set -- --upgrade; fi
bash scripts/lock.sh "$@"
echo "== changed in requirements/dev.lock:"
diff <(cat "$before") <(grep -E '^[A-Za-z0-9_.-]+==' requirements/dev.lock | sort) \
    | sed -n 's/^> /  now /p; s/^< /  was /p' || true
rm -f "$before"
bash scripts/venv.sh dev
bash scripts/test.sh
bash scripts/test-oldest.sh
