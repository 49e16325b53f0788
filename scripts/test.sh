#!/usr/bin/env bash
# The tests: set up (first run: a few minutes), then unit tests and real-engine tests.
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh -m "not engine" for the fast ones
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup.sh"
cd "$repo"
exec "${VENV:-$repo/.venv}/bin/python" -m pytest "$@"
