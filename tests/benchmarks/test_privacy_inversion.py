"""CI smoke run of privacy_inversion on the real model (transformers only, no vLLM engine):
it runs, writes its JSON, sidecar and plot, and the attacks recover what they must; plus
the train / held-out split, which keeps each group of documents on one side."""
from __future__ import annotations

from benchmarks import report
from benchmarks.privacy_inversion import Document, split_documents
from tests.support.benchmarks import run


def test_split_keeps_groups_together_and_holds_out_each_source():
    docs = [Document(source, f"g{g}", [g, n]) for source in ("stdlib", "generated") for g in range(10)
            for n in range(3)]
    train, test = split_documents(docs, 0.2, seed=0)
    assert len(train) + len(test) == len(docs)
    held = {(d.source, d.group) for d in test}
    assert not held & {(d.source, d.group) for d in train}
    assert sorted(s for s, _ in held) == ["generated"] * 2 + ["stdlib"] * 2  # 20% of each source's groups
    assert split_documents(docs, 0.2, seed=0) == (train, test) != split_documents(docs, 0.2, seed=1)


def test_privacy_inversion_quick(tmp_path, model_dir):
    out = tmp_path / "privacy.json"
    run("privacy_inversion", "--quick", "--model", str(model_dir), "--out", str(out))
    data = report.load(out, rows=True)
    assert data["layers"] == [0, 7] and data["text"]["generated"] is None
    train, test = data["text"]["train"], data["text"]["held_out"]
    assert train["tokens"] > 0 and test["tokens"] > 0 and train["groups"] + test["groups"] == 12
    assert train["tokens"] + test["tokens"] == sum(len(d["ids"]) for d in data["documents"])
    results = {(r["attack"], r["layer"]): r for r in data["results"]}
    assert set(results) == {("frequency", None)} | {(a, k) for a in ("probe", "nearest_neighbour") for k in (0, 7)}
    for r in results.values():
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        assert r["top1_ci95"][0] <= r["top1"] <= r["top1_ci95"][1]
    assert results[("probe", 0)]["positions"] == test["tokens"]
    assert results[("nearest_neighbour", 7)]["positions"] == 16 == len(data["nn_positions"])
    # The layer-0 state is the token's embedding row: the probe recovers far more than the
    # frequency baseline, and the exhaustive nearest neighbour finds every token exactly.
    ceiling = data["text"]["held_out_in_training_vocabulary"]
    assert results[("probe", 0)]["top1"] > max(0.5 * ceiling, 3 * results[("frequency", None)]["top1"])
    assert results[("nearest_neighbour", 0)]["top1"] == 1.0
    assert results[("nearest_neighbour", 0)]["true_distance_rel_max"] == 0.0
    # Through layers [0, 7) the true candidate's state matches the observed one up to rounding,
    # and every other candidate is far: a hit whenever the probe proposes the true token.
    nn7 = results[("nearest_neighbour", 7)]
    assert nn7["top1"] == nn7["candidate_coverage"] and nn7["candidates"] == "probe top 8"
    if nn7["true_distance_rel_max"] is not None:
        assert nn7["true_distance_rel_max"] < 1e-3 < nn7["nearest_other_distance_rel_median"]
    assert set(data["methods"]) == {"frequency", "probe", "nearest_neighbour"}
    assert data["arguments"]["out"] == "privacy.json" and "git_sha" in data["environment"]
    assert str(tmp_path) not in out.read_text()  # paths by name, never the machine's own
    assert out.with_suffix(".png").exists()
