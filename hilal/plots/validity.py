"""ELI validity across models and presets (:func:`validity_plot`): each metric's rank correlation with the
measured single-layer sensitivity, against the measurement's own ceiling (:mod:`hilal.validity`)."""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.plots.base import PALETTE, finish_grid, style


def validity_plot(table: pd.DataFrame, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Bars: Spearman correlation of each metric with the measured loss increase, per model (x) and preset
    (panels); a black tick per model marks the ceiling (square root of the split-half reliability)."""
    models = list(dict.fromkeys(table["model"]))
    metrics = list(dict.fromkeys(table["metric"]))
    with style():
        g = sns.catplot(data=table, x="model", y="spearman", hue="metric", col="preset", kind="bar", order=models,
                        hue_order=metrics, palette=PALETTE, height=3.4, aspect=1.2, errorbar=None)
        for ax, preset in zip(g.axes.flat, g.col_names, strict=True):
            ceil = table[table["preset"] == preset].groupby("model")["ceiling"].first()
            for i, m in enumerate(models):
                if m in ceil.index:
                    ax.hlines(ceil[m], i - 0.45, i + 0.45, color="black", lw=2,
                              label="ceiling (split-half)" if i == 0 else None)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_ylim(-1, 1.05)
            ax.set_xlabel("")
        g.axes.flat[0].legend(loc="lower left", fontsize=8)
        finish_grid(g, "Spearman with measured loss increase", title)
    return g.figure, table
