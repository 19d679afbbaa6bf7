"""ELI validity read against its ceiling: the measured single-layer sensitivity with its programming draws kept
(:func:`measured_sensitivity`), the measurement's split-half reliability (:func:`split_half`: how well two
halves of the draws rank the layers alike, the ceiling any metric's rank correlation with it can reach), and
both for several models and presets (:func:`validity_table`), under the preset with single noise sources
switched off (:func:`hilal.attribution.noise_conditions`), and per layer (:func:`layer_agreement`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import check_layers, mappable_layers, to_analog
from hilal.data import Splits
from hilal.evaluate import _loss_and_accuracy, per_repetition
from hilal.hessian import HessianConfig, layer_metrics
from hilal.registry import HilalError

METRICS = ("trace", "lambda_max", "concentration", "eli")


def measured_sensitivity(model: nn.Module, splits: Splits, preset: str | object = "pcm", t_inference: float = 86400.0,
                         reps: int = 20, seed: int = 0, split: str = "calib", layers: Sequence[str] | None = None,
                         engine: str = "batched") -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`hilal.evaluate.single_layer_sensitivity`'s table (the same numbers) and its draws: one row per
    (layer, rep) with that programming's loss increase and accuracy drop."""
    if reps < 2:
        raise HilalError(f"reps must be at least 2 to split the draws in halves, got {reps}")
    layers = check_layers(model, layers if layers is not None else mappable_layers(model))
    base_loss, base_acc = _loss_and_accuracy(model, splits, split)
    rows, draws = [], []
    for name in layers:
        res = per_repetition(to_analog(model, [name], preset), lambda m: _loss_and_accuracy(m, splits, split),
                             t_inference, reps, seed, engine=engine)
        losses, accs = np.array([x[0] for x in res]), np.array([x[1] for x in res])
        rows.append({"layer": name, "loss": float(losses.mean()), "loss_increase": float(losses.mean() - base_loss),
                     "loss_increase_se": float(losses.std(ddof=1) / np.sqrt(reps)), "accuracy": float(accs.mean()),
                     "accuracy_drop": float(base_acc - accs.mean())})
        draws += [{"layer": name, "rep": r, "loss_increase": float(v - base_loss), "accuracy_drop": float(base_acc - a)}
                  for r, (v, a) in enumerate(zip(losses, accs, strict=True))]
    return pd.DataFrame(rows), pd.DataFrame(draws)


def split_half(draws: pd.DataFrame, target: str = "loss_increase", halves: int = 0, seed: int = 0) -> float:
    """Split-half reliability of the layers' ranking by mean ``target``: the Spearman correlation between the
    means over even and over odd repetitions, stepped up to the full number of draws (Spearman-Brown,
    2r / (1 + r)). Why: it is how well the measurement agrees with itself; a metric's rank correlation with
    the measurement is bounded by about its square root (:func:`ceiling`). ``halves`` > 0 averages r over that
    many random splits of the repetitions in two halves (seeded by ``seed``) instead of the one even/odd split,
    whose r is a single draw of that spread and can sit in either tail of it."""
    wide = draws.pivot(index="layer", columns="rep", values=target)
    if wide.shape[0] < 3 or wide.shape[1] < 2:
        raise HilalError(f"split-half needs at least 3 layers and 2 repetitions; got {wide.shape[0]} and "
                         f"{wide.shape[1]}")
    if halves < 0 or int(halves) != halves:
        raise HilalError(f"halves must be a whole number >= 0, got {halves!r}")
    values, n = wide.to_numpy(), wide.shape[1]
    if halves == 0:
        parts = [(np.arange(0, n, 2), np.arange(1, n, 2))]
    else:
        rng = np.random.default_rng(seed)
        parts = [(p[: n // 2], p[n // 2:]) for p in (rng.permutation(n) for _ in range(int(halves)))]
    r = float(np.mean([spearmanr(values[:, a].mean(1), values[:, b].mean(1))[0] for a, b in parts]))
    return max(-1.0, 2 * r / (1 + r)) if r > -1 + 1e-9 else -1.0  # negative halves: no reliability to step up


def ceiling(reliability: float) -> float:
    """The highest correlation a noise-free predictor can have with a measurement of this reliability: its
    square root (0 for a reliability of 0 or below)."""
    return math.sqrt(reliability) if reliability > 0 else 0.0


def validity_table(models: Mapping[str, nn.Module], splits: Splits, presets: Sequence[str] | Mapping[str, Any],
                   cfg: HessianConfig | None = None, t_inference: float = 86400.0, reps: int = 20, seed: int = 0,
                   done: Mapping[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]] | None = None,
                   progress: bool = False, halves: int = 0) -> pd.DataFrame:
    """One row per (model, preset, metric): the Spearman correlation of the metric (:func:`layer_metrics` with
    ``cfg`` at ``t_inference``) with the measured single-layer loss increase, the measurement's split-half
    reliability (:func:`split_half` with ``halves``) and its ceiling. ``presets`` are names, or a mapping of
    labels to presets or configs
    (:func:`hilal.attribution.noise_conditions`); ``done`` maps (model, label) to (metrics, draws)
    already computed."""
    cfg = cfg or HessianConfig()
    presets = dict(presets) if isinstance(presets, Mapping) else {p: p for p in presets}
    rows = []
    for name, model in tqdm(models.items(), desc="validity", disable=not progress, leave=False):
        for label, preset in presets.items():
            if done and (name, label) in done:
                metrics, draws = done[(name, label)]
            else:
                metrics = layer_metrics(model, splits, preset, replace(cfg, t_inference=t_inference), progress=False)
                draws = measured_sensitivity(model, splits, preset, t_inference, reps, seed)[1]
            measured = draws.groupby("layer", sort=False)["loss_increase"].mean()
            rel = split_half(draws, halves=halves, seed=seed)
            for metric in METRICS:
                m = metrics.set_index("layer")[metric].reindex(measured.index)
                rows.append({"model": name, "preset": label, "metric": metric,
                             "spearman": float(spearmanr(m, measured)[0]), "split_half": rel,
                             "ceiling": ceiling(rel), "layers": len(measured),
                             "reps": int(draws["rep"].nunique())})
    return pd.DataFrame(rows)


def layer_agreement(metrics: pd.DataFrame, draws: pd.DataFrame, metric: str = "eli",
                    target: str = "loss_increase") -> pd.DataFrame:
    """Per layer (the draws' order): ``metric`` (and its standard error ``<metric>_se`` where ``metrics`` has
    one) next to the measured mean ``target`` over the draws and its standard error; both ranks (1 = the most
    sensitive), ``rank_gap`` = metric rank - measured rank (negative: the metric puts the layer higher than the
    tiles do) and ``z`` = (metric - measured) / sqrt(se_metric^2 + se_measured^2), the disagreement in its own
    noise (meaningful where the metric is in the target's units, as ELI is in loss). Why: the layers with a
    large |rank_gap| and |z| are where, and their kind (first conv, shortcut, last layer, a block's first or
    second conv) hints why, a metric falls short of the ceiling."""
    if metric not in metrics:
        raise HilalError(f"metrics has no column {metric!r}; columns: {', '.join(map(str, metrics.columns))}")
    g = draws.groupby("layer", sort=False)[target]
    measured, reps = g.mean(), g.count()
    missing = [n for n in measured.index if n not in set(metrics["layer"])]
    if missing:
        raise HilalError(f"metrics has no row for layer(s) {missing}")
    m = metrics.set_index("layer").reindex(measured.index)
    se = m[f"{metric}_se"] if f"{metric}_se" in m else pd.Series(np.nan, index=m.index)
    out = pd.DataFrame({metric: m[metric], f"{metric}_se": se, "measured": measured,
                        "measured_se": g.std(ddof=1) / np.sqrt(reps)})
    out[f"rank_{metric}"] = out[metric].rank(ascending=False)
    out["rank_measured"] = out["measured"].rank(ascending=False)
    out["rank_gap"] = out[f"rank_{metric}"] - out["rank_measured"]
    out["z"] = (out[metric] - out["measured"]) / np.sqrt(out[f"{metric}_se"] ** 2 + out["measured_se"] ** 2)
    return out.rename_axis("layer").reset_index()
