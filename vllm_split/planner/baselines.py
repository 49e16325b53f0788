"""Baselines the DP is compared against. Their rules are fixed: do not weaken them.

* ``server_only``: the server runs every node (``split_layer = 0``); it meets the SLA or
  not, it is never changed.
* ``greedy`` (the rule a practitioner writes without the DP). Feasibility is judged with
  the same ticked latency model as the DP, with every node not yet decided on the server:

  - prefix: start from server-only; move node ``k`` (k = 0, 1, ...) to the client while
    the placement with client ``[0, k+1)`` meets the SLA; stop at the first violation.
  - U: run the prefix rule to get ``k``; then move trailing nodes to the client one at a
    time from the output (``N-1, N-2, ...``, never below ``k``) while the SLA holds; stop
    at the first violation.
  - general (per-node first-fit): walk the nodes in forward order; put node ``i`` on the
    client if the placement "decided nodes as decided, node i on the client, nodes after
    i on the server" meets the SLA, else leave it on the server and go on to node i+1.

  If server-only breaks the SLA, greedy returns server-only marked infeasible.

  ``client_prefix = c`` pins nodes ``[0, c)`` on the client (nodes the server cannot run,
  such as the embedding that holds the token ids): the prefix and U rules then start from
  client ``[0, c)`` instead of server-only, and return it marked infeasible if it breaks
  the SLA. The admission controller's ``placement=greedy`` is this rule.
* ``client_max``: the placement of the shape with the most client nodes that meets the
  SLA (the DP with a unit workload per node); the fastest placement when none does.
"""

from __future__ import annotations

from itertools import accumulate

from .dp import solve_min_work
from .fastest import solve_fastest
from .evaluate import TickedProblem, compile_ticks, meets_ticks
from .plan import DEFAULT_TICK_S, _check_inputs, result_for
from .problem import SLA, LayerGraph, NetworkSpec, Placement, PlannerInputError, PlanResult, Shape
from .shapes import automaton_for


def server_only(graph: LayerGraph, network: NetworkSpec, sla: SLA) -> PlanResult:
    """Every node on the server."""
    _check_inputs(graph, network, sla, Shape.PREFIX)
    return result_for(graph, network, sla, Placement.prefix(0, graph.num_nodes), method="server_only")


def _prefix_sums(values: list[int]) -> list[int]:
    return [0, *accumulate(values)]


class _UShapeLatency:
    """O(1) ticked latency of the U placement client ``[0, k)`` + ``[m, N)``, ``k <= m``."""

    def __init__(self, p: TickedProblem) -> None:
        self.p = p
        self.cp, self.cd = _prefix_sums(p.client_prefill), _prefix_sums(p.client_decode)
        self.sp, self.sd = _prefix_sums(p.server_prefill), _prefix_sums(p.server_decode)

    def meets(self, k: int, m: int) -> bool:
        p, n = self.p, self.p.num_nodes
        if k == m:  # everything on the client
            return meets_ticks(p, self.cp[n], self.cd[n])
        t1 = self.cp[k] + p.up_prefill[k] + self.sp[m] - self.sp[k]
        t2 = self.cd[k] + (p.up_decode[k] if k else 0) + self.sd[m] - self.sd[k]
        if m < n:
            t1 += p.down_prefill[m] + self.cp[n] - self.cp[m]
            t2 += p.down_decode[m] + self.cd[n] - self.cd[m]
        else:
            t1 += p.down_prefill[n]
        if (k > 0) != (m < n):  # node 0 and node N-1 on different sides
            t2 += p.down_decode[0] if k > 0 else p.up_decode[0]
        return meets_ticks(p, t1, t2)


def _greedy_general(p: TickedProblem) -> tuple[bool, ...] | None:
    n = p.num_nodes
    s1 = _prefix_sums(p.server_prefill)
    s2 = _prefix_sums(p.server_decode)

    def closed(i: int, t1: int, t2: int, last_client: bool, first_client: bool):
        """Latency when nodes i..N-1 run on the server after the decided part."""
        if i == n:
            last_server = not last_client
        else:
            last_server = True
            t1 += s1[n] - s1[i]
            t2 += s2[n] - s2[i]
            if last_client:
                t1 += p.up_prefill[i]
                t2 += p.up_decode[i]
        if last_server:
            t1 += p.down_prefill[n]
            if first_client:
                t2 += p.down_decode[0]
        elif not first_client:
            t2 += p.up_decode[0]
        return t1, t2

    if not meets_ticks(p, *closed(0, p.up_prefill[0], 0, False, False)):
        return None
    mask: list[bool] = []
    t1 = t2 = 0  # latency of the decided nodes 0..i-1, edge 0 included
    for i in range(n):
        prev_client = mask[-1] if mask else True  # the client holds the input tokens
        first_client = mask[0] if mask else True
        c1 = t1 + p.client_prefill[i] + (p.down_prefill[i] if i and not prev_client else 0)
        c2 = t2 + p.client_decode[i] + (p.down_decode[i] if i and not prev_client else 0)
        if meets_ticks(p, *closed(i + 1, c1, c2, True, first_client)):
            mask.append(True)
            t1, t2 = c1, c2
            continue
        mask.append(False)
        if i == 0:
            t1 += p.up_prefill[0]
        elif prev_client:
            t1 += p.up_prefill[i]
            t2 += p.up_decode[i]
        t1 += p.server_prefill[i]
        t2 += p.server_decode[i]
    return tuple(mask)


def greedy(graph: LayerGraph, network: NetworkSpec, sla: SLA, *, shape: Shape = Shape.PREFIX,
           tick_s: float = DEFAULT_TICK_S, client_prefix: int = 0) -> PlanResult:
    """The greedy baseline of the module docstring for ``shape``, starting from client
    ``[0, client_prefix)`` (server-only by default)."""
    shape = _check_inputs(graph, network, sla, shape)
    n = graph.num_nodes
    if isinstance(client_prefix, bool) or not isinstance(client_prefix, int) or not 0 <= client_prefix <= n:
        raise PlannerInputError(f"client_prefix must be an int in [0, {n}] (the graph has {n} nodes), "
                                f"got {client_prefix!r}")
    if client_prefix and shape is Shape.GENERAL:
        raise PlannerInputError(f"client_prefix applies to the prefix and U shapes, not general; "
                                f"got client_prefix {client_prefix}")
    p = compile_ticks(graph, network, sla, tick_s)
    if shape is Shape.GENERAL:
        mask = _greedy_general(p)
        if mask is None:
            return result_for(graph, network, sla, Placement.from_mask([False] * n, shape),
                              method="greedy", feasible=False, tick_s=tick_s)
        return result_for(graph, network, sla, Placement.from_mask(mask, shape),
                          method="greedy", feasible=True, tick_s=tick_s)
    u = _UShapeLatency(p)
    k = client_prefix
    feasible = u.meets(k, n)
    while feasible and k < n and u.meets(k + 1, n):
        k += 1
    m = n
    if shape is Shape.U:
        while feasible and m - 1 >= k and u.meets(k, m - 1):
            m -= 1
    mask = tuple(i < k or i >= m for i in range(n))
    return result_for(graph, network, sla, Placement.from_mask(mask, shape),
                      method="greedy", feasible=feasible, tick_s=tick_s)


def client_max(graph: LayerGraph, network: NetworkSpec, sla: SLA, *, shape: Shape = Shape.PREFIX,
               tick_s: float = DEFAULT_TICK_S) -> PlanResult:
    """The placement of ``shape`` with the most client nodes that meets ``sla``."""
    shape = _check_inputs(graph, network, sla, shape)
    p = compile_ticks(graph, network, sla, tick_s)
    auto = automaton_for(shape)
    solved = solve_min_work(p, auto, [1] * p.num_nodes)
    mask = solve_fastest(p, auto) if solved is None else solved[1]
    return result_for(graph, network, sla, Placement.from_mask(mask, shape),
                      method="client_max", feasible=solved is not None, tick_s=tick_s)
