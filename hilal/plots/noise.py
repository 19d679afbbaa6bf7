"""Noise attribution figures (:mod:`hilal.attribution`): what each non-ideality costs alone and what removing it
recovers (:func:`attribution_bars`), per layer (:func:`layer_attribution`), and the drift-compensation factors
the periphery biases (:func:`compensation_plot`)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from hilal.evaluate import time_label
from hilal.plots.base import PALETTE, _percent_axis, _short, style

SOURCE_LABELS = {"programming": "programming", "drift": "drift", "read": "read noise", "dac": "DAC", "adc": "ADC",
                 "output": "output noise", "clipping": "I/O clipping", "all": "all (preset)", "none": "none"}


def attribution_data(table: pd.DataFrame) -> pd.DataFrame:
    """The all-analog rows of an attribution table as plotted: the accuracy drop of each source alone and, where
    measured, what removing it from the preset recovers (the preset's drop less the drop without it)."""
    t = table[(table["scope"] == "all-analog") & (table["source"] != "none")].copy()
    t["time"] = t["t_inference"].map(time_label)
    full = t[(t["source"] == "all")].set_index("t_inference")["accuracy_drop"]
    t["value"] = t["accuracy_drop"]
    removed = t["mode"] == "removed"
    t.loc[removed, "value"] = t.loc[removed, "t_inference"].map(full) - t.loc[removed, "accuracy_drop"]
    t["what"] = t["mode"].map({"alone": "drop with this source alone", "removed": "drop recovered without it"})
    t["label"] = t["source"].map(SOURCE_LABELS)
    return t[["what", "source", "label", "time", "t_inference", "value", "accuracy_drop", "accuracy_se"]]


def attribution_bars(table: pd.DataFrame, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Per source, bars by time: the all-analog accuracy drop it causes alone, and (when the table has
    ``removed`` rows) the drop its removal recovers from the whole preset."""
    data = attribution_data(table)
    whats = list(dict.fromkeys(data["what"]))
    hue = list(dict.fromkeys(data.sort_values("t_inference")["time"]))
    with style():
        fig, axes = plt.subplots(1, len(whats), figsize=(5.2 * len(whats), 3.8), sharey=True, squeeze=False)
        for ax, what in zip(axes[0], whats, strict=True):
            sub = data[data["what"] == what]
            sns.barplot(data=sub, x="label", y="value", hue="time", hue_order=hue, palette=PALETTE, ax=ax,
                        errorbar=None)
            ax.set_title(what)
            ax.set_xlabel("")
            ax.set_ylabel("all-analog accuracy drop")
            ax.tick_params(axis="x", rotation=45)
            ax.axhline(0, color="black", lw=0.8)
            _percent_axis(ax, "y")
        if title:
            fig.suptitle(title)
    return fig, data


def layer_attribution(table: pd.DataFrame, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Heatmap of the loss increase of each layer analog alone (rows) under each source alone (columns), at the
    table's per-layer time(s) (several times: their mean)."""
    t = table[(table["scope"] != "all-analog") & (table["mode"] == "alone") & (table["source"] != "none")]
    data = t.groupby(["scope", "source"], sort=False)["loss_increase"].mean().reset_index()
    grid = data.pivot(index="scope", columns="source", values="loss_increase")
    grid = grid.loc[list(dict.fromkeys(t["scope"])), [s for s in SOURCE_LABELS if s in grid.columns]]
    with style():
        fig, ax = plt.subplots(figsize=(1.0 * grid.shape[1] + 2.5, 0.32 * grid.shape[0] + 1.6))
        sns.heatmap(grid.rename(columns=SOURCE_LABELS, index=_short), cmap="rocket_r", center=None, ax=ax,
                    annot=grid.shape[0] <= 24, fmt=".3f", annot_kws={"fontsize": 7},
                    cbar_kws={"label": "loss increase, layer analog alone"})
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_title(title or "which layer each source hurts")
    return fig, data


def compensation_plot(factors: pd.DataFrame, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Drift-compensation factor per layer (x: layers in model order) under each setting."""
    with style():
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        sns.lineplot(data=factors, x="layer", y="alpha", hue="setting", marker="o", palette=PALETTE, ax=ax,
                     sort=False)
        ax.set_xticks(range(factors["layer"].nunique()))
        ax.set_xticklabels([_short(n) for n in dict.fromkeys(factors["layer"])], rotation=90, fontsize=7)
        ax.set_xlabel("")
        ax.set_ylabel("drift compensation factor")
        ax.set_title(title or "global drift compensation, as aihwkit reads it out")
    return fig, factors
