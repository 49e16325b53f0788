"""Latency and workload of a given placement, in exact floats and in integer ticks.

The latency model (shared by the DP, the baselines and brute force):

* TTFT = the prompt's token ids go from the client to node 0's side (free if node 0 is on
  the client), every node runs its prefill on its side, every inner edge whose two ends
  differ sends the prefill activation (uplink C->S, downlink S->C), and the first sampled
  token goes from node N-1's side to the client (free if node N-1 is on the client).
* TPOT = one decode step in steady state: every node runs one decode step on its side,
  inner edges that switch side send the decode activation, and the sampled token is fed
  back from node N-1's side to node 0's side (edge 0, free when both sides match). When
  both ends are on the server the token's delivery to the client overlaps the next step,
  so it is not on the per-token critical path.
* A message of B bytes costs ``rtt / 2 + 8 B / bandwidth`` in its direction.
* Server workload = the sum of ``server_work`` over the server's nodes.

Ticks: every latency term is rounded *up* to a multiple of ``tick_s`` and every SLA bound
rounded *down* (with a 1e-9 relative margin for float rounding), so a placement whose
ticked latencies meet the ticked bounds meets the SLA in exact arithmetic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .problem import SLA, LayerGraph, NetworkSpec, Placement, PlannerInputError, Shape

NO_BOUND = 1 << 62  # ticked bound standing for "unbounded"


def evaluate(graph: LayerGraph, network: NetworkSpec, placement: Placement) -> tuple[float, float, float, float]:
    """Exact ``(ttft_s, tpot_s, e2e_s, server_work)`` of ``placement`` on ``graph``."""
    if placement.num_nodes != graph.num_nodes:
        raise PlannerInputError(
            f"placement has {placement.num_nodes} nodes but the graph has {graph.num_nodes}")
    mask = placement.on_client
    nodes, n = graph.nodes, graph.num_nodes
    ttft = 0.0 if mask[0] else network.uplink_s(graph.prefill_edge_bytes[0])
    tpot = 0.0
    work = 0.0
    for i, node in enumerate(nodes):
        if i and mask[i] != mask[i - 1]:
            if mask[i]:
                ttft += network.downlink_s(graph.prefill_edge_bytes[i])
                tpot += network.downlink_s(graph.decode_edge_bytes[i])
            else:
                ttft += network.uplink_s(graph.prefill_edge_bytes[i])
                tpot += network.uplink_s(graph.decode_edge_bytes[i])
        if mask[i]:
            ttft += node.client_prefill_s
            tpot += node.client_decode_s
        else:
            ttft += node.server_prefill_s
            tpot += node.server_decode_s
            work += node.server_work
    if not mask[n - 1]:
        ttft += network.downlink_s(graph.prefill_edge_bytes[n])
    if mask[n - 1] != mask[0]:
        token = graph.decode_edge_bytes[0]
        tpot += network.downlink_s(token) if mask[0] else network.uplink_s(token)
    return ttft, tpot, ttft + (graph.num_output_tokens - 1) * tpot, work


@dataclass(slots=True)
class TickedProblem:
    """The problem in integer ticks (internal; built by :func:`compile_ticks`)."""

    num_nodes: int
    num_output_tokens: int
    tick_s: float
    client_prefill: list[int]
    client_decode: list[int]
    server_prefill: list[int]
    server_decode: list[int]
    work: list[int]  # server_work in units of 2**-40 of the graph's total
    up_prefill: list[int]  # per edge 0..N: uplink ticks of the prefill activation
    down_prefill: list[int]
    up_decode: list[int]
    down_decode: list[int]
    ttft_bound: int  # NO_BOUND when unbounded
    tpot_bound: int
    e2e_bound: int


def compile_ticks(graph: LayerGraph, network: NetworkSpec, sla: SLA, tick_s: float) -> TickedProblem:
    """Round the problem to ``tick_s`` (latencies up, bounds down)."""
    if not isinstance(tick_s, (int, float)) or not math.isfinite(tick_s) or tick_s <= 0:
        raise PlannerInputError(f"tick_s must be a finite number > 0 seconds, got {tick_s!r}")
    inv = 1.0 / tick_s
    ceil = math.ceil
    nodes = graph.nodes
    total = sum(node.server_work for node in nodes) or 1.0
    half_rtt = network.rtt_s / 2
    up_bits, down_bits = 8.0 / network.uplink_bps, 8.0 / network.downlink_bps
    pe, de = graph.prefill_edge_bytes, graph.decode_edge_bytes

    def bound(value: float | None) -> int:
        return NO_BOUND if value is None else math.floor(value * inv * (1 - 1e-9))

    return TickedProblem(
        num_nodes=graph.num_nodes,
        num_output_tokens=graph.num_output_tokens,
        tick_s=tick_s,
        client_prefill=[ceil(node.client_prefill_s * inv) for node in nodes],
        client_decode=[ceil(node.client_decode_s * inv) for node in nodes],
        server_prefill=[ceil(node.server_prefill_s * inv) for node in nodes],
        server_decode=[ceil(node.server_decode_s * inv) for node in nodes],
        work=[round(node.server_work / total * (1 << 40)) for node in nodes],
        up_prefill=[ceil((half_rtt + b * up_bits) * inv) for b in pe],
        down_prefill=[ceil((half_rtt + b * down_bits) * inv) for b in pe],
        up_decode=[ceil((half_rtt + b * up_bits) * inv) for b in de],
        down_decode=[ceil((half_rtt + b * down_bits) * inv) for b in de],
        ttft_bound=bound(sla.ttft_s),
        tpot_bound=bound(sla.tpot_s),
        e2e_bound=bound(sla.e2e_s),
    )


def evaluate_ticks(problem: TickedProblem, on_client: tuple[bool, ...]) -> tuple[int, int, int]:
    """Ticked ``(ttft, tpot, work)`` of a client mask (used by brute force and baselines)."""
    p = problem
    n = p.num_nodes
    ttft = 0 if on_client[0] else p.up_prefill[0]
    tpot = work = 0
    for i in range(n):
        client = on_client[i]
        if i and client != on_client[i - 1]:
            if client:
                ttft += p.down_prefill[i]
                tpot += p.down_decode[i]
            else:
                ttft += p.up_prefill[i]
                tpot += p.up_decode[i]
        if client:
            ttft += p.client_prefill[i]
            tpot += p.client_decode[i]
        else:
            ttft += p.server_prefill[i]
            tpot += p.server_decode[i]
            work += p.work[i]
    if not on_client[n - 1]:
        ttft += p.down_prefill[n]
    if on_client[n - 1] != on_client[0]:
        tpot += p.down_decode[0] if on_client[0] else p.up_decode[0]
    return ttft, tpot, work


def meets_ticks(problem: TickedProblem, ttft: int, tpot: int) -> bool:
    return (ttft <= problem.ttft_bound and tpot <= problem.tpot_bound
            and ttft + (problem.num_output_tokens - 1) * tpot <= problem.e2e_bound)


def enumerate_placements(num_nodes: int, shape: Shape) -> list[Placement]:
    """Every placement of ``shape`` on ``num_nodes`` nodes (for brute force; 2^N for general)."""
    if shape is Shape.PREFIX:
        return [Placement.prefix(k, num_nodes) for k in range(num_nodes + 1)]
    if shape is Shape.U:
        masks = {tuple(i < k or i >= m for i in range(num_nodes))
                 for k in range(num_nodes + 1) for m in range(k, num_nodes + 1)}
    else:
        masks = set(itertools.product((False, True), repeat=num_nodes))
    return [Placement.from_mask(mask, shape) for mask in sorted(masks)]
