"""Statistics of the throughput experiment (pure: no engine, no torch).

* :func:`wilson`: a 95% interval on one point's SLA attainment (``met`` of ``n`` requests).
* :func:`isotonic_decreasing`: attainment as a non-increasing function of the offered rate
  (pool-adjacent-violators, weighted by requests), so that one noisy dip below the target
  does not end the curve and one lucky point above it does not extend it.
* :func:`max_rate_at`: the largest offered rate at which the fitted attainment is at least
  the target, interpolated between the two points that bracket the crossing; with
  :func:`max_rate_interval`, a bootstrap interval over the requests of every point, and
  :func:`max_rate_interval_by_trace`, over its arrival traces (the headline interval: the
  requests of one trace share a queue and are not independent).
* :func:`next_rate`: where to measure next to narrow the crossing (the refinement of the
  rate grid around it).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

TARGET = 0.9
Z95 = 1.959964


def wilson(met: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``met / n`` (None when ``n == 0``); it contains
    ``met / n`` also where rounding would put an end a hair inside it (at 0 or 1)."""
    if n <= 0:
        return None
    p = met / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def isotonic_decreasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-increasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, w2, c2), (m1, w1, c1) = blocks.pop(), blocks.pop()
            total = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / total if total else (m1 + m2) / 2, total, c1 + c2])
    out: list[float] = []
    for mean, _, count in blocks:
        out += [mean] * count
    return out


def _crossing(rates: Sequence[float], fitted: Sequence[float], target: float) -> tuple[float | None, str]:
    """(rate, how): the largest rate with ``fitted >= target`` (interpolated to the next
    point); ``how`` is "crossing", "above_all" (never below the target: the rate is a lower
    bound) or "below_all" (below the target at the lowest rate: None)."""
    if not rates or fitted[0] < target:
        return None, "below_all"
    for i in range(len(rates) - 1):
        a, b = fitted[i], fitted[i + 1]
        if a >= target > b:
            return rates[i] + (a - target) / (a - b) * (rates[i + 1] - rates[i]), "crossing"
    return rates[-1], "above_all"


def max_rate_at(points: Sequence[dict], target: float = TARGET) -> tuple[float | None, str]:
    """Largest offered rate at ``target`` attainment from points ``{"offered_rate", "met",
    "requests"}`` (any order), on the isotonic fit of attainment against the offered rate."""
    pts = sorted((p for p in points if p["requests"]), key=lambda p: p["offered_rate"])
    rates = [p["offered_rate"] for p in pts]
    fitted = isotonic_decreasing([p["met"] / p["requests"] for p in pts], [p["requests"] for p in pts])
    return _crossing(rates, fitted, target)


def _bootstrap(points: Sequence[dict], target: float, resamples: int, seed: int, by: str, redraw) -> dict:
    """:func:`max_rate_at` with a 95% bootstrap interval: every point (those ``redraw`` can
    redraw) redrawn ``resamples`` times by ``redraw(point, rng) -> (met, requests)``, the fit
    and crossing redone; censored draws (above the target at every rate, or below it at the
    lowest) count at the grid's ends."""
    rate, how = max_rate_at(points, target)
    pts = sorted((p for p in points if p["requests"] and (by != "trace" or p.get("trace_counts"))),
                 key=lambda p: p["offered_rate"])
    if not pts:
        return {"rate": rate, "how": how, "ci95": None, "resamples": 0, "by": by}
    rng = random.Random(seed)
    lo_end, hi_end = pts[0]["offered_rate"], pts[-1]["offered_rate"]
    draws = []
    for _ in range(resamples):
        fake = []
        for p in pts:
            met, n = redraw(p, rng)
            fake.append({"offered_rate": p["offered_rate"], "requests": n, "met": met})
        r, h = max_rate_at(fake, target)
        draws.append(lo_end if h == "below_all" else r)
    draws.sort()
    ci = (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))])
    return {"rate": rate, "how": how, "ci95": ci, "resamples": resamples, "by": by,
            "censored_share": sum(1 for d in draws if d in (lo_end, hi_end)) / len(draws)}


def _redraw_requests(p: dict, rng: random.Random) -> tuple[int, int]:
    n, q = p["requests"], p["met"] / p["requests"]
    return sum(rng.random() < q for _ in range(n)), n


def _redraw_traces(p: dict, rng: random.Random) -> tuple[int, int]:
    picks = [rng.choice(p["trace_counts"]) for _ in p["trace_counts"]]
    return sum(m for m, _ in picks), sum(n for _, n in picks)


def max_rate_interval(points: Sequence[dict], target: float = TARGET, *, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """:func:`max_rate_at` with a 95% bootstrap interval over requests: each point's
    attainment redrawn from its own requests (binomial)."""
    return _bootstrap(points, target, resamples, seed, "request", _redraw_requests)


def max_rate_interval_by_trace(points: Sequence[dict], target: float = TARGET, *, resamples: int = 2000,
                               seed: int = 0) -> dict:
    """:func:`max_rate_interval` resampling whole arrival traces instead of requests: the
    requests of one trace share its queue, so they are not independent, and the spread
    between traces at one rate is what a repeat of the experiment would see. Each point
    needs ``trace_counts``: ``[[met, requests], ...]`` per trace."""
    return _bootstrap(points, target, resamples, seed, "trace", _redraw_traces)


def ratio_interval(num: dict, den: dict) -> tuple[float, float] | None:
    """Conservative interval of ``num / den`` from two independent 95% intervals (the ends
    divided crosswise); None when either is missing or ``den``'s low end is 0."""
    if not num.get("ci95") or not den.get("ci95") or not den["ci95"][0]:
        return None
    return num["ci95"][0] / den["ci95"][1], num["ci95"][1] / den["ci95"][0]


def next_rate(points: Sequence[dict], target: float = TARGET, *, rel_width: float = 0.15,
              grow: float = 1.5) -> float | None:
    """The next rate (nominal) to measure, or None when the crossing is bracketed within
    ``rel_width`` of its rate. Above the target everywhere: ``grow`` times the highest rate;
    below it at the lowest: half the lowest; otherwise the midpoint of the bracketing pair."""
    pts = sorted((p for p in points if p["requests"]), key=lambda p: p["rate"])
    if not pts:
        return None
    fitted = isotonic_decreasing([p["met"] / p["requests"] for p in pts], [p["requests"] for p in pts])
    if fitted[0] < target:
        return pts[0]["rate"] / 2
    for i in range(len(pts) - 1):
        if fitted[i] >= target > fitted[i + 1]:
            lo, hi = pts[i]["rate"], pts[i + 1]["rate"]
            return None if hi - lo <= rel_width * lo else (lo + hi) / 2
    return pts[-1]["rate"] * grow
