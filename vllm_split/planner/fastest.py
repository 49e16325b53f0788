"""The fastest placement of a shape, returned when no placement meets the SLA.

A single-criterion shortest path over (node, automaton state): minimise
``TTFT + (n-1) TPOT`` in ticks, ties broken by lower TPOT then lower TTFT
(lexicographic sums are additive, so the per-state minimum is exact). ``O(N * |Q|)``.
"""

from __future__ import annotations

from .evaluate import TickedProblem
from .shapes import CLIENT, Automaton


def solve_fastest(p: TickedProblem, auto: Automaton) -> tuple[bool, ...]:
    """The placement minimising ``(TTFT + (n-1) TPOT, TPOT)`` lexicographically."""
    n, m = p.num_nodes, p.num_output_tokens - 1
    locs, first = auto.locations, auto.first
    cost = [None] * len(locs)  # per state: (e2e, tpot, ttft, parent-chain)
    for q in auto.initial:
        t1 = p.client_prefill[0] if locs[q] == CLIENT else p.up_prefill[0] + p.server_prefill[0]
        t2 = p.client_decode[0] if locs[q] == CLIENT else p.server_decode[0]
        cost[q] = (t1 + m * t2, t2, t1, (q, None))
    for i in range(1, n):
        new = [None] * len(locs)
        for q, q_preds in enumerate(auto.predecessors):
            client = locs[q] == CLIENT
            for pq in q_preds:
                prev = cost[pq]
                if prev is None:
                    continue
                a1 = p.client_prefill[i] if client else p.server_prefill[i]
                a2 = p.client_decode[i] if client else p.server_decode[i]
                if locs[pq] != locs[q]:
                    a1 += p.down_prefill[i] if client else p.up_prefill[i]
                    a2 += p.down_decode[i] if client else p.up_decode[i]
                cand = (prev[2] + a1 + m * (prev[1] + a2), prev[1] + a2, prev[2] + a1, (q, prev[3]))
                if new[q] is None or cand[:3] < new[q][:3]:
                    new[q] = cand
        cost = new
    best = None
    for q, c in enumerate(cost):
        if c is None:
            continue
        t1 = c[2] + (p.down_prefill[n] if locs[q] != CLIENT else 0)
        t2 = c[1]
        if locs[q] != first[q]:
            t2 += p.down_decode[0] if first[q] == CLIENT else p.up_decode[0]
        key = (t1 + m * t2, t2, t1)
        if best is None or key < best[0]:
            best = (key, c[3])
    mask = []
    chain = best[1]
    while chain is not None:
        mask.append(locs[chain[0]] == CLIENT)
        chain = chain[1]
    return tuple(reversed(mask))
