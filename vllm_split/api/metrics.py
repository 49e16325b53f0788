"""vllm-split's metrics on vLLM's ``/metrics`` (prometheus_client, the registry vLLM serves).

Created once per API-server process, after vLLM has chosen single- or multi-process
collection (``PROMETHEUS_MULTIPROC_DIR``), so they are exported either way.

Every series of a session or of an engine's fit carries the label ``engine``, the DP rank
the session runs on (vLLM's own per-engine label, same values; ``"0"`` without data
parallelism: one schema everywhere). Refusals and the admission queue have no engine yet
and carry none. Under several API servers (``--api-server-count``) the counters and
histograms add up across their processes, the session gauge is summed (``livesum``) and
the per-engine fit is the most recent poll (every API server polls every engine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_RATIO_BUCKETS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
_TOKENS_PER_ROUND_TRIP_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 17.0)  # at most 1 + 16 drafts


@dataclass
class SplitMetrics:
    sessions_open: Any
    split_layer: Any
    offloaded_fraction: Any
    work_done: Any
    work_saved: Any
    predicted_ttft: Any
    measured_ttft: Any
    predicted_tpot: Any
    measured_tpot: Any
    tpot_ratio: Any
    finished: Any
    refusals: Any
    queue_length: Any
    server_cost: Any
    occupancy: Any
    server_decoded: Any
    tokens_per_round_trip: Any
    rows_per_round_trip: Any


_metrics: SplitMetrics | None = None
E = ["engine"]  # the DP rank a series is about


def split_metrics(num_layers: int) -> SplitMetrics:
    global _metrics
    if _metrics is None:
        from prometheus_client import Counter, Gauge, Histogram

        layer_buckets = tuple(float(k) for k in range(num_layers + 1))
        _metrics = SplitMetrics(
            sessions_open=Gauge("vllm_split:sessions_open", "Split sessions open", E, multiprocess_mode="livesum"),
            split_layer=Histogram("vllm_split:placement_split_layer", "Split layer k of admitted sessions", E,
                                  buckets=layer_buckets),
            offloaded_fraction=Histogram("vllm_split:layers_offloaded_fraction",
                                         "Fraction of decoder layers run by the client (k / N)", E,
                                         buckets=tuple(i / 10 for i in range(11))),
            work_done=Counter("vllm_split:server_layer_tokens", "Layer-tokens the server ran for split sessions", E),
            work_saved=Counter("vllm_split:server_layer_tokens_saved",
                               "Layer-tokens clients ran instead of the server (vs server-only)", E),
            predicted_ttft=Histogram("vllm_split:predicted_ttft_seconds", "Controller's predicted time to first token", E,
                                     buckets=_LATENCY_BUCKETS),
            measured_ttft=Histogram("vllm_split:measured_ttft_seconds", "Measured time to first token", E,
                                    buckets=_LATENCY_BUCKETS),
            predicted_tpot=Histogram("vllm_split:predicted_tpot_seconds", "Controller's predicted time per output token", E,
                                     buckets=_LATENCY_BUCKETS),
            measured_tpot=Histogram("vllm_split:measured_tpot_seconds", "Measured time per output token", E,
                                    buckets=_LATENCY_BUCKETS),
            tpot_ratio=Histogram("vllm_split:tpot_measured_over_predicted", "Measured / predicted TPOT per session", E,
                                 buckets=_RATIO_BUCKETS),
            finished=Counter("vllm_split:sessions_finished", "Finished sessions by SLA outcome", ["sla", "engine"]),
            refusals=Counter("vllm_split:refusals", "Sessions refused by the admission controller", ["reason"]),
            queue_length=Gauge("vllm_split:admission_queue_length", "Sessions waiting for admission",
                               multiprocess_mode="livesum"),
            server_cost=Gauge("vllm_split:server_step_cost_seconds",
                              "Live step cost model: fixed per step, per layer call, per layer-row", ["term", "engine"],
                              multiprocess_mode="mostrecent"),
            occupancy=Gauge("vllm_split:server_occupancy", "Mean requests per engine step (last seconds)", E,
                            multiprocess_mode="mostrecent"),
            server_decoded=Counter("vllm_split:sessions_server_decoded",
                                   "Sessions at k = 0 decoded on the server (token ids in, no round trip per token)", E),
            # per engine only: the request type is the client's free text, not a label
            tokens_per_round_trip=Histogram("vllm_split:tokens_per_round_trip",
                                            "Output tokens per decode round trip of finished sessions granted drafts",
                                            E, buckets=_TOKENS_PER_ROUND_TRIP_BUCKETS),
            rows_per_round_trip=Histogram("vllm_split:rows_per_round_trip",
                                          "Decode rows (last token and drafts) per round trip of finished sessions "
                                          "granted drafts", E, buckets=_TOKENS_PER_ROUND_TRIP_BUCKETS),
        )
    return _metrics
