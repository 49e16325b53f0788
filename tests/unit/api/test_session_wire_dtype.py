"""Wire dtype negotiation on the server, over the stand-in engine of test_session_driver: the
first offered dtype the server accepts, 8-bit rows decoded into the model's dtype, rows in
another dtype refused (non-fatal, naming both), bad 8-bit frames refused with the codec's
message, and the admission request sized by the negotiated dtype."""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import pytest
import torch

from tests.unit.api.test_session_driver import FakeEngine
from vllm_split.api.admission import request_from_open
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.api.session_driver import run_session
from vllm_split.config import SplitConfig, SplitConfigError
from vllm_split.control.policy import Admission
from vllm_split.wire import protocol as wire
from vllm_split.wire import quant
from vllm_split.wire.contract import UTILITY_DELIVER

HIDDEN = 64
MODEL = ModelInfo(fingerprint="fp", num_layers=4, hidden_size=HIDDEN, dtype=torch.bfloat16, max_model_len=128)
PROMPT_LEN = 5


def _rows(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[:, 9] *= 30.0  # an outlier channel
    return x


class RecordingEngine(FakeEngine):
    """The stand-in engine, keeping the rows each delivery carried (in the model's dtype)."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(tokens)
        self.rows: dict[int, torch.Tensor] = {}

    async def call_utility_async(self, name: str, *args):
        if name == UTILITY_DELIVER:
            _, start, num_rows, data, _ = args
            self.rows[start] = wire.decode_tensor("bfloat16", (num_rows, HIDDEN), data)
        return await super().call_utility_async(name, *args)


@dataclass
class WireClient:
    """Offers ``offer`` at Open and sends its rows in ``send`` (None: float32); ``before``:
    frames sent before the prompt (each is refused or would fail the test)."""

    offer: tuple[str, ...] = ()
    send: str | None = None
    before: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    prompt: torch.Tensor = field(default_factory=lambda: _rows(PROMPT_LEN, 0))
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    def start(self) -> None:
        self.inbox.put_nowait(wire.encode(wire.Open(model_fingerprint="fp", split_layer=2, wire_dtypes=self.offer,
                                                    sampling=wire.SamplingOptions(max_tokens=3, ignore_eos=True))))
        for frame in self.before:
            self.inbox.put_nowait(frame)
        self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(self.prompt, start=0, end_of_prompt=True,
                                                                      wire_dtype=self.send)))

    async def on_send(self, msg: wire.Message) -> None:
        self.sent.append(msg)
        if isinstance(msg, wire.Token) and msg.finish_reason is None:
            row = _rows(1, 100 + msg.index)
            self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(row, start=PROMPT_LEN + msg.index,
                                                                          wire_dtype=self.send)))

    async def receive(self):
        return await self.inbox.get()

    def errors(self) -> list[wire.Error]:
        return [m for m in self.sent if isinstance(m, wire.Error)]

    def opened(self) -> wire.Opened:
        return next(m for m in self.sent if isinstance(m, wire.Opened))


async def _run(client: WireClient, *, config: SplitConfig | None = None, engine=None, controller=None):
    engine = engine or RecordingEngine([11, 12, 13])
    session = ServerSession(engine=engine, model=MODEL, config=config or SplitConfig(), send=client.on_send,
                            controller=controller)
    client.start()
    await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    return session, engine


# ---------------------------------------------------------------- negotiation
async def test_the_first_offered_dtype_the_server_accepts_is_chosen_and_rows_are_decoded_into_the_model_dtype():
    client = WireClient(offer=("int8_mixed", "float32"), send="int8_mixed")
    session, engine = await _run(client)
    assert client.opened().wire_dtype == "int8_mixed" and session.wire_dtype == "int8_mixed"
    assert client.errors() == [] and isinstance(client.sent[-1], wire.Finished)
    assert sorted(engine.rows) == [0, PROMPT_LEN, PROMPT_LEN + 1]  # the prompt, then a row per token
    expected = quant.roundtrip(client.prompt, "int8_mixed").to(torch.bfloat16)
    assert torch.equal(engine.rows[0], expected)
    assert not torch.equal(engine.rows[0], client.prompt.to(torch.bfloat16))  # really went as 8 bits


async def test_the_server_skips_what_its_option_does_not_list():
    client = WireClient(offer=("int8_mixed", "int4_future", "float16"), send="float16")
    await _run(client, config=SplitConfig(wire_dtypes="float16,float32"))
    assert client.opened().wire_dtype == "float16" and client.errors() == []


async def test_an_offer_with_nothing_accepted_is_refused_at_open():
    client = WireClient(offer=("int8_row", "fp8_e4m3"), send="int8_row")
    with pytest.raises(SessionError, match=r"none of the wire dtypes offered \['int8_row', 'fp8_e4m3'\] is accepted: "
                                           r"this server takes \['int8_mixed', 'float32'\]"):
        await _run(client, config=SplitConfig(wire_dtypes="int8_mixed,float32"))
    assert [(e.code, e.fatal) for e in client.errors()] == [("wire_dtype", True)]
    assert not any(isinstance(m, wire.Opened) for m in client.sent)


async def test_without_an_offer_floats_go_as_before_and_nothing_is_negotiated():
    client = WireClient()
    session, engine = await _run(client)
    assert client.opened().wire_dtype is None and client.errors() == []
    assert torch.equal(engine.rows[0], client.prompt.to(torch.bfloat16))


# ---------------------------------------------------------------- refusals
async def test_a_row_in_another_dtype_than_negotiated_is_refused_and_the_session_goes_on():
    stray = wire.encode(wire.Activation.from_tensor(_rows(PROMPT_LEN, 0), start=0, end_of_prompt=True))  # float32
    client = WireClient(offer=("int8_mixed",), send="int8_mixed", before=[stray])
    await _run(client)
    assert client.errors() == [wire.Error(code="wire_dtype", message="activation at position 0 is in float32, but "
                                          "this session negotiated int8_mixed (Opened.wire_dtype)")]
    assert isinstance(client.sent[-1], wire.Finished) and client.sent[-1].num_output_tokens == 3


async def test_an_8bit_row_without_negotiation_is_refused():
    stray = wire.encode(wire.Activation.from_tensor(_rows(PROMPT_LEN, 0), start=0, wire_dtype="int8_row"))
    client = WireClient(before=[stray])
    await _run(client)
    assert client.errors() == [wire.Error(code="wire_dtype", message=(
        "activation at position 0 is in int8_row, but this session negotiated no wire dtype: it takes "
        "['float32', 'float16', 'bfloat16'] (offer int8_row in Open.wire_dtypes)"))]
    assert isinstance(client.sent[-1], wire.Finished)


def _nan_scale_frame() -> bytes:
    msg = wire.Activation.from_tensor(_rows(PROMPT_LEN, 0), start=0, wire_dtype="int8_row")
    data = msg.data[:-8] + struct.pack("<f", float("nan")) + msg.data[-4:]  # scale of row 3
    meta = b'{"start":0,"dtype":"int8_row","shape":[5,64],"end_of_prompt":true}'
    return struct.pack("<4sBBI", wire.MAGIC, wire.PROTOCOL_VERSION, wire.Activation.KIND, len(meta)) + meta + data


async def test_an_8bit_frame_with_a_nan_scale_is_refused_with_the_codecs_message():
    client = WireClient(offer=("int8_row",), send="int8_row", before=[_nan_scale_frame()])
    await _run(client)
    [error] = client.errors()
    assert (error.code, error.fatal) == ("protocol", False)
    assert error.message == ("scales[3]: expected a finite float32 in (0, 2.68e+36] (an all-zero row is sent with "
                             "scale 1.0), got nan")
    assert isinstance(client.sent[-1], wire.Finished) and client.sent[-1].num_output_tokens == 3


async def test_an_8bit_frame_whose_contents_do_not_decode_is_refused_at_its_position():
    msg = wire.Activation.from_tensor(_rows(1, 0), start=0, wire_dtype="int8_mixed")
    data = bytearray(msg.data)
    struct.pack_into("<H", data, HIDDEN, HIDDEN)  # outlier channel 0 -> 64, out of range
    bad = wire.encode(wire.Activation(start=0, dtype="int8_mixed", shape=(1, HIDDEN), data=bytes(data)))
    client = WireClient(offer=("int8_mixed",), send="int8_mixed", before=[bad])
    await _run(client)
    assert [(e.code, e.fatal) for e in client.errors()] == [("protocol", False)]
    assert client.errors()[0].message.startswith("activation at position 0: outlier index [0, 0]: expected a "
                                                  "channel < hidden_size 64, got 64")


# ---------------------------------------------------------------- admission and config
class RecordingController:
    def __init__(self) -> None:
        self.requests = []

    async def admit(self, session_id, request):
        self.requests.append(request)
        return Admission(request.split_layer, "fixed", None, None)

    def engine_of(self, session_id):
        return 0

    async def release(self, *args, **kwargs):
        pass


async def test_the_admission_request_is_sized_by_the_negotiated_dtype():
    controller = RecordingController()
    session, _ = await _run(WireClient(offer=("int8_mixed",), send="int8_mixed"), controller=controller)
    await session.release()
    assert controller.requests[0].row_bytes == HIDDEN + 4 + 6 * quant.MIXED_OUTLIERS
    controller = RecordingController()
    await _run(WireClient(), controller=controller)
    assert controller.requests[0].row_bytes is None  # the policy's hidden_bytes (the model's dtype)
    open_ = wire.Open(model_fingerprint="fp", split_layer=1, wire_dtypes=("float16",))
    assert request_from_open(open_, None, wire_dtype="float16", hidden_size=576).row_bytes == 1152
    with pytest.raises(ValueError, match="wire_dtype 'float16' needs the model's hidden_size"):
        request_from_open(open_, None, wire_dtype="float16")


def test_the_wire_dtypes_option_lists_known_names():
    assert SplitConfig().accepted_wire_dtypes == ("int8_mixed", "int8_row", "fp8_e4m3", "float16", "bfloat16",
                                                  "float32")
    cfg = SplitConfig.from_additional_config({"vllm_split": {"wire_dtypes": " float16, int8_mixed"}})
    assert cfg.accepted_wire_dtypes == ("float16", "int8_mixed")
    for bad, named in (("float16,int4", "'int4'"), ("", "''"), ("float16,", "''"), (8, "8")):
        with pytest.raises(SplitConfigError, match=rf"vllm_split\.wire_dtypes: expected comma-separated names from "
                                                   rf"\['float32', .*\], got .* \({named} is not one\)"):
            SplitConfig(wire_dtypes=bad)
