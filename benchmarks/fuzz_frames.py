"""Adversarial frames for the live fuzz run (``fuzz_live.py``), by session state.

Every maker returns a frame (bytes, or str for a text frame) that the server must refuse
in the given state: ``fresh`` (no Open yet), ``prompt`` (opened, no prompt), ``decode``
(a token was sent, the server waits for the activation at ``position``). Values are
drawn from a seeded ``random.Random`` so a run can be repeated.
"""
from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_split.wire import protocol as wire

HEADER = struct.Struct("<4sBBI")
HIDDEN = 576


@dataclass
class State:
    name: str  # fresh | prompt | decode
    fingerprint: str
    split_layer: int
    position: int = 0  # decode: the position the server waits for
    max_frame_bytes: int = 8 * 1024 * 1024


def frame(kind: int, meta: dict | list | bytes, payload: bytes = b"", *, version: int = wire.PROTOCOL_VERSION,
          meta_len: int | None = None) -> bytes:
    m = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return HEADER.pack(wire.MAGIC, version, kind, len(m) if meta_len is None else meta_len) + m + payload


def activation_meta(start: int, shape, dtype: str = "float32", **extra) -> dict:
    return {"start": start, "dtype": dtype, "shape": shape, "end_of_prompt": True, **extra}


def rows(n: int, rng: random.Random) -> bytes:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return (torch.randn(n, HIDDEN, generator=g) * 0.5).numpy().tobytes()


def _position(s: State) -> int:
    return s.position if s.name == "decode" else 0


# ---------------------------------------------------------------- any state
def random_bytes(s, rng):
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))


def truncated_header(s, rng):
    return frame(wire.Close.KIND, {})[: rng.randrange(0, wire.HEADER_SIZE)]


def bad_magic(s, rng):
    return b"XSPL" + frame(wire.Close.KIND, {})[4:]


def bad_version(s, rng):
    return frame(wire.Close.KIND, {}, version=rng.choice([0, 2, 255]))


def unknown_kind(s, rng):
    return frame(rng.choice([0, 8, 99, 255]), {})


def huge_meta_length(s, rng):
    return frame(wire.Activation.KIND, b"{}", rows(1, rng), meta_len=rng.choice([2**32 - 1, 2**31, 65 * 1024, 10**6]))


def meta_not_json(s, rng):
    return frame(wire.Activation.KIND, rng.choice([b"{", b"\xff\xfe{}", b"[" * 5000, b'{"start":' + b"9" * 5000 + b"}",
                                                  b"NaN", b""]))


def meta_not_object(s, rng):
    return frame(wire.Open.KIND, rng.choice([[], [1, 2], "x", 3, None]))


def unknown_field(s, rng):
    return frame(wire.Activation.KIND, activation_meta(_position(s), [1, HIDDEN], session_id="someone-else"), rows(1, rng))


def text_frame(s, rng):
    return rng.choice(["hello", "{}", "VSPL", ""]) or " "


def payload_on_close(s, rng):
    return frame(wire.Close.KIND, {}, b"\0" * rng.randrange(1, 100))


def oversized(s, rng):
    n = s.max_frame_bytes // (HIDDEN * 4) + rng.randrange(1, 50)
    return frame(wire.Activation.KIND, activation_meta(_position(s), [n, HIDDEN]), bytes(n * HIDDEN * 4))


def server_kind(s, rng):
    """A server-to-client message sent by the client: valid frame, wrong direction."""
    msg = rng.choice([wire.Token(index=0, token_id=1), wire.Finished(finish_reason="stop", num_prompt_tokens=1, num_output_tokens=1),
                      wire.Error(code="x", message="y"), wire.Opened(session_id="s", split_layer=1, num_layers=30,
                                                                    hidden_size=HIDDEN, dtype="float32", max_frame_bytes=9)])
    return wire.encode(msg)


# ---------------------------------------------------------------- activations (prompt, decode)
def wrong_dtype(s, rng):
    return frame(wire.Activation.KIND, activation_meta(_position(s), [1, HIDDEN], rng.choice(["int8", "float64", "f32", 5, None])),
                 rows(1, rng))


def wrong_shape(s, rng):
    shape = rng.choice([[1, HIDDEN, 1], [HIDDEN], [0, HIDDEN], [1, -HIDDEN], [1, 100], [2**31, HIDDEN], [1, 2**40], "1x576"])
    return frame(wire.Activation.KIND, activation_meta(_position(s), shape), rows(1, rng))


def wrong_hidden_size(s, rng):
    hidden = rng.choice([1, 100, 575, 577, 4096])
    return frame(wire.Activation.KIND, activation_meta(_position(s), [1, hidden]), bytes(4 * hidden))


def extreme_sampling(rng: random.Random) -> wire.SamplingOptions:
    """Valid but extreme sampling values: the session must run (or be refused clearly)."""
    return wire.SamplingOptions(max_tokens=32, ignore_eos=True, temperature=rng.choice([0.0, 1e-6, 1e6]),
                                top_p=rng.choice([1.0, 1e-9]), top_k=rng.choice([0, 1, 2**20]),
                                seed=rng.choice([None, 0, 2**63 - 1]), stop_token_ids=tuple(rng.sample([0, 2, 10**9], 2)))


def wrong_payload_size(s, rng):
    data = rows(2, rng)
    return frame(wire.Activation.KIND, activation_meta(_position(s), [1, HIDDEN]), data[: rng.choice([0, 1, 100, 4 * HIDDEN - 1])]
                 if rng.random() < 0.5 else data)


def non_finite(s, rng):
    t = torch.randn(1 if s.name == "decode" else rng.randrange(1, 8), HIDDEN)
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    return wire.encode(wire.Activation.from_tensor(t.to(dtype), start=_position(s), end_of_prompt=True))


def out_of_order(s, rng):
    start = rng.choice([_position(s) + rng.randrange(1, 50), max(0, _position(s) - rng.randrange(1, 5)) if s.name == "decode" else 7,
                        2**62, -1])
    return frame(wire.Activation.KIND, activation_meta(start, [1, HIDDEN]), rows(1, rng))


def reopen(s, rng):
    return wire.encode(wire.Open(model_fingerprint=s.fingerprint, split_layer=s.split_layer))


def decode_many_rows(s, rng):
    n = rng.randrange(2, 6)
    return frame(wire.Activation.KIND, activation_meta(s.position, [n, HIDDEN], end_of_prompt=False), rows(n, rng))


# ---------------------------------------------------------------- fresh connections
def bad_open(s, rng):
    """An Open the server must refuse: all fatal but the ones the decoder refuses."""
    meta = {"model_fingerprint": s.fingerprint, "split_layer": s.split_layer}
    which = rng.randrange(7)
    if which == 0:
        meta["model_fingerprint"] = "fp1-" + "0" * rng.randrange(1, 64)
    elif which == 1:
        meta["split_layer"] = rng.choice([31, 1000, 2**40])
    elif which == 2:
        meta["protocol_version"] = rng.choice([0, 2, 99])
    elif which == 3:
        meta["sampling"] = {"max_tokens": rng.choice([0, -1, 10**9, "x"])}
    elif which == 4:
        meta["sampling"] = {"temperature": rng.choice([-1, "hot", None]), "top_p": rng.choice([0, 1.5])}
    elif which == 5:
        meta["split_layer"] = rng.choice([-1, 1.5, "7", None])
    else:
        meta["sampling"] = {"stop_token_ids": rng.choice([[-1], "x", [1.5], {"a": 1}])}
    return frame(wire.Open.KIND, meta)


def activation_before_open(s, rng):
    return wire.encode(wire.Activation.from_tensor(torch.randn(1, HIDDEN), start=0, end_of_prompt=True))


Maker = Callable[[State, random.Random], "bytes | str"]
ANY: dict[str, Maker] = {f.__name__: f for f in (random_bytes, truncated_header, bad_magic, bad_version, unknown_kind,
                                                  huge_meta_length, meta_not_json, meta_not_object, unknown_field, text_frame,
                                                  payload_on_close)}
ACTIVATION: dict[str, Maker] = {f.__name__: f for f in (wrong_dtype, wrong_shape, wrong_hidden_size, wrong_payload_size, non_finite,
                                                         out_of_order, reopen, server_kind)}
MAKERS: dict[str, dict[str, Maker]] = {
    "fresh": {**ANY, "bad_open": bad_open, "activation_before_open": activation_before_open},
    "prompt": {**ANY, **ACTIVATION},
    "decode": {**ANY, **ACTIVATION, "decode_many_rows": decode_many_rows},
}
RARE = {"oversized": oversized}  # megabytes each: sent now and then
