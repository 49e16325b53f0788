"""Pure parts of benchmarks/bench_gather.py: the server-log counters, the round and the summary."""
import pytest

from benchmarks import report
from benchmarks.bench_gather import bootstrap_ratio, draw, gather_totals, minus, round_summary, summarize


def test_reads_the_totals_the_scheduler_logs(tmp_path):
    pytest.importorskip("vllm")
    from vllm_split.engine.scheduler import GATHER_LOG

    log = tmp_path / "server.log"
    assert gather_totals(log) is None
    log.write_text("INFO starting\n" + "(EngineCore pid=1) INFO 01-01 [scheduler.py:9] "
                   + GATHER_LOG % (3, 0.0125, 5, 1, 2) + "\nother\n"
                   + "INFO " + GATHER_LOG % (7, 0.03, 11, 2, 2) + "\n")
    after = gather_totals(log)
    assert after == {"num_holds": 7, "held_s": 0.03, "num_caught": 11, "num_late": 2, "num_probes": 2}
    assert minus(after, {"num_holds": 3, "held_s": 0.0125, "num_caught": 5, "num_late": 1, "num_probes": 2}) == \
        {"num_holds": 4, "held_s": pytest.approx(0.0175), "num_caught": 6, "num_late": 1, "num_probes": 0}


def test_round_summary_counts_tokens_tpot_and_mismatches():
    results = [{"times": [10.5, 10.6, 10.8], "tokens": [1, 2, 3]}, {"times": [10.4, 11.0], "tokens": [4, 9]}]
    summary, sessions = round_summary(10.0, results, [[1, 2, 3], [4, 5]])
    assert summary["output_tokens"] == 5 and summary["wall_s"] == pytest.approx(1.0)
    assert summary["tokens_per_s"] == pytest.approx(5.0) and summary["mismatches"] == 1
    assert sessions[0]["tpot_s"] == pytest.approx(0.15) and sessions[1]["ttft_s"] == pytest.approx(0.4)


def test_bootstrap_interval_brackets_the_ratio_of_means():
    lo, hi = bootstrap_ratio([30.0, 32.0, 31.0], [44.0, 45.0, 43.0], seed=0)
    assert lo <= 31.0 / 44.0 <= hi and hi - lo < 0.1
    assert bootstrap_ratio([30.0], [40.0], seed=0) == [0.75, 0.75]  # one round: no spread


def test_summary_and_plot_from_the_json(tmp_path):
    def system(tps, tpot, gather=None):
        return {"rounds": [{"tokens_per_s": t, "mismatches": 0, "gather": gather} for t in tps],
                "sessions": [{"tpot_s": tpot, "ttft_s": 0.3}] * 4}

    counts = {"num_holds": 10, "held_s": 0.05, "num_caught": 20, "num_late": 1, "num_probes": 3}
    summary = summarize({"plain": system([44.0, 45.0], 0.128), "split_adaptive": system([42.0, 43.0], 0.135, counts),
                         "split_off": system([31.0, 32.0], 0.2)}, seed=0)
    assert summary["split_off"]["ratio_to_plain"] == pytest.approx(31.5 / 44.5)
    assert summary["gather"] == {k: 2 * v for k, v in counts.items()}
    out = tmp_path / "gather.json"
    report.write(out, {"arguments": {"sessions": 8, "max_tokens": 64}, "summary": summary}, draw=draw)
    assert out.with_suffix(".png").exists()


def test_server_args_turn_the_window_off_only_for_split_off():
    """(The CI smoke runs plain and split_adaptive only; split_off differs by this argument.)"""
    import argparse

    from benchmarks.bench_gather import server_args

    a = argparse.Namespace(sessions=8, gather_max_ms=None, split_args=["--x"])
    assert "--split-gather" not in server_args("split_adaptive", a) and "--x" in server_args("split_adaptive", a)
    assert server_args("split_off", a)[-3:] == ["--split-gather", "off", "--x"]
    assert "--x" not in server_args("plain", a)
