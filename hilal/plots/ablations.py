"""The HILAL paper's ablation chart (:func:`ablation_chart`): per model, the accuracy of full digital, full
analog and ``hilal-paper`` clustered on each feature set, with the analog share each one reached."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.plots.base import PALETTE, _percent_axis, finish_grid, style

BASELINES = {"all-digital": "full digital", "all-analog": "full analog"}


def ablation_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per (model, setting) from ``results[model][setting]`` (``MappingResult.to_dict()`` records:
    ``all-digital``, ``all-analog`` and one per ablation name): accuracy, its drop from floating point, analog
    MAC share, the ``hilal-paper`` variant (kit or paper-faithful), and the robust layers it tried and kept."""
    rows = []
    for model, by_setting in results.items():
        for setting, r in by_setting.items():
            tried = r.get("robust")
            rows.append({"model": model, "setting": BASELINES.get(setting, setting),
                         "accuracy": float(r["accuracy_mean"]), "accuracy_std": float(r["accuracy_std"]),
                         "drop": float(r["fp_accuracy"]) - float(r["accuracy_mean"]),
                         "analog_mac_share": float(r["analog_mac_share"]), "variant": r.get("variant", ""),
                         "tried": len(tried) if tried is not None else None, "kept": len(r["analog_layers"])})
    return pd.DataFrame(rows)


def ablation_chart(table: pd.DataFrame, title: str = "") -> tuple[Figure, pd.DataFrame]:
    """Bars of mean test accuracy per setting, one panel per model (the HILAL repository's chart), each bar
    labelled with its analog MAC share; error bars one standard deviation over programmings."""
    order = list(dict.fromkeys(table["setting"]))
    with style():
        g = sns.catplot(data=table, x="setting", y="accuracy", col="model", kind="bar", order=order,
                        hue="setting", hue_order=order, palette=PALETTE, legend=False, height=3.6, aspect=1.1,
                        errorbar=None)
        for ax, model in zip(g.axes.flat, g.col_names, strict=True):
            sub = table[table["model"] == model].set_index("setting")
            for i, s in enumerate(order):
                if s in sub.index:
                    r = sub.loc[s]
                    ax.errorbar(i, r["accuracy"], yerr=r["accuracy_std"], color="black", capsize=3, lw=1)
                    ax.annotate(f"{r['analog_mac_share']:.0%}", (i, r["accuracy"]), ha="center", va="bottom",
                                xytext=(0, 6), textcoords="offset points", fontsize=8)
            ax.tick_params(axis="x", rotation=60)
            ax.set_ylim(max(0.0, float((table["accuracy"] - table["accuracy_std"]).min()) - 0.1), 1.05)
            _percent_axis(ax, "y")
            ax.set_xlabel("")
        finish_grid(g, "test accuracy (label: analog MAC share)", title)
    return g.figure, table
