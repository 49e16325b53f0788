"""The adaptive gather window's rule (vllm_split/engine/gather.py), on a fake clock."""
import pytest

from vllm_split.engine.gather import MIN_TOLERANCE_S, PROBE_EVERY, SETTLE_S, GatherWindow

STEP = 0.100  # recent step time: bound = min(25 ms, 50 ms) = 25 ms
MS = 0.001


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self, dt: float = 0.0) -> float:
        self.now += dt
        return self.now


def timely_round(win: GatherWindow, clock: Clock, req: str, turnaround: float) -> None:
    """One token out and its activation back while the engine watches (a measured turnaround)."""
    win.token_sent(req, clock(STEP))
    win.scheduling(clock())
    win.arrived(req, clock(turnaround))


def trained(turnarounds: dict[str, float], rounds: int = 4, **kwargs) -> tuple[GatherWindow, Clock]:
    win, clock = GatherWindow(max_s=25 * MS, **kwargs), Clock()
    for _ in range(rounds):
        for req, t in turnarounds.items():
            timely_round(win, clock, req, t)
    return win, clock


def test_holds_for_an_activation_expected_within_the_bound():
    win, clock = trained({"a": 4 * MS})
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.scheduling(clock())
    until = win.hold_until(["a"], clock(0.5 * MS), STEP)
    assert until == pytest.approx(t0 + 4 * MS + MIN_TOLERANCE_S)
    assert win.hold_until(["a"], clock(MS), STEP) == until  # still waiting, same deadline
    win.arrived("a", clock(2.5 * MS))
    assert win.hold_until([], clock(0.2 * MS), STEP) is None  # arrived: the step runs
    assert win.stats() == {"num_holds": 1, "held_s": pytest.approx(3.7 * MS), "num_caught": 1, "num_late": 0,
                           "num_probes": 0}


def test_does_not_hold_for_a_late_client():
    win, clock = trained({"a": 4 * MS})
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.scheduling(clock())
    # past its expected arrival plus the tolerance, the window does not open for it
    assert win.hold_until(["a"], t0 + 4 * MS + MIN_TOLERANCE_S + 0.1 * MS, STEP) is None
    assert win.stats()["num_holds"] == 0


def test_gives_up_on_a_client_that_becomes_late_and_counts_it():
    win, clock = trained({"a": 4 * MS})
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.scheduling(clock())
    assert win.hold_until(["a"], clock(MS), STEP) is not None
    assert win.hold_until(["a"], t0 + 6.5 * MS, STEP) is None  # 4 ms + 2 ms tolerance passed
    stats = win.stats()
    assert (stats["num_holds"], stats["num_caught"], stats["num_late"]) == (1, 0, 1)
    assert stats["held_s"] == pytest.approx(5.5 * MS)
    # and the miss is not waited for again for that token
    assert win.hold_until(["a"], t0 + 6.6 * MS, STEP) is None


def test_does_not_hold_without_an_estimate():
    win, clock = GatherWindow(max_s=25 * MS), Clock()
    win.token_sent("new", clock())  # its first token: no activation has come back yet
    win.scheduling(clock())
    assert win.hold_until(["new"], clock(MS), STEP) is None
    assert win.hold_until(["unknown"], clock(MS), STEP) is None
    assert win.hold_until(["new"], clock(MS), None) is None  # no step time known either


def test_bound_shrinks_with_the_step_time():
    win, clock = trained({"a": 10 * MS})
    assert win.bound_s(STEP) == pytest.approx(25 * MS)  # capped by max_s
    assert win.bound_s(0.030) == pytest.approx(15 * MS)  # half the step
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.scheduling(clock())
    assert win.hold_until(["a"], clock(MS), 0.030) is not None  # 10 ms expected <= 15 ms
    win.close(clock())
    assert win.hold_until(["a"], clock(), 0.012) is None  # 10 ms expected > 6 ms: not worth a hold


def test_hold_never_outlasts_the_bound_from_the_window_opening():
    win, clock = trained({"a": 3 * MS, "b": 24.5 * MS})
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.token_sent("b", t0)
    win.scheduling(clock())
    opened = clock(MS)
    until = win.hold_until(["a", "b"], opened, 0.030)  # bound 15 ms: b (measured 24.5 ms) beyond it: a probe
    assert until == pytest.approx(opened + 15 * MS) and win.stats()["num_probes"] == 1
    # bound 25 ms: b is expected within it (t0 + 24.5 ms <= opened + 25 ms), but its deadline
    # (+ 2 ms tolerance) lies beyond: the hold stops at the bound, counted from the opening
    until = win.hold_until(["a", "b"], clock(2 * MS), STEP)
    assert until == pytest.approx(opened + 25 * MS)
    assert win.hold_until(["b"], opened + 25 * MS, STEP) is None


def test_estimate_follows_the_clients_turnaround():
    win, _ = trained({"a": 4 * MS}, rounds=8)
    assert win.estimate("a").typical_s == pytest.approx(4 * MS)
    win, clock = trained({"a": 4 * MS}, rounds=8)
    for _ in range(5):  # the client slows down: the median follows once most samples say so
        timely_round(win, clock, "a", 12 * MS)
    assert win.estimate("a").typical_s == pytest.approx(12 * MS)
    # robust: one slow answer among fast ones moves neither the median nor the tolerance much
    win, clock = trained({"a": 4 * MS}, rounds=7)
    timely_round(win, clock, "a", 90 * MS)
    est = win.estimate("a")
    assert est.typical_s == pytest.approx(4 * MS) and est.tolerance_s == pytest.approx(MIN_TOLERANCE_S)


def test_an_activation_seen_right_after_a_step_is_not_measured():
    win, clock = trained({"a": 4 * MS})
    before = win.estimate("a")
    win.token_sent("a", clock(STEP))
    win.scheduling(clock())
    win.step_ended(clock(STEP))  # another step ran meanwhile: the activation waited behind it
    win.arrived("a", clock(0.1 * MS))
    assert win.estimate("a") == before
    # seen after the engine waited past the settle time: measured
    win.token_sent("a", clock(STEP))
    win.step_ended(clock())
    win.arrived("a", clock(SETTLE_S + 3 * MS))
    assert win.estimate("a").typical_s == pytest.approx(4 * MS)  # median of 4 x 4 ms and 5 ms


def test_probes_a_request_whose_activations_only_came_back_during_steps():
    """Two groups alternating steps: each sees the other's activations only after a step."""
    win, clock = GatherWindow(max_s=25 * MS), Clock()
    win.token_sent("a", clock())
    win.step_ended(clock(STEP))
    win.arrived("a", clock(0.1 * MS))  # censored: no estimate, but it came back
    assert win.estimate("a") is None
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.scheduling(clock())
    opened = clock(0.2 * MS)
    assert win.hold_until(["a"], opened, STEP) == pytest.approx(opened + 25 * MS)  # a probe, to the bound
    win.arrived("a", clock(3 * MS))
    assert win.hold_until([], clock(), STEP) is None
    assert win.estimate("a").typical_s == pytest.approx(3.2 * MS)
    assert (win.stats()["num_probes"], win.stats()["num_caught"]) == (1, 1)


def test_a_missed_probe_is_retried_only_after_some_tokens():
    win, clock = GatherWindow(max_s=25 * MS), Clock()
    win.token_sent("slow", clock())
    win.step_ended(clock(STEP))
    win.arrived("slow", clock(0.1 * MS))
    win.token_sent("slow", clock(STEP))
    win.scheduling(clock())
    opened = clock()
    assert win.hold_until(["slow"], opened, STEP) is not None
    assert win.hold_until(["slow"], opened + 25 * MS, STEP) is None  # bound reached: missed
    win.step_ended(clock(STEP + 25 * MS))
    win.arrived("slow", clock(0.1 * MS))  # the miss is measured: an upper bound, beyond the bound
    assert win.estimate("slow").typical_s > 25 * MS
    holds = []
    for _ in range(3 * PROBE_EVERY):
        win.token_sent("slow", clock(STEP))
        win.scheduling(clock())
        holds.append(win.hold_until(["slow"], clock(MS), STEP) is not None)
        win.close(clock())
        win.step_ended(clock(STEP))
        win.arrived("slow", clock(0.1 * MS))
    # probed on its PROBE_EVERY-th token after the miss, then (missed again) on the 2 * PROBE_EVERY-th
    assert [i for i, held in enumerate(holds) if held] == [PROBE_EVERY - 1, 3 * PROBE_EVERY - 1]


def test_probes_a_request_whose_measured_turnaround_lies_beyond_the_bound():
    """A long turnaround recorded once groups alternated must not keep it out for good."""
    win, clock = trained({"a": 40 * MS}, rounds=2)  # measured beyond the 25 ms bound
    assert win.estimate("a").typical_s == pytest.approx(40 * MS)
    caught = []
    for _ in range(3):  # the client is fast now: each probe catches it, the median comes down
        win.token_sent("a", clock(STEP))
        win.scheduling(clock())
        opened = clock()
        until = win.hold_until(["a"], opened, STEP)
        caught.append(until == pytest.approx(opened + 25 * MS))
        win.arrived("a", clock(3 * MS))
        assert win.hold_until([], clock(), STEP) is None
    assert caught == [True, True, True] and win.estimate("a").typical_s == pytest.approx(3 * MS)
    # two probes; the third hold is an ordinary one (median of 40, 40, 3, 3 ms within the bound)
    assert (win.stats()["num_probes"], win.stats()["num_caught"], win.stats()["num_late"]) == (2, 3, 0)
    win.token_sent("a", clock(STEP))  # waited for on its estimate now, not as a probe
    win.scheduling(clock())
    assert win.hold_until(["a"], clock(), STEP) is not None and win.stats()["num_probes"] == 2


def test_forgets_finished_requests():
    win, clock = trained({"a": 4 * MS, "b": 4 * MS})
    t0 = clock(STEP)
    win.token_sent("a", t0)
    win.token_sent("b", t0)
    win.scheduling(clock())
    assert win.hold_until(["a", "b"], clock(MS), STEP) is not None
    win.forget("a")
    win.forget("b")
    assert win.estimate("a") is None
    win.arrived("a", clock(MS))  # a late delivery for a finished request: ignored
    assert win.hold_until(["a", "b"], clock(), STEP) is None
    assert win.stats()["num_late"] == 0  # a finished request is not a late one


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"max_s must be > 0 and 0 < fraction <= 1, got 0, 0.5"):
        GatherWindow(max_s=0)


def tokens_out(turnarounds: dict[str, float], *reqs: str) -> tuple[GatherWindow, Clock, float]:
    """A trained window whose ``reqs`` each have a token out (sent at the returned time)."""
    win, clock = trained(turnarounds)
    t0 = clock(STEP)
    for req in reqs:
        win.token_sent(req, t0)
    win.scheduling(clock())
    return win, clock, t0


def test_a_hold_is_weighed_against_the_ordinary_requests_it_delays():
    """W waited, R ordinary ready: hold only while W (S - w) > R w, i.e. w < S W / (W + R)."""
    assert GatherWindow.weighed_end(1.0, 0.030, 1, 2) == pytest.approx(1.010)
    assert GatherWindow.weighed_end(1.0, 0.030, 3, 1) == pytest.approx(1.0225)
    both = {"a": 8 * MS, "b": 8 * MS}
    # step 30 ms, bound 15 ms; two waited, no ordinary: as before, until their deadline (8 + 2 ms)
    win, clock, t0 = tokens_out(both, "a", "b")
    assert win.hold_until(["a", "b"], clock(MS), 0.030) == pytest.approx(t0 + 10 * MS)
    # with 6 ordinary requests ready: at most 30 * 2 / 8 = 7.5 ms from the opening
    win, clock, t0 = tokens_out(both, "a", "b")
    opened = clock(MS)
    assert win.hold_until(["a", "b"], opened, 0.030, ordinary=6) == pytest.approx(opened + 7.5 * MS)
    # with 60: 30 * 2 / 62 < 1 ms, and a and b, expected 7 ms after the opening, are beyond it:
    # not waited for, not probed (they are within the bound): no hold, nothing late
    win, clock, _ = tokens_out(both, "a", "b")
    assert win.hold_until(["a", "b"], clock(MS), 0.030, ordinary=60) is None
    assert win.stats()["num_holds"] == 0 and win.stats()["num_late"] == 0 and win.stats()["num_probes"] == 0


def test_a_probe_is_cut_at_the_weighed_bound():
    # b's measured turnaround lies beyond the 15 ms bound: a probe, to the bound; with 2 ordinary
    # requests the bound is 30 * 1 / 3 = 10 ms
    turnarounds = {"a": 3 * MS, "b": 24.5 * MS}
    win, clock, _ = tokens_out(turnarounds, "b")
    opened = clock(MS)
    assert win.hold_until(["b"], opened, 0.030) == pytest.approx(opened + 15 * MS)
    win, clock, _ = tokens_out(turnarounds, "b")
    opened = clock(MS)
    assert win.hold_until(["b"], opened, 0.030, ordinary=2) == pytest.approx(opened + 10 * MS)
