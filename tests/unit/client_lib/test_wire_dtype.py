"""The client's wire dtype: the ``auto`` policy's offer from the measured table, and a session
against a fake server that offers at Open, sends every row in ``Opened.wire_dtype`` and cuts
the prompt by that format's bytes per row."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from aiohttp import web

from client_lib import SamplingOptions, SplitSession
from client_lib.session import ServerError
from client_lib.wire_policy import DEFAULT_MIN_AGREEMENT, MEASURED, offered_wire_dtypes
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire
from vllm_split.wire import quant

SMOLLM2 = next(iter(MEASURED))
RESULTS = Path(__file__).resolve().parents[3] / "results" / "bench_wire_precision.json"


# ---------------------------------------------------------------- the auto policy
@pytest.mark.parametrize(("min_agreement", "offer"), [
    (DEFAULT_MIN_AGREEMENT, ("int8_mixed", "float16", "bfloat16", "float32")),
    (0.9, ("float16", "bfloat16", "float32")),
    (0.95, ("float16", "float32")),
    (1.0, ("float16", "float32")),
    (0.5, ("fp8_e4m3", "int8_mixed", "float16", "bfloat16", "float32")),
    (0.0, ("fp8_e4m3", "int8_row", "int8_mixed", "float16", "bfloat16", "float32")),  # ties: better agreement first
])
def test_auto_offers_the_smallest_formats_whose_measured_agreement_reaches_the_threshold(min_agreement, offer):
    if not hasattr(torch, "float8_e4m3fn"):
        offer = tuple(d for d in offer if d != "fp8_e4m3")
    assert offered_wire_dtypes(SMOLLM2, "auto", min_agreement=min_agreement) == offer


def test_auto_offers_nothing_for_a_model_not_measured():
    assert offered_wire_dtypes("fp1-another-model", "auto") == ()  # its rows go as float32, exact


def test_no_choice_offers_nothing_and_a_name_offers_itself():
    assert offered_wire_dtypes(SMOLLM2, None) == ()
    assert offered_wire_dtypes("fp1-any", "int8_row") == ("int8_row",)  # the user's choice, measured or not


@pytest.mark.parametrize(("wire_dtype", "min_agreement", "match"), [
    ("int4", 0.85, r"wire_dtype: expected None, 'auto' or one of \['float32', .*\], got 'int4'"),
    ("auto", 1.5, r"min_agreement: expected a token match rate in \[0, 1\], got 1.5"),
    ("auto", True, r"min_agreement: expected a token match rate in \[0, 1\], got True"),
])
def test_bad_choices_are_refused(wire_dtype, min_agreement, match):
    with pytest.raises(ValueError, match=match):
        offered_wire_dtypes(SMOLLM2, wire_dtype, min_agreement=min_agreement)


def test_without_float8_fp8_is_neither_offered_nor_accepted_as_a_choice(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn", raising=False)
    assert "fp8_e4m3" not in offered_wire_dtypes(SMOLLM2, "auto", min_agreement=0.0)
    with pytest.raises(ValueError, match="wire_dtype fp8_e4m3: this torch cannot encode it"):
        offered_wire_dtypes(SMOLLM2, "fp8_e4m3")


@pytest.mark.skipif(not RESULTS.exists(), reason="no results/bench_wire_precision.json in this checkout")
def test_the_shipped_table_is_the_benchmarks_summary_rounded_down():
    data = json.loads(RESULTS.read_text())
    measured = MEASURED[SMOLLM2]
    assert (data["model"]["name"], data["model"]["hidden_size"]) == (measured.model, measured.hidden_size)
    summary = {fmt: math.floor(s["min_token_match_rate"] * 1e4) / 1e4 for fmt, s in data["summary"].items()}
    assert measured.agreement == summary


def test_the_table_is_keyed_by_the_prepared_models_fingerprint():
    from harness.model_prep import model_dir
    from vllm_split.wire.fingerprint import model_fingerprint

    if not (model_dir() / "config.json").exists():
        pytest.skip("the SmolLM2 model is not prepared here (python -m harness.model_prep)")
    assert model_fingerprint(model_dir()) == SMOLLM2


# ---------------------------------------------------------------- a session
HIDDEN = 64


class FakeLayers:
    """Row of token t: t + 0.01 * channel, with channel 9 an outlier."""

    split_layer = 3

    def __init__(self, fingerprint: str = SMOLLM2) -> None:
        self.fingerprint = fingerprint

    def reset(self) -> None:
        pass

    def forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.float32)[:, None] + 0.01 * torch.arange(HIDDEN, dtype=torch.float32)
        x[:, 9] *= 50.0
        return x


class FakeServer:
    """Answers Open with ``choose(offer)``, records every Activation, sends 3 tokens."""

    def __init__(self, choose, max_frame_bytes: int = 1 << 20) -> None:
        self.choose = choose
        self.max_frame_bytes = max_frame_bytes
        self.opens: list[wire.Open] = []
        self.activations: list[wire.Activation] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        open_ = wire.decode((await ws.receive()).data)
        self.opens.append(open_)
        await ws.send_bytes(wire.encode(wire.Opened(
            session_id="s", split_layer=3, num_layers=8, hidden_size=HIDDEN, dtype="float32",
            max_frame_bytes=self.max_frame_bytes, wire_dtype=self.choose(open_.wire_dtypes))))
        while not self.activations or not self.activations[-1].end_of_prompt:
            self.activations.append(wire.decode((await ws.receive()).data))
        for index in range(3):
            last = index == 2
            await ws.send_bytes(wire.encode(wire.Token(index=index, token_id=7 + index,
                                                       finish_reason="length" if last else None)))
            if not last:
                self.activations.append(wire.decode((await ws.receive()).data))
        await ws.send_bytes(wire.encode(wire.Finished(finish_reason="length", num_prompt_tokens=0,
                                                      num_output_tokens=3)))
        await ws.close()
        return ws


async def _session(fake: FakeServer, layers: FakeLayers, prompt: list[int], **options) -> list[int]:
    runner, url = await _serve(fake)
    try:
        async with await SplitSession.create(url, layers, server_decode=False,
                                             sampling=SamplingOptions(max_tokens=3), **options) as session:
            return [e.token_id async for e in session.generate(prompt)]
    finally:
        await runner.cleanup()


async def test_auto_offers_at_open_and_sends_every_row_in_the_dtype_the_server_chose():
    fake = FakeServer(choose=lambda offer: offer[0])
    prompt = list(range(10, 30))
    assert await _session(fake, FakeLayers(), prompt, wire_dtype="auto") == [7, 8, 9]
    assert fake.opens[0].wire_dtypes == ("int8_mixed", "float16", "bfloat16", "float32")
    assert {a.dtype for a in fake.activations} == {"int8_mixed"}  # prompt chunks and decode rows
    assert [a.start for a in fake.activations] == [0, 20, 21]
    exact = FakeLayers().forward(prompt)
    assert torch.equal(fake.activations[0].to_tensor(), quant.roundtrip(exact, "int8_mixed"))
    assert torch.equal(fake.activations[0].to_tensor()[:, 9], exact[:, 9])  # the outlier channel goes exactly


async def test_the_prompt_is_cut_by_the_wire_formats_bytes_per_row():
    row = wire.row_bytes("int8_row", HIDDEN)  # 68 bytes against float32's 256
    frame_limit = 4096 + 10 * row  # 10 int8_row rows fit a frame, 2 float32 rows would
    fake = FakeServer(choose=lambda offer: offer[0], max_frame_bytes=frame_limit)
    await _session(fake, FakeLayers(), list(range(25)), wire_dtype="int8_row")
    prompt = [a for a in fake.activations if a.start < 25]
    assert [a.rows for a in prompt] == [10, 10, 5] and {a.dtype for a in prompt} == {"int8_row"}
    assert all(len(wire.encode(a)) <= frame_limit for a in prompt)


async def test_without_a_choice_nothing_is_offered_and_rows_go_as_float32():
    fake = FakeServer(choose=lambda offer: None)
    await _session(fake, FakeLayers(), [1, 2, 3])
    assert fake.opens[0].wire_dtypes == () and {a.dtype for a in fake.activations} == {"float32"}


async def test_a_server_choosing_what_was_not_offered_is_a_protocol_error():
    fake = FakeServer(choose=lambda offer: "int8_row")
    with pytest.raises(ServerError, match=r"protocol: the server chose wire dtype 'int8_row', not one of the offered "
                                          r"\['float16'\]"):
        await _session(fake, FakeLayers(), [1, 2, 3], wire_dtype="float16")


def test_the_cli_takes_a_wire_dtype_and_a_threshold():
    from client_lib.cli import parse_args

    base = ["--model", "m", "--prompt", "p"]
    assert (parse_args(base).wire_dtype, parse_args(base).min_agreement) == (None, DEFAULT_MIN_AGREEMENT)
    args = parse_args([*base, "--wire-dtype", "auto", "--min-agreement", "0.9"])
    assert (args.wire_dtype, args.min_agreement) == ("auto", 0.9)
    with pytest.raises(SystemExit):
        parse_args([*base, "--wire-dtype", "int4"])
