"""Public entry point: plan one request's placement with the DP."""

from __future__ import annotations

from .dp import solve_min_work
from .fastest import solve_fastest
from .evaluate import compile_ticks, evaluate
from .problem import SLA, LayerGraph, NetworkSpec, Placement, PlannerInputError, PlanResult, Shape
from .shapes import automaton_for

DEFAULT_TICK_S = 1e-5  # 10 us: latency granularity of the DP (see dp.py for the guarantee)


def result_for(graph: LayerGraph, network: NetworkSpec, sla: SLA, placement: Placement, *,
               method: str, feasible: bool | None = None, tick_s: float | None = None) -> PlanResult:
    """Package a placement with its exact latencies; ``feasible`` defaults to the exact check."""
    ttft, tpot, e2e, work = evaluate(graph, network, placement)
    if feasible is None:
        feasible = sla.is_met(ttft, tpot, e2e)
    return PlanResult(placement=placement, feasible=feasible, ttft_s=ttft, tpot_s=tpot,
                      e2e_s=e2e, server_work=work, method=method, tick_s=tick_s)


def _check_inputs(graph: LayerGraph, network: NetworkSpec, sla: SLA, shape: Shape) -> Shape:
    for value, kind in ((graph, LayerGraph), (network, NetworkSpec), (sla, SLA)):
        if not isinstance(value, kind):
            raise PlannerInputError(f"expected a {kind.__name__}, got {type(value).__name__}")
    try:
        return Shape(shape)
    except ValueError as exc:
        allowed = ", ".join(s.value for s in Shape)
        raise PlannerInputError(f"shape must be one of {allowed}; got {shape!r}") from exc


def plan(graph: LayerGraph, network: NetworkSpec, sla: SLA, *, shape: Shape = Shape.PREFIX,
         tick_s: float = DEFAULT_TICK_S) -> PlanResult:
    """Minimum-server-workload placement of ``shape`` that meets ``sla``.

    Exact over latencies rounded up to ``tick_s`` (see :mod:`.dp`). When no placement of
    the shape meets the SLA, the result has ``feasible=False`` and holds the fastest
    placement (minimum ``TTFT + (n-1) TPOT``, then minimum TPOT).
    """
    shape = _check_inputs(graph, network, sla, shape)
    problem = compile_ticks(graph, network, sla, tick_s)
    auto = automaton_for(shape)
    solved = solve_min_work(problem, auto, problem.work)
    if solved is None:
        mask = solve_fastest(problem, auto)
        return result_for(graph, network, sla, Placement.from_mask(mask, shape),
                          method="dp", feasible=False, tick_s=tick_s)
    _, mask = solved
    return result_for(graph, network, sla, Placement.from_mask(mask, shape),
                      method="dp", feasible=True, tick_s=tick_s)
