"""benchmarks/draft_lookup.py's replay of a greedy session (pure)."""
from benchmarks.draft_lookup import replay, summarise
from client_lib.drafts import Drafter


class Oracle(Drafter):
    """Proposes the true continuation, ``k`` tokens of it, with ``wrong`` drafts corrupted."""

    def __init__(self, prompt, output, k, wrong=()):
        self.full, self.k, self.wrong, self.n = prompt + output, k, set(wrong), len(prompt)

    def propose(self, context, limit=None):
        want = self.k if limit is None else min(self.k, limit)
        out = list(self.full[len(context):len(context) + want])
        return [t + 1000 if len(context) + j - self.n in self.wrong else t for j, t in enumerate(out)]


def test_replay_counts_round_trips_and_drafts():
    prompt, output = [1, 2, 3], list(range(10, 20))  # 10 output tokens
    assert replay(prompt, output, Oracle(prompt, output, 0)) == (10, 10, 0)  # no drafts: one token per trip
    # 3 drafts, all right: trips yield 4 tokens after the first: 1 + 4 + 4 + 1 (limit: 1 left) -> 4 trips
    assert replay(prompt, output, Oracle(prompt, output, 3)) == (10, 4, 3 + 3 + 0)
    # output index 2 wrong: trip 2 proposes indices 1, 2x, 3 -> accepts 1 and gets 2 from the server;
    # trip 3 drafts 3-5 (all right), trip 4 the last 2 (limit) -> i = 10
    assert replay(prompt, output, Oracle(prompt, output, 3, wrong={2})) == (10, 4, 3 + 3 + 2)


def test_summarise_reports_the_ratios():
    sessions = [{"prompt": [5, 6, 5, 6, 5], "output": [6, 5, 6, 5, 6, 5, 6, 5]}]
    s = summarise(sessions, {"min_n": 2, "max_n": 4, "k": 4, "per_token": None})
    assert s["tokens_per_round_trip"] > 2 and s["acceptance"] == 1.0 and s["sessions"] == 1
