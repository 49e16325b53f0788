"""What the admission controller measures, as the policy plans with it (pure): the load a
newcomer meets (:func:`server_load`, from the live cost model) and the latency model's
measured error (:func:`model_error`, the margin :func:`calibrated` divides bounds by).

Process: the API server (:mod:`vllm_split.api.admission` calls these;
:mod:`vllm_split.control.policy` and :mod:`vllm_split.control.ushape_policy` plan with them).
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from vllm_split.control.live_cost import LiveCostModel
from vllm_split.control.request_graph import ServerLoad
from vllm_split.planner import SLA


def server_load(costs: LiveCostModel, *, admitted_ages_s: Collection[float], num_layers: int,
                now: float) -> ServerLoad:
    """The load a new session meets, ``now`` on the step records' wall clock.

    The batch size is measured, not counted: the mean requests per engine step over the
    live model's window (``occupancy_window_s``). A split session whose client computes
    misses steps (a fast client runs in every other one), so the sessions in flight
    overstate the batch. The sessions admitted within the window (``admitted_ages_s``:
    seconds since each admitted session's admission, on any clock) are not fully in the
    measurement yet: each adds the part of the window it has not been measured for, ``1 -
    age / window``, so the estimate never exceeds the measured mean plus the sessions
    admitted. Also the recent step time (a step of the admitted sessions at ``k = 0`` when
    none ran yet), the utilisation and the lowest split layer of the recent steps."""
    window = costs.occupancy_window_s
    unmeasured = sum(max(0.0, 1.0 - age / window) for age in admitted_ages_s)
    occupancy = costs.occupancy(now) + unmeasured
    recent_step = costs.recent_step_s(now)
    if occupancy and not recent_step:  # admitted sessions not running yet: a step of them
        recent_step = costs.cost.step_s(num_layers, num_layers * occupancy)
    return ServerLoad(cost=costs.cost, occupancy=occupancy, recent_step_s=recent_step,
                      utilization=costs.utilization(now),
                      min_split_layer=costs.recent_min_split_layer(num_layers, now))


TPOT_ERROR_QUANTILE = 0.75  # of the recent ratios: most sessions at the edge keep their bound
TPOT_ERROR_MIN_SAMPLES = 5
TPOT_ERROR_MAX = 3.0
BIAS_QUANTILE = 0.5  # of every kept ratio, fresh or not: the model's standing bias
BIAS_MAX = 1.5  # the standing bias never holds round trips back by more than this


def model_error(ratios: Collection[float], *, quantile: float = TPOT_ERROR_QUANTILE,
                cap: float = TPOT_ERROR_MAX) -> float:
    """The planning margin from recent split sessions' measured / predicted TPOT (or TTFT): their
    ``quantile`` (:data:`TPOT_ERROR_QUANTILE`), within [1, ``cap``] (1 with fewer than
    :data:`TPOT_ERROR_MIN_SAMPLES`: nothing measured yet). Never below 1: a pessimistic
    model is not made optimistic."""
    values = sorted(r for r in ratios if r > 0)
    if len(values) < TPOT_ERROR_MIN_SAMPLES:
        return 1.0
    q = values[min(len(values) - 1, int(quantile * len(values)))]
    return min(cap, max(1.0, q))


def standing_bias(ratios: Collection[float]) -> float:
    """The margin when too few sessions ended recently for :func:`model_error`: the median of
    every kept ratio however old (:data:`BIAS_QUANTILE`), at most :data:`BIAS_MAX`. The
    latency model of round-trip sessions errs one way (measured: their TPOT 1.07 / 1.22 /
    1.62 times the prediction at the quartiles), and round trips came ~4 per 30 s at low
    load, so a margin that fell to 1 between them planned every offload at the SLA's edge."""
    return model_error(ratios, quantile=BIAS_QUANTILE, cap=BIAS_MAX)


def calibrated(sla: SLA, tpot_error: float, ttft_error: float = 1.0) -> SLA:
    """``sla`` with its TPOT and TTFT bounds divided by the model's measured errors (>= 1)."""
    return replace(sla, tpot_s=sla.tpot_s / max(1.0, tpot_error) if sla.tpot_s is not None else None,
                   ttft_s=sla.ttft_s / max(1.0, ttft_error) if sla.ttft_s is not None else None)
