"""The resuming client against a fake server (no engine): the server's "model" picks each
token from everything it has been sent, so a resumed run equals an uninterrupted one only
if the replayed rows are exactly the prompt's and the generated tokens' rows."""
from __future__ import annotations

import pytest
import torch
from aiohttp import web

from client_lib import SamplingOptions
from client_lib.resume import ReconnectPolicy, ResumableGeneration, ResumeError
from vllm_split.wire.contract import SESSION_PATH
from vllm_split.wire import protocol as wire
from harness.server_process import free_port

HIDDEN = 4
FAST = ReconnectPolicy(initial_delay_s=0.01, max_delay_s=0.05, give_up_after_s=5)


class FakeLayers:
    """Row of a token = its id in every column; keeps a count like a KV cache would."""

    fingerprint, split_layer = "fp", 3

    def __init__(self) -> None:
        self.num_rows = 0

    def reset(self) -> None:
        self.num_rows = 0

    def forward(self, ids: list[int]) -> torch.Tensor:
        self.num_rows += len(ids)
        return torch.tensor(ids, dtype=torch.float32)[:, None].expand(len(ids), HIDDEN).contiguous()


class FakeServer:
    def __init__(self, *, drop_after: list[int], busy_first: int = 0, abort: bool = False) -> None:
        self.drop_after = list(drop_after)  # per connection: close after this many tokens
        self.abort = abort  # at a drop, end with Finished(abort) (a server shutting down) first
        self.busy = busy_first  # refuse this many connections with too_many_sessions first
        self.opens: list[wire.Open] = []
        self.prompts: list[list[int]] = []  # per session: the prompt rows received (a row's value is its token)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        msg = wire.decode((await ws.receive()).data)
        if self.busy:
            self.busy -= 1
            await ws.send_bytes(wire.encode(wire.Error(code="too_many_sessions", message="full", fatal=True)))
            await ws.close()
            return ws
        self.opens.append(msg)
        await ws.send_bytes(wire.encode(wire.Opened(session_id="s", split_layer=3, num_layers=8, hidden_size=HIDDEN,
                                                    dtype="float32", max_frame_bytes=1 << 20)))
        context: list[float] = []
        while True:  # the prompt
            act = wire.decode((await ws.receive()).data)
            context += act.to_tensor()[:, 0].tolist()
            if act.end_of_prompt:
                break
        self.prompts.append([int(v) for v in context])
        drop = self.drop_after.pop(0) if self.drop_after else None
        for index in range(msg.sampling.max_tokens):
            if index == drop:
                if self.abort:  # a shutting-down server aborts the request and says so
                    await ws.send_bytes(wire.encode(wire.Finished(finish_reason="abort", num_prompt_tokens=0,
                                                                  num_output_tokens=index)))
                await ws.close()  # the server goes away mid-generation
                return ws
            token = int(sum(v * (i + 1) for i, v in enumerate(context))) % 997
            last = index == msg.sampling.max_tokens - 1
            await ws.send_bytes(wire.encode(wire.Token(index=index, token_id=token, finish_reason="length" if last else None)))
            if last:
                break
            act = wire.decode((await ws.receive()).data)
            assert act.start == len(context)  # positions continue across sessions
            context += act.to_tensor()[:, 0].tolist()
        await ws.send_bytes(wire.encode(wire.Finished(finish_reason="length", num_prompt_tokens=0,
                                                      num_output_tokens=msg.sampling.max_tokens)))
        await ws.close()
        return ws


async def _serve(fake: FakeServer, ssl_context=None):
    """Serve ``fake`` on a free port (over TLS with ``ssl_context``): the runner and the URL."""
    app = web.Application()
    app.router.add_get(SESSION_PATH, fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"


async def _generate(*servers: FakeServer | str, max_tokens: int = 12
                    ) -> tuple[list[int], list[int], ResumableGeneration]:
    """Generate from ``[5, 6, 7]`` over ``servers`` (fake servers, served here, or URLs), in order."""
    runners, urls = [], []
    try:
        for server in servers:
            if isinstance(server, str):
                urls.append(server)
            else:
                runner, url = await _serve(server)
                runners.append(runner)
                urls.append(url)
        gen = ResumableGeneration(urls[0] if len(urls) == 1 else urls, FakeLayers(),
                                  sampling=SamplingOptions(max_tokens=max_tokens), policy=FAST)
        events = [e async for e in gen.generate([5, 6, 7])]
    finally:
        for runner in runners:
            await runner.cleanup()
    return [e.token_id for e in events], [e.index for e in events], gen


async def test_resumed_generation_equals_an_uninterrupted_one():
    expected, _, plain = await _generate(FakeServer(drop_after=[]))
    assert plain.num_reconnects == 0 and len(expected) == 12
    fake = FakeServer(drop_after=[4, 3], busy_first=0)
    tokens, indices, gen = await _generate(fake)
    assert tokens == expected and indices == list(range(12))
    assert gen.num_reconnects == 2 and gen.finish_reason == "length"
    assert [o.sampling.max_tokens for o in fake.opens] == [12, 8, 5]  # what is left, each time


async def test_a_request_the_server_aborted_is_resumed():
    expected, _, _ = await _generate(FakeServer(drop_after=[]))
    tokens, indices, gen = await _generate(FakeServer(drop_after=[6], abort=True))
    assert tokens == expected and indices == list(range(12))
    assert gen.num_reconnects == 1 and gen.finish_reason == "length"


async def test_a_full_server_is_retried_with_backoff():
    expected, _, _ = await _generate(FakeServer(drop_after=[]))
    tokens, _, gen = await _generate(FakeServer(drop_after=[], busy_first=3))
    assert tokens == expected and gen.num_reconnects == 0


async def test_too_many_drops_give_up_with_a_clear_error():
    with pytest.raises(ResumeError, match=r"connection dropped 9 times, more than the 8 allowed"):
        await _generate(FakeServer(drop_after=[1] * 20), max_tokens=30)


async def test_an_unreachable_server_gives_up_after_the_policy_time():
    gen = ResumableGeneration(f"http://127.0.0.1:{free_port()}", FakeLayers(),
                              policy=ReconnectPolicy(initial_delay_s=0.05, give_up_after_s=0.3))
    with pytest.raises(ResumeError, match=r"could not reconnect to .* within 0.3 s"):
        async for _ in gen.generate([1, 2]):
            pass


async def test_non_retryable_server_errors_are_raised():
    class Refusing(FakeServer):
        async def handle(self, request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.receive()
            await ws.send_bytes(wire.encode(wire.Error(code="fingerprint_mismatch", message="other weights", fatal=True)))
            await ws.close()
            return ws

    from client_lib import ServerError

    with pytest.raises(ServerError, match="fingerprint_mismatch: other weights"):
        await _generate(Refusing(drop_after=[]))



async def test_a_replica_that_goes_away_mid_generation_is_replaced_by_the_next():
    expected, _, _ = await _generate(FakeServer(drop_after=[]))
    first, second = FakeServer(drop_after=[4]), FakeServer(drop_after=[])
    tokens, indices, gen = await _generate(first, second)
    assert tokens == expected and indices == list(range(12)) and gen.finish_reason == "length"
    a, b = gen.urls
    assert gen.servers_used == [a, b] and gen.num_reconnects == 1
    assert [o.sampling.max_tokens for o in first.opens] == [12]
    assert [o.sampling.max_tokens for o in second.opens] == [8]  # what is left
    # the second replica was sent the kept rows: the prompt and the 4 tokens so far
    assert first.prompts == [[5, 6, 7]] and second.prompts == [[5, 6, 7, *expected[:4]]]


@pytest.mark.parametrize("failing", ["unreachable", "full"])
async def test_a_url_that_keeps_failing_is_skipped_for_the_other(failing):
    """Round robin from the URL after the one that failed: the client ends on the live one."""
    expected, _, _ = await _generate(FakeServer(drop_after=[]))
    full = FakeServer(drop_after=[], busy_first=100)  # refuses every session with too_many_sessions
    bad = f"http://127.0.0.1:{free_port()}" if failing == "unreachable" else full
    live = FakeServer(drop_after=[5])
    tokens, indices, gen = await _generate(bad, live)
    assert tokens == expected and indices == list(range(12))
    # first try: the bad URL, then the live one; after the drop: the bad one again, then the live one
    assert gen.servers_used == [gen.urls[1]] * 2 and gen.num_reconnects == 1
    assert [o.sampling.max_tokens for o in live.opens] == [12, 7] and live.prompts[1] == [5, 6, 7, *expected[:5]]
    assert full.busy == (100 if failing == "unreachable" else 98) and not full.opens


async def test_every_url_unreachable_gives_up_naming_them_all():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    gen = ResumableGeneration(urls, FakeLayers(), policy=ReconnectPolicy(initial_delay_s=0.05, give_up_after_s=0.3))
    with pytest.raises(ResumeError, match=rf"could not reconnect to any of {urls[0]}, {urls[1]} within 0.3 s"):
        async for _ in gen.generate([1, 2]):
            pass
    assert gen.servers_used == []


@pytest.mark.parametrize("url", [[], [""], ("http://a", None)])
def test_a_bad_url_list_is_refused(url):
    with pytest.raises(ValueError, match="non-empty list"):
        ResumableGeneration(url, FakeLayers())
