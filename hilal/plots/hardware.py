"""The accuracy / hardware-cost trade-off (notebook 10): HILAL's knapsack frontier against energy and latency per
sample, with the all-digital and all-analog corners, other methods' mappings, and the point a tile budget picks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.plots.base import PALETTE, _percent_axis, style

_AXES = (("energy_uj", "energy per sample (µJ, log scale)"), ("latency_us", "latency per sample (µs, log scale)"))
_HW = ("analog_tiles", "energy_uj", "latency_us", "energy_gain", "latency_gain")


def frontier_table(frontier: pd.DataFrame, others: Iterable[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """The plotted numbers: one row per frontier point (``kind``: all-digital, hilal, all-analog) and per mapping
    record in ``others`` (``MappingResult.to_dict()`` form, ``kind`` its method): accuracy mean, std and drop,
    analog layers, tiles, energy, latency and their gains over all-digital."""
    cols = ["kind", "n_analog", "accuracy_mean", "accuracy_std", "accuracy_drop", *_HW]
    rows = [frontier[cols + (["within_budget"] if "within_budget" in frontier else [])]]
    for r in others:
        hw = r["hardware"]
        rows.append(pd.DataFrame([{"kind": r["method"], "n_analog": len(r["analog_layers"]),
                                   "accuracy_mean": r["accuracy_mean"], "accuracy_std": r["accuracy_std"],
                                   "accuracy_drop": r["fp_accuracy"] - r["accuracy_mean"],
                                   **{k: hw[k] for k in _HW}}]))
    return pd.concat(rows, ignore_index=True)


def energy_frontier_plot(frontier: pd.DataFrame, others: Iterable[Mapping[str, Any]] = (),
                         drop_threshold: float | None = None, chosen: pd.Series | None = None,
                         max_tiles: int | None = None, title: str = "Accuracy against hardware cost"
                         ) -> tuple[Figure, pd.DataFrame]:
    """Two panels, test accuracy against energy and against latency per sample (log scales): HILAL's frontier
    points joined in order of saving, the all-digital and all-analog corners, each mapping in ``others`` (e.g.
    LionHeart's) as its own marker, the tolerance (floating point less ``drop_threshold``) dashed, and
    ``chosen`` (the point a budget of ``max_tiles`` tiles picks: :func:`hilal.mapping.budget_choice`) ringed."""
    others = list(others)
    data = frontier_table(frontier, others)
    kinds = list(dict.fromkeys(data["kind"]))
    colors = dict(zip(kinds, sns.color_palette(PALETTE, len(kinds)), strict=True))
    markers = {"all-digital": "s", "hilal": "o", "all-analog": "X", "lionheart": "*"}
    fp = float(frontier.attrs.get("fp_accuracy", (data["accuracy_mean"] + data["accuracy_drop"]).iloc[0]))
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, (col, label) in zip(axes, _AXES, strict=True):
            line = data[data["kind"].isin(["all-digital", "hilal", "all-analog"])].sort_values(col)
            ax.plot(line[col], line["accuracy_mean"], color="0.7", lw=1, zorder=1)
            for kind in kinds:
                d = data[data["kind"] == kind]
                ax.errorbar(d[col], d["accuracy_mean"], yerr=d["accuracy_std"], fmt=markers.get(kind, "D"),
                            ms=13 if kind == "lionheart" else 7, color=colors[kind], label=kind, capsize=2, zorder=3)
            if drop_threshold is not None:
                ax.axhline(fp - drop_threshold, ls="--", color="0.4", lw=1, label="tolerance")
            if chosen is not None:
                ax.scatter([chosen[col]], [chosen["accuracy_mean"]], s=260, facecolors="none", edgecolors="k",
                           lw=1.5, zorder=4, label=f"fits {max_tiles} tiles" if max_tiles else "chosen")
            ax.set_xscale("log")
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_xlabel(label)
            _percent_axis(ax, "y")
        axes[0].set_ylabel("test accuracy")
        axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.suptitle(title)
    return fig, data


_POINT = ("n_analog", "accuracy_mean", "accuracy_drop", "analog_tiles", "energy_uj", "energy_gain", "latency_us",
          "latency_gain")


def frontier_summary(frontier: pd.DataFrame, lionheart: Mapping[str, Any], better: pd.DataFrame,
                     chosen: pd.Series | None, max_tiles: int | None) -> dict[str, Any]:
    """Headline numbers of notebook 10 for :func:`save_summary`: every frontier point, LionHeart's mapping, the
    frontier points that beat it (``better``: :func:`hilal.mapping.beats`) and the point ``chosen`` for a budget
    of ``max_tiles`` tiles."""
    def point(r: Mapping[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in _POINT}

    hw = lionheart["hardware"]
    return {"fp_accuracy": frontier.attrs.get("fp_accuracy"), "curvature_s": frontier.attrs.get("curvature_s"),
            "frontier": [{"kind": r["kind"], **point(r)} for _, r in frontier.iterrows()],
            "lionheart": {"n_analog": len(lionheart["analog_layers"]), "accuracy_mean": lionheart["accuracy_mean"],
                          "accuracy_drop": lionheart["fp_accuracy"] - lionheart["accuracy_mean"],
                          **{k: hw[k] for k in ("analog_tiles", "energy_uj", "energy_gain", "latency_us",
                                                "latency_gain")}},
            "beats_lionheart": [point(r) for _, r in better.iterrows()],
            "max_tiles": max_tiles, "chosen": None if chosen is None else point(chosen)}
