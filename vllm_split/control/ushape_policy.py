"""Admission of U-shaped sessions: which ``(k, m)`` the server offers (pure).

Process: the API server (called by :class:`vllm_split.control.policy.AdmissionPolicy` for a
request with ``u_shape``). A U-shaped session keeps the embedding, layers ``[0, k)``, layers
``[m, L)`` and the head (final norm, LM head, sampling) on the client; the server runs
``[k, m)`` and sends the layer-``m`` state back: the whole prompt's rows after prefill, one
row per decode step. Its graph (:func:`u_graph`) is the request's prefix graph
(:func:`vllm_split.control.request_graph.request_graph`) with the head moved to the client
(its cost there: the planner's head FLOPs at the client's measured speed per layer FLOPs)
and forbidden on the server, so the edge from layer ``m - 1`` to ``m`` is the download of the
layer-``m`` state (``prompt_len`` rows in prefill, one per token) and the sampled token never
crosses the network. The placement is the planner's U-shape DP
(:func:`vllm_split.planner.plan` with ``Shape.U``): the least server work that meets the SLA
(calibrated by the measured model error, as for prefix splits); with compute to spare
(utilisation below ``offload_above``) the least offloaded U instead: ``m = L`` and the lowest
``k`` from the request's floor (and the running steps' lowest split layer) up that meets it.
A DP answer that is no U the server can serve (every node on the client, i.e. no server
layer), or that breaks the client's memory bound (it holds ``k + L - m`` layers:
``max_layers``), is replaced by a scan of every ``k < m`` under the same rule. The privacy
floor bounds ``k`` (the layers below it are forbidden on the server); it does not bound ``m``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Collection

from vllm_split.control.request_graph import (FORBIDDEN_S, ClientCosts, ServerLoad, busy_fraction, decode_wait_s,
                                              request_graph)
from vllm_split.planner import SLA, LayerGraph, Placement, PlanResult, Shape, evaluate, plan, result_for
from vllm_split.planner.cost_model import node_cost
from vllm_split.wire.contract import ErrorCode

if TYPE_CHECKING:
    from vllm_split.control.policy import Admission, AdmissionPolicy, AdmissionRequest, InFlight, Refusal, Wait


def head_s(policy: "AdmissionPolicy", client: ClientCosts) -> float:
    """The client's time for the head (norm + LM head + sampling) of one position: one decoder
    layer's decode time scaled by the head's FLOPs over a layer's."""
    model = policy.model
    head = node_cost(model, "head", phase="decode", tokens=1, context=0).flops
    block = node_cost(model, "block", phase="decode", tokens=1, context=512).flops
    return client.decode_s * head / block


def u_graph(policy: "AdmissionPolicy", request: "AdmissionRequest", load: ServerLoad, client: ClientCosts, *,
            wait_s: float = 0.0) -> LayerGraph:
    """The request's graph with the head on the client (module docstring). The engine step's
    own cost and the wait for the step in progress (the prefix graph's head on the server)
    stay: every U placement the server can serve runs some layers in a step, so they go on
    the embedding, which a U keeps on the client (a constant for every such placement)."""
    unbounded = replace(client, max_layers=None)  # the bound is a count for a U: checked by fits()
    graph = request_graph(policy.graph_inputs(request), load, unbounded, wait_s=wait_s)
    embed, head, client_head = graph.nodes[0], graph.nodes[-1], head_s(policy, client)
    step = replace(embed, client_prefill_s=embed.client_prefill_s + head.server_prefill_s,
                   client_decode_s=embed.client_decode_s + head.server_decode_s)
    moved = replace(head, client_prefill_s=client_head, client_decode_s=client_head, server_prefill_s=FORBIDDEN_S,
                    server_decode_s=FORBIDDEN_S, server_work=0.0)
    return replace(graph, nodes=(step,) + graph.nodes[1:-1] + (moved,))


def u_placement(k: int, m: int, num_layers: int) -> Placement:
    """The graph's placement of a U session: embed + [0, k) and [m, L) + head on the client."""
    return Placement(shape=Shape.U, num_nodes=num_layers + 2, client_ranges=((0, k + 1), (m + 1, num_layers + 2)))


def u_layers_of(placement: Placement) -> tuple[int, int] | None:
    """``(k, m)`` of a U placement the server can serve (at least one server layer, the
    embedding and the head on the client), else None."""
    n, ranges = placement.num_nodes, placement.client_ranges
    if len(ranges) != 2 or ranges[0][0] != 0 or ranges[1][1] != n:
        return None
    k, m = ranges[0][1] - 1, ranges[1][0] - 1
    return (k, m) if 0 <= k < m <= n - 2 else None


def fits(request: "AdmissionRequest", k: int, m: int, num_layers: int) -> bool:
    """Whether the client holds the ``k + L - m`` layers a U at ``(k, m)`` needs."""
    bound = request.client.max_layers if request.client is not None else None
    return bound is None or k + num_layers - m <= bound


def place_u(policy: "AdmissionPolicy", request: "AdmissionRequest", load: ServerLoad, sla: SLA) -> PlanResult | None:
    """The U placement for ``request`` at ``load`` (module docstring); None when no ``(k, m)``
    fits the client's memory bound and floor at all."""
    from vllm_split.control.measured_load import calibrated

    client, network, n = policy.client_costs(request), request.network, policy.num_layers
    floor = policy.floor(request)
    sla = calibrated(sla, load.tpot_error, load.ttft_error)
    graph = u_graph(policy, request, load, client, wait_s=busy_fraction(load) * load.recent_step_s)
    pairs = [(k, m) for k in range(floor, n) for m in range(k + 1, n + 1) if fits(request, k, m, n)]
    if not pairs:
        return None
    if load.utilization < policy.offload_above:
        for k in range(max(floor, load.min_split_layer), n):
            if (k, n) in pairs:
                result = result_for(graph, network, sla, u_placement(k, n, n), method="least_offload")
                if result.feasible:
                    return result
    best = plan(graph, network, sla, shape=Shape.U)
    layers = u_layers_of(best.placement)
    if best.feasible and layers is not None and layers in pairs:
        return replace(best, method="dp")
    scanned = [result_for(graph, network, sla, u_placement(k, m, n), method="u_scan") for k, m in pairs]
    feasible = [r for r in scanned if r.feasible]
    if feasible:
        return min(feasible, key=lambda r: r.server_work)
    return min(scanned, key=lambda r: (r.e2e_s, r.tpot_s))


def place_u_request(policy: "AdmissionPolicy", request: "AdmissionRequest", load: ServerLoad) -> "PlanResult | Refusal":
    """:meth:`AdmissionPolicy.place` for a U request: the placement at ``load``; when it misses
    the SLA but an idle server would meet it, that (``decide`` makes it wait); else a refusal."""
    from vllm_split.control.policy import Refusal

    sla = policy.sla_for(request)
    result = place_u(policy, request, load, sla)
    if result is None:
        return Refusal(ErrorCode.BAD_REQUEST, f"no U shape fits: this client holds at most {request.client.max_layers} "
                                              f"decoder layers (client.max_layers) and k >= {policy.floor(request)}")
    if result.feasible:
        return result
    idle = ServerLoad(cost=load.cost, occupancy=0.0, recent_step_s=0.0)
    best = place_u(policy, request, idle, sla)
    if best.feasible:
        return result
    k, m = u_layers_of(best.placement) or (None, None)
    return Refusal(ErrorCode.SLA_UNREACHABLE, (
        f"no U shape meets the SLA (TTFT <= {sla.ttft_s} s, TPOT <= {sla.tpot_s} s) even on an idle server: the best "
        f"this client can get is TTFT {best.ttft_s:.3f} s and TPOT {best.tpot_s:.3f} s (split layer {k}, return layer "
        f"{m}); relax the SLA"))


def predict_u(policy: "AdmissionPolicy", request: "AdmissionRequest", k: int, m: int,
              load: ServerLoad) -> tuple[float, float, float]:
    """Expected (TTFT, TPOT, server work) of a U session at ``(k, m)``, with the waits of
    :meth:`AdmissionPolicy.predict`: its turnaround is the client's ``k + L - m`` layers and
    head, the layer-``m`` row down and the layer-``k`` row up."""
    client, network, n = policy.client_costs(request), request.network, policy.num_layers
    ttft, tpot, _, work = evaluate(u_graph(policy, request, load, client), network, u_placement(k, m, n))
    row = policy.row_bytes(request)
    turnaround = ((k + n - m) * client.decode_s + head_s(policy, client) + network.uplink_s(row)
                  + network.downlink_s(row))
    wait = decode_wait_s(load, turnaround, policy.gather_s(load))
    return ttft + 0.5 * busy_fraction(load) * load.recent_step_s, tpot + wait, work


def fixed_u(policy: "AdmissionPolicy", request: "AdmissionRequest", load: ServerLoad) -> "Admission | Refusal":
    """:meth:`AdmissionPolicy.fixed` for a U request whose client fixed ``(k, m)``: refused when
    the client cannot hold ``k + L - m`` layers (``bad_request``); predicted when it sent its
    profile and the network was measured."""
    from vllm_split.control.policy import Admission, Refusal

    k, m, n = request.split_layer, request.return_layer, policy.num_layers
    if not fits(request, k, m, n):
        return Refusal(ErrorCode.BAD_REQUEST, f"U shape (split_layer {k}, return_layer {m}) needs {k + n - m} decoder "
                                              f"layers on the client, above its memory bound of "
                                              f"{request.client.max_layers} (client.max_layers)")
    if request.client is None or request.network is None:
        return Admission(k, "fixed", None, None, sla=request.sla, return_layer=m)
    ttft, tpot, work = predict_u(policy, request, k, m, load)
    return Admission(k, "fixed", ttft, tpot, server_work=work, sla=request.sla, return_layer=m)


def decide_u(policy: "AdmissionPolicy", request: "AdmissionRequest", placed: "PlanResult | Refusal", *,
             load: ServerLoad, inflight: Collection["InFlight"]) -> "Admission | Wait | Refusal":
    """:meth:`AdmissionPolicy.decide` for a U request (the same waits; what the newcomer adds
    to each step is weighed as its rows from ``k`` up, an upper bound)."""
    from vllm_split.control.policy import Admission

    held = policy.held(placed, inflight)
    if held is not None:
        return held
    k, m = u_layers_of(placed.placement)
    if (wait := policy.admitted_hold(request, k, load, inflight)) is not None:
        return wait
    ttft, tpot, work = predict_u(policy, request, k, m, load)
    return Admission(k, placed.method, ttft, tpot, server_work=work, sla=policy.sla_for(request), return_layer=m)
