"""Accuracy figures: accuracy over time since programming (notebooks 00, 02, 07), digital baselines (01), and
the headline numbers of a drift summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.evaluate import time_label
from hilal.plots.base import METHOD_ORDER, PALETTE, _order, _percent_axis, style, time_axis

# ---------------------------------------------------------------- accuracy over time (00, 02, 07)

def drift_curves(table: pd.DataFrame, hue: str = "preset", col: str | None = None,
                 fp: float | Mapping[str, float] | None = None, title: str | None = None,
                 metric: str = "accuracy", labels: Mapping[str, str] | None = None) -> tuple[Figure, pd.DataFrame]:
    """Accuracy (mean ± std over repetitions) against time since programming, one line per ``hue``.

    ``table`` is a tidy drift table (``hilal.evaluate.drift_table``: ``t_inference``, ``rep``,
    ``accuracy`` plus label columns). ``col`` makes one panel per value; ``fp`` draws the digital accuracy
    as a dashed line (a number, or a mapping from the ``col`` value to a number); ``labels`` renames legend
    entries (e.g. :func:`share_labels`).
    """
    by = [c for c in (col, hue) if c] + ["t_inference"]
    summ = table.groupby(by, sort=False)["accuracy"].agg(mean="mean", std="std", reps="count").reset_index()
    summ["std"] = summ["std"].fillna(0.0)
    summ["time"] = [time_label(t) for t in summ["t_inference"]]
    panels = list(dict.fromkeys(summ[col])) if col else [None]
    hues = _order(summ[hue], METHOD_ORDER)
    colors = dict(zip(hues, sns.color_palette(PALETTE, len(hues)), strict=True))
    # distinct markers and dashes keep overlapping lines (e.g. two mild presets) apart
    marks = dict(zip(hues, [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"),
                            ("X", "-."), ("*", ":")] * (len(hues) // 8 + 1), strict=False))
    with style():
        longest = max(len((labels or {}).get(h, h)) for h in hues)
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.2 + 0.075 * max(0, longest - 12), 3.8),
                                 squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels, strict=True):
            sub = summ if panel is None else summ[summ[col] == panel]
            for h in hues:
                s = sub[sub[hue] == h].sort_values("t_inference")
                if s.empty:
                    continue
                ax.plot(s["t_inference"], s["mean"], marker=marks[h][0], ls=marks[h][1], color=colors[h],
                        label=(labels or {}).get(h, h),
                        lw=1.8, ms=5, mfc="white" if len(hues) > 1 and hues.index(h) % 2 else colors[h])
                ax.fill_between(s["t_inference"], s["mean"] - s["std"], s["mean"] + s["std"],
                                color=colors[h], alpha=0.18, lw=0)
            ref = fp.get(panel) if isinstance(fp, Mapping) else fp
            if ref is not None:
                ax.axhline(ref, color="0.3", ls="--", lw=1, label="digital (FP)")
            time_axis(ax, summ["t_inference"])
            ax.set_ylabel(f"test {metric} (mean ± std)")
            _percent_axis(ax)
            if panel is not None:
                ax.set_title(str(panel))
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, title=hue, loc="outside right center", frameon=False)
        if title:
            fig.suptitle(title, fontweight="bold")
    return fig, summ


def share_labels(results: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Legend labels ``method (NN % MACs analog)`` from mapping results."""
    return {r["method"]: f"{r['method']} ({float(r['analog_mac_share']):.0%} MACs analog)" for r in results}


# ---------------------------------------------------------------- digital baselines (01)

def accuracy_bars(table: pd.DataFrame, x: str = "model", hue: str = "dataset", y: str = "accuracy",
                  title: str = "Digital (floating-point) test accuracy") -> tuple[Figure, pd.DataFrame]:
    """Grouped bars of ``y`` (a fraction) per ``x`` and ``hue``, each bar labelled with its value."""
    data = table[[x, hue, y]].copy()
    with style():
        fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * data[x].nunique() * max(1, data[hue].nunique())), 3.6))
        sns.barplot(data=data, x=x, y=y, hue=hue, palette=PALETTE, ax=ax)
        for cont in ax.containers:
            ax.bar_label(cont, labels=[f"{v:.1%}" for v in cont.datavalues], fontsize=8, padding=2)
        ax.set_ylim(0, 1.08)
        _percent_axis(ax)
        ax.set_ylabel(f"test {y}")
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.legend(title=hue, loc="lower right", frameon=True)
    return fig, data


# ---------------------------------------------------------------- headline numbers

def headline(summary: pd.DataFrame, keys: Sequence[str], value: str = "mean") -> dict[str, Any]:
    """Nested dict ``{key1: {key2: ... {time label: value}}}`` from a summary with ``t_inference`` (e.g. the
    ``data`` returned by :func:`drift_curves`), for :func:`save_summary`."""
    out: dict[str, Any] = {}
    for _, r in summary.iterrows():
        node = out
        for k in keys:
            node = node.setdefault(str(r[k]), {})
        node[time_label(float(r["t_inference"]))] = float(r[value])
    return out
