"""Adaptive gather window: hold an engine step for client activations about to arrive.

Runs in the EngineCore process, inside the split scheduler (``scheduler.py``). Pure: no
vLLM, no torch; every call takes the time ``now`` (the scheduler passes
``time.monotonic()``, the tests a fake clock).

**Why.** A split request's token leaves when a step ends; its client answers with the
activation for that token some milliseconds later (its *turnaround*). The engine starts
the next step as soon as anything is ready, often a few milliseconds before the other
clients' activations arrive, and those then wait a whole step. Waiting ``w`` delays every
request of the step by ``w``; a missed activation costs its request a whole step and the
server an extra pass over the weights later (the missed requests run in a batch of their
own). So the window waits only for activations expected soon: within
``bound = min(max_s, fraction * step_s)`` of the moment it opened, ``step_s`` being the
recent step time. With ``fraction`` 0.5 a hold never costs more than half of what a miss
costs; ``max_s`` caps it where steps are long.

**Rule** (:meth:`GatherWindow.hold_until`, asked while some request could run and split
requests still wait for their activation). A waiting request is waited for when its token
has left, an activation of it has come back before (*never for a request without an
estimate*: its first token after the prompt is not waited for), and either

* its turnaround estimate (median of the last ``NUM_SAMPLES`` measured turnarounds) puts
  its arrival within the bound, and it is not late: ``now <= sent + typical + tolerance``
  with ``tolerance = max(min_tolerance_s, interquartile range)``; or
* it is due a *probe* (below).

The step is held until the latest such deadline, at most until the bound; the first call
that waits for nobody closes the window and the step runs.

**Weighed against the ordinary requests** (``gather_weigh``, on by default). Requests that
need no activation (ordinary ones, server-decoded sessions) are ready at every step; a hold
of ``w`` delays each of them by ``w``, while an activation missed only joins the next step,
which runs anyway for them. So with ``W`` requests waited for and ``R`` ordinary ones ready,
the bound is shortened to where ``W (S - w) > R w`` stops holding (``S`` the recent step
time): ``w < S W / (W + R)``, weighed again with the requests still expected within it.
With no ordinary request (a batch of split requests only) nothing changes: a missed
activation then runs in a step of its own, an extra pass over the weights.

**Measuring turnarounds.** The scheduler sees an activation when EngineCore drains its
input queue, between steps. An activation that arrived while a step ran is seen when the
step ends: its turnaround is then inflated by up to a step and is not recorded
(*censored*: the activation is seen within ``settle_s`` of the end of a step, before the
next scheduling pass). Activations seen while the engine waits (idle, or holding) are
timely and recorded. Where the window gave up on an activation (a miss), its eventual
turnaround is recorded as measured: an upper bound, so that the window does not wait
again for a client that made it wait in vain.

**Probes.** Two groups of requests that alternate steps only ever see each other's
activations arrive during a step: all censored, no estimate, no hold, the groups never
merge. And the turnarounds that are recorded while groups alternate can be long ones (a
client whose answer waited in the host's queue, a miss's upper bound): an estimate beyond
the bound then stops the window from ever waiting for that request again, and the groups
stay apart (measured: the third round of ``bench_gather`` never held). So a request whose
activations came back without a recorded turnaround, or whose estimate lies beyond the
bound, is waited for until the bound (a probe): caught, it gets a measured turnaround
(and is probed again on its next token while its median stays beyond the bound); missed,
it is probed again on its ``PROBE_EVERY``-th next token, the interval doubling with every
miss, so a client that is really slow costs a few bounded holds over its whole session.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

NUM_SAMPLES = 8  # turnarounds kept per request (median and interquartile range over them)
FRACTION = 0.5  # of the recent step time: the longest hold worth a missed step
MIN_TOLERANCE_S = 0.002  # about one pass of the hold loop (its empty step and 1 ms sleep)
SETTLE_S = 0.002  # activations seen this soon after a step ended may have waited through it
PROBE_EVERY = 8  # tokens between probes of a request after a missed probe (doubling)
MAX_PROBE_EVERY = 256


@dataclass(frozen=True, slots=True)
class Estimate:
    typical_s: float  # median turnaround
    tolerance_s: float  # how far past ``typical_s`` it is still not late

    @classmethod
    def of(cls, samples: Iterable[float], min_tolerance_s: float) -> "Estimate":
        ordered = sorted(samples)
        spread = 0.0
        if len(ordered) >= 4:
            q1, _, q3 = statistics.quantiles(ordered, n=4)
            spread = q3 - q1
        return cls(statistics.median(ordered), max(min_tolerance_s, spread))


@dataclass(slots=True)
class _Client:
    samples: deque = field(default_factory=lambda: deque(maxlen=NUM_SAMPLES))  # turnarounds (s)
    sent_at: float | None = None  # when its pending token left; None: none pending
    seen: bool = False  # an activation of it has come back
    missed: bool = False  # the window gave up on its pending token
    last_was_miss: bool = False  # the last recorded turnaround is a miss's upper bound
    probe_in: int = 0  # tokens until it may be probed again
    probe_every: int = PROBE_EVERY
    estimate: Estimate | None = None  # from ``samples``, kept up to date


class GatherWindow:
    """When to hold a step for split requests' activations (see the module docstring)."""

    def __init__(self, *, max_s: float, fraction: float = FRACTION, min_tolerance_s: float = MIN_TOLERANCE_S,
                 settle_s: float = SETTLE_S) -> None:
        if max_s <= 0 or not 0 < fraction <= 1:
            raise ValueError(f"gather window: max_s must be > 0 and 0 < fraction <= 1, got {max_s}, {fraction}")
        self.max_s = max_s
        self.fraction = fraction
        self.min_tolerance_s = min_tolerance_s
        self.settle_s = settle_s
        self._clients: dict[str, _Client] = {}
        self._step_ended_at: float | None = None  # last model step's end, until the next scheduling pass
        self._opened_at: float | None = None  # the open window's start
        self._waiting: dict[str, bool] = {}  # requests the open window waited for -> as a probe
        self.num_holds = 0  # windows opened (steps held)
        self.held_s = 0.0  # total time held
        self.num_caught = 0  # activations that arrived while the window waited for them
        self.num_late = 0  # activations waited for and not there when the step ran
        self.num_probes = 0  # waits for a request without a usable estimate

    # ---------------------------------------------------------------- events
    def token_sent(self, req_id: str, now: float) -> None:
        """A step produced a token for ``req_id`` (not its last): its activation is due."""
        client = self._clients.setdefault(req_id, _Client())
        client.sent_at = now
        client.missed = False
        client.probe_in = max(0, client.probe_in - 1)

    def arrived(self, req_id: str, now: float) -> None:
        """The activation for ``req_id``'s pending token was delivered."""
        client = self._clients.get(req_id)
        if client is None or client.sent_at is None:
            return
        turnaround = now - client.sent_at
        probe = self._waiting.pop(req_id, None)
        if probe is not None:
            self.num_caught += 1
            if probe:
                client.probe_every, client.probe_in = PROBE_EVERY, 0
        if client.missed or not self._censored(now):
            client.samples.append(turnaround)
            client.last_was_miss = client.missed
            client.estimate = Estimate.of(client.samples, self.min_tolerance_s)
        client.seen = True
        client.sent_at = None
        client.missed = False

    def forget(self, req_id: str) -> None:
        """``req_id`` has finished (or was aborted)."""
        self._clients.pop(req_id, None)
        self._waiting.pop(req_id, None)

    def step_ended(self, now: float) -> None:
        """A step that ran the model has returned its output."""
        self._step_ended_at = now

    def scheduling(self, now: float) -> None:
        """The engine drained its input queue and schedules: later deliveries are timely."""
        self._step_ended_at = None

    def _censored(self, now: float) -> bool:
        return self._step_ended_at is not None and now - self._step_ended_at <= self.settle_s

    # ---------------------------------------------------------------- the rule
    def estimate(self, req_id: str) -> Estimate | None:
        """The turnaround estimate of ``req_id``; None without a measured turnaround."""
        client = self._clients.get(req_id)
        return None if client is None else client.estimate

    def bound_s(self, step_s: float | None) -> float:
        """The longest hold worth it at the recent step time ``step_s`` (0: none known)."""
        return min(self.max_s, self.fraction * step_s) if step_s else 0.0

    def hold_until(self, held_req_ids: Iterable[str], now: float, step_s: float | None,
                   ordinary: int = 0) -> float | None:
        """Until when to hold the step for ``held_req_ids`` (split requests waiting for their
        activation) while others could run; None: run it now. The first call that holds
        opens the window, the first that does not closes it (counting the misses).
        ``ordinary``: requests of the step that need no activation (ordinary and
        server-decoded ones): the hold is weighed against them (:meth:`weighed_end`)."""
        start = self._opened_at if self._opened_at is not None else now
        end = start + self.bound_s(step_s)
        held = list(held_req_ids)
        bound_end = end
        waits = self._waits(held, now, end, bound_end)
        while waits and ordinary and step_s:  # fewer waited for under a shorter bound: weigh again
            weighed = self.weighed_end(start, step_s, len(waits), ordinary)
            if weighed >= end:
                break
            end = weighed
            waits = self._waits(held, now, end, bound_end)
        until = None
        for req_id, (deadline, probe) in waits.items():
            if req_id not in self._waiting:
                self._waiting[req_id] = probe
                self.num_probes += probe
            until = deadline if until is None else max(until, deadline)
        if until is None or until <= now:
            self.close(now)
            return None
        if self._opened_at is None:
            self._opened_at = now
            self.num_holds += 1
        return until

    @staticmethod
    def weighed_end(start: float, step_s: float, waited: int, ordinary: int) -> float:
        """The end of a hold worth its cost to the ordinary requests of the step: holding
        ``w`` delays each of them by ``w``, while each of the ``waited`` requests caught
        gains about ``step_s - w`` (missed, it joins the next step, which runs anyway for the
        ordinary requests); so hold while ``waited (step_s - w) > ordinary w``."""
        return start + step_s * waited / (waited + ordinary)

    def _waits(self, held: Iterable[str], now: float, end: float, bound_end: float) -> dict[str, tuple[float, bool]]:
        """The held requests worth waiting for within ``end``: (wait until, as a probe)."""
        return {req_id: wait for req_id in held if (wait := self._deadline(req_id, now, end, bound_end)) is not None}

    def _deadline(self, req_id: str, now: float, end: float, bound_end: float) -> tuple[float, bool] | None:
        """(wait until, as a probe) for one held request, None: do not wait for it. ``end``:
        the hold's end (weighed); ``bound_end``: the bound's, beyond which an estimate makes
        the request due a probe (one within it but beyond ``end`` is just not worth the hold)."""
        client = self._clients.get(req_id)
        if client is None or client.sent_at is None or not client.seen or client.missed:
            return None  # nothing due, no estimate yet, or already given up on
        if self._waiting.get(req_id):
            return end, True  # a probe goes on to the bound
        est = client.estimate
        if est is not None and client.sent_at + est.typical_s <= end:
            deadline = client.sent_at + est.typical_s + est.tolerance_s
            return (min(deadline, end), False) if now <= deadline else None  # late: never waited for
        if est is not None and client.sent_at + est.typical_s <= bound_end:
            return None  # expected within the bound, not within the weighed hold
        if client.probe_in == 0:  # no estimate, or one beyond the bound: probe (see the module docstring)
            return end, True
        return None

    def close(self, now: float) -> None:
        """The step runs: whatever the window still waited for is late."""
        if self._opened_at is not None:
            self.held_s += now - self._opened_at
            self._opened_at = None
        for req_id, probe in self._waiting.items():
            client = self._clients.get(req_id)
            if client is None:
                continue
            self.num_late += 1
            client.missed = True
            if probe:
                client.probe_in = client.probe_every
                client.probe_every = min(2 * client.probe_every, MAX_PROBE_EVERY)
        self._waiting.clear()

    def stats(self) -> dict:
        return {"num_holds": self.num_holds, "held_s": self.held_s, "num_caught": self.num_caught,
                "num_late": self.num_late, "num_probes": self.num_probes}
