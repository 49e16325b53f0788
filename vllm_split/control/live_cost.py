"""The server's live cost model, learned from the engine's real step timings.

A step's model time is fitted as ``fixed_s + layer_s * layer_calls + row_s * layer_rows``:
``layer_calls`` decoder layers ran (a layer no request needed is skipped), carrying
``layer_rows`` rows in all (a request at split layer ``k`` with ``t`` tokens in the step adds
``t * (N - k)`` rows). On this eager CPU build a layer call costs ~1.8 ms whatever its rows
and each row ~0.1 ms: both terms matter. ``fixed_s`` is what every step pays (embedding,
final norm, LM head, sampling, worker round trip).

The fit is least squares over the most recent steps, pulled towards a prior by a weight
worth ``prior_weight`` steps (so that a few steps of one shape cannot produce nonsense) and
kept non-negative. Pure Python; no vLLM, no torch.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from vllm_split.wire.contract import StepRecord


@dataclass(frozen=True, slots=True)
class StepCost:
    fixed_s: float
    layer_s: float
    row_s: float
    samples: int = 0  # steps behind the fit (0: the prior alone)

    def step_s(self, layer_calls: float, layer_rows: float) -> float:
        return self.fixed_s + self.layer_s * layer_calls + self.row_s * layer_rows

    def as_dict(self) -> dict:
        return {"fixed_ms": self.fixed_s * 1e3, "layer_ms": self.layer_s * 1e3,
                "row_ms": self.row_s * 1e3, "samples": self.samples}


# A deliberately neutral prior: a step of a few ms, mostly per layer. It only matters until
# the first steps are seen (the controller warms the engine up at start-up).
DEFAULT_PRIOR = StepCost(fixed_s=2e-3, layer_s=1e-3, row_s=1e-4)


class LiveCostModel:
    def __init__(self, *, window: int = 512, prior: StepCost = DEFAULT_PRIOR, prior_weight: float = 2.0,
                 occupancy_window_s: float = 2.0) -> None:
        self.records: deque[StepRecord] = deque(maxlen=window)
        self.prior = prior
        self.prior_weight = prior_weight
        self.occupancy_window_s = occupancy_window_s
        self.cost = prior
        self.last_seq = 0
        self.updated_at = 0.0

    def add(self, records: Iterable[StepRecord]) -> int:
        n = 0
        for r in records:
            self.records.append(r)
            self.last_seq = max(self.last_seq, r.seq)
            n += 1
        return n

    def refit(self) -> StepCost:
        self.cost = fit_step_cost(list(self.records), prior=self.prior, prior_weight=self.prior_weight)
        self.updated_at = time.time()
        return self.cost

    def recent(self, now: float | None = None) -> list[StepRecord]:
        """The steps of the last ``occupancy_window_s``."""
        now = time.time() if now is None else now
        return [r for r in self.records if now - r.wall_time <= self.occupancy_window_s]

    def utilization(self, now: float | None = None) -> float:
        """Fraction of the last ``occupancy_window_s`` the engine spent running the model."""
        return min(1.0, sum(r.exec_s for r in self.recent(now)) / self.occupancy_window_s)

    def occupancy(self, now: float | None = None) -> float:
        """Mean requests per step over the last ``occupancy_window_s`` (0 when idle)."""
        recent = self.recent(now)
        return sum(r.num_reqs for r in recent) / len(recent) if recent else 0.0

    def recent_step_s(self, now: float | None = None) -> float:
        """Mean model time of the steps of the last ``occupancy_window_s`` (0 when idle)."""
        recent = self.recent(now)
        return sum(r.exec_s for r in recent) / len(recent) if recent else 0.0

    def recent_min_split_layer(self, num_layers: int, now: float | None = None) -> int:
        """The lowest split layer among the steps of the last ``occupancy_window_s``: a step
        runs the layers from its lowest ``k`` up (``layer_calls = num_layers - k``), so it is
        ``num_layers`` less the most layer calls of a recent step. 0 when ordinary requests
        ran (they need every layer) and when idle."""
        recent = self.recent(now)
        return max(0, num_layers - max(r.layer_calls for r in recent)) if recent else 0


def fit_step_cost(records: Sequence[StepRecord], *, prior: StepCost, prior_weight: float) -> StepCost:
    """Non-negative ridge fit of ``exec_s ~ fixed + layer * calls + row * rows`` towards ``prior``."""
    if not records:
        return prior
    xs = [(1.0, float(r.layer_calls), float(r.layer_rows)) for r in records]
    ys = [r.exec_s for r in records]
    # the prior counts as prior_weight steps of typical size in each feature
    scale = [1.0] + [max(sum(x[j] for x in xs) / len(xs), 1e-9) for j in (1, 2)]
    theta0 = [prior.fixed_s, prior.layer_s, prior.row_s]
    free = [True, True, True]
    theta = theta0[:]
    for _ in range(3):  # active set: drop a coefficient that comes out negative, refit
        theta = _ridge(xs, ys, theta0, scale, prior_weight, free)
        negative = [j for j in range(3) if free[j] and theta[j] < 0]
        if not negative:
            break
        for j in negative:
            free[j] = False
    theta = [max(t, 0.0) for t in theta]
    return StepCost(fixed_s=theta[0], layer_s=theta[1], row_s=theta[2], samples=len(records))


def _ridge(xs, ys, theta0, scale, weight, free) -> list[float]:
    idx = [j for j in range(3) if free[j]]
    m = len(idx)
    a = [[0.0] * m for _ in range(m)]
    b = [0.0] * m
    for x, y in zip(xs, ys):  # coefficients outside ``free`` are held at zero
        for p, j in enumerate(idx):
            b[p] += x[j] * y
            for q, k in enumerate(idx):
                a[p][q] += x[j] * x[k]
    for p, j in enumerate(idx):
        w = weight * scale[j] ** 2
        a[p][p] += w
        b[p] += w * theta0[j]
    sol = _solve(a, b)
    theta = [0.0, 0.0, 0.0]
    for p, j in enumerate(idx):
        theta[j] = sol[p]
    return theta


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the system is small and positive definite)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            continue
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))
        x[r] = s / m[r][r] if abs(m[r][r]) > 1e-300 else 0.0
    return x
