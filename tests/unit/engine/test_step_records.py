"""Step records: what a step ran and how long the model took (EngineCore side)."""
from vllm_split.engine.step_records import MAX_PENDING, StepClock, StepRecord, StepRecorder, step_shape


def test_step_shape_counts_layer_calls_and_rows():
    # 30 layers: a plain request (k=0) of 5 prefill tokens, split requests at k=15 and k=22
    assert step_shape(30, [(5, 0), (1, 15), (1, 22)]) == (30, 5 * 30 + 15 + 8, 3, 7)
    # only split requests: layers below the lowest split layer are skipped
    assert step_shape(30, [(1, 15), (1, 22)]) == (15, 15 + 8, 2, 2)
    assert step_shape(30, []) == (0, 0, 0, 0)


def test_recorder_pairs_steps_and_serves_records_since_a_sequence_number():
    rec = StepRecorder(max_records=3)
    for key in range(5):
        rec.scheduled(key, (30, 30, 1, 1))
        rec.finished(key)
    rec.scheduled(99, (0, 0, 0, 0))  # an empty step runs no model: not recorded
    rec.finished(99)
    rec.finished(12345)  # an output for no known step: ignored
    out = [StepRecord.from_list(r) for r in rec.since(0)]
    assert [r.seq for r in out] == [3, 4, 5]  # bounded: the oldest are dropped
    assert all(r.exec_s >= 0 and r.layer_calls == 30 for r in out)
    assert [r[0] for r in rec.since(4)] == [5]
    assert rec.since(5) == []


def test_recorder_forgets_steps_whose_output_never_came():
    rec = StepRecorder()
    for key in range(20):
        rec.scheduled(key, (30, 30, 1, 1))
    rec.finished(19)
    assert rec.clock.num_pending == MAX_PENDING - 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_exec_s_runs_from_schedule_to_update_from_output():
    clock = FakeClock()
    rec = StepRecorder(clock=clock)
    rec.scheduled(1, (30, 60, 2, 2))
    clock.now += 0.25  # step 2 scheduled while step 1 runs (async scheduling)
    rec.scheduled(2, (30, 30, 1, 1))
    clock.now += 0.5
    rec.finished(1)
    clock.now += 0.125
    rec.finished(2)
    first, second = (StepRecord.from_list(r) for r in rec.since(0))
    assert (first.exec_s, first.layer_rows, first.num_reqs) == (0.75, 60, 2)
    assert (second.exec_s, second.layer_rows, second.num_reqs) == (0.625, 30, 1)


def test_eviction_keeps_the_newest_pending_steps_whatever_their_ids():
    rec = StepRecorder()
    keys = list(range(1000, 980, -1))  # ids that fall as steps get newer: sorting ids is not age
    for key in keys:
        rec.scheduled(key, (30, key, 1, 1))  # layer_rows tells the steps apart
    assert rec.clock.num_pending == MAX_PENDING
    for key in keys:  # outputs of the oldest steps come late (their steps were aborted)
        rec.finished(key)
    assert [StepRecord.from_list(r).layer_rows for r in rec.since(0)] == keys[-MAX_PENDING:]


def test_a_reused_key_starts_a_new_step_that_counts_as_newest():
    clock = StepClock(max_pending=2)
    clock.begin("a", "old", num_tokens=1)
    clock.begin("b", "b", num_tokens=1)
    clock.begin("a", "new", num_tokens=1)  # the id of a freed output, reused
    clock.begin("c", "c", num_tokens=1)  # evicts the oldest: "b", not the renewed "a"
    assert clock.end("b") is None
    assert clock.end("a")[0] == "new"
    assert clock.end("c")[0] == "c"


def test_a_step_that_schedules_no_token_is_not_timed():
    clock = StepClock()
    assert clock.begin(1, None, num_tokens=0) is False
    assert clock.num_pending == 0 and clock.end(1) is None


def test_step_shape_counts_only_the_layers_a_u_row_runs():
    # an ordinary row (30 layers), a U row [5, 12) (7 layers), a prefix-split row from 15 (15 layers)
    assert step_shape(30, [(1, 0, None), (1, 5, 12), (2, 15)]) == (30, 30 + 7 + 2 * 15, 3, 4)
    assert step_shape(30, [(3, 4, 20)]) == (16, 3 * 16, 1, 3)  # U rows only: the layers [4, 20)
