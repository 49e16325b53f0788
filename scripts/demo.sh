#!/usr/bin/env bash
# The demo: set up (first run: a few minutes), then split inference on the real model.
#   scripts/demo.sh [--split-layer K] [--prompt "..."] [--max-tokens N]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup.sh"
cd "$repo"
# the demo uses harness/ (the test and demo tooling, not installed): the repo root is its home
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${VENV:-$repo/.venv}/bin/python" scripts/demo.py "$@"
