"""Client drafts in the split scheduler, on a stand-in for vLLM's scheduler that keeps its
speculative-decoding bookkeeping (docs/design/issue14_drafts.md §1.2): ``num_tokens_with_spec``
wanted, clamped by the budget, the drafts cut to what was scheduled and cleared, the
``-1`` padding of a waiting request with one token left, ``num_computed_tokens`` rolled
back past rejected drafts. Token "verification" is greedy against a fixed continuation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from tests.unit.engine.test_scheduler_gather import HIDDEN, FakeQueue  # noqa: E402
from vllm_split.config import SplitConfigError  # noqa: E402
from vllm_split.engine import scheduler as sched_module  # noqa: E402
from vllm_split.engine.drafts import CLASS_PATH  # noqa: E402
from vllm_split.wire.contract import EXTRA_ARGS_KEY  # noqa: E402

K = 4
PROMPT = 5
TRUTH = [100 + i for i in range(40)]  # the greedy continuation of every request here


class FakeRequest:
    def __init__(self, req_id: str, *, split: bool = True) -> None:
        self.request_id = req_id
        extra = {EXTRA_ARGS_KEY: {"session": f"s-{req_id}", "split_layer": 1}} if split else {}
        self.sampling_params = SimpleNamespace(extra_args=extra)
        self.all_token_ids = [0] * PROMPT
        self.num_prompt_tokens = PROMPT
        self.spec_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)


class FakeSpecScheduler:
    """vLLM's scheduler reduced to the spec-decode bookkeeping the mixin relies on."""

    def __init__(self, additional_config: dict, speculative_config) -> None:
        model_config = SimpleNamespace(get_hidden_size=lambda: HIDDEN, dtype=torch.float32,
                                       hf_config=SimpleNamespace(num_hidden_layers=2))
        self.vllm_config = SimpleNamespace(model_config=model_config, additional_config=additional_config,
                                           parallel_config=SimpleNamespace(data_parallel_index=0),
                                           speculative_config=speculative_config)
        self.num_spec_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        self.running: list = []
        self.waiting = FakeQueue()
        self.requests: dict = {}
        self.num_waiting_for_streaming_input = 0
        self.budget = 100
        pool = SimpleNamespace(num_gpu_blocks=65, get_num_free_blocks=lambda: 60)
        self.kv_cache_manager = SimpleNamespace(block_pool=pool)
        self.cache_config = SimpleNamespace(block_size=16)

    def add_request(self, request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self, *args, **kwargs):
        budget, num_scheduled, spec = self.budget, {}, {}
        for r in self.running:  # SCH:703-721, 861-876
            n = min(r.num_tokens_with_spec - r.num_computed_tokens, budget)
            if n <= 0:
                continue
            num_scheduled[r.request_id], budget = n, budget - n
            if r.spec_token_ids:
                s = n + r.num_computed_tokens - r.num_tokens
                if s > 0:
                    spec[r.request_id] = r.spec_token_ids[:s]
                r.spec_token_ids = []
            r.num_computed_tokens += n
        for r in list(self.waiting):  # SCH:1131-1153, 1371-1375
            n = min(r.num_tokens - r.num_computed_tokens, budget)
            if n <= 0:
                break
            if self.num_spec_tokens and n == 1 and (num_scheduled or r.num_computed_tokens > 0):
                n = 1 + self.num_spec_tokens
                spec[r.request_id] = [-1] * self.num_spec_tokens
            num_scheduled[r.request_id], budget = n, budget - n
            self.waiting.remove_requests([r])
            self.running.append(r)
            r.num_computed_tokens += n
        return SimpleNamespace(num_scheduled_tokens=num_scheduled, total_num_scheduled_tokens=sum(num_scheduled.values()),
                               scheduled_spec_decode_tokens=spec)

    def update_from_output(self, scheduler_output, model_output):  # SCH:2100-2128
        for req_id in scheduler_output.num_scheduled_tokens:
            r = self.requests[req_id]
            generated = model_output.sampled_token_ids[model_output.req_id_to_index[req_id]]
            drafts = scheduler_output.scheduled_spec_decode_tokens.get(req_id)
            if drafts and generated:
                r.num_computed_tokens -= len(drafts) - (len(generated) - 1)
            r.all_token_ids += generated
        return {0: SimpleNamespace(outputs=[])}

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def preempt(self, r) -> None:
        self.running.remove(r)
        r.num_computed_tokens, r.spec_token_ids = 0, []
        self.waiting.prepend_requests([r])

    def _free_request(self, request, delay_free_blocks: bool = False):
        self.requests.pop(request.request_id, None)
        return None, None


class Sched(sched_module.SplitSchedulerMixin, FakeSpecScheduler):
    pass


def spec_config(k: int = K):
    return SimpleNamespace(method="custom_class", model=CLASS_PATH, num_speculative_tokens=k)


@pytest.fixture(autouse=True)
def _no_patch(monkeypatch):
    monkeypatch.setattr(sched_module.engine_core_utility, "apply", lambda: None)


def make(drafts: int = K, spec=True) -> Sched:
    return Sched({"vllm_split": {"drafts": drafts, "gather": "off"}}, spec_config() if spec is True else spec)


def rows(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).expand(len(values), HIDDEN).clone()


def deliver(s: Sched, r, values: list[float], drafts: tuple[int, ...] = ()) -> str | None:
    session = f"s-{r.request_id}"
    data = rows(values).numpy().tobytes()
    return s.split_deliver(session, s.split_store.num_rows(session), len(values), data, 0.01, drafts)


def greedy_verify(i: int, drafts) -> list[int]:
    """What the greedy rejection sampler emits for ``drafts`` after output index ``i`` when
    ``TRUTH`` is the argmax continuation: the matching drafts, then the correction or the bonus."""
    n = 0
    while n < len(drafts) and drafts[n] == TRUTH[i + n]:
        n += 1
    return TRUTH[i : i + n + 1]


def step(s: Sched):
    """One engine step: schedule, verify greedily against TRUTH, update. Returns (output, generated)."""
    out = s.schedule()
    generated = {}
    for req_id, count in out.num_scheduled_tokens.items():
        r = s.requests[req_id]
        if r.num_computed_tokens < r.num_tokens:  # a prefill chunk: no token
            generated[req_id] = []
            continue
        generated[req_id] = greedy_verify(r.num_tokens - PROMPT, out.scheduled_spec_decode_tokens.get(req_id, []))
    ids = list(out.num_scheduled_tokens)
    runner = SimpleNamespace(req_id_to_index={r: n for n, r in enumerate(ids)},
                             sampled_token_ids=[generated[r] for r in ids])
    s.update_from_output(out, runner)
    return out, generated


def prefilled(s: Sched, req_id: str = "a") -> FakeRequest:
    r = FakeRequest(req_id)
    s.add_request(r)
    assert deliver(s, r, [float(p) for p in range(PROMPT)]) is None
    _, gen = step(s)
    assert gen[req_id] == TRUTH[:1] and r.num_computed_tokens == PROMPT
    return r


def counts(s: Sched) -> dict:
    return s.split_step_stats(0)["drafts"]


def test_drafts_are_scheduled_with_their_rows_and_all_accepted_gives_the_bonus_token():
    s = make()
    r = prefilled(s)
    out = s.schedule()
    assert out.num_scheduled_tokens == {}  # held: its rows have not come
    assert deliver(s, r, [5.0, 6.0, 7.0, 8.0], drafts=tuple(TRUTH[1:4])) is None
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 4} and out.scheduled_spec_decode_tokens == {"a": TRUTH[1:4]}
    x = out.split_inputs["a"]
    assert x.start == PROMPT and torch.equal(x.hidden[:, 0], torch.tensor([5.0, 6.0, 7.0, 8.0]))
    assert gen["a"] == TRUTH[1:5]  # 3 accepted and the bonus token
    assert r.num_tokens == PROMPT + 5 and r.num_computed_tokens == PROMPT + 4
    assert s.split_store.num_rows("s-a") == PROMPT + 4 and "s-a" not in s._split_drafts
    assert counts(s) == {"k": K, "steps": 1, "drafted": 3, "accepted": 3, "rejected": 0, "padded": 0}


def test_a_rejection_rolls_back_and_the_next_delivery_starts_after_the_accepted_drafts():
    s = make()
    r = prefilled(s)
    drafts = (TRUTH[1], 999, TRUTH[3], TRUTH[4])  # rejected at the second draft
    assert deliver(s, r, [5.0, 6.0, 7.0, 8.0, 9.0], drafts=drafts) is None
    out, gen = step(s)
    assert gen["a"] == TRUTH[1:3]  # the accepted draft, then the correction
    assert r.num_computed_tokens == PROMPT + 2 and s.split_store.num_rows("s-a") == PROMPT + 2
    assert counts(s)["drafted"] == 4 and counts(s)["accepted"] == 1 and counts(s)["rejected"] == 3
    # the stale rows are gone: the client's next activation starts at the new token's position
    assert deliver(s, r, [20.0, 21.0], drafts=(TRUTH[3],)) is None
    out, gen = step(s)
    assert out.split_inputs["a"].start == PROMPT + 2 and gen["a"] == TRUTH[3:5]
    assert torch.equal(s.split_store.rows("s-a", start=PROMPT, count=4)[:, 0], torch.tensor([5.0, 6.0, 20.0, 21.0]))


def test_a_budget_clamped_step_verifies_a_prefix_and_drops_the_rest():
    s = make()
    r = prefilled(s)
    s.budget = 2
    assert deliver(s, r, [5.0, 6.0, 7.0, 8.0], drafts=tuple(TRUTH[1:4])) is None
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 2} and out.scheduled_spec_decode_tokens == {"a": TRUTH[1:2]}
    assert gen["a"] == TRUTH[1:3]  # d1 accepted and the bonus at its row
    assert s.split_store.num_rows("s-a") == PROMPT + 2 and "s-a" not in s._split_drafts
    s.budget = 100
    assert deliver(s, r, [9.0]) is None  # no drafts this time: one row
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 1} and gen["a"] == TRUTH[3:4]


def test_stray_spec_tokens_of_split_requests_are_overridden_and_ordinary_ones_untouched():
    s = make()
    r = prefilled(s)
    plain = FakeRequest("plain", split=False)
    s.requests["plain"] = plain
    plain.all_token_ids += [1]
    plain.num_computed_tokens = plain.num_tokens - 1
    s.running.append(plain)
    r.spec_token_ids = [0] * K  # the runner's zero drafts near max_model_len
    plain.spec_token_ids = [0] * K
    assert deliver(s, r, [5.0]) is None
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "plain": 1 + K}  # not held for rows that never come
    assert "a" not in out.scheduled_spec_decode_tokens and out.scheduled_spec_decode_tokens["plain"] == [0] * K


def test_padding_of_a_waiting_request_gets_zero_rows_and_counts_as_padded():
    s = make()
    a = prefilled(s, "a")
    b = FakeRequest("b")
    b.all_token_ids = [0]  # a one-token prompt: vLLM pads it to 1 + K with -1 drafts
    s.add_request(b)
    assert deliver(s, b, [3.0]) is None
    assert deliver(s, a, [5.0]) is None
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1 + K}
    x = out.split_inputs["b"]
    assert x.hidden.shape == (1 + K, HIDDEN) and torch.equal(x.hidden[:, 0], torch.tensor([3.0] + [0.0] * K))
    assert len(gen["b"]) == 1  # every -1 draft is rejected
    assert b.num_computed_tokens == 1 and s.split_store.num_rows("s-b") == 1
    assert counts(s)["padded"] == K and counts(s)["drafted"] == 0


def test_a_preempted_request_recomputes_without_its_drafts_and_drops_them_once_it_has_a_token():
    s = make()
    r = prefilled(s)
    assert deliver(s, r, [5.0, 6.0, 7.0], drafts=tuple(TRUTH[1:3])) is None
    s.preempt(r)  # before its drafts ran
    s.budget = 4  # the recompute (6 positions) takes two chunks
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 4} and gen["a"] == [] and not out.scheduled_spec_decode_tokens
    assert s.split_store.num_rows("s-a") == PROMPT + 3 and s._split_drafts["s-a"] == TRUTH[1:3]  # kept mid-chunk
    out, gen = step(s)
    assert out.num_scheduled_tokens == {"a": 2} and not out.scheduled_spec_decode_tokens
    assert gen["a"] == TRUTH[1:2] and r.num_computed_tokens == PROMPT + 1
    assert s.split_store.num_rows("s-a") == PROMPT + 1 and "s-a" not in s._split_drafts
    assert counts(s)["drafted"] == 0


def test_the_scheduler_refuses_bad_draft_deliveries():
    s = make(drafts=2)
    r = prefilled(s)
    assert deliver(s, r, [5.0, 6.0, 7.0, 8.0], drafts=(1, 2, 3)) == "session s-a: 3 drafts, this server verifies at most 2"
    assert deliver(s, r, [5.0, 6.0, 7.0], drafts=(1,)) == "session s-a: 1 drafts need 2 rows, got 3"
    assert s.split_store.num_rows("s-a") == PROMPT and not s._split_drafts


def test_without_a_spec_config_nothing_changes():
    s = make(drafts=0, spec=None)
    assert not s._split_spec and s.split_num_drafts == 0
    r = prefilled(s)
    assert deliver(s, r, [5.0, 6.0], drafts=(TRUTH[1],)) == "session s-a: 1 drafts, this server verifies at most 0"
    r.spec_token_ids = [7]  # left alone: only a spec config makes them ours
    assert deliver(s, r, [5.0, 6.0]) is None  # rows for what vLLM would want
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 2} and r.spec_token_ids == []
    assert counts(s) == {"k": 0, "steps": 0, "drafted": 0, "accepted": 0, "rejected": 0, "padded": 0}


@pytest.mark.parametrize("spec, message", [
    (None, r"vllm_split\.drafts 4 needs vLLM's --speculative-config with the vllm_split\.engine\.drafts\.ClientDrafts "
           r"proposer \(start with `vllm-split serve --split-drafts K`\); found none"),
    (SimpleNamespace(method="ngram", model=None, num_speculative_tokens=4), r"found method 'ngram', model None"),
    (spec_config(2), r"vllm_split\.drafts 4 exceeds the speculative config's num_speculative_tokens 2"),
])
def test_drafts_need_the_client_drafts_spec_config(spec, message):
    with pytest.raises(SplitConfigError, match=message):
        make(drafts=4, spec=spec)


def test_stray_spec_tokens_never_hold_a_split_request_out_of_the_unfinished_count():
    """vLLM's zero-id drafts (near max_model_len) written after a step must not make a
    delivered request look held, or EngineCore would sleep on its input queue."""
    s = make()
    r = prefilled(s)
    assert deliver(s, r, [5.0]) is None
    r.spec_token_ids = [0] * K  # update_draft_token_ids after the step
    assert not s._split_is_held(r) and s.get_num_unfinished_requests() == 1
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1} and not out.scheduled_spec_decode_tokens
