"""One request's planner graph from the live server model, the client's profile and the
measured network (pure; used by the admission policy, :mod:`vllm_split.control.policy`).

Nodes, in order: ``embed`` (on the client, which holds the token ids; on the server only
for a session the server decodes, ``embed_on_server``), the ``N`` decoder layers, ``head``
(final norm, LM head, sampling: always on the server). A prefix placement that keeps
``embed`` and layers ``[0, k)`` on the client is split layer ``k``; the placement with every
node on the server is server decoding (:data:`SERVER_DECODE_SPLIT`): the client uploads the
prompt's token ids and the request runs in every step with no round trip per token.

Server latencies follow the engine's step model (:mod:`vllm_split.control.live_cost`) at the
current occupancy ``B`` (requests per step, this one excluded): a decoder layer costs
``layer_s + row_s * (B + 1)`` in a decode step and ``layer_s + row_s * (P + B)`` in the
prefill step; the head costs ``fixed_s`` plus ``wait_s``, the wait for the step already
running when the activation arrives (see :func:`decode_wait_s`). This is
exact for a batch whose requests share this request's placement (each request waits for
one step that runs its layers) and is the assumption the controller plans under: the load
it sees persists and is placed like this request.

Which layers a step runs (the roofline of a step, ``docs/server_savings.md``): a step runs
every layer from the lowest split layer among its requests up (``ServerLoad.min_split_layer``,
``k_min``), and a layer's cost is mostly reading its weights, shared by every row. So while
others run (``B > 0``) a layer ``l >= k_min`` runs whether or not this request keeps it on
its client: kept on the client, it costs the client's time *and* the step still pays
``layer_s + row_s * B`` for it (this request waits for that step), and it saves the server
only this request's rows, not the layer call. Only layers below ``k_min`` save the call.
Layers below the server's ``min_layer``
cannot run on the server; layers at or above the client's ``max_layers`` (what it can hold
in memory) cannot run on the client. A node on a side that cannot run it costs
``FORBIDDEN_S``, more than any SLA the wire accepts (at most 3600 s), so no planner finds
such a placement feasible.

A drafted session (``drafting``, :mod:`vllm_split.control.drafting`) has a graph of one
*round trip* instead of one token. It sends ``r̄`` rows per round trip on average, its type's
measured mean (``1 <= r̄ <= 1 + γ``; ``1 + γ``, the most it may send, before it is measured):
they cross the uplink, a server layer costs ``layer_s + row_s * (B + r̄)``, the answer brings
``E`` tokens, and the request's server work counts ``(n - 1) * r̄ / E`` decode rows (the
rejected drafts are server work) in ``(n - 1) / E`` steps. The client's pass is its mean over
round trips of one row to ``1 + γ`` rows averaging ``r̄`` (:meth:`ClientCosts.round_trip_pass_s`;
a pass costs at least a decode step). The graph's ``num_output_tokens`` is ``1 + ceil((n - 1)
/ E)``, so its e2e is TTFT plus one round trip per round trip; its TPOT is per round trip (the
policy compares it with ``E`` times the per-token bound).
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm_split.control.drafting import Drafting, activation_bytes, answer_bytes, graph_output_tokens, rows_of
from vllm_split.control.kv_budget import KVState
from vllm_split.control.live_cost import StepCost
from vllm_split.planner import LayerGraph, LayerNode, Placement
from vllm_split.planner.model_configs import ModelConfig
from vllm_split.planner.cost_model import node_cost

FORBIDDEN_S = 1e4  # latency of a node on the side that cannot run it
TOKEN_BYTES = 4


def check_max_layers(owner: str, value: object, error: type[ValueError] = ValueError) -> None:
    """``value`` is None (no bound) or an int >= 0; raises ``error`` naming ``owner`` otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise error(f"{owner}.max_layers: expected None or an int >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ClientCosts:
    """One decoder layer on the client, and how many layers it can hold."""

    prefill_s_per_token: float
    decode_s: float
    max_layers: int | None = None  # layers [max_layers, N) cannot run on the client; None: no bound

    def __post_init__(self) -> None:
        check_max_layers("ClientCosts", self.max_layers)

    @classmethod
    def from_flops(cls, flops_per_s: float, model: ModelConfig, *, context: int = 512,
                   max_layers: int | None = None) -> "ClientCosts":
        decode = node_cost(model, "block", phase="decode", tokens=1, context=context).flops
        prefill = node_cost(model, "block", phase="prefill", tokens=context, context=0).flops / context
        return cls(prefill_s_per_token=prefill / flops_per_s, decode_s=decode / flops_per_s, max_layers=max_layers)

    def pass_s(self, rows: float = 1) -> float:
        """One decoder layer over ``rows`` new rows (a decode step, or a drafted round trip's
        one pass over the last token and its drafts): at least a decode step."""
        return self.decode_s if rows == 1 else max(self.decode_s, self.prefill_s_per_token * rows)

    def round_trip_pass_s(self, drafting: Drafting | None) -> float:
        """One decoder layer's pass per round trip as planned: one row, or for a drafted session
        the chord from a one-row pass to a full one (``1 + γ`` rows) at its share of drafts sent
        (``(r̄ - 1) / γ``; the full pass before ``r̄`` is measured). Its TPOT bound is on the
        mean gap per token, so the mean pass is what counts, not the worst (``1 + γ`` would
        charge a type that seldom finds a draft for drafts it does not send); and since a pass
        is convex in its rows, the chord is the most the mean pass can be over any round trips
        averaging ``r̄`` rows (exactly it when each sends all its drafts or none, as prompt
        lookup does except near ``max_tokens``), where the pass at ``r̄`` would be the least."""
        if drafting is None:
            return self.decode_s
        one = self.pass_s(1)
        return one + (self.pass_s(drafting.max_rows) - one) * drafting.draft_fill

    def holds(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` fits in the client's memory bound."""
        return self.max_layers is None or layer < self.max_layers


@dataclass(frozen=True, slots=True)
class ServerLoad:
    cost: StepCost
    occupancy: float  # requests per step besides this one
    recent_step_s: float  # mean model time of the recent steps (0 when idle)
    utilization: float = 0.0  # fraction of the recent window the engine spent running the model
    min_split_layer: int = 0  # lowest split layer of the recent steps (0: ordinary requests ran, or idle)
    tpot_error: float = 1.0  # measured / predicted TPOT of recent split sessions (a high quantile, >= 1)
    ttft_error: float = 1.0  # the same for TTFT
    decoded_tpot_error: float = 1.0  # the same for the TPOT of recent server-decoded sessions
    drafted_tpot_error: float = 1.0  # the same for recent sessions granted drafts (against draft-aware predictions)
    kv: KVState | None = None  # the engine's block pool as last reported (control/kv_budget.py)


@dataclass(frozen=True, slots=True)
class RequestGraphInputs:
    num_layers: int
    min_layer: int
    hidden_bytes: int  # one row of activations on the wire
    prompt_len: int
    output_len: int


def busy_fraction(load: ServerLoad) -> float:
    """How likely an arriving activation finds the engine running others' step."""
    return min(1.0, load.occupancy)


def decode_wait_s(load: ServerLoad, turnaround_s: float, gather_s: float = 0.0) -> float:
    """Expected wait of a decode activation for the step in progress.

    With others in the batch the engine steps back to back, period ``S`` (the recent mean
    step). The token leaves at the end of a step; the next step starts at once without this
    request; its activation comes back ``turnaround_s`` later (client compute + network) and
    waits for the running step to end: ``S - (turnaround mod S)``. So a fast client waits a
    whole step (its token cadence is two steps), which the measurements show. Unless the
    engine's gather window (``vllm_split/engine/gather.py``) holds the next step for it: it
    does for an activation expected within ``gather_s`` of the token leaving, which then
    waits for nothing (the hold is in its turnaround already).
    """
    s = load.recent_step_s
    if s <= 0 or turnaround_s <= gather_s:
        return 0.0
    return busy_fraction(load) * (s - (turnaround_s % s))


def request_graph(req: RequestGraphInputs, load: ServerLoad, client: ClientCosts, *,
                  wait_s: float = 0.0, decode_wait: float | None = None, embed_on_server: bool = False,
                  drafting: Drafting | None = None) -> LayerGraph:
    """The graph at ``load``; the head pays ``wait_s`` for the step in progress, in the decode
    pass ``decode_wait`` instead when given (0 for placements the gather window waits for,
    and for server decoding). ``embed_on_server``: the embedding may run on the server (free
    there: a lookup), for a client that offered server decoding. ``drafting``: the decode
    pass is one round trip of a drafted session (module docstring); None: one token."""
    c, b, p, n_out = load.cost, load.occupancy, req.prompt_len, req.output_len
    wait, dwait = wait_s, wait_s if decode_wait is None else decode_wait
    r = rows_of(drafting)  # rows per decode pass: 1, or a drafted session's r̄
    steps = n_out - 1 if drafting is None else drafting.decode_round_trips(n_out)  # decode steps it is in
    row_work = c.row_s * (p + steps * r)
    call_work = c.layer_s * (1 + steps / (b + 1))  # this request's share of the layer's calls
    shared = c.layer_s + c.row_s * b  # a layer the others' steps run anyway: this request waits for it too
    embed_server_s = 0.0 if embed_on_server else FORBIDDEN_S
    nodes = [LayerNode("embed", 0.0, 0.0, embed_server_s, embed_server_s, 0.0)]
    for layer in range(req.num_layers):
        server_ok, client_ok = layer >= req.min_layer, client.holds(layer)
        runs_anyway = b > 0 and layer >= load.min_split_layer
        nodes.append(LayerNode(
            f"layer{layer}",
            client_prefill_s=client.prefill_s_per_token * p + shared * runs_anyway if client_ok else FORBIDDEN_S,
            client_decode_s=client.round_trip_pass_s(drafting) + shared * runs_anyway if client_ok else FORBIDDEN_S,
            server_prefill_s=c.layer_s + c.row_s * (p + b) if server_ok else FORBIDDEN_S,
            server_decode_s=c.layer_s + c.row_s * (b + r) if server_ok else FORBIDDEN_S,
            server_work=row_work + (0.0 if runs_anyway else call_work),
        ))
    nodes.append(LayerNode("head", FORBIDDEN_S, FORBIDDEN_S, c.fixed_s + wait, c.fixed_s + dwait,
                           c.fixed_s * (1 + steps / (b + 1))))
    rows = req.hidden_bytes
    answer = answer_bytes(TOKEN_BYTES, drafting)
    prefill = [p * TOKEN_BYTES] + [p * rows] * (len(nodes) - 1) + [TOKEN_BYTES]
    decode = [answer] + [activation_bytes(rows, drafting)] * (len(nodes) - 1) + [answer]
    return LayerGraph(nodes=tuple(nodes), prefill_edge_bytes=tuple(prefill), decode_edge_bytes=tuple(decode),
                      num_output_tokens=graph_output_tokens(n_out, drafting))


SERVER_DECODE_SPLIT = -1  # placement_for(SERVER_DECODE_SPLIT): every node, the embedding too, on the server


def placement_for(split_layer: int, num_layers: int) -> Placement:
    """The graph's placement of split layer ``k`` (embed + layers [0, k) on the client);
    :data:`SERVER_DECODE_SPLIT`: everything on the server."""
    return Placement.prefix(split_layer + 1, num_layers + 2)


def split_layer_of(placement: Placement) -> int:
    """The split layer of a prefix placement (0 for server decoding, which runs layer 0 up
    on the server like ``k = 0``)."""
    return max(0, placement.split_layer - 1)


def is_server_decoded(placement: Placement) -> bool:
    """Whether the placement keeps even the embedding on the server (server decoding)."""
    return placement.split_layer == 0
