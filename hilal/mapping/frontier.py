"""The accuracy / hardware-cost trade-off from one curvature pass (notebook 10): points along HILAL's knapsack
frontier (the layer sets with the most saving per expected-loss budget), each judged zero-shot or after one
retraining stage, with the all-digital and all-analog corners, and which of them fit a tile budget."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from hilal.analog import extend_analog
from hilal.data import Splits
from hilal.evaluate import noisy_metrics
from hilal.hardware import OBJECTIVES, make_chip, mapping_cost
from hilal.mapping.config import COSTS, MappingConfig
from hilal.mapping.methods import check_max_tiles
from hilal.mapping.run import _Run, retrain
from hilal.mapping.search import _metrics, pareto_sets
from hilal.registry import HilalError, check_choice


def frontier_sets(cost: dict[str, float], value: dict[str, float], points: int) -> list[list[str]]:
    """Up to ``points`` sets of the knapsack frontier of ``cost`` against ``value`` (:func:`pareto_sets`): for each
    of ``points`` evenly spaced shares of the largest total saving, the cheapest set reaching it, in increasing
    saving (duplicates dropped)."""
    if points < 1:
        raise HilalError(f"points must be a positive integer; got {points!r}")
    names = list(cost)
    frontier = pareto_sets([cost[n] for n in names], [value[n] for n in names])
    top = frontier[-1][1] if frontier else 0.0
    if top <= 0:
        return []
    out: list[list[str]] = []
    for share in np.linspace(1 / points, 1.0, points):
        c, v, idx = next(p for p in frontier if p[1] >= share * top - 1e-9 * top)
        chosen = [names[i] for i in idx]
        if chosen and chosen not in out:
            out.append(chosen)
    return out


def energy_frontier(model: nn.Module, splits: Splits, cfg: MappingConfig | None = None, points: int = 5,
                    retrain_points: bool = True, progress: bool = True) -> pd.DataFrame:
    """One row per mapping: all-digital, ``points`` sets along HILAL's knapsack frontier (expected loss, from one
    curvature pass, against the saving of ``cfg.objective``) and all-analog, each judged like a mapping result
    (test accuracy over ``final_reps`` programmings at ``t_eval``), after one retraining stage
    (``retrain_points``) or zero-shot, with its :func:`hilal.hardware.mapping_cost` columns and, when
    ``cfg.max_tiles`` is set, ``within_budget``. ``cfg.objective`` ``energy`` by default here (the
    notebook's axis). Why one pass: the frontier's sets come from the curvature alone; only judging them
    costs evaluations."""
    cfg = cfg or MappingConfig(objective="energy")
    check_choice("objective", cfg.objective, OBJECTIVES)
    check_max_tiles(cfg.max_tiles)
    make_chip(cfg.chip, cfg.preset)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise HilalError(f"points must be a positive integer; got {points!r}")
    run = _Run("hilal-frontier", model, splits, cfg, progress)
    t = time.perf_counter()
    df = _metrics(run)
    curvature_s = time.perf_counter() - t
    cost = dict(zip(df["layer"], df[COSTS[cfg.cost]].astype(float), strict=True))
    sets = [("all-digital", [])] + [("hilal", s) for s in frontier_sets(cost, run.value, points)]
    everything = list(run.candidates)
    if sets[-1][1] and set(sets[-1][1]) == set(everything):
        sets[-1] = ("all-analog", sets[-1][1])
    else:
        sets.append(("all-analog", everything))
    reps = cfg.final_reps or cfg.reps
    rows: list[dict[str, Any]] = []
    for i, (kind, layers) in enumerate(sets):
        t = time.perf_counter()
        candidate = extend_analog(run.digital, layers, cfg.preset) if layers else run.digital
        retrained = bool(layers) and retrain_points
        if retrained:
            retrain(candidate, splits, cfg, cfg.seed + 7919 * (i + 1), teacher=run.digital)
        scores = noisy_metrics(candidate, splits, cfg.t_eval, reps, cfg.seed + 1, split="test")["accuracy"]
        hw = mapping_cost(run.costs, layers, run.chip)
        rows.append({"kind": kind, "layers": list(layers), "n_analog": len(layers),
                     "eli": float(sum(cost[n] for n in layers)), "saving": float(sum(run.value[n] for n in layers)),
                     "retrained": retrained, "accuracy_mean": float(scores.mean()),
                     "accuracy_std": float(scores.std(ddof=1)) if reps > 1 and layers else 0.0,
                     "accuracy_drop": run.fp_test - float(scores.mean()), **hw,
                     **({"within_budget": hw["analog_tiles"] <= cfg.max_tiles} if cfg.max_tiles else {}),
                     "seconds": time.perf_counter() - t})
    out = pd.DataFrame(rows)
    out.attrs.update(curvature_s=curvature_s, fp_accuracy=run.fp_test, objective=cfg.objective,
                     max_tiles=cfg.max_tiles, chip=run.chip.name)
    return out


def budget_choice(frontier: pd.DataFrame, max_tiles: int, drop_threshold: float) -> pd.Series | None:
    """The frontier point with the lowest energy among those within ``max_tiles`` analog tiles whose accuracy
    drop stays within ``drop_threshold`` (None if none does): the mapping to put on that chip."""
    ok = frontier[(frontier["analog_tiles"] <= max_tiles) & (frontier["accuracy_drop"] <= drop_threshold)]
    return None if ok.empty else ok.loc[ok["energy_uj"].idxmin()]


def beats(frontier: pd.DataFrame, other: dict[str, Any]) -> pd.DataFrame:
    """The HILAL frontier points that need less energy per sample than the mapping record ``other`` (e.g.
    LionHeart's ``MappingResult.to_dict()``) at no larger accuracy drop from floating point."""
    drop = float(other["fp_accuracy"]) - float(other["accuracy_mean"])
    hilal = frontier[frontier["kind"] == "hilal"]
    return hilal[(hilal["energy_uj"] < other["hardware"]["energy_uj"]) & (hilal["accuracy_drop"] <= drop + 1e-12)]
