"""A sweep's runs across seeds (:func:`sweep_seeds`): HILAL's speed-up over LionHeart, the analog MAC share and
the accuracy per model and method, one point per mapping seed with the median over them. Takes the sweep's
table (:func:`hilal.sweep.read_table`) as it is, so that the figure needs no part of the sweep machinery."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from hilal.plots.base import METHOD_ORDER, PALETTE, _order, style

COMPARISON = ["dataset", "preset", "train_seed", "settings"]
"""Runs that differ only in model, method and mapping seed: one comparison of the methods."""


def seed_table(table: pd.DataFrame, reference: str = "lionheart", method: str = "hilal") -> pd.DataFrame:
    """One row per run: model, method, mapping seed, the comparison it belongs to, analog MAC share, accuracy,
    total time, and ``speedup`` (``reference``'s total time over ``method``'s on the same model, comparison and
    seed; on ``method``'s rows only)."""
    cols = ["model", "method", "mapping_seed", *COMPARISON, "analog_mac_share", "accuracy_mean", "total_s"]
    data = table[cols].copy()
    keys = ["model", "mapping_seed", *COMPARISON]
    ref = data[data["method"] == reference].set_index(keys)["total_s"]
    own = data[data["method"] == method].set_index(keys)["total_s"]
    speed = (ref / own).dropna().rename("speedup").reset_index()
    data = data.merge(speed.assign(method=method), on=[*keys, "method"], how="left")
    data["comparison"] = data.groupby(COMPARISON, sort=False).ngroup()
    return data.sort_values(["model", "method", "comparison", "mapping_seed"]).reset_index(drop=True)


def sweep_seeds(table: pd.DataFrame, reference: str = "lionheart", method: str = "hilal", target: float = 5.0,
                title: str = "Across mapping seeds") -> tuple[Figure, pd.DataFrame]:
    """Three panels over a sweep's runs: ``method``'s speed-up over ``reference`` per model (the dashed line at
    ``target``), the analog MAC share and the accuracy per model and method; a dot per run, a bar at the
    median. Returns the figure and :func:`seed_table`."""
    data = seed_table(table, reference, method)
    models = _order(data["model"].unique())
    methods = _order(data["method"].unique(), METHOD_ORDER)
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        speed = data.dropna(subset=["speedup"])
        ax = axes[0]
        color = sns.color_palette(PALETTE)[0]
        for i, model in enumerate(models):  # a dot per run, spread sideways in a fixed order, the median a bar
            ys = speed.loc[speed["model"] == model, "speedup"].to_numpy()
            if len(ys):
                ax.scatter(i + np.linspace(-0.15, 0.15, len(ys)) * (len(ys) > 1), ys, color=color, s=30, zorder=2)
                ax.plot([i - 0.25, i + 0.25], [np.median(ys)] * 2, color="black", lw=2, zorder=3,
                        label="median" if i == 0 else None)
        ax.axhline(target, ls="--", color="grey", lw=1, label=f"target {target:g}×")
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_xlabel("model")
        ax.legend(loc="best", fontsize=8)
        ax.set_ylabel(f"{method} speed-up over {reference} (×)")
        ax.set_title("speed-up (total time)")
        for ax, col, label in ((axes[1], "analog_mac_share", "analog MAC share"),
                               (axes[2], "accuracy_mean", "accuracy at t_eval")):
            sns.stripplot(data, x="model", y=col, hue="method", order=models, hue_order=methods, dodge=True,
                          palette=PALETTE, ax=ax, size=6, jitter=0.1, legend=ax is axes[2])
            sns.pointplot(data, x="model", y=col, hue="method", order=models, hue_order=methods, dodge=0.4,
                          estimator=np.median, errorbar=None, markers="_", markersize=20, linestyle="none",
                          palette=PALETTE, ax=ax, legend=False)
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))  # runs can lie a point apart
            ax.set_ylabel(label)
            ax.set_title(label)
        if axes[2].get_legend() is not None:
            sns.move_legend(axes[2], "lower right", fontsize=8, title=None)
        fig.suptitle(title)
    return fig, data
