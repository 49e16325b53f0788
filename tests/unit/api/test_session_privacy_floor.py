"""The privacy floor at Open on the server (stand-in engine, real admission controller): a fixed
split layer below the server's or the client's floor is refused before the probe and
admission, an ``auto`` session with a floor is placed at or above it, and no session with a
floor is decoded on the server."""
from __future__ import annotations

import asyncio
import re

import pytest
import torch

from tests.unit.api.test_session_driver import FakeEngine
from tests.unit.control.test_policy import N, policy
from vllm_split.api.admission import AdmissionController
from vllm_split.api.metrics import split_metrics
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.config import SplitConfig
from vllm_split.control.policy import Admission
from vllm_split.wire import protocol as wire

MODEL = ModelInfo(fingerprint="fp", num_layers=N, hidden_size=8, dtype=torch.float32, max_model_len=128)
PROFILE = wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4)


class Peer:
    """The client's side of Open: records what the server sent and answers its probes."""

    def __init__(self) -> None:
        self.sent: list[wire.Message] = []
        self.replies: asyncio.Queue = asyncio.Queue()

    async def send(self, msg: wire.Message) -> None:
        self.sent.append(msg)
        if isinstance(msg, wire.Probe):
            self.replies.put_nowait(wire.ProbeReply(nonce=msg.nonce, data=bytes(msg.reply_bytes)))

    async def receive(self) -> wire.Message:
        return await self.replies.get()

    def opened(self) -> wire.Opened:
        [opened] = [m for m in self.sent if isinstance(m, wire.Opened)]
        return opened


class NoController:
    """Fails the test if admission is reached."""

    async def admit(self, session_id, request):
        raise AssertionError(f"admission reached for {request}")


async def _no_stats(since):
    return None


async def _open(msg: wire.Open, *, config: SplitConfig | None = None, controller=None) -> tuple[ServerSession, Peer]:
    peer = Peer()
    session = ServerSession(engine=FakeEngine([1]), model=MODEL, config=config or SplitConfig(), send=peer.send,
                            controller=controller)
    await asyncio.wait_for(session.handle_open(msg, peer.receive), timeout=10)
    return session, peer


def _msg(split_layer: int | None, **fields) -> wire.Open:
    return wire.Open(model_fingerprint="fp", split_layer=split_layer, client=PROFILE, prompt_tokens=40,
                     sampling=wire.SamplingOptions(max_tokens=8), server_decode=True, **fields)


@pytest.mark.parametrize("config, msg, whose", [
    (SplitConfig(), _msg(4, privacy_floor=12), "the client's privacy floor 12 (Open.privacy_floor)"),
    (SplitConfig(privacy_floor=12), _msg(0), "this server's privacy floor 12 (its privacy_floor option)"),
    (SplitConfig(privacy_floor=12), _msg(11, privacy_floor=6), "this server's privacy floor 12"),
])
async def test_a_fixed_split_layer_below_a_floor_is_refused_before_the_probe_and_admission(config, msg, whose):
    with pytest.raises(SessionError, match=re.escape(f"split_layer {msg.split_layer} is below {whose}")) as err:
        await _open(msg, config=config, controller=NoController())
    assert (err.value.code, err.value.fatal) == ("split_layer", True)
    assert "expected split_layer >= 12" in str(err.value)


async def test_without_a_controller_a_fixed_split_layer_below_the_floor_is_refused_too():
    with pytest.raises(SessionError, match=r"split_layer 3 is below the client's privacy floor 4"):
        await _open(_msg(3, privacy_floor=4))
    session, peer = await _open(_msg(4, privacy_floor=4))
    assert (peer.opened().split_layer, peer.opened().server_decode, session.server_decode) == (4, False, False)


@pytest.mark.parametrize("floors", [dict(client=12), dict(server=12), dict(client=5, server=12)])
async def test_an_auto_session_with_a_floor_is_placed_at_or_above_it_and_never_decoded_on_the_server(floors):
    config = SplitConfig(privacy_floor=floors.get("server", 0))
    controller = AdmissionController(policy=policy(privacy_floor=config.privacy_floor), step_stats=_no_stats,
                                     metrics=split_metrics(N))
    try:
        _, free = await _open(_msg(None), controller=AdmissionController(
            policy=policy(), step_stats=_no_stats, metrics=split_metrics(N)))
        assert (free.opened().split_layer, free.opened().server_decode) == (0, True)  # idle, no floor: decoded
        session, peer = await _open(_msg(None, privacy_floor=floors.get("client", 0)), config=config,
                                    controller=controller)
        assert any(isinstance(m, wire.Probe) for m in peer.sent)  # planned on the measured network
        opened = peer.opened()
        assert opened.split_layer == 12 and not opened.server_decode and not session.server_decode
        await session.release()
    finally:
        await controller.stop()


class DecodingController:
    """A controller that (wrongly) decodes on the server whatever the floor."""

    async def admit(self, session_id, request):
        return Admission(12, "dp", None, None, server_decode=True)

    def engine_of(self, session_id):
        return 0


async def test_the_session_never_decodes_on_the_server_with_a_floor_whatever_admission_says():
    session, peer = await _open(_msg(None, privacy_floor=12), controller=DecodingController())
    assert not peer.opened().server_decode and not session.server_decode
    session, peer = await _open(_msg(None), config=SplitConfig(privacy_floor=1), controller=DecodingController())
    assert not peer.opened().server_decode
