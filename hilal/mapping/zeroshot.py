"""Retraining-free methods, to say what HILAL's retraining buys: ``max-norm``, the maximum-neuron-norm criterion
of mixture-of-experts studies on analog tiles (the layers whose weight rows have the largest norm, relative to
the range the tile maps them to, stay digital), and ``hilal-zeroshot``, HILAL's knapsack judged on zero-shot
screens only. Both keep the tolerance on the calibration split and never retrain: a chosen set is converted
as the digital weights are (:meth:`hilal.mapping.run._Run.convert`)."""

from __future__ import annotations

import math

import torch
from aihwkit.simulator.parameters import WeightRemapType
from torch import nn

from hilal.analog import get_preset
from hilal.mapping.config import COSTS, MappingResult
from hilal.mapping.run import _Run
from hilal.mapping.search import _metrics, pareto_sets
from hilal.registry import HilalError


def row_norm_ratio(model: nn.Module, layers: list[str], preset: str = "pcm") -> dict[str, float]:
    """Per layer, the largest L2 norm of a weight row (one output neuron) in units of the weight the preset's
    remapping maps to the full conductance range: the row's own max |w| under channel-wise remapping, the
    layer's max |W| otherwise. Why in tile units: programming, read and converter noise scale with that range,
    so a row that fills it with many large weights carries the most of them into its output."""
    channelwise = get_preset(preset).remap.type == WeightRemapType.CHANNELWISE_SYMMETRIC
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        weight = getattr(mods[name], "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise HilalError(f"max-norm needs the digital weights of layer {name!r}; pass the digital model")
        w = weight.detach().reshape(weight.shape[0], -1).double()
        scale = w.abs().amax(1) if channelwise else w.abs().max().expand(w.shape[0])
        norms = w.norm(dim=1) / scale.clamp_min(1e-30)
        out[name] = float(norms.max())
    return out


def longest_prefix(run: _Run, key: str, order: list[str]) -> list[str]:
    """The longest prefix of ``order`` whose zero-shot score clears the floor, by bisection (feasibility assumed
    monotone in the prefix length); the empty list when no layer does."""
    floor = run.floor()
    lo, hi = 0, len(order)
    while lo < hi:
        k = (lo + hi + 1) // 2
        if run.screen(f"{key}-{k}", order[:k], threshold=floor) >= floor:
            lo = k
        else:
            hi = k - 1
    return order[:lo]


def max_norm(run: _Run) -> MappingResult:
    """The maximum-neuron-norm criterion without retraining: layers in ascending :func:`row_norm_ratio`, the
    longest prefix whose zero-shot score keeps the tolerance made analog; the rest stay digital."""
    scores = run.timed_search(lambda: row_norm_ratio(run.digital, run.candidates, run.cfg.preset))
    order = sorted(run.candidates, key=lambda n: scores[n])
    run.convert(longest_prefix(run, "prefix", order))
    return run.finish(order=order, max_norm=scores)


def zeroshot_knapsack(run: _Run, cost: dict[str, float], robust: list[str], sensitive: list[str]) -> list[str]:
    """The largest set on the knapsack frontier (most saving per expected-loss budget, robust cluster in every
    set) whose zero-shot score clears the floor, by bisection; if the robust cluster alone fails its screen,
    the frontier over every layer without it. Honours ``max_tiles``. One round suffices without retraining:
    the ELI of independent noise adds up, so a later round's sets are on the same frontier."""
    floor, value, tiles = run.floor(), run.value, run.tiles
    run.honours_budget = True
    forced = [n for n in robust if value[n] > 0]
    if sum(tiles[n] for n in forced) > run.tiles_left():  # the robust cluster alone exceeds the budget
        forced = []
    for it, must in enumerate([forced, []] if forced else [[]]):
        rest = [n for n in robust + sensitive if n not in must]
        room = run.tiles_left() - sum(tiles[n] for n in must)
        cands = [must + [rest[i] for i in idx] for _, _, idx in
                 pareto_sets([cost[n] for n in rest], [value[n] for n in rest], weight=[tiles[n] for n in rest],
                             capacity=None if math.isinf(room) else room)]
        cands = [c for c in cands if c and sum(value[n] for n in c) > 0]
        lo, hi = -1, len(cands) - 1
        while lo < hi:
            k = (lo + hi + 1) // 2
            lo, hi = (k, hi) if run.screen(f"screen-{it}-{k}", cands[k], threshold=floor) >= floor else (lo, k - 1)
        if lo >= 0:
            return cands[lo]
    return []


def hilal_zeroshot(run: _Run) -> MappingResult:
    """HILAL without retraining: the same curvature metrics, clusters and knapsack frontier as ``hilal``, the
    set chosen on zero-shot screens (:func:`zeroshot_knapsack`) and converted as it is."""
    cfg = run.cfg
    df = run.timed_search(lambda: _metrics(run))
    cost = df[COSTS[cfg.cost]].astype(float)
    if cost.isna().any():
        raise HilalError(f"HILAL's cost {cfg.cost!r} needs the ELI: set hessian eli_samples > 0")
    robust = df.loc[df["cluster"] == "robust", "layer"].tolist()
    sensitive = df.loc[df["cluster"] == "sensitive", "layer"].tolist()
    run.convert(zeroshot_knapsack(run, dict(zip(df["layer"], cost, strict=True)), robust, sensitive))
    return run.finish(metrics=df, robust=robust, sensitive=sensitive)
