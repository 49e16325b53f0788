"""Measure a session's network on its own connection before planning (server side).

The server sends ``Probe`` frames and times the client's ``ProbeReply``: a few empty ones
give the round-trip time (the minimum), one carrying ``upload_bytes`` of payload gives the
client->server bandwidth (its extra time over the RTT). Nothing the client claims about
its network is used. The downlink carries only token ids (4 bytes a step), so it is taken
to be as fast as the uplink. The probe costs the session four round trips and a 64 KiB
upload before its first token (measured: 25 ms on a LAN, 100 ms on Wi-Fi, 325 ms on 4G with
the Open's own round trip and admission), so it is skipped where the placement cannot depend
on the network (``UNPROBED``; the session module's ``handle_open``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from vllm_split.wire import protocol as wire
from vllm_split.planner import NetworkSpec

# The network a session is planned on before its probe (AdmissionController.admit_unprobed):
# slower than the networks the workloads model (4G: 50 ms, 10 Mbit/s up), so that a placement
# that meets the SLA on it meets it on the session's own network.
UNPROBED = NetworkSpec(uplink_bps=1e6, downlink_bps=1e6, rtt_s=0.3)
PINGS = 3
UPLOAD_BYTES = 64 * 1024
MAX_BPS = 1e11  # loopback measures "instant": cap at 100 Gbit/s
TIMEOUT_S = 10.0


class ProbeFailed(Exception):
    pass


async def measure_network(send: Callable[[wire.Message], Awaitable[None]],
                          receive: Callable[[], Awaitable[wire.Message | None]], *,
                          pings: int = PINGS, upload_bytes: int = UPLOAD_BYTES) -> NetworkSpec:
    async def round_trip(nonce: int, reply_bytes: int) -> float:
        t0 = time.perf_counter()
        await send(wire.Probe(nonce=nonce, reply_bytes=reply_bytes))
        try:
            reply = await asyncio.wait_for(receive(), timeout=TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProbeFailed(f"no ProbeReply within {TIMEOUT_S} s") from None
        if reply is None:
            raise ProbeFailed("the client left during the network probe")
        if not isinstance(reply, wire.ProbeReply) or reply.nonce != nonce or len(reply.data) != reply_bytes:
            got = (f"ProbeReply(nonce={reply.nonce}, {len(reply.data)} bytes)" if isinstance(reply, wire.ProbeReply)
                   else type(reply).__name__)
            raise ProbeFailed(f"expected ProbeReply(nonce={nonce}, {reply_bytes} bytes), got {got}")
        return time.perf_counter() - t0

    rtt = min([await round_trip(i + 1, 0) for i in range(pings)])
    upload_s = await round_trip(pings + 1, upload_bytes) - rtt
    bps = min(MAX_BPS, 8.0 * upload_bytes / max(upload_s, 8.0 * upload_bytes / MAX_BPS))
    return NetworkSpec(uplink_bps=bps, downlink_bps=bps, rtt_s=rtt)
