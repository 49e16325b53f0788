"""Admission before the network probe (stand-in engine, real admission controller): an
``auto`` session the server would decode itself whatever its network is admitted at Open
without probes; every other auto session is probed first, then planned."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.api.test_session_privacy_floor import PROFILE, _msg, _no_stats, _open
from tests.unit.control.test_policy import IDLE, N, policy, request
from vllm_split.api.admission import AdmissionController
from vllm_split.api.metrics import split_metrics
from vllm_split.api.net_probe import UNPROBED
from vllm_split.control.policy import Refusal
from vllm_split.wire import protocol as wire


def _controller(**options) -> AdmissionController:
    return AdmissionController(policy=policy(**options), step_stats=_no_stats, metrics=split_metrics(N))


def _probed(peer) -> bool:
    return any(isinstance(m, wire.Probe) for m in peer.sent)


async def test_a_session_decoded_on_a_server_with_compute_to_spare_is_admitted_without_a_probe():
    controller = _controller()
    try:
        session, peer = await _open(_msg(None), controller=controller)
        opened = peer.opened()
        assert not _probed(peer) and (opened.split_layer, opened.server_decode, opened.placement) == (0, True, "server_only")
        assert opened.predicted_ttft_s >= UNPROBED.rtt_s  # planned on the slow network assumed before a probe
        assert controller.inflight[session.session_id].request.network == UNPROBED
        await session.release()
        assert not controller.inflight
    finally:
        await controller.stop()


@pytest.mark.parametrize("why, msg, options", [
    ("no server decoding offered", replace(_msg(None), server_decode=False), {}),
    ("the DP at any load (no compute to spare)", _msg(None), {"offload_above": 0.0}),
    ("a privacy floor", _msg(None, privacy_floor=3), {}),
])
async def test_other_auto_sessions_are_probed_then_planned(why, msg, options):
    controller = _controller(**options)
    try:
        session, peer = await _open(msg, controller=controller)
        assert _probed(peer), why
        assert controller.inflight[session.session_id].request.network != UNPROBED
        await session.release()
    finally:
        await controller.stop()


def test_network_free_is_the_least_offload_rules_server_decoding_only():
    p = policy()
    decoded = p.place(request(server_decode=True), IDLE)
    assert decoded.method == "least_offload" and p.network_free(decoded)
    assert not p.network_free(policy(offload_above=0.0).place(request(server_decode=True), IDLE))
    assert not p.network_free(p.place(request(server_decode=False), IDLE))
    assert not p.network_free(Refusal("bad_request", "no"))
    assert PROFILE.layer_decode_s  # the sessions above send a profile: they ask to be planned
