"""The placement ceiling of the throughput experiment's client population (pure: no engine).

How much server capacity could *any* placement free for the workload's clients, on the
server's step model? Every session takes the deepest split layer its own client could run
within its SLA alone: no deeper than its memory bound; its prompt's layers on the client,
the prompt's rows uploaded and one server step within the TTFT bound; its one-row pass, a
round trip and one server step within the TPOT bound. Nothing else is in the way: no queue,
every round trip hidden behind other work, no per-session cost on the server.

A step of ``b`` such sessions, drawn at random from the population (request type, device
class and network by the workload's weights), reads the weights of every layer from its
lowest split layer up (shared by every row that needs the layer) and runs each row's own
layers (:func:`expected_step`, the additive step model of ``docs/server_savings.md``). The
ceiling is plain's step over that expected step: the most a placement could raise the
server's rate at that occupancy, an upper bound for every placement, the DP's included.
``memory_only`` drops the SLA conditions (every client at its memory bound).
"""
from __future__ import annotations

from vllm_split.engine.composition import RooflineCost

OCCUPANCIES = (4, 8, 16)  # sessions per step at which the ceiling is reported


def deepest_k(device: dict, rtype: dict, network: dict, *, layer_decode_s: float, layer_prefill_s_per_token: float,
              step_s: float, num_layers: int, row_bytes: int, memory_only: bool = False) -> int:
    """The deepest split layer at which this client alone keeps this request's SLA
    (``device``: a workload device class; ``layer_*``: the server's per-layer times)."""
    deepest = min(device["max_layers"], num_layers)
    if memory_only:
        return deepest
    prompt, sla = rtype["prompt_tokens"], rtype["sla"]
    up_s = 8 * row_bytes / network["uplink_bps"]  # one row's upload
    for k in range(deepest, 0, -1):
        ttft = (k * prompt * layer_prefill_s_per_token * device["prefill_multiple"] + network["rtt_s"]
                + prompt * up_s + step_s)
        tpot = k * layer_decode_s * device["decode_multiple"] + network["rtt_s"] + up_s + step_s
        if ttft <= sla["ttft_s"] and tpot <= sla["tpot_s"]:
            return k
    return 0


def population(w: dict, **kw) -> list[tuple[float, int, str]]:
    """(probability, deepest split layer, device class) per (request type, device, network)."""
    out = []
    for r in w["request_types"]:
        for d in w["device_classes"]:
            for n in w["networks"]:
                out.append((r["weight"] * d["weight"] * n["weight"], deepest_k(d, r, n, **kw), d["name"]))
    total = sum(p for p, _, _ in out)
    return [(p / total, k, name) for p, k, name in out]


def expected_step(mix: list[tuple[float, int, str]], b: int, num_layers: int, cost: RooflineCost) -> float:
    """Expected step time of ``b`` rows drawn from ``mix``: a layer runs unless every row's
    split layer is above it; each row runs its own layers."""
    layers = sum(1.0 - sum(p for p, k, _ in mix if k > layer) ** b for layer in range(num_layers))
    rows = b * sum(p * (num_layers - k) for p, k, _ in mix)
    return cost.fixed_s + cost.layer_s * layers + cost.row_s * rows


def ceiling(w: dict, server: dict, num_layers: int, row_bytes: int, cost: RooflineCost = RooflineCost(),
            occupancies: tuple[int, ...] = OCCUPANCIES, speed_scale: float = 1.0) -> dict:
    """The ceiling per occupancy, by SLA and by memory alone (module docstring). ``server``:
    the run's measured per-layer times ({decode_s, prefill_s_per_token}); ``speed_scale``
    multiplies the clients' per-layer times (the crossover's scales)."""
    out: dict = {"cost": {"fixed_s": cost.fixed_s, "layer_s": cost.layer_s, "row_s": cost.row_s},
                 "row_bytes": row_bytes, "speed_scale": speed_scale, "by_occupancy": {}}
    for b in occupancies:
        plain = cost.fixed_s + num_layers * (cost.layer_s + b * cost.row_s)
        entry = {"plain_step_s": plain}
        for name, memory_only in (("sla", False), ("memory_only", True)):
            mix = population(w, layer_decode_s=speed_scale * server["decode_s"],
                             layer_prefill_s_per_token=speed_scale * server["prefill_s_per_token"], step_s=plain, num_layers=num_layers, row_bytes=row_bytes, memory_only=memory_only)
            split = expected_step(mix, b, num_layers, cost)
            by_device: dict = {}
            for p, k, device in mix:
                by_device[device] = by_device.get(device, 0.0) + p * k
            shares = {device: sum(p for p, _, d in mix if d == device) for device in by_device}
            entry[name] = {"rate_ratio": plain / split, "split_step_s": split,
                           "mean_k": sum(p * k for p, k, _ in mix),
                           "share_at_k0": sum(p for p, k, _ in mix if k == 0),
                           "mean_k_by_device": {d: v / shares[d] for d, v in by_device.items()}}
        out["by_occupancy"][str(b)] = entry
    return out


def placement_ceiling(w: dict, server: dict, num_layers: int, row_bytes: int,
                      speed_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> dict:
    """The report's ``placement_ceiling``: :func:`ceiling` at the workload's client speeds,
    and its SLA-bound rate ratio per occupancy at each of ``speed_scales``."""
    return {"at_workload_speed": ceiling(w, server, num_layers, row_bytes),
            "sla_rate_ratio_by_speed_scale": {
                f"{s:g}": {b: e["sla"]["rate_ratio"]
                           for b, e in ceiling(w, server, num_layers, row_bytes, speed_scale=s)["by_occupancy"].items()}
                for s in speed_scales}}
