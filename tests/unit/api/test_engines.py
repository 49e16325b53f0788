"""EngineSet: a session's utility calls and its request reach one engine under vLLM's internal
DP load balancing, and plain vLLM calls with one engine; the API servers' shares of a limit."""
import pytest

from vllm_split.api.engines import EngineSet, share


class FakeCore:
    def __init__(self, ranks=(0,), client_index=0, client_count=1):
        self.engine_ranks_managed = list(ranks)
        self.core_engines = [r.to_bytes(2, "little") for r in ranks]
        self.client_index, self.client_count = client_index, client_count
        self.calls = []

    async def call_utility_async(self, method, *args):
        self.calls.append(("all", method, args))
        return "first"

    async def _call_utility_async(self, method, *args, engine):
        self.calls.append((engine, method, args))
        return f"from {int.from_bytes(engine, 'little')}"


def dp_core(ranks=(0, 1), **kw):
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    class FakeDPLB(FakeCore, DPLBAsyncMPClient):  # isinstance only: no vLLM client is built
        def __init__(self):
            FakeCore.__init__(self, ranks, **kw)
    return FakeDPLB()


class Client:
    def __init__(self, core):
        self.engine_core = core


async def test_under_internal_dp_a_call_reaches_one_engine_and_a_request_is_pinned():
    core = dp_core()
    engines = EngineSet(Client(core))
    assert engines.count == 2 and engines.ranks == (0, 1) and engines.label(1) == "1"
    assert await engines.call(1, "deliver", "s", 3) == "from 1"
    assert core.calls == [((1).to_bytes(2, "little"), "deliver", ("s", 3))]
    assert engines.pin(1) == {"data_parallel_rank": 1}


async def test_one_engine_uses_vllms_plain_call_and_no_pin():
    core = FakeCore()
    engines = EngineSet(Client(core))
    assert engines.count == 1 and engines.ranks == (0,)
    assert await engines.call(0, "release", "s") == "first" and core.calls == [("all", "release", ("s",))]
    assert engines.pin(0) == {}
    assert engines.api_server() == (0, 1)


async def test_an_api_server_knows_its_index():
    assert EngineSet(Client(dp_core(client_index=1, client_count=2))).api_server() == (1, 2)


@pytest.mark.parametrize("total,count", [(256, 2), (7, 3), (64, 4), (3, 3), (0, 2)])
def test_shares_add_up_and_differ_by_at_most_one(total, count):
    shares = [share(total, i, count) for i in range(count)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_share_refuses_an_index_out_of_range():
    with pytest.raises(ValueError):
        share(10, 2, 2)


def test_each_api_server_takes_its_share_of_the_replicas_limits():
    from vllm_split.api.endpoint import _api_server_share
    from vllm_split.config import SplitConfig

    config = SplitConfig(max_sessions=5, admission_queue=3)
    shares = [_api_server_share(config, EngineSet(Client(dp_core(client_index=i, client_count=2)))) for i in (0, 1)]
    assert [s.max_sessions for s in shares] == [3, 2] and [s.admission_queue for s in shares] == [2, 1]
    assert _api_server_share(config, EngineSet(Client(FakeCore()))) is config  # one API server: as configured
    with pytest.raises(ValueError, match="max_sessions 1 cannot be shared by 2 API servers"):
        _api_server_share(SplitConfig(max_sessions=1), EngineSet(Client(dp_core(client_count=2))))
