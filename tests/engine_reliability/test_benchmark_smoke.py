"""Smoke runs of the reliability benchmarks against this package's server (tiny sizes).

The full runs (10,000 fuzz frames, a 5-minute soak at 64 sessions) write results/; here
the scripts must run, find nothing wrong, and write the report fields the docs cite.
"""
from __future__ import annotations

import json

import pytest

from tests.support.benchmarks import run

pytestmark = pytest.mark.engine


def test_fuzz_live_smoke(box, tmp_path):
    out = tmp_path / "fuzz.json"
    run("fuzz_live", "--url", box.url, "--frames", "300", "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert report["frames_tried"] >= 300 and report["engine_crashes"] == 0 and report["leaked_kv_blocks"] == 0
    assert report["rejections_without_error_frame"] == 0 and report["internal_errors"] == 0
    assert report["reference_unchanged"] and report["valid_activations_between"] > 0
    assert "Exception in ASGI application" not in box.server.log_path.read_text(errors="replace")


def test_soak_smoke(box, tmp_path):
    out = tmp_path / "soak.json"
    run("soak", "--quick", "--url", box.url, "--out", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert report["completed"] > 0 and report["wrong_outputs"] == 0 and report["failed"] == 0
    assert report["leaked_kv_blocks"] == 0 and report["requests_left"] == 0
    assert report["drops"] > 0 and report["reconnects"] > 0  # connections dropped and were resumed
