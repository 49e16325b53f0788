"""The split scheduler's step composition (grouped alternation, auto's choice, the
turnarounds it plans with) on the stand-in scheduler of ``test_scheduler_gather``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from tests.unit.engine.test_scheduler_gather import HIDDEN, Sched, clock  # noqa: E402,F401 (fixture)
from vllm_split.engine.composition import Choice  # noqa: E402
from vllm_split.wire.contract import EXTRA_ARGS_KEY  # noqa: E402

N = 30


def make(composition: str) -> Sched:
    s = Sched({"vllm_split": {"composition": composition}})
    s.vllm_config.model_config.hf_config.num_hidden_layers = N
    s.split_num_layers = N
    return s


def request(req_id: str, k: int | None, *, tpot_s: float | None = None):
    """A decoding request at split layer ``k`` (None: an ordinary one)."""
    extra = {} if k is None else {EXTRA_ARGS_KEY: {"session": f"s-{req_id}", "split_layer": k, "tpot_s": tpot_s}}
    return SimpleNamespace(request_id=req_id, sampling_params=SimpleNamespace(extra_args=extra),
                           num_tokens_with_spec=3, num_output_placeholders=0, num_computed_tokens=3,
                           num_prompt_tokens=2)


def ready(s: Sched, req, turnaround_s: float | None = None) -> None:
    """Its rows are all there (the last one ``turnaround_s`` after its token left)."""
    session = f"s-{req.request_id}"
    start = s.split_store.num_rows(session)
    for pos in range(start, req.num_tokens_with_spec):
        row = torch.zeros(1, HIDDEN).numpy().tobytes()
        assert s.split_deliver(session, pos, 1, row, turnaround_s) is None


def scheduled(s: Sched) -> list[str]:
    s.seen.clear()
    s.schedule()
    return s.seen[0][0]


def test_grouped_alternates_high_steps_with_low_ones_and_defers_without_losing_slots(clock):
    s = make("grouped")
    plain, low, high1, high2 = request("plain", None), request("low", 7), request("h1", 22), request("h2", 22)
    for r in (plain, low, high1, high2):
        s.add_request(r)
        if r is not plain:
            ready(s, r, 0.03)
    assert s._split_compose() == Choice("grouped", 22)
    assert scheduled(s) == ["h1", "h2"]  # a high step: layers [22, 30) only
    assert s.seen[0][2] == 2 and [r.request_id for r in s.running] == ["plain", "low", "h1", "h2"]  # slots kept
    assert scheduled(s) == ["plain", "low", "h1", "h2"]  # a low step (the high ones were ready too: they run)
    assert scheduled(s) == ["h1", "h2"]
    for r in (high1, high2):  # their activations are out: no high step to make, nothing deferred
        r.num_tokens_with_spec += 1
    assert scheduled(s) == ["plain", "low"]
    assert scheduled(s) == ["plain", "low"]
    assert s.split_composition_steps == {}  # the stand-in schedules no tokens: no step counted


def test_auto_groups_split_only_batches_of_slow_clients_and_spares_ordinary_requests(clock):
    s = make("auto")
    split = [request(f"a{i}", 15) for i in range(6)] + [request(f"b{i}", 22) for i in range(6)]
    for r in split:
        s.add_request(r)
        ready(s, r, 0.03)  # Wi-Fi-like clients: 30 ms from token to activation
    assert s._split_compose() == Choice("grouped", 22)
    s.add_request(request("plain", None))  # an ordinary request may not get slower
    assert s._split_compose() == Choice("gathered")


def test_auto_keeps_gathering_loopback_clients(clock):
    s = make("auto")
    for i, k in enumerate((0, 7, 15, 22, 0, 7, 15, 22)):
        r = request(f"r{i}", k)
        s.add_request(r)
        ready(s, r, 0.002)
    assert s._split_compose() == Choice("gathered")


def test_fixed_compositions_and_what_they_drop(clock):
    assert make("mixed")._split_compose() == Choice("mixed")
    assert make("mixed").split_gather is None  # mixed never holds a step
    s = make("gathered")
    assert s._split_compose() == Choice("gathered") and s.split_gather is not None
    r = request("x", 7, tpot_s=0.2)
    s.add_request(r)
    ready(s, r, 0.01)
    assert s._split_bounds["x"] == 0.2 and list(s._split_turnarounds["s-x"]) == [0.01, 0.01, 0.01]
    s._free_request(r)
    assert "x" not in s._split_bounds and "s-x" not in s._split_turnarounds


def test_the_composer_refits_its_step_costs_on_the_engines_own_steps(clock):
    from vllm_split.wire.contract import StepRecord

    s = make("auto")
    assert s._split_fitted_cost().layer_s == pytest.approx(0.00195)  # no steps yet: the reference defaults
    fixed, layer, row = 0.008, 0.003, 0.0002  # a slower machine
    for i, (calls, rows) in enumerate([(30, 30 * b) for b in (1, 2, 4, 8)] * 20 + [(15, 15 * b) for b in (2, 6)] * 20):
        s.split_steps.records.append(StepRecord(i + 1, 0.0, fixed + layer * calls + row * rows, calls, rows, 1, 1))
    fit = s._split_fitted_cost()
    assert (fit.fixed_s, fit.layer_s, fit.row_s) == (pytest.approx(fixed, rel=0.05), pytest.approx(layer, rel=0.05),
                                                     pytest.approx(row, rel=0.05))
