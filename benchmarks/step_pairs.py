"""Engine-step samples compared as ratios, pooled or in pairs measured seconds apart (used by
``benchmarks/bench_server_step.py``; pure: no vLLM, no torch, no I/O).

A *step* is one line of the worker's step log (``vllm_split/engine/step_timing.py``):
``step_s`` (the whole step) and ``model_s`` (the model forward inside it). A comparison of
a system's steps against a baseline's gives the ratios of their medians and the limit
``fixed + (L - k) / L * loop`` from the baseline's own split of its step into the forward
(``loop``) and the rest (``fixed``): :func:`compare`.

The interleaved mode of the benchmark measures a *pair*: on one vllm-split server, a batch
of ordinary requests (vLLM's own compiled whole-model graph) and a batch of split sessions
of the same shape, one right after the other. Each pair gives its own ratios
(:func:`pair_ratios`), so the machine's drift over minutes (1.3-1.7x here) cancels; a
scenario's ratio is the median over its pairs with a 95% bootstrap interval of that median
(:func:`median_interval`), in :func:`summarize_pairs`. Under pipeline parallelism a pair
holds one stage's steps (``stage``: the workers' ``pp_rank``) and each stage is its own row.
"""
from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

RESAMPLES = 2000
CI_METHOD = f"95% percentile bootstrap of the median over pairs ({RESAMPLES} resamples)"


def median_of(steps: Sequence[dict], field: str) -> float:
    """The median of ``field`` over ``steps`` (which must not be empty)."""
    if not steps:
        raise ValueError(f"no steps to take the median {field!r} of")
    return statistics.median(s[field] for s in steps)


def compare(base: Sequence[dict], got: Sequence[dict], *, layer_fraction: float) -> dict:
    """``got``'s steps against ``base``'s: medians, their ratios and the limit of a system that
    runs ``layer_fraction`` of the forward's layers and everything else as ``base`` does."""
    b_step, b_layers = median_of(base, "step_s"), median_of(base, "model_s")
    step, layers = median_of(got, "step_s"), median_of(got, "model_s")
    b_fixed = b_step - b_layers
    limit = (b_fixed + layer_fraction * b_layers) / b_step
    return {"layer_fraction": layer_fraction, "steps": len(got), "plain_steps": len(base),
            "plain_step_s": b_step, "plain_layers_s": b_layers, "plain_fixed_s": b_fixed,
            "step_s": step, "layers_s": layers, "step_ratio": step / b_step, "layers_ratio": layers / b_layers,
            "step_limit_ratio": limit, "step_minus_limit": step / b_step - limit}


def pair_ratios(pair: dict, *, layer_fraction: float) -> dict | None:
    """One pair's ratios (split over ordinary), or None when either batch logged no step of the
    scenario's shape."""
    if not pair["ordinary"] or not pair["split"]:
        return None
    c = compare(pair["ordinary"], pair["split"], layer_fraction=layer_fraction)
    return {"repeat": pair["repeat"], "order": pair["order"], "steps": (len(pair["ordinary"]), len(pair["split"])),
            "step_ratio": c["step_ratio"], "layers_ratio": c["layers_ratio"],
            "step_limit_ratio": c["step_limit_ratio"], "step_minus_limit": c["step_minus_limit"]}


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, interpolated linearly between order statistics."""
    if not values:
        raise ValueError("no values to take a quantile of")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q}: expected a fraction in [0, 1]")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_interval(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES,
                    level: float = 0.95) -> list[float]:
    """A ``level`` percentile-bootstrap interval of the median of ``values``: resample them with
    replacement ``resamples`` times and take the quantiles of the resampled medians. With one
    value the interval is that value; it never extends beyond the values' range."""
    if not values:
        raise ValueError("no values to bound the median of")
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)]
    tail = (1.0 - level) / 2
    return [quantile(medians, tail), quantile(medians, 1.0 - tail)]


def group_key(pair: dict) -> tuple:
    return pair["mode"], pair["kind"], pair["batch"], pair["context"], pair["system"], pair.get("stage")


def summarize_pairs(pairs: Sequence[dict], *, layer_fraction: Callable[..., float],
                    seed: int = 0) -> list[dict]:
    """One row per (mode, kind, batch, context, system, stage) of ``pairs`` (in first-seen
    order): the pooled comparison of all its split steps against all its ordinary steps (the
    fields of :func:`compare`), and the pairs' own ratios with their medians and intervals.
    ``layer_fraction(system, batch)``: the share of the layers a batch of ``system`` runs;
    pairs of a pipeline stage (``stage``): ``layer_fraction(system, batch, stage)``, the share
    of that stage's layers."""
    groups: dict[tuple, list[dict]] = {}
    for p in pairs:
        groups.setdefault(group_key(p), []).append(p)
    rows = []
    for (mode, kind, batch, context, system, stage), group in groups.items():
        frac = layer_fraction(system, batch) if stage is None else layer_fraction(system, batch, stage)
        ratios = [r for p in group if (r := pair_ratios(p, layer_fraction=frac)) is not None]
        base = [s for p in group for s in p["ordinary"]]
        got = [s for p in group for s in p["split"]]
        if not ratios:
            continue
        row = {"kind": kind, "batch": batch, "context": context, "mode": mode, "system": system,
               **({} if stage is None else {"stage": stage}), "baseline": "ordinary",
               **compare(base, got, layer_fraction=frac), "pairs": len(ratios)}
        for field in ("step_ratio", "layers_ratio", "step_limit_ratio", "step_minus_limit"):
            values = [r[field] for r in ratios]
            row[f"{field}_median"] = statistics.median(values)
            row[f"{field}_ci95"] = median_interval(values, seed=seed)
            row[f"pair_{field}s"] = values
        row["ci_method"] = CI_METHOD
        rows.append(row)
    return rows
