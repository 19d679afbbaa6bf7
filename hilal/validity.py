"""ELI validity read against its ceiling: the measured single-layer sensitivity with its programming draws kept
(:func:`measured_sensitivity`), the measurement's split-half reliability (:func:`split_half`: how well two
halves of the draws rank the layers alike, the ceiling any metric's rank correlation with it can reach), and
both for several models and presets (:func:`validity_table`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

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


def split_half(draws: pd.DataFrame, target: str = "loss_increase") -> float:
    """Split-half reliability of the layers' ranking by mean ``target``: the Spearman correlation between the
    means over even and over odd repetitions, stepped up to the full number of draws (Spearman-Brown,
    2r / (1 + r)). Why: it is how well the measurement agrees with itself; a metric's rank correlation with
    the measurement is bounded by about its square root (:func:`ceiling`)."""
    wide = draws.pivot(index="layer", columns="rep", values=target)
    if wide.shape[0] < 3 or wide.shape[1] < 2:
        raise HilalError(f"split-half needs at least 3 layers and 2 repetitions; got {wide.shape[0]} and "
                         f"{wide.shape[1]}")
    even, odd = wide.iloc[:, 0::2].mean(1), wide.iloc[:, 1::2].mean(1)
    r = float(spearmanr(even, odd)[0])
    return max(-1.0, 2 * r / (1 + r)) if r > -1 + 1e-9 else -1.0  # negative halves: no reliability to step up


def ceiling(reliability: float) -> float:
    """The highest correlation a noise-free predictor can have with a measurement of this reliability: its
    square root (0 for a reliability of 0 or below)."""
    return math.sqrt(reliability) if reliability > 0 else 0.0


def validity_table(models: Mapping[str, nn.Module], splits: Splits, presets: Sequence[str],
                   cfg: HessianConfig | None = None, t_inference: float = 86400.0, reps: int = 20, seed: int = 0,
                   done: Mapping[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]] | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """One row per (model, preset, metric): the Spearman correlation of the metric (:func:`layer_metrics` with
    ``cfg`` at ``t_inference``) with the measured single-layer loss increase, the measurement's split-half
    reliability and its ceiling. ``done`` maps (model, preset) to (metrics, draws) already computed."""
    cfg = cfg or HessianConfig()
    rows = []
    for name, model in tqdm(models.items(), desc="validity", disable=not progress, leave=False):
        for preset in presets:
            if done and (name, preset) in done:
                metrics, draws = done[(name, preset)]
            else:
                metrics = layer_metrics(model, splits, preset, replace(cfg, t_inference=t_inference), progress=False)
                draws = measured_sensitivity(model, splits, preset, t_inference, reps, seed)[1]
            measured = draws.groupby("layer", sort=False)["loss_increase"].mean()
            rel = split_half(draws)
            for metric in METRICS:
                m = metrics.set_index("layer")[metric].reindex(measured.index)
                rows.append({"model": name, "preset": preset, "metric": metric,
                             "spearman": float(spearmanr(m, measured)[0]), "split_half": rel,
                             "ceiling": ceiling(rel), "layers": len(measured),
                             "reps": int(draws["rep"].nunique())})
    return pd.DataFrame(rows)
