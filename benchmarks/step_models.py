"""Models of one engine step's time from its batch, fitted offline to measured steps (used by
``benchmarks/fit_roofline.py``; pure numpy: no vLLM, no torch, no I/O).

A step runs decoder layer ``l`` on ``rows_l`` rows, the new tokens of the requests whose split
layer is at most ``l``; a layer without rows is skipped. A decode row also reads its request's
cached context from the KV cache: ``kv_l`` cached tokens in all. Four models of the step:

* ``additive``: ``fixed + layer_s * calls + row_s * rows`` (``calls`` layers ran, ``rows`` the
  sum of ``rows_l``): the live cost model's form (``vllm_split/control/live_cost.py``);
* ``additive_kv``: the same ``+ kv_s * sum(kv_l)``;
* ``roofline``: ``fixed + sum over the layers run of max(layer_s, row_s * rows_l)``: a layer
  call costs reading its weights (shared by all its rows) or its rows' compute, whichever is
  longer; ``layer_s`` is then the weight read, ``layer_s / row_s`` the crossover row count;
* ``roofline_kv``: ``max(layer_s + kv_s * kv_l, row_s * rows_l)``: the memory side also reads
  the KV cache of the layer's decode rows.

Every fit minimises the squared *relative* error (a 30 ms decode step counts as much as a 2 s
prefill) with non-negative coefficients; ``fixed_s`` can be pinned (where a group's layer
calls never vary, ``fixed`` and ``layer_s`` cannot be told apart). The additive fits are exact
NNLS (every subset of free coefficients). A roofline is linear in ``(fixed, row_s)`` once the
ratios ``n = layer_s / row_s`` and ``m = kv_s / row_s`` are fixed: the fit searches a log
grid of ratios and zooms in around the best point.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

KINDS = ("additive", "additive_kv", "roofline", "roofline_kv")


def layer_loads(split_layers, tokens, contexts, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows per layer, cached tokens read per layer) of a step whose request ``i`` enters at
    layer ``split_layers[i]`` with ``tokens[i]`` new tokens reading ``contexts[i]`` cached ones."""
    if not len(split_layers) == len(tokens) == len(contexts):
        raise ValueError(f"one split layer, token count and context per request; got "
                         f"{len(split_layers)}, {len(tokens)}, {len(contexts)}")
    rows, kv = np.zeros(num_layers), np.zeros(num_layers)
    for k, t, c in zip(split_layers, tokens, contexts):
        if not 0 <= k < num_layers:
            raise ValueError(f"split layer {k} outside [0, {num_layers})")
        rows[k:] += t
        kv[k:] += t * c
    return rows, kv


@dataclass(frozen=True, slots=True)
class StepModel:
    kind: str  # one of KINDS
    fixed_s: float  # every step: embedding, final norm, LM head, sampling, worker round trip
    layer_s: float  # per layer call (roofline: the layer's weight read)
    row_s: float  # per row per layer
    kv_s: float = 0.0  # per cached token a row reads, per layer
    fixed_pinned: bool = False  # fixed_s was given, not fitted

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r}: expected one of {KINDS}")

    def layer_cost(self, rows: np.ndarray, kv: np.ndarray) -> np.ndarray:
        """Seconds of each layer call (0 where a layer has no row); same shape as ``rows``."""
        active = rows > 0
        if self.kind.startswith("additive"):
            cost = self.layer_s + self.row_s * rows + self.kv_s * kv
        else:
            cost = np.maximum(self.layer_s + self.kv_s * kv, self.row_s * rows)
        return np.where(active, cost, 0.0)

    def predict(self, rows: np.ndarray, kv: np.ndarray) -> np.ndarray:
        """Step seconds of steps ``rows``/``kv`` (one row per step, one column per layer)."""
        return self.fixed_s + self.layer_cost(np.atleast_2d(rows), np.atleast_2d(kv)).sum(axis=1)

    def crossover_rows(self, kv: float = 0.0) -> float:
        """Rows at which a roofline layer call turns from memory- to compute-bound."""
        return (self.layer_s + self.kv_s * kv) / self.row_s if self.row_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "fixed_ms": self.fixed_s * 1e3, "layer_ms": self.layer_s * 1e3,
                "row_ms": self.row_s * 1e3, "kv_us_per_1k_tokens": self.kv_s * 1e9,
                "fixed_pinned": self.fixed_pinned}


def fit(kind: str, rows: np.ndarray, kv: np.ndarray, y: np.ndarray, *, fixed_s: float | None = None) -> StepModel:
    """The model ``kind`` fitted to steps ``rows``/``kv`` (steps x layers) taking ``y`` seconds."""
    rows, kv, y = np.atleast_2d(rows).astype(float), np.atleast_2d(kv).astype(float), np.asarray(y, float)
    if rows.shape != kv.shape or rows.shape[0] != y.shape[0] or not len(y):
        raise ValueError(f"rows {rows.shape}, kv {kv.shape} and y {y.shape}: expected (steps, layers) twice and (steps,)")
    if np.any(y <= 0):
        raise ValueError(f"step times must be > 0 (relative errors); got min {y.min()}")
    if kind in ("additive", "additive_kv"):
        return _fit_additive(kind, rows, kv, y, fixed_s)
    if kind in ("roofline", "roofline_kv"):
        return _fit_roofline(kind, rows, kv, y, fixed_s)
    raise ValueError(f"model kind {kind!r}: expected one of {KINDS}")


def relative_errors(model: StepModel, rows: np.ndarray, kv: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(predicted - measured) / measured`` per step."""
    y = np.asarray(y, float)
    return (model.predict(rows, kv) - y) / y


def error_stats(errors: np.ndarray) -> dict:
    """Median and 90th percentile of ``|relative error|``, the median signed error (bias), count."""
    e = np.asarray(errors, float)
    a = np.abs(e)
    return {"median_abs": float(np.median(a)), "p90_abs": float(np.percentile(a, 90)),
            "median": float(np.median(e)), "steps": int(e.size)}


def _nnls(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact non-negative weighted least squares for a few columns: the best of the
    unconstrained fits over every subset of columns whose coefficients come out >= 0."""
    sw = np.sqrt(weight)
    xw, yw = x * sw[:, None], y * sw
    best, best_loss = np.zeros(x.shape[1]), float(yw @ yw)
    for size in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), size):
            sol = np.linalg.lstsq(xw[:, cols], yw, rcond=None)[0]
            if np.any(sol < 0):
                continue
            resid = yw - xw[:, cols] @ sol
            loss = float(resid @ resid)
            if loss < best_loss - 1e-15 * abs(best_loss):
                best, best_loss = np.zeros(x.shape[1]), loss
                best[list(cols)] = sol
    return best, best_loss


def _fit_additive(kind, rows, kv, y, fixed_s):
    active = rows > 0
    cols = [active.sum(axis=1), rows.sum(axis=1)] + ([kv.sum(axis=1)] if kind == "additive_kv" else [])
    x = np.column_stack(cols if fixed_s is not None else [np.ones(len(y))] + cols)
    target = y - fixed_s if fixed_s is not None else y
    theta, _ = _nnls(x, target, 1.0 / y**2)
    if fixed_s is None:
        fixed, theta = theta[0], theta[1:]
    else:
        fixed = fixed_s
    return StepModel(kind, float(fixed), float(theta[0]), float(theta[1]),
                     float(theta[2]) if kind == "additive_kv" else 0.0, fixed_pinned=fixed_s is not None)


def _roofline_at(n, m, rows, kv, y, weight, fixed_s):
    """Best (loss, fixed, row_s) with the ratios n = layer_s/row_s, m = kv_s/row_s fixed."""
    load = np.where(rows > 0, np.maximum(n + m * kv, rows), 0.0).sum(axis=1)  # pred = fixed + row_s * load
    if fixed_s is None:
        theta, loss = _nnls(np.column_stack([np.ones(len(y)), load]), y, weight)
        return loss, theta[0], theta[1]
    r = max(0.0, float(np.sum(weight * load * (y - fixed_s)) / np.sum(weight * load**2)))
    resid = y - fixed_s - r * load
    return float(np.sum(weight * resid**2)), fixed_s, r


def _zoom(grid: np.ndarray, i: int, points: int) -> np.ndarray:
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    return np.linspace(lo, hi, points)


def _fit_roofline(kind, rows, kv, y, fixed_s, rounds: int = 4):
    weight = 1.0 / y**2
    ns = np.geomspace(1e-2, 1e5, 71)  # crossover rows
    ms = np.concatenate([[0.0], np.geomspace(1e-6, 10.0, 36)]) if kind == "roofline_kv" else np.zeros(1)
    best = None  # (loss, fixed, row_s, n, m)
    for _ in range(rounds + 1):
        fits = [(_roofline_at(n, m, rows, kv, y, weight, fixed_s), i, j)
                for i, n in enumerate(ns) for j, m in enumerate(ms)]
        (loss, fixed, row_s), i, j = min(fits, key=lambda f: f[0][0])
        if best is None or loss < best[0]:
            best = (loss, fixed, row_s, ns[i], ms[j])
        ns, ms = _zoom(ns, i, 21), _zoom(ms, j, 21) if len(ms) > 1 else ms
    _, fixed, row_s, n, m = best
    return StepModel(kind, float(fixed), float(n * row_s), float(row_s), float(m * row_s),
                     fixed_pinned=fixed_s is not None)
