"""Pure parts of benchmarks/bench_drafts.py: the prompts, one session's numbers, the summary and the plot."""
import ast
import json

import pytest

from benchmarks import report
from benchmarks.bench_drafts import (TYPES, build_prompts, cell_summary, code_edit_prompt, decode_steps, draw,
                                     first_difference, load_links, paired_bootstrap_ratio, paired_tpots, prompt_ids,
                                     rename_target, session_row, step_lines, summarize)
from client_lib.session import GenerationStats

SOURCE = '''def scale(values, factor=2):
    """Doc."""
    total = 0
    for v in values:
        total += v * factor
    return total
'''


def test_rename_target_takes_the_first_local_and_an_unused_name():
    assert rename_target(SOURCE) == ("total", "result")  # "value" is inside "values"
    assert rename_target("def f(value, b):\n    return value + b\n") == ("value", "result")  # no local: the 1st param
    with pytest.raises(ValueError):
        rename_target("def f():\n    return 1\n")


def test_code_edit_prompt_holds_the_function_and_parses_back():
    text, old, new = code_edit_prompt(SOURCE)
    assert (old, new) == ("total", "result") and f"`{old}` to `{new}`" in text
    body = text.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
    assert ast.parse(body).body[0].name == "scale" and body == SOURCE.rstrip()


def test_build_prompts_gives_count_of_each_type(tmp_path):
    shipped = tmp_path / "p.json"
    shipped.write_text(json.dumps({"prompts": [{"name": "a", "kind": "chat", "text": "Hi?"},
                                               {"name": "b", "kind": "chat", "text": "Why?"},
                                               {"name": "c", "kind": "summarisation", "text": "Sum."},
                                               {"name": "d", "kind": "summarisation", "text": "Up."},
                                               {"name": "e", "kind": "code", "text": "no"}]}))
    got = build_prompts(2, shipped)
    assert list(got) == ["chat", "summarisation", "code_edit"] and all(len(got[t]) == 2 for t in TYPES)
    assert [q["name"] for q in got["chat"]] == ["a", "b"]
    for q in got["code_edit"]:  # stdlib sources, each with its rename in the text
        old, new = q["rename"]
        assert f"`{old}` to `{new}`" in q["text"] and "```python\ndef " in q["text"]
    with pytest.raises(SystemExit, match="only 2 chat"):
        build_prompts(3, shipped)


def test_the_shipped_prompts_cover_five_of_each_type():
    assert all(len(v) == 5 for v in build_prompts(5).values())


def test_prompt_ids_uses_the_chat_template_when_there_is_one():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, return_dict):
            assert add_generation_prompt and not return_dict and messages[0]["role"] == "user"
            return [1, 2, len(messages[0]["content"])]

        def __call__(self, text):
            return {"input_ids": [9]}

    assert prompt_ids(Tok(), "abc") == [1, 2, 3]
    Tok.chat_template = None
    assert prompt_ids(Tok(), "abc") == [9]


def test_links_are_the_workloads_networks():
    links = load_links()
    assert list(links) == ["lan", "wifi", "4g"] and links["4g"]["rtt_s"] == pytest.approx(0.05)


def stats(round_trips, sent, accepted, times, prompt=10):
    s = GenerationStats(round_trips=round_trips, drafts_sent=sent, drafts_accepted=accepted, num_prompt_tokens=prompt,
                        finish_reason="length")
    s.token_times = list(times)
    return s


def test_session_row_counts_rows_and_checks_the_step_log():
    # 6 tokens in 3 answers (1, then 3 = 2 accepted + 1, then 2 = 1 accepted + 1): 2 activations, 4 drafts sent
    s = stats(3, 4, 3, [0.0, 0.3, 0.3, 0.3, 0.5, 0.5])
    steps = [{"num_tokens": 6, "layer_rows": 90}, {"num_tokens": 4, "layer_rows": 60},
             {"num_tokens": 3, "layer_rows": 45}, {"num_tokens": 3, "layer_rows": 45}]
    row = session_row(s, [1, 2, 3, 4, 5, 6], split_layer=15, num_layers=30, steps=steps)
    assert row["tpot_s"] == pytest.approx(0.1) and row["decode_rows"] == 6 and row["decode_layer_rows"] == 90
    assert row["decode_steps"] == 2 and row["step_log_decode_layer_rows"] == 90 and row["server_steps"] == 4
    assert decode_steps(steps, 10) == steps[2:]
    assert session_row(s, [1] * 6, split_layer=15, num_layers=30, steps=[{"num_tokens": 12}, {"num_tokens": 3}]
                       )["step_log_decode_layer_rows"] is None  # a step without layer_rows: not counted
    assert "step_log_decode_layer_rows" not in session_row(s, [1] * 6, split_layer=15, num_layers=30, steps=None)


def test_step_lines_reads_whole_split_lines_from_an_offset(tmp_path):
    log = tmp_path / "s.jsonl"
    assert step_lines(log, 0) == ([], 0)
    log.write_text('{"split_requests": ["a"], "num_tokens": 3}\n{"split_requests": [], "num_tokens": 1}\n{"spl')
    got, offset = step_lines(log, 0)
    assert got == [{"split_requests": ["a"], "num_tokens": 3}] and offset == log.read_text().rfind("\n") + 1
    with open(log, "a") as f:
        f.write('it_requests": ["b"]}\n')
    assert step_lines(log, offset)[0] == [{"split_requests": ["b"]}]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_paired_bootstrap_brackets_the_ratio_of_means():
    off, on = [0.10, 0.12, 0.20], [0.05, 0.06, 0.09]
    lo, hi = paired_bootstrap_ratio(off, on, seed=0)
    assert lo <= sum(off) / sum(on) <= hi and hi - lo < 0.3
    assert paired_bootstrap_ratio([0.2], [0.1], seed=0) == [2.0, 2.0]
    with pytest.raises(ValueError):
        paired_bootstrap_ratio([1.0], [1.0, 2.0], seed=0)


def row(t, link, mode, prompt, tpot, *, tokens=8, rts=8, sent=0, acc=0, diff=None):
    return {"type": t, "link": link, "mode": mode, "prompt": prompt, "tpot_s": tpot, "tokens": tokens,
            "round_trips": rts, "drafts_sent": sent, "drafts_accepted": acc, "decode_rows": rts - 1 + sent,
            "decode_layer_rows": (rts - 1 + sent) * 15, "step_log_decode_layer_rows": (rts - 1 + sent) * 15,
            "first_difference": diff}


def rows_fixture():
    out = []
    for link, rtt in (("lan", 0.0), ("4g", 0.05)):
        for i, p in enumerate(("p1", "p2")):
            out.append(row("summarisation", link, "off", p, 0.1 + rtt + i * 0.01))
            out.append(row("summarisation", link, "on", p, (0.1 + rtt + i * 0.01) / 2, rts=4, sent=8, acc=4))
            out.append(row("chat", link, "off", p, 0.1 + rtt))
            out.append(row("chat", link, "on", p, 0.1 + rtt, sent=2, diff=3 if (link, p) == ("4g", "p2") else None))
    return out


def test_cell_summary_and_summary():
    rows = rows_fixture()
    c = cell_summary([r for r in rows if r["type"] == "summarisation" and r["link"] == "4g" and r["mode"] == "on"])
    assert c["tokens_per_round_trip"] == 2.0 and c["acceptance"] == 0.5 and c["sessions"] == 2
    assert c["layer_rows_per_token"] == pytest.approx((3 + 8) * 15 / 8) == c["step_log_layer_rows_per_token"]
    assert paired_tpots([r for r in rows if r["type"] == "chat" and r["link"] == "lan"]) == [(0.1, 0.1)] * 2
    s = summarize(rows, seed=0)
    cell = s["cells"]["summarisation"]["4g"]
    assert cell["tpot_ratio"] == pytest.approx(2.0) and cell["tpot_ratio_ci95"] == pytest.approx([2.0, 2.0])
    assert cell["layer_rows_ratio"] == pytest.approx(11 / 7)
    assert s["targets"]["summarisation"]["met"] and s["targets"]["chat"]["met"]  # 2.0 >= 1.8, 1.0 >= 1.0
    assert "code_edit" not in s["targets"] and s["mismatches"] == 1
    assert s["cells"]["chat"]["4g"]["on"]["mismatches"] == 1


def test_plot_from_the_json(tmp_path):
    rows = rows_fixture()
    data = {"arguments": {"num_drafts": 4, "split_layer": 15, "prompts": 2, "max_tokens": 8},
            "links": {"lan": {"rtt_s": 0.002}, "4g": {"rtt_s": 0.05}}, "summary": summarize(rows, seed=0)}
    out = tmp_path / "d.json"
    report.write(out, data, rows={"sessions": rows}, draw=draw)
    assert out.with_suffix(".png").stat().st_size > 1000


async def test_one_session_rows_match_what_a_verifying_server_received(tmp_path, monkeypatch):
    """``one_session`` and ``session_row`` against the client tests' fake verifying server: the
    decode rows counted from the session's counters are the rows the server was sent."""
    from client_lib import LocalLayers
    from benchmarks.bench_drafts import one_session
    from tests.unit.client_lib.conftest import NUM_LAYERS, build_tiny_chat_model
    from tests.unit.client_lib.test_drafts_session import PROMPT, SCRIPT, DraftServer
    from tests.unit.client_lib.test_resume import _serve

    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))
    build_tiny_chat_model(tmp_path / "m")
    for draft in ("none", "ngram"):
        server = DraftServer()
        runner, url = await _serve(server)
        try:
            session, tokens = await one_session(url, LocalLayers(tmp_path / "m", split_layer=2), PROMPT, link=None,
                                                max_tokens=len(SCRIPT), draft=draft, num_drafts=4)
        finally:
            await runner.cleanup()
        got = session_row(session.stats, tokens, split_layer=2, num_layers=NUM_LAYERS, steps=None)
        assert tokens == SCRIPT and got["tokens"] == len(SCRIPT)
        assert got["decode_rows"] == sum(a.rows for a in server.decode_activations)
        assert got["decode_layer_rows"] == got["decode_rows"] * (NUM_LAYERS - 2)
        assert (got["drafts_sent"] > 0) == (draft == "ngram")


def test_rounded_keeps_four_significant_digits_everywhere():
    from benchmarks.bench_drafts import rounded

    assert rounded({"a": [0.123456, 2], "b": {"c": 1234.567, "d": None, "e": "x"}, "f": (1e-7 / 3,)}) == \
        {"a": [0.1235, 2], "b": {"c": 1235.0, "d": None, "e": "x"}, "f": [3.333e-8]}
