"""Run a benchmark as CI does: ``python -m benchmarks.NAME`` at the repo root, which must exit 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, *args: str, timeout: int = 900) -> None:
    """Run benchmark ``name`` (a module name, ``"fuzz_live"``, or its file name, ``"fuzz_live.py"``)."""
    module = f"benchmarks.{name.removesuffix('.py')}"
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
