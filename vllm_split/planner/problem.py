"""Typed records of the placement problem: the layer chain, the network, the SLA, the
placement shapes and the planner's answer.

Conventions used everywhere in the planner:

* Nodes are indexed ``0 .. N-1`` in forward order. A node is one decoder block, one
  sub-block (attention or MLP) or the LM head (final norm + lm_head + sampling).
* Edge ``i`` enters node ``i``; edge ``0`` carries the token ids into the model and edge
  ``N`` the sampled token out of it. Ranges are half-open ``[start, end)``.
* Location ``client`` or ``server`` per node. The client always holds the prompt tokens at
  the input and must receive every sampled token at the output.
* Times are seconds (floats); sizes are bytes; bandwidths are bits per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class PlannerInputError(ValueError):
    """A planner input is malformed; the message names the bad value and the expected one."""


class Shape(str, Enum):
    """Placement shapes: which client/server patterns a plan may use."""

    PREFIX = "prefix"  # client runs [0, split_layer), server runs [split_layer, N)
    U = "u"  # client runs [0, k) and [m, N), server runs [k, m)
    GENERAL = "general"  # any sequence of client/server switches (the paper's)


def _check_time(owner: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PlannerInputError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class LayerNode:
    """One node of the chain with its per-request costs on either side."""

    name: str
    client_prefill_s: float  # client time for this node in the prefill pass
    client_decode_s: float  # client time for one decode step (at the longest context)
    server_prefill_s: float  # server time (latency) in the prefill pass
    server_decode_s: float  # server time (latency) of one decode step in its batch
    server_work: float  # server workload of the request on this node (any unit, >= 0)

    def __post_init__(self) -> None:
        for name in ("client_prefill_s", "client_decode_s", "server_prefill_s",
                     "server_decode_s", "server_work"):
            _check_time(f"LayerNode({self.name!r})", name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class LayerGraph:
    """The chain of nodes of one request, with the bytes crossing each edge.

    ``prefill_edge_bytes[i]`` / ``decode_edge_bytes[i]`` (length N+1) are the bytes sent
    when edge ``i`` crosses the network in the prefill pass / one decode step. In decode
    the sampled token re-enters the model: edge ``0``'s decode size is the token fed back
    from the side holding node N-1 to the side holding node 0 (free when both match).
    """

    nodes: tuple[LayerNode, ...]
    prefill_edge_bytes: tuple[int, ...]
    decode_edge_bytes: tuple[int, ...]
    num_output_tokens: int = 1  # decode length of the request (for e2e and "fastest")

    def __post_init__(self) -> None:
        num_nodes = len(self.nodes)
        if num_nodes == 0:
            raise PlannerInputError("LayerGraph.nodes must hold at least 1 node, got 0")
        for name in ("prefill_edge_bytes", "decode_edge_bytes"):
            edges = getattr(self, name)
            if len(edges) != num_nodes + 1:
                raise PlannerInputError(
                    f"LayerGraph.{name} must have num_nodes + 1 = {num_nodes + 1} entries "
                    f"(input edge, {num_nodes - 1} inner edges, output edge), got {len(edges)}")
            for i, size in enumerate(edges):
                if not isinstance(size, int) or size < 0:
                    raise PlannerInputError(
                        f"LayerGraph.{name}[{i}] must be an int >= 0 bytes, got {size!r}")
        if not isinstance(self.num_output_tokens, int) or self.num_output_tokens < 1:
            raise PlannerInputError(
                f"LayerGraph.num_output_tokens must be an int >= 1, got {self.num_output_tokens!r}")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """A client's link to the server. A message of B bytes in one direction takes
    ``rtt_s / 2 + 8 * B / bandwidth``."""

    uplink_bps: float  # client -> server, bits per second
    downlink_bps: float  # server -> client, bits per second
    rtt_s: float  # round-trip time, seconds

    def __post_init__(self) -> None:
        for name in ("uplink_bps", "downlink_bps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PlannerInputError(
                    f"NetworkSpec.{name} must be a finite number > 0 bits/s, got {value!r}")
        _check_time("NetworkSpec", "rtt_s", self.rtt_s)

    def uplink_s(self, num_bytes: int) -> float:
        return self.rtt_s / 2 + 8.0 * num_bytes / self.uplink_bps

    def downlink_s(self, num_bytes: int) -> float:
        return self.rtt_s / 2 + 8.0 * num_bytes / self.downlink_bps


@dataclass(frozen=True, slots=True)
class SLA:
    """Latency bounds of one request; ``None`` means unbounded, at least one is set.

    ``e2e_s`` bounds ``TTFT + (num_output_tokens - 1) * TPOT`` of the request's graph.
    """

    ttft_s: float | None = None  # time to first token (prefill pass + transfers)
    tpot_s: float | None = None  # time per output token (one decode step + transfers)
    e2e_s: float | None = None  # end-to-end bound for the request's output length

    def __post_init__(self) -> None:
        bounds = {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}
        if all(value is None for value in bounds.values()):
            raise PlannerInputError("SLA needs at least one of ttft_s, tpot_s, e2e_s; got none")
        for name, value in bounds.items():
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PlannerInputError(
                    f"SLA.{name} must be a finite number > 0 seconds or None, got {value!r}")

    def is_met(self, ttft_s: float, tpot_s: float, e2e_s: float) -> bool:
        return ((self.ttft_s is None or ttft_s <= self.ttft_s)
                and (self.tpot_s is None or tpot_s <= self.tpot_s)
                and (self.e2e_s is None or e2e_s <= self.e2e_s))


@dataclass(frozen=True, slots=True)
class Placement:
    """Which nodes run on the client: a tuple of half-open ``[start, end)`` ranges.

    The ranges are sorted, non-empty and non-adjacent; every other node runs on the server.
    """

    shape: Shape
    num_nodes: int
    client_ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise PlannerInputError(f"Placement.num_nodes must be an int >= 1, got {self.num_nodes!r}")
        prev_end = -1
        for start, end in self.client_ranges:
            if not (0 <= start < end <= self.num_nodes) or start <= prev_end:
                raise PlannerInputError(
                    f"Placement.client_ranges must be sorted, non-empty, non-adjacent ranges "
                    f"within [0, {self.num_nodes}), got {self.client_ranges!r}")
            prev_end = end
        ranges, n = self.client_ranges, self.num_nodes
        if self.shape is Shape.PREFIX and (len(ranges) > 1 or (ranges and ranges[0][0] != 0)):
            raise PlannerInputError(
                f"a prefix placement has at most one client range starting at 0, got {ranges!r}")
        if self.shape is Shape.U and not _is_u(ranges, n):
            raise PlannerInputError(
                f"a U placement has client ranges only at [0, k) and [m, {n}), got {ranges!r}")

    @classmethod
    def from_mask(cls, on_client: tuple[bool, ...] | list[bool], shape: Shape) -> Placement:
        ranges: list[tuple[int, int]] = []
        start = None
        for i, client in enumerate(on_client):
            if client and start is None:
                start = i
            elif not client and start is not None:
                ranges.append((start, i))
                start = None
        if start is not None:
            ranges.append((start, len(on_client)))
        return cls(shape=shape, num_nodes=len(on_client), client_ranges=tuple(ranges))

    @classmethod
    def prefix(cls, split_layer: int, num_nodes: int) -> Placement:
        if not isinstance(split_layer, int) or not 0 <= split_layer <= num_nodes:
            raise PlannerInputError(
                f"split_layer must be an int in [0, {num_nodes}], got {split_layer!r}")
        ranges = ((0, split_layer),) if split_layer else ()
        return cls(shape=Shape.PREFIX, num_nodes=num_nodes, client_ranges=ranges)

    @property
    def on_client(self) -> tuple[bool, ...]:
        mask = [False] * self.num_nodes
        for start, end in self.client_ranges:
            mask[start:end] = [True] * (end - start)
        return tuple(mask)

    @property
    def split_layer(self) -> int:
        """Prefix shape only: the client runs ``[0, split_layer)``; 0 is server-only."""
        if self.shape is not Shape.PREFIX:
            raise PlannerInputError(f"split_layer is defined for the prefix shape, not {self.shape.value!r}")
        return self.client_ranges[0][1] if self.client_ranges else 0

    @property
    def num_client_nodes(self) -> int:
        return sum(end - start for start, end in self.client_ranges)


def _is_u(ranges: tuple[tuple[int, int], ...], num_nodes: int) -> bool:
    if len(ranges) > 2:
        return False
    if len(ranges) == 2:
        return ranges[0][0] == 0 and ranges[1][1] == num_nodes
    return not ranges or ranges[0][0] == 0 or ranges[0][1] == num_nodes


@dataclass(frozen=True, slots=True)
class PlanResult:
    """A plan: the placement with its predicted latencies (exact, not ticked) and workload."""

    placement: Placement
    feasible: bool  # False: no placement of the shape meets the SLA; placement is the fastest
    ttft_s: float
    tpot_s: float
    e2e_s: float  # ttft_s + (num_output_tokens - 1) * tpot_s
    server_work: float  # sum of server_work over the server's nodes
    method: str  # "dp", "greedy", "server_only", "client_max", ...
    tick_s: float | None = None  # latency granularity the planner used (None: exact floats)
