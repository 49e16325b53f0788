"""Analytic per-node cost model (FLOPs and bytes, roofline) and the graph of one request.

Per node and pass, the model counts FLOPs, weight bytes and other bytes (KV cache reads and
writes, activations in and out) for a Llama-style decoder:

* attention (input norm, QKV and output projections, causal attention): linear FLOPs
  ``2 * params * T`` plus the quadratic core ``2 * q_dim * P * (P + 1)`` in a prefill of
  ``P`` tokens, ``4 * q_dim * (c + 1)`` in a decode step at context ``c``; the KV cache
  read is ``2 * kv_dim * dtype`` bytes per cached token;
* MLP (post norm, gate/up/down): ``2 * 3 * h * I * T`` FLOPs;
* head (final norm, lm_head, sampling): logits of the last position only.

Time on a device is the roofline ``max(flops / peak_flops, bytes / bandwidth) / efficiency
+ node_overhead``. On the server, a node's weights are read once per batch step and shared
by the ``server_batch`` requests of that step, so the request's *share* (its workload) is
``max(flops / F, (weights / b + other) / BW) / eff + overhead / b``, and the latency of a
decode step is ``b`` times that share (the whole batch advances together). A prefill runs
alone (latency with ``b = 1``) but its workload amortises weights over ``b`` like decode.
Workload of a node = prefill share + (output_len - 1) decode shares at the mean context;
TPOT is taken at the longest context ``prompt_len + output_len - 1`` (conservative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model_configs import ModelConfig
from .problem import LayerGraph, LayerNode, PlannerInputError

TOKEN_ID_BYTES = 4  # int32 token ids on the wire
GRANULARITIES = ("block", "subblock")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device class for the roofline (server GPU, phone, laptop, edge box)."""

    name: str
    peak_flops: float  # dense FLOP/s at the model dtype
    mem_bandwidth: float  # bytes/s
    efficiency: float = 1.0  # fraction of the roofline achieved (fit by calibration)
    node_overhead_s: float = 0.0  # fixed time per node per pass (kernel launches, ...)

    def __post_init__(self) -> None:
        for name in ("peak_flops", "mem_bandwidth"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PlannerInputError(f"DeviceSpec({self.name!r}).{name} must be > 0, got {value!r}")
        if not 0 < self.efficiency <= 1:
            raise PlannerInputError(
                f"DeviceSpec({self.name!r}).efficiency must be in (0, 1], got {self.efficiency!r}")
        if not math.isfinite(self.node_overhead_s) or self.node_overhead_s < 0:
            raise PlannerInputError(
                f"DeviceSpec({self.name!r}).node_overhead_s must be >= 0, got {self.node_overhead_s!r}")

    def share_s(self, cost: NodeCost, batch: int = 1) -> float:
        """This request's share of a batch step of ``batch`` requests of the same shape."""
        roof = max(cost.flops / self.peak_flops,
                   (cost.weight_bytes / batch + cost.other_bytes) / self.mem_bandwidth)
        return roof / self.efficiency + self.node_overhead_s / batch


@dataclass(frozen=True, slots=True)
class RequestShape:
    prompt_len: int  # tokens in the prefill pass
    output_len: int  # generated tokens (the first comes from the prefill pass)
    server_batch: int = 1  # sequences sharing each server batch step (occupancy)

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len", "server_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlannerInputError(f"RequestShape.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    weight_bytes: float
    other_bytes: float  # KV cache and activations (not shared across a batch)


def node_cost(model: ModelConfig, kind: str, *, phase: str, tokens: int, context: int) -> NodeCost:
    """Cost of one node (``attn``, ``mlp``, ``block`` or ``head``) in one pass.

    ``phase="prefill"``: ``tokens`` new tokens, no cache. ``phase="decode"``: one new token
    attending to ``context`` cached tokens plus itself.
    """
    if phase not in ("prefill", "decode"):
        raise PlannerInputError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if kind == "block":
        a = node_cost(model, "attn", phase=phase, tokens=tokens, context=context)
        m = node_cost(model, "mlp", phase=phase, tokens=tokens, context=context)
        return NodeCost(a.flops + m.flops, a.weight_bytes + m.weight_bytes, a.other_bytes + m.other_bytes)
    h, db = model.hidden_size, model.dtype_bytes
    t = tokens if phase == "prefill" else 1
    act = 2 * t * h * db
    if kind == "attn":
        q_dim, kv_dim = h, model.kv_dim
        params = h * (q_dim + 2 * kv_dim) + q_dim * h
        if phase == "prefill":
            core = 2 * q_dim * tokens * (tokens + 1)
            kv = 2 * (2 * kv_dim * db * tokens)  # write the new KV, read it back
        else:
            core = 4 * q_dim * (context + 1)
            kv = 2 * kv_dim * db * (context + 2)  # read the cache, write the new entry
        return NodeCost(2 * params * t + core, params * db, kv + act)
    if kind == "mlp":
        params = 3 * h * model.intermediate_size
        return NodeCost(2 * params * t, params * db, act)
    if kind == "head":
        params = model.vocab_size * h
        return NodeCost(2 * params, params * db, h * db + 4 * model.vocab_size)
    raise PlannerInputError(f"node kind must be attn, mlp, block or head, got {kind!r}")


def node_kinds(model: ModelConfig, granularity: str, include_head: bool = True) -> list[tuple[str, str]]:
    """``(name, kind)`` per node: ``block`` or ``attn``/``mlp`` per layer, then the head."""
    if granularity not in GRANULARITIES:
        raise PlannerInputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    out: list[tuple[str, str]] = []
    for layer in range(model.num_hidden_layers):
        if granularity == "block":
            out.append((f"layer{layer}", "block"))
        else:
            out += [(f"layer{layer}.attn", "attn"), (f"layer{layer}.mlp", "mlp")]
    if include_head:
        out.append(("head", "head"))
    return out


def build_graph(model: ModelConfig, request: RequestShape, *, client: DeviceSpec, server: DeviceSpec,
                granularity: str = "block", include_head: bool = True) -> LayerGraph:
    """The planner's input for one request, from the analytic model."""
    p, n_out, b = request.prompt_len, request.output_len, request.server_batch
    ctx_max = p + n_out - 1  # cached tokens at the last decode step
    ctx_mean = p + n_out // 2
    cache: dict[str, LayerNode] = {}
    nodes = []
    for name, kind in node_kinds(model, granularity, include_head):
        if kind not in cache:
            pre = node_cost(model, kind, phase="prefill", tokens=p, context=0)
            dec = node_cost(model, kind, phase="decode", tokens=1, context=ctx_max)
            mean = node_cost(model, kind, phase="decode", tokens=1, context=ctx_mean)
            work = server.share_s(pre, b) + (n_out - 1) * server.share_s(mean, b)
            cache[kind] = LayerNode(
                name=kind,
                client_prefill_s=client.share_s(pre),
                client_decode_s=client.share_s(dec),
                server_prefill_s=server.share_s(pre),
                server_decode_s=b * server.share_s(dec, b),
                server_work=work,
            )
        node = cache[kind]
        nodes.append(LayerNode(name, node.client_prefill_s, node.client_decode_s,
                               node.server_prefill_s, node.server_decode_s, node.server_work))
    hidden = model.hidden_size * model.dtype_bytes
    prefill_edges = [p * TOKEN_ID_BYTES] + [p * hidden] * (len(nodes) - 1) + [TOKEN_ID_BYTES]
    decode_edges = [TOKEN_ID_BYTES] + [hidden] * (len(nodes) - 1) + [TOKEN_ID_BYTES]
    if include_head and len(nodes) > 1:
        prefill_edges[-2] = hidden  # the head needs the last position only
    return LayerGraph(nodes=tuple(nodes), prefill_edge_bytes=tuple(prefill_edges),
                      decode_edge_bytes=tuple(decode_edges), num_output_tokens=n_out)
