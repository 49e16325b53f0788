"""The API server's rules for U-shaped sessions (:mod:`vllm_split.wire.ushape` has the frames).

Runs in the API server process, for :class:`vllm_split.api.session.ServerSession`. A U
session's engine request runs layers ``[k, m)`` only and never sees a token id: its prompt
ids are placeholders (as for every split request), its sampling is the server's own (greedy
on a zero logits row: the engine's bookkeeping gets a placeholder token per step, which is
never sent), with ``ignore_eos`` and no stop ids, so only the server's limits (the client's
``max_tokens`` within ``max_tokens_per_session``, the max model length) end it; the client
stops earlier with ``Close``. Each engine output carries the step's layer-``m`` rows
(:mod:`vllm_split.engine.returns`), which go to the client as ``Hidden`` frames.
"""
from __future__ import annotations

from typing import Any

from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import RETURN_KEY
from vllm_split.wire.ushape import u_layers_problem

FRAME_HEADROOM = 4096  # bytes of a frame left for its header and metadata


def check_fixed_u(msg: wire.Open, *, num_layers: int, min_layer: int) -> str | None:
    """Why a U-shaped Open with a fixed (split_layer, return_layer) cannot be served, or None
    (the privacy floor on ``split_layer`` is checked with the prefix split's rules)."""
    problem = u_layers_problem(msg.split_layer, msg.return_layer, num_layers, min_layer=min_layer)
    if problem is not None:
        return problem
    return stop_ids_problem(msg)


def u_shape_unsupported(vllm_config: Any) -> str | None:
    """Why this server cannot run U-shaped sessions, or None: the worker's reasons
    (``SplitRunnerMixin._split_u_why``), known here from the config. Their rows leave the layer
    loop at ``m``, which only the compact forward does, on a single pipeline stage; a U request
    in a step the worker cannot run that way would fail the step. Refused at Open instead,
    with this reason."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return (f"this server runs on {current_platform.device_name}, where the compact forward that U-shaped "
                "sessions need is not validated yet")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return ("this server runs pipeline parallelism, where U-shaped sessions are not supported yet (their rows "
                "leave the forward pass at their return layer on a single stage only)")
    return None


def stop_ids_problem(msg: wire.Open) -> str | None:
    if msg.sampling.stop_token_ids:
        return (f"sampling.stop_token_ids {list(msg.sampling.stop_token_ids)[:4]}: a U-shaped session samples on the "
                "client, which applies its stop tokens itself; send none (token ids never go to the server)")
    return None


def u_sampling_params(*, max_tokens: int, extra_args: dict[str, Any]) -> SamplingParams:
    """The engine request's sampling: placeholder tokens until the server's limits."""
    return SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA, extra_args=extra_args)


def hidden_frames(out: Any, *, index: int, end: int, finish_reason: str | None, wire_dtype: str | None,
                  max_frame_bytes: int) -> list[wire.Hidden]:
    """The ``Hidden`` frames of an engine output for output ``index``, whose rows must end at
    position ``end`` (exclusive); frames fit ``max_frame_bytes``, the last one carries
    ``finish_reason``. Raises ValueError when the output does not carry those rows."""
    payload = (getattr(out, "kv_transfer_params", None) or {}).get(RETURN_KEY)
    if payload is None:
        raise ValueError(f"output {index} of a U-shaped request carries no layer rows")
    start, num_rows = int(payload["start"]), int(payload["rows"])
    if start + num_rows != end:
        raise ValueError(f"output {index} carries rows for positions [{start}, {start + num_rows}), "
                         f"expected rows ending at position {end}")
    dtype, data = payload["dtype"], payload["data"]
    rows = wire.decode_tensor(dtype, (num_rows, len(data) // (num_rows * wire.TENSOR_DTYPES[dtype])), data)
    per_row = wire.row_bytes(wire_dtype or payload["dtype"], rows.shape[1])
    step = max(1, (max_frame_bytes - FRAME_HEADROOM) // per_row)
    frames = []
    for begin in range(0, num_rows, step):
        stop = min(begin + step, num_rows)
        frames.append(wire.Hidden.from_tensor(rows[begin:stop], index=index, start=start + begin, wire_dtype=wire_dtype,
                                              finish_reason=finish_reason if stop == num_rows else None))
    return frames
