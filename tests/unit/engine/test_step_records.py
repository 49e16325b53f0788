"""Step records: what a step ran and how long the model took (EngineCore side)."""
from vllm_split.engine.step_records import StepRecord, StepRecorder, step_shape


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
    assert len(rec._pending) <= 8
