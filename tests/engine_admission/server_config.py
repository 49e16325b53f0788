"""This folder's server: a default vllm-split server with its admission controller; the
emulated clients' profiles and links."""
from __future__ import annotations

from harness.emulation import EmulatedLink
from vllm_split.wire import protocol as wire

PROMPT = "Write a short poem about the sea and the wind."
LONG = 256  # tokens in the script: enough for the load sessions

FAST = wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4)  # faster than this server
MEDIUM = wire.ClientProfile(layer_prefill_s_per_token=5e-5, layer_decode_s=2.2e-3)  # a bit slower
SLOW = wire.ClientProfile(layer_prefill_s_per_token=2e-4, layer_decode_s=8e-3)  # much slower
LAN = EmulatedLink(rtt_s=0.004, uplink_bps=1e9, downlink_bps=1e9)
WIFI = EmulatedLink(rtt_s=0.02, uplink_bps=5e7, downlink_bps=5e7)
