"""Step composition by split layer: which ready requests run together (pure).

Runs in the EngineCore process, inside the split scheduler (``scheduler.py``); no vLLM, no
torch. The scheduler asks :meth:`Composer.choose` for the current batch and applies it.

**Why** (the roofline, ``docs/server_savings.md``). A decode step runs every decoder layer
from the lowest split layer ``k_min`` among its requests up, and at these batch sizes a
layer's cost is mostly reading its weights, shared by every row of the step. A split
request's next activation comes back ``u`` seconds after its token left (its client's
layers and the network, its *turnaround*), so it misses the step that starts meanwhile.
Three ways to compose steps:

* ``mixed``: each step runs whatever is ready. A request with turnaround ``u`` runs once
  every ``1 + ceil(u / S)`` steps of length ``S``; every step reads the layers from the
  lowest ``k`` among the requests that happen to be in it.
* ``gathered`` (the default; ``gather.py``'s adaptive window): the engine holds a step for
  the activations expected within ``min(gather_max, half a step)``; those requests run in
  every step, the step is longer by the hold.
* ``grouped(t)``: steps alternate between the requests with ``k >= t`` (a *high* step,
  which skips the layers below ``t``) and the others (a *low* step); a split request's
  turnaround hides behind the other group's step, and per two steps the server reads
  ``(N - k_min) + (N - t)`` layers instead of ``2 (N - k_min)``. Requests of the low
  group run every other step at best, so ordinary requests get slower.

**The model** (:func:`predict`): the expected step of a composition from the additive
step model with the KV read (``fixed + layer * layers run + sum over rows of (row + kv *
context) * layers the row runs``), where a row is in a step with probability ``1 / n``
(its cadence ``n`` in steps) and a layer runs unless no row that needs it is in the step;
the cadence depends on the step time, so the two are iterated to a fixed point. Output:
tokens per engine-second (holds count: the engine waits) and each row's TPOT.

**The choice** (``auto``): the composition with the most tokens per engine-second among
those that keep every row within its TPOT bound (a session states one; a request that
states none, an ordinary one, may not get slower than under ``gathered``), ``gathered``
when none does. ``grouped`` fixed picks its best threshold the same way, with no bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

MODES = ("gathered", "mixed", "grouped", "auto")
ITERATIONS = 4  # fixed-point rounds of step time <-> cadence
UNBOUND_SLACK = 0.02  # a row without a TPOT bound may be this much slower than under "gathered"


@dataclass(frozen=True, slots=True)
class RooflineCost:
    """A step's cost terms (seconds). The defaults are the split runner's compiled fit on
    this project's reference machine (``results/fit_roofline.json``, ``additive_kv``); the
    scheduler refits them on its own recent steps (``SplitSchedulerMixin._split_fitted_cost``)."""

    fixed_s: float = 0.0129
    layer_s: float = 0.00195
    row_s: float = 0.000064
    kv_s: float = 2.5e-7  # per cached token, per layer

    def row_layer_s(self, context: int) -> float:
        return self.row_s + self.kv_s * context


@dataclass(frozen=True, slots=True)
class Row:
    """One running decode request as the composer sees it."""

    split_layer: int  # 0 for an ordinary (or server-decoded) request
    context: int = 0  # cached tokens it reads per layer
    turnaround_s: float = 0.0  # from its token leaving to its next input arriving (0: ready at once)
    tpot_bound_s: float | None = None  # its session's TPOT bound; None: none stated


@dataclass(frozen=True, slots=True)
class Choice:
    mode: str  # "gathered", "mixed" or "grouped"
    threshold: int | None = None  # grouped: the high group's lowest split layer


@dataclass(frozen=True, slots=True)
class Prediction:
    choice: Choice
    tokens_per_s: float  # per engine-second (steps and holds)
    cycle_s: float  # engine time of one step (mixed, gathered) or of a high + low pair (grouped)
    tpot_s: tuple[float, ...]  # per row, in the order given
    step_s_per_token: float = 0.0  # the steps' time (holds excluded) per token: the server's work


def _expected_step(rows: Sequence[Row], presence: Sequence[float], num_layers: int, cost: RooflineCost) -> float:
    """Expected step time when row ``i`` is in a step with probability ``presence[i]``."""
    if not rows:
        return 0.0
    step = cost.fixed_s
    absent = 1.0  # probability that no row with split layer <= l is in the step
    order = sorted(range(len(rows)), key=lambda i: rows[i].split_layer)
    j = 0
    for layer in range(num_layers):
        while j < len(order) and rows[order[j]].split_layer <= layer:
            absent *= 1.0 - presence[order[j]]
            j += 1
        step += cost.layer_s * (1.0 - absent)
    for row, p in zip(rows, presence):
        step += p * cost.row_layer_s(row.context) * (num_layers - row.split_layer)
    return step


def _cadence(turnaround_s: float, step_s: float) -> int:
    """Steps between a row's turns when it misses the steps its turnaround overlaps."""
    if turnaround_s <= 0 or step_s <= 0:
        return 1
    return 1 + math.ceil(turnaround_s / step_s - 1e-9)


def _mixed(rows: Sequence[Row], num_layers: int, cost: RooflineCost, *, gathered: frozenset[int] = frozenset(),
           hold_s: float = 0.0) -> tuple[float, list[float], float, float]:
    """(engine time per step, TPOT per row, tokens per step, step time) with rows in
    ``gathered`` held for (``hold_s`` per step) and the others at their cadence."""
    step = _expected_step(rows, [1.0] * len(rows), num_layers, cost)
    for _ in range(ITERATIONS):
        period = step + hold_s
        n = [1 if i in gathered else _cadence(r.turnaround_s, period) for i, r in enumerate(rows)]
        step = _expected_step(rows, [1.0 / x for x in n], num_layers, cost)
    period = step + hold_s
    n = [1 if i in gathered else _cadence(r.turnaround_s, period) for i, r in enumerate(rows)]
    tpot = [max(x * period, step + r.turnaround_s) for x, r in zip(n, rows)]
    return period, tpot, sum(1.0 / x for x in n), step


def _grouped(rows: Sequence[Row], threshold: int, num_layers: int,
             cost: RooflineCost) -> tuple[float, list[float], float, float]:
    """(engine time per high + low pair, TPOT per row, tokens per pair, the pair's steps)."""
    high = [i for i, r in enumerate(rows) if r.split_layer >= threshold]
    low = [i for i, r in enumerate(rows) if r.split_layer < threshold]
    groups = (high, low)
    steps = [_expected_step([rows[i] for i in g], [1.0] * len(g), num_layers, cost) for g in groups]
    cycles = [1] * len(rows)
    for _ in range(ITERATIONS):
        pair = sum(steps)
        for g, other in ((0, 1), (1, 0)):
            for i in groups[g]:  # its token leaves at the end of its step; the other group's runs
                cycles[i] = 1 + math.ceil(max(0.0, rows[i].turnaround_s - steps[other]) / pair - 1e-9)
        steps = [_expected_step([rows[i] for i in g], [1.0 / cycles[i] for i in g], num_layers, cost) for g in groups]
    pair = sum(steps)
    tpot = [cycles[i] * pair for i in range(len(rows))]
    return pair, tpot, sum(1.0 / c for c in cycles), pair


def predict(rows: Sequence[Row], choice: Choice, num_layers: int, cost: RooflineCost = RooflineCost(), *,
            gather_max_s: float = 0.025, gather_fraction: float = 0.5) -> Prediction:
    """The steady state of ``rows`` under ``choice`` (see the module docstring)."""
    if not rows:
        return Prediction(choice, 0.0, 0.0, ())
    if choice.mode == "grouped":
        t = choice.threshold
        if t is None or all(r.split_layer >= t for r in rows) or all(r.split_layer < t for r in rows):
            return replace(predict(rows, Choice("mixed"), num_layers, cost), choice=choice)
        cycle, tpot, tokens, busy = _grouped(rows, t, num_layers, cost)
    elif choice.mode == "gathered":
        step = _expected_step(rows, [1.0] * len(rows), num_layers, cost)
        bound = min(gather_max_s, gather_fraction * step)
        waited = frozenset(i for i, r in enumerate(rows) if 0 < r.turnaround_s <= bound)
        hold = max((rows[i].turnaround_s for i in waited), default=0.0)
        cycle, tpot, tokens, busy = _mixed(rows, num_layers, cost, gathered=waited, hold_s=hold)
    elif choice.mode == "mixed":
        cycle, tpot, tokens, busy = _mixed(rows, num_layers, cost)
    else:
        raise ValueError(f"composition: expected one of {list(MODES[:3])}, got {choice.mode!r}")
    return Prediction(choice, tokens / cycle if cycle > 0 else 0.0, cycle, tuple(tpot), busy / tokens if tokens else 0.0)


def candidates(rows: Sequence[Row]) -> list[Choice]:
    """``gathered``, ``mixed`` and ``grouped`` at every split layer above the lowest."""
    ks = sorted({r.split_layer for r in rows})
    return [Choice("gathered"), Choice("mixed"), *(Choice("grouped", t) for t in ks[1:])]


def choose(rows: Sequence[Row], mode: str, num_layers: int, cost: RooflineCost = RooflineCost(), *,
           gather_max_s: float = 0.025) -> Prediction:
    """The composition ``mode`` asks for: fixed for gathered and mixed; grouped at its best
    threshold; ``auto`` the best feasible composition (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"composition: expected one of {list(MODES)}, got {mode!r}")
    kw = dict(gather_max_s=gather_max_s)
    if mode in ("gathered", "mixed"):
        return predict(rows, Choice(mode), num_layers, cost, **kw)
    options = [c for c in candidates(rows) if mode == "auto" or c.mode == "grouped"]
    if not options:  # grouped with a single split layer: nothing to group
        return predict(rows, Choice("mixed"), num_layers, cost, **kw)
    base = predict(rows, Choice("gathered"), num_layers, cost, **kw)
    best = base if mode == "auto" else None
    for c in options:
        p = predict(rows, c, num_layers, cost, **kw)
        if mode == "auto" and not _keeps_bounds(rows, p, base):
            continue
        if best is None or p.tokens_per_s > best.tokens_per_s * (1 + 1e-9):
            best = p
    return best


def _keeps_bounds(rows: Sequence[Row], p: Prediction, base: Prediction) -> bool:
    """Every row within its TPOT bound under ``p``, or no slower than under ``base`` (the
    default): a row without a bound, or missing it anyway, is not made slower."""
    return all(tpot <= ref * (1 + UNBOUND_SLACK) or (row.tpot_bound_s is not None and tpot <= row.tpot_bound_s)
               for row, tpot, ref in zip(rows, p.tpot_s, base.tpot_s))
