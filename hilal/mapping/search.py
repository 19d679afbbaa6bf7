"""HILAL, the kit's method: curvature metrics (ELI, traces, top eigenvalues) on the calibration split, the
threshold-free robust/sensitive split, an order by expected loss (per MAC), and the searches that choose which
layers to offload, stage by stage: ``knapsack`` over :func:`pareto_sets`, ``screen`` on zero-shot scores of
prefixes, and ``gallop``/``bisect``/``walk``, which retrain at every probe. Each search is written against the
run object's steps (:class:`hilal.mapping.run._Run`: ``stage``, ``screen``, ``adopt``), so it can be tested
against exhaustive search on a stand-in run with known scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from hilal.cluster import cluster_layers
from hilal.hessian import layer_metrics
from hilal.mapping.config import COSTS, MappingResult, _hessian_cfg
from hilal.mapping.run import _Run
from hilal.registry import HilalError


def _metrics(run: _Run) -> pd.DataFrame:
    """The digital model's per-layer curvature metrics and clusters (journaled)."""
    cached = run.journal.get("metrics")
    if cached is not None:
        return pd.DataFrame(cached)
    df = layer_metrics(run.digital, run.splits, run.cfg.preset, _hessian_cfg(run.cfg), layers=run.candidates,
                       progress=run.progress)
    df = cluster_layers(df, method=run.cfg.cluster, seed=run.cfg.seed)
    run.journal.put("metrics", df.to_dict(orient="records"))
    return df


def hilal(run: _Run) -> MappingResult:
    """Curvature metrics -> robust/sensitive clusters -> layers offloaded robust cluster first, each cluster
    in ascending ``cost`` (or cost per MAC), with noise-injection fine-tuning after every stage, as far as accuracy
    stays within the tolerance. ``search="knapsack"`` (:func:`_knapsack`) and ``"screen"``
    (:func:`_screened`) pick each stage from zero-shot scores (the robust cluster is proposed first and kept
    if it clears the tolerance); the other searches offload the robust cluster unconditionally in ``stages``
    stages, then find the longest feasible prefix of the sensitive layers with retraining at every probe."""
    cfg = run.cfg
    df = run.timed_search(lambda: _metrics(run))
    cost = df[COSTS[cfg.cost]].astype(float)
    if cost.isna().any():
        raise HilalError(f"HILAL's cost {cfg.cost!r} needs the ELI: set hessian eli_samples > 0")
    key = cost / df["macs"] if cfg.order == "eli_per_mac" else cost
    order = df.assign(_key=key).sort_values("_key", kind="stable")
    robust = order.loc[order["cluster"] == "robust", "layer"].tolist()
    sensitive = [] if cfg.robust_only else order.loc[order["cluster"] == "sensitive", "layer"].tolist()
    if cfg.search == "knapsack":
        _knapsack(run, dict(zip(df["layer"], cost, strict=True)), robust, sensitive)
    elif cfg.search == "screen":
        _screened(run, robust + sensitive, len(robust))
    else:
        chunks = np.array_split(np.array(robust, dtype=object), max(1, min(cfg.stages, len(robust))))
        for i, chunk in enumerate(c for c in chunks if len(c)):
            run.stage(f"robust-{i}", list(chunk))
        if sensitive:
            _extend_prefix(run, sensitive)
    return run.finish(metrics=df, robust=robust, sensitive=sensitive)


def pareto_sets(cost: Sequence[float], value: Sequence[float], max_points: int = 4096,
                weight: Sequence[int] | None = None, capacity: float | None = None
                ) -> list[tuple[float, float, tuple[int, ...]]]:
    """The 0/1-knapsack Pareto frontier of items with ``cost`` and ``value``: (total cost, total value, item
    indices) of every set that has more value than any set of lower or equal cost, in increasing cost (and
    value). Items of cost <= 0 are in every set if their value is positive, in none otherwise (a saving of
    0 or less is never worth it). Nemhauser-Ullmann list merging; past ``max_points`` the
    list is thinned to the cheapest set per value bin (1/max_points of the value range) and the largest.

    With ``capacity``, only sets whose integer ``weight`` (e.g. analog tiles) sums to at most ``capacity``
    count (a 2-D knapsack): the merging then keeps every set no other beats in cost, value and weight at
    once, items of cost <= 0 are ordinary items, and the frontier is taken over the sets that fit."""
    if capacity is None:
        return _pareto_2d(cost, value, max_points)
    if weight is None or len(weight) != len(cost):
        raise HilalError("pareto_sets: a capacity needs one weight per item")
    points = [(0.0, 0.0, 0, ())]
    for i, (ci, vi, wi) in enumerate(zip(cost, value, weight, strict=True)):
        ci, wi = float(ci), int(wi)
        grown = [(c + ci, v + vi, w + wi, s + (i,)) for c, v, w, s in points if w + wi <= capacity]
        points = _undominated(points + grown, int(capacity), max_points)
    frontier, best = [], -math.inf
    for c, v, _, s in sorted(points, key=lambda p: (p[0], -p[1])):
        if v > best:
            frontier.append((c, v, tuple(sorted(s))))
            best = v
    return frontier


def _undominated(points: list, capacity: int, max_points: int) -> list:
    """The (cost, value, weight, items) points no other point matches or beats in all three (lower cost, higher
    value, lower weight); past ``max_points``, the cheapest per (value bin, weight). Points sorted by cost
    are checked against the best value seen at each weight or below (weights are integers <= ``capacity``)."""
    best = [-math.inf] * (capacity + 1)  # best[w]: the highest value of a kept point of weight <= w
    kept = []
    for p in sorted(points, key=lambda p: (p[0], -p[1], p[2])):
        if best[p[2]] >= p[1]:
            continue
        kept.append(p)
        for w in range(p[2], capacity + 1):
            if best[w] >= p[1]:
                break
            best[w] = p[1]
    if len(kept) > max_points:
        lo, hi = min(p[1] for p in kept), max(p[1] for p in kept)
        width, seen, thinned = (hi - lo) / max_points or 1.0, set(), []
        for p in kept:  # in increasing cost: the first of each bin and weight is its cheapest
            b = (math.floor(p[1] / width), p[2])
            if b not in seen:
                seen.add(b)
                thinned.append(p)
        kept = thinned
    return kept


def _pareto_2d(cost: Sequence[float], value: Sequence[float], max_points: int
               ) -> list[tuple[float, float, tuple[int, ...]]]:
    """:func:`pareto_sets` without a capacity."""
    free = tuple(i for i, (c, v) in enumerate(zip(cost, value, strict=True)) if c <= 0 < v)
    points = [(float(sum(cost[i] for i in free)), float(sum(value[i] for i in free)), free)]
    for i, (ci, vi) in enumerate(zip(cost, value, strict=True)):
        if ci <= 0:
            continue
        merged = sorted(points + [(c + ci, v + vi, s + (i,)) for c, v, s in points], key=lambda p: (p[0], -p[1]))
        points, best = [], -math.inf
        for p in merged:
            if p[1] > best:
                points.append(p)
                best = p[1]
        if len(points) > max_points:
            width = (points[-1][1] - points[0][1]) / max_points
            thinned, last = [], -math.inf
            for p in points:
                b = math.floor(p[1] / width)
                if b > last:
                    thinned.append(p)
                    last = b
            points = thinned if thinned[-1] is points[-1] else [*thinned, points[-1]]
    return [(c, v, tuple(sorted(s))) for c, v, s in points]


def _knapsack(run: _Run, cost: dict[str, float], robust: list[str], sensitive: list[str]) -> None:
    """Stages chosen as knapsack sets: since independent noise in different layers adds expected loss
    increases (the cross terms vanish in expectation), the layers that carry the most MACs for an ELI budget
    form the knapsack optimum, and as the budget grows these optima trace a Pareto frontier. Each round
    bisects that frontier, without retraining, for the largest set whose zero-shot score z, plus the share
    ``recovery_prior`` of the drop that retraining is assumed to recover, clears the floor (the first round
    keeps the robust cluster in every set, and proposes it when only a near miss cleared the floor; if the
    robust cluster alone fails its screen, the next round searches all layers without it). A near miss
    (short by at most ``near_miss`` standard errors; first stage only) counts as clearing it in the
    bisection: it is retrained first, and if rejected (and, with ``trim``, no subset of it clears the floor
    on its retrained weights: :func:`_trim`) the largest screened set that did clear it; a kept stage starts
    the next round from the grown model (sets adding at least ``min_gain`` of the MACs; its cheapest set is
    screened first, and if it fails, so would every costlier one: the round ends after one screen, which
    after a kept stage is the usual case), a rejected one caps the total ELI of later sets. Recovery is not
    extrapolated from one stage to the next: a stage's best score is the maximum of noisy evaluations, which
    overstates it. ``cost`` maps every layer to its expected loss (the ``MappingConfig.cost`` chosen).

    What a set carries is its saving under ``MappingConfig.objective`` (``run.value``: MACs, or energy or
    latency on the chip); with ``max_tiles`` only sets whose analog tiles fit beside the kept layers are
    candidates (a 2-D knapsack: :func:`pareto_sets` with a capacity), and a robust cluster that alone exceeds
    the budget is not forced into them."""
    cfg, base, floor = run.cfg, run.baseline, run.floor()
    value, tiles = run.value, run.tiles
    total = sum(v for v in value.values() if v > 0)
    run.honours_budget = True
    candidates_pool = robust + sensitive
    rho, cap, it = cfg.recovery_prior, math.inf, 0
    thr = (floor - rho * base) / (1 - rho)  # z + rho * (base - z) >= floor
    while True:
        # near misses for the first stage only; a standard error from fewer than 5 repetitions is too rough
        margin = cfg.near_miss if cfg.reps >= 5 and not run.layers else 0.0
        forced = [n for n in robust if n not in run.layers and value[n] > 0] if it == 0 else []
        if sum(tiles[n] for n in forced) > run.tiles_left():  # the robust cluster alone exceeds the budget
            forced = []
        rest = [n for n in candidates_pool if n not in run.layers and n not in forced]
        spent, forced_cost = sum(cost[n] for n in run.layers), sum(cost[n] for n in forced)
        room = run.tiles_left() - sum(tiles[n] for n in forced)
        cands = [forced + [rest[i] for i in idx] for c, _, idx in
                 pareto_sets([cost[n] for n in rest], [value[n] for n in rest], weight=[tiles[n] for n in rest],
                             capacity=None if math.isinf(room) else room) if spent + forced_cost + c < cap]
        gain = cfg.min_gain * total if run.layers else 0.0
        cands = [c for c in cands if c and sum(value[n] for n in c) >= max(gain, 1e-300)]
        if not cands:
            return
        z: dict[int, float] = {}
        se: dict[int, float] = {}
        lo, hi = -1, len(cands) - 1  # bisection for the largest set that clears the floor or nearly misses it
        cheapest_first = bool(run.layers)  # after a kept stage: if the cheapest set fails, so would the rest
        while lo < hi:
            k = 0 if cheapest_first else (lo + hi + 1) // 2
            cheapest_first = False
            z[k] = run.screen(f"screen-{it}-{k}", cands[k], threshold=thr)
            se[k] = run.rows[-1]["zero_shot_se"] or 0.0
            lo, hi = (k, hi) if z[k] >= thr - margin * se[k] else (lo, k - 1)
        if lo < 0 and forced:  # the robust cluster alone fails its screen: search every layer instead
            it += 1
            continue
        if lo < 0 and run.layers and cfg.scan:  # a later round where no frontier set clears: single layers
            tried = {tuple(c) for k, c in enumerate(cands) if k in z and len(c) == 1}
            singles = [n for n in rest if (n,) not in tried and value[n] >= max(gain, 1e-300)
                       and spent + cost[n] < cap and tiles[n] <= run.tiles_left()]
            singles = sorted(singles, key=lambda n: cost[n] / value[n])[: cfg.scan]
            if _scan(run, f"single-{it}", singles, floor):
                it += 1
                continue
            return
        tries = [lo] if lo >= 0 else []
        if lo < 0 or z[lo] < thr:  # a near miss (or nothing): fall back to the largest set that cleared it
            strict = max((k for k in z if k < max(lo, 0) and z[k] >= thr), default=-1)
            if strict >= 0:
                tries.append(strict)
            elif forced:
                tries.append(0)
        if not tries:
            return
        for k in tries:  # a near miss first, then the largest set that cleared the floor
            if run.stage(f"stage-{it}-{k}", cands[k], lambda sc: sc >= floor, zero_shot=z.get(k, True),
                         keep_rejected=cfg.trim):
                break
            cap = min(cap, spent + sum(cost[n] for n in cands[k]))
            if cfg.trim and _trim(run, f"trim-{it}-{k}", cands[k], cost, floor, gain):
                break
        it += 1


def _scan(run: _Run, key: str, layers: list[str], floor: float) -> bool:
    """Screen single ``layers`` in order (sequential test against the floor) and retrain the first whose
    zero-shot score is within one standard error of the floor; keep it if it then clears the floor. Once
    stages are kept, the digital model's ELI ranks the remaining layers less well (their sensitivities moved
    with the retraining, and its Monte-Carlo error is of the order of the gaps between them), so the
    frontier's cheapest set may fail where the next single layer clears. At most one retraining."""
    for n in layers:
        z = run.screen(f"{key}-{n}", [n], threshold=floor)
        if z >= floor - (run.rows[-1]["zero_shot_se"] or 0.0):
            return run.stage(f"{key}-{n}-stage", [n], lambda sc: sc >= floor, zero_shot=z)
    return False


def _trim(run: _Run, key: str, layers: list[str], cost: dict[str, float], floor: float, gain: float) -> bool:
    """After the stage of ``layers`` was retrained and rejected: bisect the knapsack frontier of its own
    layers (most MACs per expected-loss budget, the full set excluded) on zero-shot scores of its retrained model with
    the rest of its layers digital again, and keep the largest subset that clears the floor and adds at least
    ``gain`` MACs. Retraining adapted the whole network to the stage's noise, so a subset may clear the
    floor where it would not on the model before the stage; this replaces a second retraining stage by a
    few evaluations (when no round beat the stage's zero-shot score, its weights
    are those it had before retraining, and the subsets are screened on them). With ``confirm`` the subsets
    that cleared are tried largest first until one also clears a fresh evaluation (:meth:`_Run.adopt`).
    Returns whether a subset was kept."""
    full = set(layers)
    subsets = [[layers[i] for i in idx] for _, _, idx in
               pareto_sets([cost[n] for n in layers], [run.value[n] for n in layers])]
    subsets = [x for x in subsets if x and set(x) != full and sum(run.value[n] for n in x) >= gain]
    z: dict[int, float] = {}
    lo, hi = -1, len(subsets) - 1
    while lo < hi:
        k = (lo + hi + 1) // 2
        z[k] = run.screen(f"{key}-{k}", subsets[k], threshold=floor, retrained=True)
        lo, hi = (k, hi) if z[k] >= floor else (lo, k - 1)
    # the largest subset that cleared the floor first; the smaller ones only when ``confirm`` rejects it
    cleared = sorted((k for k in z if z[k] >= floor), reverse=True)
    for i, k in enumerate(cleared):
        if run.adopt(key if i == 0 else f"{key}-{k}-adopt", subsets[k], z[k]):
            return True
    return False


def _screened(run: _Run, order: list[str], n_robust: int) -> None:
    """Stages chosen from zero-shot scores over ``order`` (robust layers first). Each round bisects, without
    retraining, for the longest prefix whose zero-shot score z, plus the share rho of the drop
    (baseline - z) that retraining recovers (``recovery_prior`` until a stage has measured it), clears the
    floor; the first round proposes at least the whole robust cluster. The chosen stage is retrained once and
    kept if it clears the floor: a kept stage moves the start forward, a rejected one lowers the upper end and
    updates rho, until no longer prefix is worth a stage."""
    base, floor = run.baseline, run.floor()
    rho, done, hi, it = run.cfg.recovery_prior, 0, len(order), 0
    while True:
        lo_s, hi_s = done, hi
        while lo_s < hi_s:
            k = (lo_s + hi_s + 1) // 2
            z = run.screen(f"screen-{it}-{k}", order[done:k], threshold=(floor - rho * base) / (1 - rho))
            if z + rho * max(base - z, 0.0) >= floor:
                lo_s = k
            else:
                hi_s = k - 1
        k = max(lo_s, min(n_robust, hi)) if it == 0 else lo_s
        if k == done:
            return
        kept = run.stage(f"stage-{it}", order[done:k], lambda s: s >= floor, zero_shot=True)
        z, s = run.rows[-1]["zero_shot"], run.rows[-1]["score"]
        if z is not None and (base - z > run.cfg.drop_threshold or not kept):
            rho = min(max((s - z) / max(base - z, 1e-9), 0.0), 0.95)
        if kept:
            done = k
        else:
            hi = k - 1
        it += 1


def _extend_prefix(run: _Run, layers: list[str]) -> None:
    """Find the longest prefix of ``layers`` whose offloading keeps the calibration score above the floor,
    retraining at every probe and assuming feasibility is monotone in the prefix length (the ELI order)."""
    ok = lambda s: s >= run.floor()  # noqa: E731
    lo, hi = 0, len(layers)  # prefix lo is known feasible, hi + 1 known infeasible
    if run.cfg.search == "walk":
        for i, name in enumerate(layers):
            if not run.stage(f"sensitive-{i}", [name], ok):
                return
        return
    if run.cfg.search == "gallop":
        step = 1
        while lo < hi:
            k = min(lo + step, hi)
            if run.stage(f"prefix-{k}", layers[lo:k], ok):
                lo, step = k, step * 2
            else:
                hi = k - 1
                break
    while lo < hi:
        k = (lo + hi + 1) // 2
        if run.stage(f"prefix-{k}", layers[lo:k], ok):
            lo = k
        else:
            hi = k - 1
