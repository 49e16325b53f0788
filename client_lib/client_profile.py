"""This device's speed for one decoder layer, measured once and cached per device and model,
and the most layers it holds (``LocalLayers(max_layers=...)``, sent as ``ClientProfile.max_layers``).

The admission controller plans with it (``Open.client``). Measured with the client library
itself: a prefill of ``PREFILL_TOKENS`` and ``DECODE_STEPS`` decode steps through the layers
this client loaded, timed per layer; cached as JSON under
``$VLLM_SPLIT_CACHE`` (default ``~/.cache/vllm-split``)``/client-profiles/``, keyed by the
model fingerprint, device, dtype, torch thread count and CPU model.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from vllm_split.wire import protocol as wire

PREFILL_TOKENS = 64
DECODE_STEPS = 8


def _cache_path(layers) -> Path:
    cpu = platform.processor() or platform.machine()
    key = f"{layers.fingerprint}|{layers.device}|{layers.dtype}|{torch.get_num_threads()}|{cpu}"
    root = Path(os.environ.get("VLLM_SPLIT_CACHE", Path.home() / ".cache" / "vllm-split"))
    return root / "client-profiles" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def measure(layers) -> wire.ClientProfile:
    """Time the loaded layers (``layers.split_layer`` of them, at least one)."""
    n = max(layers.split_layer, 1)
    if layers.split_layer == 0:
        raise ValueError("measuring needs at least one local layer: load the layers with split_layer='auto'")
    vocab = layers.model.embed_tokens.num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (PREFILL_TOKENS + DECODE_STEPS + 8,), generator=gen).tolist()
    layers.reset()
    layers.forward(ids[:8])  # warm-up
    layers.reset()
    t0 = time.perf_counter()
    layers.forward(ids[:PREFILL_TOKENS])
    prefill = (time.perf_counter() - t0) / n / PREFILL_TOKENS
    steps = []
    for i in range(DECODE_STEPS):
        t0 = time.perf_counter()
        layers.forward([ids[PREFILL_TOKENS + i]])
        steps.append((time.perf_counter() - t0) / n)
    layers.reset()
    return wire.ClientProfile(layer_prefill_s_per_token=prefill, layer_decode_s=statistics.median(steps))


def with_bound(profile: wire.ClientProfile, max_layers: int | None) -> wire.ClientProfile:
    """``profile`` holding at most ``max_layers`` decoder layers (the tighter of its own
    bound and ``max_layers``; None: no bound to add)."""
    if max_layers is None or (profile.max_layers is not None and profile.max_layers <= max_layers):
        return profile
    return replace(profile, max_layers=max_layers)


def client_profile(layers, *, refresh: bool = False) -> wire.ClientProfile:
    """The cached profile of this device for this model, measured on first use, with the
    layers' memory bound (``layers.max_layers``). A client holding no layer
    (``max_layers=0``) has no speed to measure: its profile is the bound alone."""
    bound = getattr(layers, "max_layers", None)
    if bound == 0:
        return wire.ClientProfile(max_layers=0)
    return with_bound(_speed(layers, refresh), bound)


def _speed(layers, refresh: bool) -> wire.ClientProfile:
    path = _cache_path(layers)
    if path.exists() and not refresh:
        try:
            return wire.ClientProfile(**json.loads(path.read_text())["profile"])
        except (ValueError, KeyError, TypeError, wire.ProtocolError):
            pass  # unreadable cache: measure again
    profile = measure(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_fingerprint": layers.fingerprint, "device": str(layers.device),
                               "threads": torch.get_num_threads(), "measured_at": time.time(),
                               "profile": {"layer_prefill_s_per_token": profile.layer_prefill_s_per_token,
                                           "layer_decode_s": profile.layer_decode_s}}))
    tmp.replace(path)
    return profile
