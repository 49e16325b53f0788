"""The placement DP: minimum server workload subject to the SLA, exact in integer ticks.

Formulation (a resource-constrained shortest path over the chain):

* state ``(node i, automaton state q)``; ``q`` fixes node i's location, node 0's location
  and the shape's phase (see :mod:`.shapes`); four location transitions between adjacent
  nodes (C->C, C->S, S->S, S->C), a switch paying the edge's transfer in both passes;
* a *label* at a state is a partial placement of nodes ``0..i`` summarised by
  ``(work, ttft_ticks, tpot_ticks)``. Prefill and decode latencies are kept apart (a 2-D
  latency state), so TTFT, TPOT and the end-to-end bound ``TTFT + (n-1) TPOT`` are all
  checked exactly; each is monotone in both coordinates, so a label dominated on all three
  numbers by another label at the same state can be dropped without losing the optimum.
  This Pareto front replaces a dense ``(i, q, t_prefill, t_decode)`` table.
* extra exact pruning: (a) *reachability*: drop a label if even the fastest completion
  (every later node on its faster side, transfers ignored) breaks a bound; (b) *bound*:
  closing a partial placement by running the rest on the server gives a complete
  placement (the incumbent); a label is dropped when a relaxation (fractional knapsack
  with the best workload-per-latency ratio of the remaining nodes, transfers ignored)
  shows it cannot beat the incumbent.

Exactness: over integer ticks the DP returns the minimum workload among the shape's
placements whose ticked latencies meet the ticked SLA (tests check it against brute
force). Ticks round every latency term up and every bound down, so any returned
placement meets the SLA in exact arithmetic; a placement with slack of at least
``(number of terms) * tick_s`` in each bound is never missed.
Complexity: ``O(N * |Q| * F)`` label extensions with ``F`` the front size (at most the
number of distinct ticked latency pairs, in practice a handful).
"""

from __future__ import annotations

from itertools import accumulate

from .evaluate import NO_BOUND, TickedProblem
from .shapes import CLIENT, Automaton

_INF = float("inf")


def _suffix(values: list, op=None) -> list:
    """``out[i] = op(values[i:])`` with ``out[N] = identity`` (sum by default)."""
    if op is None:
        out = list(accumulate(reversed(values)))[::-1]
        out.append(0)
        return out
    out = list(accumulate(reversed(values), op))[::-1]
    return out


def _ratio_bound(work: list[int], delta: list[int]) -> list[float]:
    """Suffix max of work/latency-increase; inf where some node offloads for free."""
    ratios = [(w / d if d > 0 else _INF) if w > 0 else 0.0 for w, d in zip(work, delta)]
    out = list(accumulate(reversed(ratios), max))[::-1]
    out.append(0.0)
    return out


def solve_min_work(p: TickedProblem, auto: Automaton, work: list[int]):
    """Return ``(best_work, on_client_mask)`` or ``None`` when no placement meets the SLA."""
    n = p.num_nodes
    m = p.num_output_tokens - 1
    b1, b2, b3 = p.ttft_bound, p.tpot_bound, p.e2e_bound
    cp, cd, sp, sd = p.client_prefill, p.client_decode, p.server_prefill, p.server_decode
    upp, dnp, upd, dnd = p.up_prefill, p.down_prefill, p.up_decode, p.down_decode
    locs, first, preds = auto.locations, auto.first, auto.predecessors
    stails, ctails = auto.server_tail, auto.client_tail

    # suffix tables indexed by the next node j = i + 1 (entry N is the empty suffix)
    s1, s2, c1, c2 = _suffix(sp), _suffix(sd), _suffix(cp), _suffix(cd)
    lb1 = _suffix([a if a < b else b for a, b in zip(cp, sp)])
    lb2 = _suffix([a if a < b else b for a, b in zip(cd, sd)])
    wsuf = _suffix(work)
    d1 = [a - b for a, b in zip(cp, sp)]
    d2 = [a - b for a, b in zip(cd, sd)]
    neg1 = _suffix([-d if d < 0 else 0 for d in d1])
    neg2 = _suffix([-d if d < 0 else 0 for d in d2])
    rho1 = _ratio_bound(work, d1) if b1 != NO_BOUND else None
    rho2 = _ratio_bound(work, d2) if b2 != NO_BOUND else None
    rho3 = s3 = neg3 = None
    if b3 != NO_BOUND:  # the end-to-end bound's own relaxation
        d3 = [a + m * b for a, b in zip(d1, d2)]
        s3 = [a + m * b for a, b in zip(s1, s2)]
        neg3 = _suffix([-d if d < 0 else 0 for d in d3])
        rho3 = _ratio_bound(work, d3)
    minw = _suffix([w if w > 0 else NO_BOUND for w in work], min) + [NO_BOUND]
    wrap_s = (dnd[0], 0)  # decode token feedback from a server-side last node, by first
    wrap_c = (0, upd[0])  # ... from a client-side last node
    out_s = dnp[n]  # first token to the client from a server-side last node
    # transfer lower bounds: the cheapest switch on any edge j..N-1 (NO_BOUND: none left);
    # no uplink bound for prefill: a completion may end on the client for free there
    up2 = _suffix(upd[:n], min) + [NO_BOUND]
    dn1 = _suffix(dnp[:n], min) + [NO_BOUND]
    dn2 = _suffix(dnd[:n], min) + [NO_BOUND]
    later_c, later_s, c_then_s = auto.later_client, auto.later_server, auto.client_then_server

    best = _INF  # incumbent workload
    best_label = None  # (label, next node, tail on client?) of the incumbent

    def bounds(q, j):
        """Label-independent bound terms of state q before node j (see admit)."""
        # Lower bounds on what completions pay in transfers and output edges: x for those
        # that put at least one more node on the client (a server-side label first pays a
        # downlink switch), e for all of them.
        f = first[q]
        client = locs[q] == CLIENT
        ws, wc = wrap_s[f], wrap_c[f]
        if client:
            x1 = 0  # ending on the client needs no output edge
            x2 = wc
            if later_s[q] and up2[j] + ws < wc:
                x2 = up2[j] + ws
            e1, e2 = x1, x2
        else:
            x1 = dn1[j]
            x2 = wc
            if c_then_s[q] and up2[j] + ws < wc:
                x2 = up2[j] + ws
            x2 += dn2[j]
            e1, e2 = out_s, ws
            if later_c[q]:
                e1 = x1 if x1 < e1 else e1
                e2 = x2 if x2 < e2 else e2
        # label (t1, t2) is reachable iff t1 + l1 <= b1, t2 + l2 <= b2, ...; the slack for
        # client nodes in bound k is K_k - (t1, t2, t1 + m t2)
        l1, l2 = e1 + lb1[j], e2 + lb2[j]
        k1 = b1 - s1[j] + neg1[j] - x1
        k2 = b2 - s2[j] + neg2[j] - x2
        k3 = b3 - s3[j] + neg3[j] - x1 - m * x2 if rho3 is not None else 0
        return (client, l1, l2, l1 + m * l2, k1, k2, k3,
                wsuf[j] if client or later_c[q] else 0)

    def admit(w, t1, t2, q, parent, j, c):
        """Prune, close or keep a label placing nodes 0..j-1 (returns it to keep, or None)."""
        nonlocal best, best_label
        client, l1, l2, l3, k1, k2, k3, gain = c
        if t1 + l1 > b1 or t2 + l2 > b2 or t1 + m * t2 + l3 > b3:
            return None  # even the fastest completion breaks a bound
        # upper bound on the remaining work the client can still take: a fractional
        # knapsack per bound (best work/latency ratio of the remaining nodes)
        if gain and rho1 is not None:
            r = k1 - t1
            if r * rho1[j] < gain:
                gain = r * rho1[j] * 1.000000001 + 1 if r >= 0 else 0
        if gain and rho2 is not None:
            r = k2 - t2
            if r * rho2[j] < gain:
                gain = r * rho2[j] * 1.000000001 + 1 if r >= 0 else 0
        if gain and rho3 is not None:
            r = k3 - t1 - m * t2
            if r * rho3[j] < gain:
                gain = r * rho3[j] * 1.000000001 + 1 if r >= 0 else 0
        if gain < minw[j]:
            gain = 0  # offloading any remaining node with work > 0 is out of reach
        if w + wsuf[j] - gain >= best or j == n:
            return None if j < n else (w, t1, t2, q, parent)
        if ctails[q] >= 0:  # close with the client running nodes j..N-1
            f1 = t1 + c1[j]
            f2 = t2 + c2[j] + wrap_c[first[q]]
            if not client:
                f1 += dnp[j]
                f2 += dnd[j]
            if f1 <= b1 and f2 <= b2 and f1 + m * f2 <= b3:
                if w < best:  # no completion of this label can do better
                    best, best_label = w, ((w, t1, t2, q, parent), j, True)
                return None
        if stails[q] >= 0:  # close with the server running nodes j..N-1
            f1 = t1 + s1[j] + out_s
            f2 = t2 + s2[j] + wrap_s[first[q]]
            if client:
                f1 += upp[j]
                f2 += upd[j]
            if f1 <= b1 and f2 <= b2 and f1 + m * f2 <= b3:
                if w + wsuf[j] < best:
                    best, best_label = w + wsuf[j], ((w, t1, t2, q, parent), j, False)
                if gain == 0:
                    return None  # the server tail is this label's best completion
        return (w, t1, t2, q, parent)

    fronts: list[list] = [[] for _ in locs]
    for q in auto.initial:
        if locs[q] == CLIENT:
            lab = admit(0, cp[0], cd[0], q, None, 1, bounds(q, 1))
        else:
            lab = admit(work[0], upp[0] + sp[0], sd[0], q, None, 1, bounds(q, 1))
        if lab is not None:
            fronts[q].append(lab)

    for i in range(1, n):
        if not any(fronts):
            break
        new_fronts: list[list] = []
        ci1, ci2, si1, si2, wi = cp[i], cd[i], sp[i], sd[i], work[i]
        for q, q_preds in enumerate(preds):
            cand = []
            client = locs[q] == CLIENT
            c = None
            for pq in q_preds:
                front = fronts[pq]
                if not front:
                    continue
                same = locs[pq] == locs[q]
                if client:
                    a1, a2 = (ci1, ci2) if same else (ci1 + dnp[i], ci2 + dnd[i])
                    dw = 0
                else:
                    a1, a2 = (si1, si2) if same else (si1 + upp[i], si2 + upd[i])
                    dw = wi
                if c is None:
                    c = bounds(q, i + 1)
                for lab in front:
                    new = admit(lab[0] + dw, lab[1] + a1, lab[2] + a2, q, lab, i + 1, c)
                    if new is not None:
                        cand.append(new)
            if len(cand) > 1:
                cand = _pareto(cand)
            new_fronts.append(cand)
        fronts = new_fronts

    final = None
    for q, front in enumerate(fronts):
        server_last = locs[q] != CLIENT
        for lab in front:
            t1 = lab[1] + (out_s if server_last else 0)
            t2 = lab[2] + (wrap_s if server_last else wrap_c)[first[q]]
            if t1 <= b1 and t2 <= b2 and t1 + m * t2 <= b3 and lab[0] < best:
                best = lab[0]
                final = lab
    if final is not None:
        return best, _backtrack(final, locs, n)
    if best_label is not None:
        lab, j, client_tail = best_label
        return best, _backtrack(lab, locs, j) + (client_tail,) * (n - j)
    return None


def _pareto(labels: list) -> list:
    """Labels not dominated on (work, ttft, tpot) by another label (ties: keep one)."""
    labels.sort(key=_label_key)
    kept = []
    for lab in labels:
        t1, t2 = lab[1], lab[2]
        for k in kept:
            if k[1] <= t1 and k[2] <= t2:
                break
        else:
            kept.append(lab)
    return kept


def _label_key(label):
    return label[0], label[1], label[2]


def _backtrack(label, locs, length: int) -> tuple[bool, ...]:
    mask = []
    while label is not None:
        mask.append(locs[label[3]] == CLIENT)
        label = label[4]
    if len(mask) != length:
        raise RuntimeError(f"backtrack found {len(mask)} nodes, expected {length}")
    return tuple(reversed(mask))
