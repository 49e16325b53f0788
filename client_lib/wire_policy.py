"""Which wire dtypes a client offers at Open (``SplitSession.create(wire_dtype=...)``).

Process: the client. Pure (no torch, no network): names in, the offer out.

``wire_dtype=None`` offers nothing: the rows go in the tensor's own dtype (float32 from
:class:`~client_lib.local_layers.LocalLayers`), as before the 8-bit formats existed. A name
(``"float16"``, ``"int8_mixed"``, ...) offers that one alone: the server takes it or refuses
the session (``wire_dtype``). ``"auto"`` offers, smallest per row first, every format whose
*measured* greedy agreement with float32 on this model is at least ``min_agreement``; the
server takes the first it accepts. Agreement is measured, not assumed: a model without
measurements here (:data:`MEASURED`, keyed by the model fingerprint, which names exact
weights) gets no offer, i.e. float32 (exact): nothing says how much a smaller format would
cost it.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm_split.wire import quant
from vllm_split.wire.protocol import WIRE_DTYPES, row_bytes

DEFAULT_MIN_AGREEMENT = 0.85  # greedy token match rate vs float32, at the worst split layer measured


@dataclass(frozen=True, slots=True)
class Measured:
    """Greedy agreement of each wire dtype with float32 on one model."""

    model: str
    hidden_size: int
    # wire dtype -> the lowest greedy token match rate over the split layers measured
    agreement: dict[str, float]


# Copied from results/bench_wire_precision.json ("summary" -> <dtype> -> min_token_match_rate,
# rounded down to 4 decimals; benchmarks/bench_wire_precision.py at git 742a363: 24 chat
# prompts x 64 free-running greedy tokens compared position by position with float32's,
# split layers 1, 7, 15, 29). They hold for SmolLM2-135M-Instruct as `python -m
# harness.model_prep` prepares it (float32 from the Q4_1 GGUF: this fingerprint) and for no
# other model: rerun the benchmark for another one and add its row here.
MEASURED: dict[str, Measured] = {
    "fp1-35da78e77b6f529705d4f6edd40f08900e9daacc7a1d88489a88c8cfacbe6621": Measured(
        model="SmolLM2-135M-Instruct-f32", hidden_size=576,
        agreement={"float32": 1.0, "float16": 1.0, "bfloat16": 0.9257, "int8_mixed": 0.8678,
                   "fp8_e4m3": 0.6035, "int8_row": 0.1510}),
}


def offered_wire_dtypes(fingerprint: str, wire_dtype: str | None, *,
                        min_agreement: float = DEFAULT_MIN_AGREEMENT) -> tuple[str, ...]:
    """The wire dtypes to offer at Open (``Open.wire_dtypes``), preferred first (see the
    module docstring). Raises ValueError for an unknown name, an agreement outside [0, 1],
    or an 8-bit format this torch cannot encode."""
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement: expected a token match rate in [0, 1], got {min_agreement!r}")
    if wire_dtype is None:
        return ()
    if wire_dtype != "auto":
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype: expected None, 'auto' or one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
        if not _encodable(wire_dtype):
            raise ValueError(f"wire_dtype {wire_dtype}: this torch cannot encode it (no float8_e4m3fn)")
        return (wire_dtype,)
    measured = MEASURED.get(fingerprint)
    if measured is None:
        return ()
    passing = [d for d, a in measured.agreement.items() if a >= min_agreement and _encodable(d)]
    passing.sort(key=lambda d: (row_bytes(d, measured.hidden_size), -measured.agreement[d]))
    return tuple(passing)


def _encodable(dtype: str) -> bool:
    return dtype not in quant.FORMATS or quant.can_encode(dtype)
