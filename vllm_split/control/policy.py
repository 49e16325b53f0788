"""Admission policy: admit a split request now, let it wait, or refuse it (pure).

Process: the API server. The admission controller (:mod:`vllm_split.api.admission`) calls
:meth:`AdmissionPolicy.place` on its planning thread (the DP runs there) and
:meth:`AdmissionPolicy.decide` on its event loop, just before it registers the session, so
that the check of the sessions already admitted and the registration are one step. No
asyncio, no vLLM, no wire frames: plain records in, a decision record out.

Design. A request (:class:`AdmissionRequest`) is planned over its graph
(:mod:`vllm_split.control.request_graph`) at the current load (:func:`server_load`, from the
live cost model). What it optimises depends on that load: while the engine is busy less
than ``offload_above`` of the time, the server has compute to spare and takes the least
offloaded placement that meets the SLA, but no lower than the lowest split layer of the
steps running now (``ServerLoad.min_split_layer``; 0 when ordinary requests run or the
engine is idle): a step runs every layer from its lowest ``k`` up, so a lower ``k`` would
make every running step pay more layer calls (``server_only`` when ``k = 0`` is chosen).
When nothing from there up meets the SLA, and above ``offload_above``, the DP
(:func:`vllm_split.planner.plan`) takes the placement with the least server work that
meets the SLA, or with ``placement="greedy"`` the planner's prefix rule
(:func:`vllm_split.planner.greedy`, the embedding pinned on the client). Both plan with the
worst wait for the step in progress (a whole step when others run), so a plan that meets
the SLA meets it whatever the phase of the steps; the predictions use the expected wait.
A client that offers server decoding (``AdmissionRequest.server_decode``) has one more
placement: ``k = 0`` with the embedding on the server, the request in every step and no
round trip per token; it costs the server what ``k = 0`` does, so it replaces ``k = 0``
wherever that is chosen, is taken when nothing else meets the SLA, and is preferred to an
offload that saves the server less than ``min_offload_saving`` of the request's work: on a
server whose steps run every layer anyway an offload saves only the request's rows
(a few percent), and a round trip per token is a risk to the SLA not worth that.
Every rule above starts at the request's floor (:meth:`AdmissionPolicy.floor`): the
server's ``min_layer`` and the server's and the client's privacy floors
(:mod:`vllm_split.control.privacy_floor`); above 0 it rules out server decoding.

The model errs, and a placement at the SLA's edge misses by the model's error. So the
placements with a round trip per token are planned against the TPOT and TTFT bounds
divided by the measured errors of recent split sessions (``ServerLoad.tpot_error`` and
``ttft_error``, :func:`model_error`: a high quantile of measured over predicted), and
server decoding against the TPOT bound divided by the error of recent server-decoded
sessions (``decoded_tpot_error``: the model sees the step at admission, not the sessions
that join after, so near saturation it is optimistic; calibrated, a newcomer waits in the
queue instead of joining a batch in which everyone misses). Predictions stay the model's
own (the errors are measured against them); the check that an admitted session keeps its
bound multiplies its prediction by its kind's error. Sessions granted drafts are a kind of
their own (``drafted_tpot_error``): their predictions count the drafts, so mixing their
ratios with the others' would make either margin wrong.

Client drafts (:mod:`vllm_split.control.drafting`). A request granted ``γ`` drafts
(``AdmissionRequest.num_drafts``) whose type's tokens per round trip ``E`` the controller
has measured (``tokens_per_round_trip``) is planned over a graph of one round trip (its
type's measured mean rows ``r̄``, ``rows_per_round_trip``, or ``1 + γ`` before that is
measured, through the client's pass, the uplink and the server's step, ``E`` tokens back)
against ``E`` times its TPOT bound, and predicted at its round trip over ``E`` per token; its
server work counts every row it sends, the rejected drafts too. Before ``E`` is measured it
is planned as without drafts (no gain promised); what it adds to each step of the admitted
sessions is ``r̄`` rows, ``1 + γ`` before ``r̄`` is measured
(:meth:`AdmissionRequest.step_rows`). Server decoding and U shapes never draft.

Decisions: :class:`Admission` (split layer, how it was chosen, predicted TTFT and TPOT,
server work); :class:`Wait` (it could be admitted on a less loaded server, when a request
slot frees, or when what the newcomer adds to each step would push an admitted session
that meets its TPOT bound now past it: :meth:`AdmissionPolicy.first_pushed_past_bound`);
:class:`Refusal` (``sla_unreachable``: no placement meets the SLA even on an idle server;
``bad_request``: the server cannot plan it). What a wait becomes (a queue place, a
``server_busy`` refusal with :func:`retry_after_s`) is the controller's business.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from vllm_split.control.admission_records import (Admission, AdmissionInputError, AdmissionRequest, ClientFlops,
                                                  InFlight, Refusal, Wait)
from vllm_split.control.drafting import activation_bytes, answer_bytes, per_round_trip, per_token
from vllm_split.control.kv_budget import kv_wait
from vllm_split.control.measured_load import calibrated
from vllm_split.control.request_graph import (TOKEN_BYTES, ClientCosts, RequestGraphInputs, ServerLoad, busy_fraction,
                                              SERVER_DECODE_SPLIT, decode_wait_s,
                                              is_server_decoded, placement_for, request_graph, split_layer_of)
from vllm_split.control.privacy_floor import describe_floor, effective_floor, floor_violation
from vllm_split.control.ushape_policy import decide_u, fixed_u, place_u_request
from vllm_split.engine.gather import FRACTION as GATHER_FRACTION  # pure: the window's longest hold, of a step
from vllm_split.planner import SLA, NetworkSpec, PlanResult, evaluate, greedy, plan, result_for
from vllm_split.planner.model_configs import ModelConfig
from vllm_split.wire.contract import ErrorCode

PLACEMENTS = ("dp", "greedy")


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The served model's shape and the admission options."""

    model: ModelConfig  # the served model (its decoder layers)
    hidden_bytes: int  # one row of activations on the wire, in the model's dtype (a request's row_bytes overrides it)
    min_layer: int = 0  # lowest split layer the server holds
    max_num_seqs: int | None = None  # the engine's request slots (None: not checked)
    default_sla: SLA = field(default_factory=lambda: SLA(ttft_s=5.0, tpot_s=0.25))  # for a client stating none
    offload_above: float = 0.5  # engine utilisation above which the DP minimises server work
    placement: str = "dp"  # or "greedy": the planner's baseline rule instead of the DP (for comparisons)
    gather_max_s: float = 0.0  # the engine's gather window cap (0: off; config gather / gather_max_ms)
    min_offload_saving: float = 0.1  # an offload must save this share of the request's server work (vs server decoding)
    privacy_floor: int = 0  # the server's: no split layer below it (it still holds them), no server decoding when > 0

    def __post_init__(self) -> None:
        n = self.model.num_hidden_layers
        if self.placement not in PLACEMENTS:
            raise AdmissionInputError(f"AdmissionPolicy.placement: expected one of {list(PLACEMENTS)}, "
                                      f"got {self.placement!r}")
        for name in ("min_layer", "privacy_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
                raise AdmissionInputError(f"AdmissionPolicy.{name}: expected an int in [0, {n}] (the model has {n} "
                                          f"decoder layers), got {value!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise AdmissionInputError(f"AdmissionPolicy.max_num_seqs: expected None or >= 1, got {self.max_num_seqs!r}")
        if not isinstance(self.gather_max_s, (int, float)) or not 0 <= self.gather_max_s < 60:
            raise AdmissionInputError(f"AdmissionPolicy.gather_max_s: expected seconds in [0, 60), "
                                      f"got {self.gather_max_s!r}")
        if not isinstance(self.min_offload_saving, (int, float)) or not 0 <= self.min_offload_saving < 1:
            raise AdmissionInputError(f"AdmissionPolicy.min_offload_saving: expected a share in [0, 1), "
                                      f"got {self.min_offload_saving!r}")
        if self.hidden_bytes < 1:
            raise AdmissionInputError(f"AdmissionPolicy.hidden_bytes: expected >= 1, got {self.hidden_bytes!r}")

    @property
    def num_layers(self) -> int:
        return self.model.num_hidden_layers

    def floor(self, request: AdmissionRequest) -> int:
        """The lowest split layer ``request`` may run at: the server's ``min_layer`` and both
        privacy floors (:mod:`vllm_split.control.privacy_floor`)."""
        return effective_floor(min_layer=self.min_layer, server_floor=self.privacy_floor,
                               client_floor=request.privacy_floor)

    def _privacy(self, request: AdmissionRequest) -> str:
        """The binding privacy floor and who set it, for messages."""
        return describe_floor(server_floor=self.privacy_floor, client_floor=request.privacy_floor)

    def sla_for(self, request: AdmissionRequest) -> SLA:
        return request.sla if request.sla is not None else self.default_sla

    def client_costs(self, request: AdmissionRequest) -> ClientCosts | None:
        """One decoder layer on the request's client (None: it sent no profile)."""
        client = request.client
        if isinstance(client, ClientFlops):
            return ClientCosts.from_flops(client.flops_per_s, self.model, max_layers=client.max_layers)
        return client

    def row_bytes(self, request: AdmissionRequest) -> int:
        """One row of ``request``'s activations on the wire: its wire dtype's, else ``hidden_bytes``."""
        return self.hidden_bytes if request.row_bytes is None else request.row_bytes

    def graph_inputs(self, request: AdmissionRequest) -> RequestGraphInputs:
        return RequestGraphInputs(num_layers=self.num_layers, min_layer=self.floor(request),
                                  hidden_bytes=self.row_bytes(request),
                                  prompt_len=request.prompt_tokens, output_len=request.expected_output_tokens)

    def gather_s(self, load: ServerLoad) -> float:
        """How late after its token left an activation may come and still be waited for by
        the engine's gather window: ``min(gather_max_s, GATHER_FRACTION * recent step)``."""
        return min(self.gather_max_s, GATHER_FRACTION * load.recent_step_s)

    def turnaround_s(self, request: AdmissionRequest, client: ClientCosts, split_layer: int) -> float:
        """From an answer leaving the server to the client's next activation arriving (a
        drafted one: ``E`` tokens down, one pass over ``r̄`` rows on average, ``r̄`` rows up;
        ``r̄ = 1 + γ`` until measured)."""
        network, drafting = request.network, request.drafting
        assert network is not None
        return (split_layer * client.round_trip_pass_s(drafting)
                + network.uplink_s(activation_bytes(self.row_bytes(request), drafting))
                + network.downlink_s(answer_bytes(TOKEN_BYTES, drafting)))

    @staticmethod
    def tpot_error(request: AdmissionRequest, load: ServerLoad, *, server_decode: bool = False) -> float:
        """The measured TPOT error of ``request``'s kind: server decoded, granted drafts (its
        predictions are draft-aware) or one token per round trip."""
        if server_decode:
            return load.decoded_tpot_error
        return load.drafted_tpot_error if request.num_drafts else load.tpot_error

    # ---------------------------------------------------------------- predictions
    def predict(self, request: AdmissionRequest, split_layer: int, load: ServerLoad, *,
                server_decode: bool = False) -> tuple[float, float, float]:
        """Expected (TTFT, TPOT, server work) at ``split_layer``: the graph's latencies plus
        the wait for the step in progress (half a step for the prompt, :func:`decode_wait_s`
        per token; none for a session the server decodes, which is in every step); a drafted
        session's TPOT is its round trip over its tokens per round trip
        (:mod:`vllm_split.control.drafting`). Needs the request's client costs and network."""
        client, network = self.client_costs(request), request.network
        if client is None or network is None:
            raise AdmissionInputError("predict: expected a request with the client's costs and a measured network, "
                                      f"got client={client!r}, network={network!r}")
        drafting = None if server_decode else request.drafting
        graph = request_graph(self.graph_inputs(request), load, client, embed_on_server=server_decode,
                              drafting=drafting)
        k = SERVER_DECODE_SPLIT if server_decode else split_layer
        ttft, tpot, _, work = evaluate(graph, network, placement_for(k, self.num_layers))
        wait = 0.0 if server_decode else decode_wait_s(load, self.turnaround_s(request, client, split_layer),
                                                       self.gather_s(load))
        # a drafted session's graph and wait are per round trip: per token, over E
        return ttft + 0.5 * busy_fraction(load) * load.recent_step_s, per_token(tpot + wait, drafting), work

    def server_decodes(self, request: AdmissionRequest, split_layer: int) -> bool:
        """Whether a session at ``split_layer`` runs decoded on the server: at ``k = 0``, when
        its client offered it (``AdmissionRequest.server_decode``) and its floor is 0."""
        return split_layer == 0 and request.server_decode and self.floor(request) == 0

    def fixed(self, request: AdmissionRequest, load: ServerLoad) -> Admission | Refusal:
        """A client that fixed its split layer is admitted there, with predictions when it
        sent its profile and the network was measured; held to the SLA it stated, if any.
        Refused when ``k`` is above the client's own memory bound (``bad_request``) or below a
        privacy floor (``split_layer``: the code a ``k`` below ``min_layer`` gets at Open)."""
        k = request.split_layer
        if k is None:
            raise AdmissionInputError("fixed: expected a request with a split_layer, got split_layer=None")
        below = floor_violation(k, server_floor=self.privacy_floor, client_floor=request.privacy_floor)
        if below is not None:
            return Refusal(ErrorCode.SPLIT_LAYER, below)
        if request.u_shape:
            return fixed_u(self, request, load)
        bound = request.client.max_layers if request.client is not None else None
        if bound is not None and k > bound:
            return Refusal(ErrorCode.BAD_REQUEST, f"split_layer {k} is above this client's memory bound: it holds at "
                                                  f"most {bound} decoder layers (client.max_layers)")
        decoded = self.server_decodes(request, k)
        if request.client is None or request.network is None:
            return Admission(k, "fixed", None, None, sla=request.sla, server_decode=decoded)
        ttft, tpot, work = self.predict(request, k, load, server_decode=decoded)
        return Admission(k, "fixed", ttft, tpot, server_work=work, sla=request.sla, server_decode=decoded)

    # ---------------------------------------------------------------- planning
    def place(self, request: AdmissionRequest, load: ServerLoad) -> PlanResult | Refusal:
        """The placement at ``load`` for a request whose split layer the server chooses (the
        slow part: run it off the event loop). A :class:`Refusal` when the request cannot be
        planned or no placement meets its SLA even on an idle server."""
        if request.split_layer is not None:
            raise AdmissionInputError(f"place: expected a request with split_layer=None (the server chooses), "
                                      f"got split_layer={request.split_layer}")
        if request.client is None or request.network is None:
            return Refusal(ErrorCode.BAD_REQUEST, "split_layer auto needs the client's profile (client) and a "
                                                  "measured network")
        floor, bound = self.floor(request), request.client.max_layers
        if floor > self.num_layers:  # only the client's floor can be: the server's options are checked
            return Refusal(ErrorCode.BAD_REQUEST, f"no split layer fits: {self._privacy(request)} is above this "
                                                  f"model's {self.num_layers} decoder layers")
        if bound is not None and bound < floor:
            why = (f"this server holds no layers below {floor}" if floor == self.min_layer else
                   f"{self._privacy(request)} keeps every split layer at or above {floor}")
            return Refusal(ErrorCode.BAD_REQUEST, f"no split layer fits: this client holds at most {bound} decoder "
                                                  f"layers (client.max_layers) and {why}")
        if request.u_shape:
            return place_u_request(self, request, load)
        sla = self.sla_for(request)
        result = self._plan(request, sla, load, spare=load.utilization < self.offload_above)
        if result.feasible:
            return result
        idle = ServerLoad(cost=load.cost, occupancy=0.0, recent_step_s=0.0)
        best = self._plan(request, sla, idle, spare=False)
        if best.feasible:
            return result  # met on a less loaded server: decide() makes it wait
        at = f" at or above {self._privacy(request)}" if floor > self.min_layer else ""
        return Refusal(ErrorCode.SLA_UNREACHABLE, (
            f"no split layer{at} meets the SLA (TTFT <= {sla.ttft_s} s, TPOT <= {sla.tpot_s} s) even on an "
            f"idle server: the best this client can get is TTFT {best.ttft_s:.3f} s and TPOT "
            f"{self._per_token(best, request):.3f} s (split layer {split_layer_of(best.placement)}); "
            f"{self._what_limits(request, sla, idle)}"))

    @staticmethod
    def network_free(placed: PlanResult | Refusal) -> bool:
        """Whether ``placed`` holds on every network better than the one it was planned on:
        the least-offload rule's server decoding (with compute to spare and no step above
        ``k = 0``, it is taken whenever it meets the SLA, and a better network only lowers its
        latencies); the controller admits such sessions before probing their network."""
        return (isinstance(placed, PlanResult) and placed.method == "least_offload"
                and is_server_decoded(placed.placement))

    def _what_limits(self, request: AdmissionRequest, sla: SLA, idle: ServerLoad) -> str:
        """The advice of an ``sla_unreachable`` refusal: relax the SLA, or, when the client's
        memory bound is what stops it, hold more layers (the fewest that would do)."""
        bound = request.client.max_layers
        if bound is None or bound >= self.num_layers:
            return "relax the SLA"
        unbounded = replace(request, client=replace(request.client, max_layers=None))
        if not self._plan(unbounded, sla, idle, spare=False).feasible:  # the same rule as the refusal's
            return "relax the SLA"
        least = self._plan(unbounded, sla, idle, spare=True)  # the least offloaded placement meeting it
        return (f"the client's memory bound limits it: it holds at most {bound} decoder layers (client.max_layers), "
                f"split layer {split_layer_of(least.placement)} would meet the SLA; hold more layers or relax the SLA")

    @staticmethod
    def _per_token(result: PlanResult, request: AdmissionRequest) -> float:
        """A plan's TPOT per output token (a drafted graph's is per round trip)."""
        return result.tpot_s if is_server_decoded(result.placement) else per_token(result.tpot_s, request.drafting)

    def _plan(self, request: AdmissionRequest, sla: SLA, load: ServerLoad, *, spare: bool) -> PlanResult:
        """With ``spare`` (the server has compute to spare) the least offloaded placement
        meeting the SLA from ``k = max(floor, load.min_split_layer)`` up (it adds no layer
        call to the running steps; ``floor``: :meth:`floor`), if there is one; otherwise the
        DP's least-server-work placement, or the planner's greedy prefix rule from
        ``k = floor``. Server decoding (when the client offered it) stands for ``k = 0``: the
        same server work without a round trip per token, so it replaces ``k = 0`` wherever
        that is chosen, and is chosen when it alone meets the SLA. A drafted request's graphs
        are of round trips, planned against ``E`` times its TPOT bound (:func:`per_round_trip`);
        its results' TPOT is per round trip (:meth:`_per_token`)."""
        client = self.client_costs(request)
        assert client is not None and request.network is not None  # place() checked
        inputs, worst = self.graph_inputs(request), busy_fraction(load) * load.recent_step_s
        decoded = None
        if self.server_decodes(request, 0):
            g = request_graph(inputs, load, client, wait_s=worst, decode_wait=0.0, embed_on_server=True)
            decoded = result_for(g, request.network, calibrated(sla, load.decoded_tpot_error),
                                 placement_for(SERVER_DECODE_SPLIT, self.num_layers), method="server_decode")
        drafting = request.drafting  # None: one token per round trip (no drafts, or none measured yet)
        # round trips: plan with the model's measured error, a drafted graph per round trip
        sla = per_round_trip(calibrated(sla, self.tpot_error(request, load), load.ttft_error), drafting)
        graph = request_graph(inputs, load, client, wait_s=worst, drafting=drafting)
        # the placements whose activations the gather window waits for pay no decode wait:
        # a second graph, the client bounded to the split layers fast enough for it
        k_gather = self._gathered_split_layer(request, client, load)
        gathered = None
        if k_gather is not None:
            bounded = replace(client, max_layers=k_gather)
            gathered = request_graph(inputs, load, bounded, wait_s=worst, decode_wait=0.0, drafting=drafting)
        if spare:
            if decoded is not None and decoded.feasible and load.min_split_layer == 0:
                return replace(decoded, method="least_offload")
            for k in range(max(inputs.min_layer, load.min_split_layer), self.num_layers + 1):
                g = gathered if gathered is not None and k <= k_gather else graph
                result = result_for(g, request.network, sla, placement_for(k, self.num_layers), method="scan")
                if result.feasible:
                    return replace(result, method="least_offload")
        results = [self._plan_graph(g, request.network, sla, floor=inputs.min_layer)
                   for g in (graph, gathered) if g is not None]
        feasible = [r for r in results if r.feasible]
        best = min(feasible, key=lambda r: r.server_work) if feasible else None
        if decoded is not None and decoded.feasible and (
                best is None or split_layer_of(best.placement) == 0
                or best.server_work >= (1 - self.min_offload_saving) * decoded.server_work):
            return decoded
        return best if best is not None else results[0]

    def _plan_graph(self, graph, network: NetworkSpec, sla: SLA, *, floor: int) -> PlanResult:
        if self.placement == "greedy":  # the embedding and layers [0, floor) stay on the client
            return greedy(graph, network, sla, client_prefix=floor + 1)
        return plan(graph, network, sla)

    def _gathered_split_layer(self, request: AdmissionRequest, client: ClientCosts, load: ServerLoad) -> int | None:
        """The highest split layer whose turnaround the gather window waits for at ``load``
        (None: none is, or nobody else runs, so there is no step to wait for)."""
        gather = self.gather_s(load)
        if gather <= 0 or busy_fraction(load) <= 0:
            return None
        k = self.floor(request)
        if self.turnaround_s(request, client, k) > gather:
            return None
        top = self.num_layers if client.max_layers is None else min(self.num_layers, client.max_layers)
        while k < top and self.turnaround_s(request, client, k + 1) <= gather:
            k += 1
        return k

    # ---------------------------------------------------------------- decision
    def decide(self, request: AdmissionRequest, placed: PlanResult | Refusal, *, load: ServerLoad,
               inflight: Collection[InFlight]) -> Admission | Wait | Refusal:
        """Admit ``placed`` now, or wait: when its SLA is not met at this load, when the
        request slots are taken, or when what it adds to each step would push an admitted
        session past its TPOT bound (:meth:`first_pushed_past_bound`)."""
        if request.u_shape:
            return decide_u(self, request, placed, load=load, inflight=inflight)
        held = self.held(placed, inflight)
        if held is not None:
            return held
        k, decoded = split_layer_of(placed.placement), is_server_decoded(placed.placement)
        if (wait := self.admitted_hold(request, k, load, inflight, server_decode=decoded)) is not None:
            return wait
        ttft, tpot, work = self.predict(request, k, load, server_decode=decoded)
        return Admission(k, "server_only" if k == 0 else placed.method, ttft, tpot, server_work=work,
                         sla=self.sla_for(request), server_decode=decoded)

    def held(self, placed: PlanResult | Refusal, inflight: Collection[InFlight]) -> Wait | Refusal | None:
        """What stops ``placed`` before the admitted sessions' bounds are weighed: its refusal,
        an SLA not met at this load, or no free request slot (None: nothing)."""
        if isinstance(placed, Refusal):
            return placed
        if not placed.feasible:
            return Wait("the SLA cannot be met at the current load")
        if self.max_num_seqs is not None and len(inflight) >= self.max_num_seqs:
            return Wait(f"all {self.max_num_seqs} request slots of the engine are taken")
        return None

    def admitted_hold(self, request: AdmissionRequest, split_layer: int, load: ServerLoad,
                      inflight: Collection[InFlight], *, server_decode: bool = False) -> Wait | None:
        """What the admitted sessions hold a newcomer at ``split_layer`` back for: the KV memory
        they are promised (:meth:`kv_held`), then their TPOT bounds
        (:meth:`first_pushed_past_bound`, with the rows it adds to each step); None: neither."""
        if (why := self.kv_held(request, split_layer, load, inflight)) is not None:
            return Wait(why)
        rows = request.step_rows(server_decode=server_decode)
        if self.first_pushed_past_bound(load, inflight, split_layer=split_layer, rows=rows) is not None:
            return Wait("admitting it would push an admitted session past its TPOT bound")
        return None

    @staticmethod
    def kv_held(request: AdmissionRequest, split_layer: int, load: ServerLoad,
                inflight: Collection[InFlight]) -> str | None:
        """Why the KV cache cannot take the newcomer's whole sequence at ``split_layer`` beside
        the admitted sessions' (:func:`vllm_split.control.kv_budget.kv_wait`), or None."""
        return kv_wait(load.kv, total_tokens=request.prompt_tokens + request.expected_output_tokens,
                       split_layer=split_layer, promises=[s.promise() for s in inflight])

    def added_step_s(self, load: ServerLoad, split_layer: int, rows: float = 1.0) -> float:
        """What a newcomer at ``split_layer`` adds to each step at ``load``: its decode
        ``rows`` (1, or a drafted session's mean ``r̄``, ``1 + γ`` until measured:
        :meth:`AdmissionRequest.step_rows`)
        through layers ``[split_layer, N)`` and the layer calls below the running steps'
        lowest split layer (``load.min_split_layer``) that the steps then run for it."""
        c = load.cost
        return (c.row_s * rows * (self.num_layers - split_layer)
                + c.layer_s * max(0, load.min_split_layer - split_layer))

    def first_pushed_past_bound(self, load: ServerLoad, inflight: Iterable[InFlight], *,
                                split_layer: int, rows: float = 1.0) -> InFlight | None:
        """The first admitted session that meets its TPOT bound at ``load`` and would miss it
        with a newcomer at ``split_layer`` in the batch: the recent step longer by
        :meth:`added_step_s` (the newcomer's ``rows`` per step), one more request per step;
        both predictions times the measured error of the session's kind (:meth:`tpot_error`:
        server-decoded, drafted or one token per round trip). A session over its
        bound already is not the newcomer's doing and does not hold it back (nor does one
        without an SLA or a profile: nothing to predict)."""
        joined = replace(load, occupancy=load.occupancy + 1.0,
                         recent_step_s=load.recent_step_s + self.added_step_s(load, split_layer, rows))
        for s in inflight:
            sla, req, k = s.admission.sla, s.request, s.admission.split_layer
            if sla is None or sla.tpot_s is None or req.client is None or req.network is None:
                continue
            decoded = s.admission.server_decode
            error = max(1.0, self.tpot_error(req, load, server_decode=decoded))
            if (error * self.predict(req, k, load, server_decode=decoded)[1] <= sla.tpot_s
                    < error * self.predict(req, k, joined, server_decode=decoded)[1]):
                return s
        return None


def retry_after_s(inflight: Iterable[InFlight], now: float) -> float:
    """When the first admitted session should have finished (>= 0.5 s; 1 s when none has
    predictions); ``now`` on the clock of ``InFlight.admitted_at``."""
    ends = []
    for s in inflight:
        a = s.admission
        if a.predicted_ttft_s is not None and a.predicted_tpot_s is not None:
            e2e = a.predicted_ttft_s + (s.request.expected_output_tokens - 1) * a.predicted_tpot_s
            ends.append(s.admitted_at + e2e - now)
    return round(max(0.5, min(ends) if ends else 1.0), 3)
