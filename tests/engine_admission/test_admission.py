"""The admission controller on a real engine with emulated clients (issue 5's checks)."""
from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from client_lib import ServerError, SplitSession
from vllm_split.wire.contract import SESSION_PATH
from vllm_split.wire import protocol as wire
from harness.server_process import split_metrics

from harness.emulation import run_emulated as emulated
from tests.engine_admission.server_config import FAST, LAN, MEDIUM, SLOW, WIFI

pytestmark = pytest.mark.engine
SLA = wire.RequestSLA(ttft_s=3.0, tpot_s=0.3)


async def _with_load(url, script, n, body):
    """Run ``body()`` while ``n`` emulated sessions at fixed k keep the engine busy."""
    stop = asyncio.Event()

    async def loader(i):
        while not stop.is_set():
            await emulated(url, script, profile=FAST, link=LAN, sla=None, max_tokens=200, split_layer=15)

    tasks = [asyncio.create_task(loader(i)) for i in range(n)]
    await asyncio.sleep(4.0)  # the controller sees the load (2 s window, polled twice a second)
    try:
        return await body()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_auto_sessions_are_token_exact_and_report_their_placement(admission_server, script):
    async def run():
        out = []
        for profile, link in ((FAST, LAN), (SLOW, WIFI)):
            out.append(await emulated(admission_server.url, script, profile=profile, link=link, sla=SLA, max_tokens=24))
        return out

    for session, tokens, layers in asyncio.run(run()):
        assert tokens == script.expected[:24] and layers.mismatch is None
        assert session.opened.placement in ("dp", "least_offload", "server_only")
        assert session.opened.predicted_tpot_s > 0 and session.opened.predicted_ttft_s > 0


def test_a_privacy_floor_lifts_an_idle_servers_placement_to_it(admission_server, script):
    """Idle, this client is decoded on the server (k = 0: its token ids go); with
    privacy_floor=12 it is placed at k >= 12, sends activations from there and never its token
    ids, and gets the same tokens."""
    floor, n = 12, 24

    async def run(privacy_floor: int):
        await asyncio.sleep(2.5)  # the measured load's window (2 s) empties: an idle server
        layers = script.layers(FAST)
        sent: list[wire.Message] = []
        async with await SplitSession.create(admission_server.url, layers, sla=SLA, profile=FAST, link=LAN,
                                             sampling=wire.SamplingOptions(max_tokens=n, ignore_eos=True),
                                             privacy_floor=privacy_floor) as session:
            send = session._send

            async def recording(msg):
                sent.append(msg)
                await send(msg)

            session._send = recording  # split_layer auto: the Open goes in generate, recorded too
            tokens = [e.token_id async for e in session.generate(script.prompt_ids)]
        return session.opened, tokens, layers, sent

    opened, tokens, layers, sent = asyncio.run(run(floor))
    free, free_tokens, _, _ = asyncio.run(run(0))  # last: it leaves the steps of an ordinary request behind
    print({"with_floor": opened, "without": free})
    assert (free.split_layer, free.server_decode) == (0, True) and free_tokens == script.expected[:n]
    assert opened.split_layer >= floor and not opened.server_decode and layers.split_layer == opened.split_layer
    assert tokens == script.expected[:n] and layers.mismatch is None
    [open_] = [m for m in sent if isinstance(m, wire.Open)]
    assert (open_.privacy_floor, open_.server_decode) == (floor, False)
    kinds = {type(m).__name__ for m in sent}
    assert "PromptTokens" not in kinds and "Activation" in kinds


def test_slower_client_gets_smaller_k_and_loaded_server_gives_larger_k(admission_server, script):
    url = admission_server.url
    sla = wire.RequestSLA(ttft_s=3.0, tpot_s=0.2)

    async def idle_medium():
        await asyncio.sleep(2.5)  # the measured load's window (2 s) empties: the last test's steps leave it
        session, tokens, _ = await emulated(url, script, profile=MEDIUM, link=LAN, sla=sla, max_tokens=8)
        return session.opened

    async def loaded():
        out = {}
        for name, profile in (("fast", FAST), ("medium", MEDIUM), ("slow", SLOW)):
            for _ in range(5):  # the precondition: the controller measures the engine busy (above
                # offload_above: the DP's mode). The 4 loaders' utilisation sits near that line on a
                # fast machine (an AMD one ran the first session in least_offload mode once): wait for it
                session, tokens, layers = await emulated(url, script, profile=profile, link=LAN, sla=sla, max_tokens=8)
                assert tokens == script.expected[:8] and layers.mismatch is None
                if session.opened.placement != "least_offload":
                    break
                await asyncio.sleep(1.0)
            out[name] = session.opened
        return out

    idle = asyncio.run(idle_medium())
    busy = asyncio.run(_with_load(url, script, 4, loaded))
    print({"idle_medium": idle, **busy})
    assert all(o.placement == "dp" for o in busy.values()), busy  # busy server: least server work
    assert busy["slow"].split_layer < busy["medium"].split_layer <= busy["fast"].split_layer
    assert idle.split_layer < busy["medium"].split_layer  # same client, idle vs loaded


def test_impossible_sla_is_refused_with_a_reason(admission_server, script):
    async def run():
        await emulated(admission_server.url, script, profile=SLOW, link=WIFI,
                       sla=wire.RequestSLA(ttft_s=0.001, tpot_s=0.001), max_tokens=4)

    with pytest.raises(ServerError) as err:
        asyncio.run(run())
    assert err.value.code == "sla_unreachable" and err.value.fatal
    assert re.search(r"no split layer meets the SLA .* the best this client can get is TTFT [0-9.]+ s and TPOT", str(err.value))
    assert split_metrics(admission_server.url).get('vllm_split:refusals_total{reason="sla_unreachable"}', 0) >= 1


def test_a_flood_of_opens_does_not_block_the_event_loop(admission_server, script):
    url = admission_server.url
    n_opens = 64

    async def open_one(http):
        ws = await http.ws_connect(url.replace("http://", "ws://") + SESSION_PATH, max_msg_size=0)
        try:
            await ws.send_bytes(wire.encode(wire.Open(
                model_fingerprint=script.fingerprint, split_layer=None, sla=SLA, client=SLOW,
                prompt_tokens=len(script.prompt_ids), sampling=wire.SamplingOptions(max_tokens=4))))
            while True:
                msg = wire.decode((await ws.receive(timeout=60)).data)
                if isinstance(msg, wire.Probe):
                    await ws.send_bytes(wire.encode(wire.ProbeReply(nonce=msg.nonce, data=bytes(msg.reply_bytes))))
                    continue
                return msg
        finally:
            await ws.close()

    async def ping(http):
        t0 = time.perf_counter()
        async with http.get(url + "/v1/models") as r:
            assert r.status == 200
        return time.perf_counter() - t0

    async def run():
        async with aiohttp.ClientSession() as http:
            base = [await ping(http) for _ in range(3)]
            flood = asyncio.gather(*(open_one(http) for _ in range(n_opens)))
            pings = []
            while not flood.done():
                pings.append(await ping(http))
                await asyncio.sleep(0.02)
            return base, pings, await flood

    base, pings, answers = asyncio.run(run())
    print(f"/v1/models: idle max {max(base) * 1e3:.1f} ms; during {n_opens} opens: {len(pings)} pings, "
          f"max {max(pings) * 1e3:.1f} ms")
    assert all(isinstance(a, (wire.Opened, wire.Error)) for a in answers)
    assert sum(isinstance(a, wire.Opened) for a in answers) >= 1
    assert len(pings) >= 3 and max(pings) < 0.5  # plain API requests kept answering


def test_metrics_report_placements_work_saved_and_predictions(admission_server, script):
    m = split_metrics(admission_server.url)
    assert m["vllm_split:placement_split_layer_count"] >= 3
    assert m["vllm_split:server_layer_tokens_total"] > 0
    assert "vllm_split:server_layer_tokens_saved_total" in m
    assert m["vllm_split:predicted_tpot_seconds_count"] >= 3 and m["vllm_split:measured_tpot_seconds_count"] >= 3
    assert m.get('vllm_split:sessions_finished_total{sla="met"}', 0) >= 1
    assert m['vllm_split:server_step_cost_seconds{term="layer"}'] > 0
    assert m["vllm_split:sessions_open"] == 0
