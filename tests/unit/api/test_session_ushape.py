"""U-shaped sessions on the API server (stand-in engine): Open with (k, m) is answered with
Opened.return_layer or refused with a clear error; the engine request samples placeholders
only; each engine output's layer-m rows go to the client as Hidden frames, never a Token;
the admission controller chooses (k, m) for a U session that leaves them to the server."""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from tests.unit.api.test_session_driver import _Completion
from tests.unit.api.test_session_privacy_floor import PROFILE, Peer, _no_stats, _open
from tests.unit.control.test_policy import N, policy
from vllm_split.api.admission import AdmissionController
from vllm_split.api.metrics import split_metrics
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.config import SplitConfig
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import EXTRA_ARGS_KEY, RETURN_KEY, UTILITY_DELIVER

HIDDEN = 8
MODEL = ModelInfo(fingerprint="fp", num_layers=N, hidden_size=HIDDEN, dtype=torch.float32, max_model_len=128)


def _u(k: int | None, m: int | None, **fields) -> wire.Open:
    return wire.Open(model_fingerprint="fp", split_layer=k, u_shape=True, return_layer=m,
                     sampling=wire.SamplingOptions(max_tokens=3), **fields)


async def test_a_fixed_u_is_opened_with_its_return_layer_and_samples_placeholders_only():
    session, peer = await _open(_u(4, 20))
    opened = peer.opened()
    assert (opened.split_layer, opened.return_layer, opened.server_decode) == (4, 20, False)
    params = session.sampling_params()
    assert (params.temperature, params.ignore_eos, params.stop_token_ids, params.max_tokens) == (0.0, True, [], 3)
    assert params.extra_args[EXTRA_ARGS_KEY]["return_layer"] == 20


@pytest.mark.parametrize("msg, match", [
    (_u(4, N + 1), rf"U shape \(split_layer 4, return_layer {N + 1}\) out of range: expected 0 <= split_layer < "
                   rf"return_layer <= {N}"),
    (wire.Open(model_fingerprint="fp", split_layer=2, u_shape=True, return_layer=9,
               sampling=wire.SamplingOptions(stop_token_ids=(7,))), r"sampling.stop_token_ids \[7\]"),
])
async def test_u_shapes_the_server_cannot_serve_are_refused(msg, match):
    with pytest.raises(SessionError, match=match) as err:
        await _open(msg)
    assert (err.value.code, err.value.fatal) == ("split_layer", True)


@pytest.mark.parametrize("k, m", [(4, 20), (None, None)])
async def test_a_server_that_cannot_run_u_shapes_refuses_them_at_open(k, m):
    """Under pipeline parallelism (U rows leave at m on a single stage only) or on a non-CPU
    build (no compact forward): the Open is refused with the reason, before any engine request
    exists."""
    from types import SimpleNamespace

    from tests.unit.api.test_session_driver import FakeEngine
    from vllm_split.api.ushape import u_shape_unsupported

    why = u_shape_unsupported(SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2)))
    assert "pipeline parallelism, where U-shaped sessions are not supported yet" in why
    assert u_shape_unsupported(SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1))) is None
    peer, engine = Peer(), FakeEngine([1])
    session = ServerSession(engine=engine, model=dataclasses.replace(MODEL, u_shape_unsupported=why),
                            config=SplitConfig(), send=peer.send)
    with pytest.raises(SessionError, match="U-shaped sessions are not served here: this server runs pipeline") as err:
        await asyncio.wait_for(session.handle_open(_u(k, m, client=PROFILE, prompt_tokens=40), peer.receive), 10)
    assert (err.value.code, err.value.fatal) == ("bad_request", True)
    # the same server still opens a prefix split
    await asyncio.wait_for(session.handle_open(wire.Open(model_fingerprint="fp", split_layer=4,
                                                         sampling=wire.SamplingOptions(max_tokens=3)), peer.receive), 10)
    assert peer.opened().split_layer == 4


async def test_min_layer_bounds_the_u_shape_too():
    with pytest.raises(SessionError, match="this server holds no layers below 6"):
        await _open(_u(5, 9), config=SplitConfig(min_layer=6))


async def test_the_controller_chooses_k_and_m_for_an_auto_u_session():
    controller = AdmissionController(policy=policy(), step_stats=_no_stats, metrics=split_metrics(N))
    try:
        session, peer = await _open(_u(None, None, client=PROFILE, prompt_tokens=40), controller=controller)
        opened = peer.opened()
        assert opened.return_layer is not None and opened.split_layer < opened.return_layer <= N
        assert opened.placement in ("least_offload", "dp", "u_scan") and opened.predicted_tpot_s is not None
        assert session.return_layer == opened.return_layer
        await session.release()
    finally:
        await controller.stop()


@dataclass
class _UOutput:
    outputs: list
    finished: bool
    kv_transfer_params: dict | None


class UEngine:
    """Returns, per output, the layer-m rows the real engine would: the prompt's after the
    prompt arrived, then one per delivered row (here: the delivered row times 2)."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.engine_core = self
        self.delivered: asyncio.Queue = asyncio.Queue()
        self.params = None

    async def call_utility_async(self, name, *args):
        if name == UTILITY_DELIVER:
            _, start, rows, data, _ = args
            self.delivered.put_nowait((start, torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(rows, -1)))

    async def generate(self, prompt, params, request_id):
        self.params = params
        for j in range(self.num_tokens):
            start, rows = await self.delivered.get()
            payload = {"start": start, "rows": rows.shape[0], "dtype": "float32", "data": (2 * rows).numpy().tobytes()}
            last = j == self.num_tokens - 1
            yield _UOutput([_Completion([0], "length" if last else None)], last, {RETURN_KEY: payload})


async def test_each_output_goes_to_the_client_as_hidden_rows_never_as_a_token():
    peer, engine = Peer(), UEngine(3)
    session = ServerSession(engine=engine, model=MODEL, config=SplitConfig(), send=peer.send)
    await session.handle_open(_u(2, 9))
    prompt = torch.randn(5, HIDDEN)
    assert session.accept_prompt_chunk(wire.Activation.from_tensor(prompt, start=0, end_of_prompt=True))
    gen = asyncio.create_task(session.generate())
    for j in range(2):  # answer the rows of outputs 0 and 1 with the next position's row
        while not any(isinstance(m, wire.Hidden) and m.index == j for m in peer.sent):
            await asyncio.sleep(0.01)
        await session.accept_decode(wire.Activation.from_tensor(torch.full((1, HIDDEN), float(j)), start=5 + j))
    await asyncio.wait_for(gen, 5)
    hidden = [m for m in peer.sent if isinstance(m, wire.Hidden)]
    assert not any(isinstance(m, wire.Token) for m in peer.sent)
    assert [(h.index, h.start, h.rows, h.finish_reason) for h in hidden] == [
        (0, 0, 5, None), (1, 5, 1, None), (2, 6, 1, "length")]
    assert torch.equal(hidden[0].to_tensor(), 2 * prompt)
    assert isinstance(peer.sent[-1], wire.Finished) and peer.sent[-1].num_output_tokens == 3


def test_a_large_prompts_rows_are_split_into_frames_that_fit_and_checked():
    from vllm_split.api.ushape import hidden_frames

    rows = torch.randn(50, HIDDEN)
    out = _UOutput([], False, {RETURN_KEY: {"start": 0, "rows": 50, "dtype": "float32", "data": rows.numpy().tobytes()}})
    frames = hidden_frames(out, index=0, end=50, finish_reason="length", wire_dtype=None, max_frame_bytes=4096 + 20 * 32)
    assert [(f.start, f.rows, f.finish_reason) for f in frames] == [(0, 20, None), (20, 20, None), (40, 10, "length")]
    assert all(len(wire.encode(f)) <= 4096 + 20 * 32 for f in frames)
    assert torch.equal(torch.cat([f.to_tensor() for f in frames]), rows)
    with pytest.raises(ValueError, match=r"positions \[0, 50\), expected rows ending at position 51"):
        hidden_frames(out, index=1, end=51, finish_reason=None, wire_dtype=None, max_frame_bytes=1 << 20)
    with pytest.raises(ValueError, match="carries no layer rows"):
        hidden_frames(_UOutput([], False, None), index=0, end=1, finish_reason=None, wire_dtype=None,
                      max_frame_bytes=1 << 20)
