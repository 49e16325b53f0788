"""benchmarks/report.py: the report every benchmark writes, and the committed results/."""
import gzip
import json
import re
from pathlib import Path

import pytest

from benchmarks import report

RESULTS = report.ROOT / "results"


def test_rows_go_to_a_gzip_sidecar_and_load_puts_them_back(tmp_path):
    out = tmp_path / "bench_x.json"
    data = {"arguments": {"quick": True}, "summary": {"median_s": 0.5}}
    rows = {"samples": {"plain": [{"ttft_s": 0.1, "ok": True}] * 3}}
    report.write(out, data, rows=rows)
    sidecar = tmp_path / "bench_x.rows.json.gz"
    assert report.rows_path(out) == sidecar
    assert json.loads(gzip.decompress(sidecar.read_bytes())) == rows
    written = json.loads(out.read_text())
    assert written == {**data, "rows_file": "bench_x.rows.json.gz"}  # no rows in the JSON itself
    assert report.load(out) == written
    assert report.load(out, rows=True) == {**written, **rows}


def test_sidecar_bytes_do_not_depend_on_when_it_was_written(tmp_path):
    a, b = tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"
    for out in (a, b):
        report.write(out, {}, rows={"rows": [[1, 2.5, "x"]]})
    assert report.rows_path(a).read_bytes() == report.rows_path(b).read_bytes()  # no mtime, no file name


def test_paths_are_written_relative_to_the_repo_or_by_name(tmp_path):
    parser = report.parser("bench_x", "Doc.\n\nMore.", quick="tiny", seed=3)
    args = parser.parse_args(["--out", str(tmp_path / "x.json"), "--quick"])
    args.config = report.ROOT / "benchmarks" / "study_config.json"
    args.ks = (0, 15)
    assert report.arguments(args) == {"out": "x.json", "quick": True, "seed": 3,
                                      "config": "benchmarks/study_config.json", "ks": [0, 15]}
    out = tmp_path / "r.json"
    report.write(out, {"workload": report.ROOT / "benchmarks" / "workloads" / "default.json"})
    assert json.loads(out.read_text()) == {"workload": "benchmarks/workloads/default.json"}


def test_parser_shared_arguments():
    p = report.parser("bench_x", "Doc.")
    assert p.parse_args([]).out == report.RESULTS / "bench_x.json"
    with pytest.raises(SystemExit):
        p.parse_args(["--quick"])  # only benchmarks with a quick size take --quick
    p = report.parser("profile_costs", "Doc.", out="profile_smollm2_cpu", plot=True)
    args = p.parse_args(["--plot-only"])
    assert args.out == report.RESULTS / "profile_smollm2_cpu.json" and args.plot_only


def test_environment_records_versions_threads_and_extra():
    env = report.environment(num_layers=30)
    assert {"python", "platform", "cpu", "cpu_count", "torch", "torch_threads", "vllm", "git_sha"} <= set(env)
    assert env["num_layers"] == 30 and env["cpu_count"] >= 1


def test_plot_is_drawn_from_the_json_on_disk(tmp_path):
    out = tmp_path / "r.json"
    seen = []

    def draw(data):
        seen.append(data)
        fig, ax = report.subplots()
        ax.plot(data["summary"]["xs"])
        return fig

    report.write(out, {"summary": {"xs": (1, 2, 3)}}, rows={"raw": [1]}, draw=draw)
    assert seen == [{"summary": {"xs": [1, 2, 3]}, "rows_file": "r.rows.json.gz"}]  # as read back, no rows
    assert out.with_suffix(".png").stat().st_size > 1000


def test_plot_only_redraws_from_the_existing_report_and_exits(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    report.write(out, {"summary": {"xs": [3, 1, 2]}})

    def draw(data):
        fig, ax = report.subplots()
        ax.plot(data["summary"]["xs"])
        return fig

    p = report.parser("bench_x", "Doc.", plot=True)
    monkeypatch.setattr("sys.argv", ["bench_x", "--out", str(out)])
    assert report.parse_args(p, draw).out == out and not out.with_suffix(".png").exists()
    monkeypatch.setattr("sys.argv", ["bench_x", "--out", str(out), "--plot-only"])
    with pytest.raises(SystemExit) as exc:
        report.parse_args(p, draw)
    assert exc.value.code == 0 and out.with_suffix(".png").exists()


# ---------------------------------------------------------------- the committed results/
MACHINE_PATH = re.compile(r'"(/root|/work|/tmp|/home)/')


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_committed_result_holds_no_machine_path_and_its_rows_file_exists(path: Path):
    text = path.read_text()
    assert not MACHINE_PATH.search(text), f"{path.name}: absolute path {MACHINE_PATH.search(text).group(0)}"
    data = json.loads(text)
    if "rows_file" in data:
        rows = json.loads(gzip.decompress((RESULTS / data["rows_file"]).read_bytes()))
        assert rows and not set(rows) & set(data)  # the sidecar adds entries, replaces none
        assert not MACHINE_PATH.search(json.dumps(rows))


def test_committed_results_stay_small():
    size = sum(p.stat().st_size for p in RESULTS.iterdir() if p.is_file())
    # 3.5 MiB: the reports every doc cites, plots at 256 colours, raw rows in gzip sidecars (3 MiB
    # until session 14, when the same-day comparisons of that session did not fit)
    assert size < 3.5 * 1024 * 1024, f"results/ holds {size / 2**20:.1f} MiB: put raw rows in a .rows.json.gz sidecar"


def test_a_failing_plot_keeps_the_data(tmp_path, capsys):
    out = tmp_path / "r.json"

    def draw(data):
        raise ValueError("bad bar")

    report.write(out, {"x": 1}, draw=draw)
    assert report.load(out) == {"x": 1} and not out.with_suffix(".png").exists()
    assert "the plot failed (ValueError: bad bar)" in capsys.readouterr().err
