"""Per-layer figures: curvature metrics against the measured sensitivity (notebook 03) and the robust /
sensitive clusters (04)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from hilal.cluster import log_eli
from hilal.plots.base import CLUSTER_COLORS, PALETTE, _order, _short, style
from hilal.registry import HilalError

# ---------------------------------------------------------------- layer sensitivity (03)

METRIC_LABELS = {
    "trace": "Hessian trace tr(H)",
    "lambda_max": "top eigenvalue λ_max",
    "concentration": "concentration λ_max / tr(H)",
    "eli": "expected loss increase (ELI)",
    "loss_increase": "measured loss increase",
    "accuracy_drop": "measured accuracy drop",
}


def rank_correlations(metrics: pd.DataFrame, sensitivity: pd.DataFrame, target: str = "loss_increase",
                      columns: Sequence[str] = ("trace", "lambda_max", "concentration", "eli")) -> pd.DataFrame:
    """Spearman rank correlation of each per-layer metric with the measured single-layer sensitivity.

    Both frames have a ``layer`` column; they are joined on it. Returns one row per metric with
    ``spearman``, ``p_value`` and ``layers`` (how many layers entered)."""
    merged = metrics.drop(columns=[target], errors="ignore").merge(sensitivity[["layer", target]], on="layer",
                                                                   how="inner")
    if len(merged) < 3:
        raise HilalError(f"rank correlation needs at least 3 layers present in both tables; got {len(merged)}")
    rows = []
    for c in columns:
        rho, p = spearmanr(merged[c], merged[target])
        rows.append({"metric": c, "target": target, "spearman": float(rho), "p_value": float(p),
                     "layers": len(merged)})
    return pd.DataFrame(rows)


def _scale_for(ax: plt.Axes, axis: str, values: Iterable[float]) -> None:
    v = np.asarray(list(values), dtype=float)
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    if np.all(v > 0) and v.max() / v.min() > 20:
        set_scale("log")
        ax_ = ax.xaxis if axis == "x" else ax.yaxis
        # plain numbers at 1-2-5 steps over a few decades; decades only beyond that
        subs = (1.0, 2.0, 5.0) if v.max() / v.min() < 1e3 else (1.0,)
        ax_.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
        ax_.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax_.set_minor_formatter(matplotlib.ticker.NullFormatter())
    elif np.any(v <= 0) and np.ptp(v) > 0 and np.abs(v).max() / max(np.median(np.abs(v)), 1e-30) > 20:
        set_scale("symlog", linthresh=float(np.median(np.abs(v[v != 0]))) if np.any(v != 0) else 1.0)


def layer_profile(merged: pd.DataFrame, columns: Sequence[str] = ("trace", "lambda_max", "concentration", "eli",
                                                                   "loss_increase"),
                  title: str = "Per-layer curvature and measured sensitivity") -> tuple[Figure, pd.DataFrame]:
    """One small bar panel per column, layers in model order on a shared x axis (log y where the values span
    decades). ``merged`` has ``layer`` plus the columns (``*_se`` columns, if present, become error bars)."""
    data = merged[["layer", *columns, *[f"{c}_se" for c in columns if f"{c}_se" in merged]]].copy()
    x = np.arange(len(data))
    with style():
        fig, axes = plt.subplots(len(columns), 1, figsize=(max(6.0, 0.45 * len(data) + 2.5), 1.6 * len(columns) + 1),
                                 sharex=True)
        colors = sns.color_palette(PALETTE, len(columns))
        for ax, c, color in zip(np.atleast_1d(axes), columns, colors, strict=True):
            err = data[f"{c}_se"] if f"{c}_se" in data else None
            ax.bar(x, data[c], yerr=err, color=color, capsize=2, error_kw={"lw": 0.8})
            _scale_for(ax, "y", data[c])
            ax.axhline(0, color="0.4", lw=0.6)
            ax.set_ylabel(METRIC_LABELS.get(c, c).replace(" ", "\n", 1), fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(data["layer"], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("layer (model order)")
        fig.suptitle(title, fontweight="bold")
    return fig, data


def sensitivity_scatter(merged: pd.DataFrame, target: str = "loss_increase",
                        columns: Sequence[str] = ("trace", "lambda_max", "concentration", "eli"),
                        title: str = "Which curvature metric predicts the measured sensitivity?"
                        ) -> tuple[Figure, pd.DataFrame]:
    """One scatter panel per metric against the measured single-layer ``target``, each titled with the
    Spearman rank correlation; points are labelled with the layer names."""
    corr = rank_correlations(merged, merged, target, columns)
    data = merged[["layer", *columns, target]].copy()
    with style():
        fig, axes = plt.subplots(1, len(columns), figsize=(3.3 * len(columns), 3.4), sharey=True)
        for ax, c, (_, row) in zip(np.atleast_1d(axes), columns, corr.iterrows(), strict=True):
            ax.scatter(data[c], data[target], s=28, color=sns.color_palette(PALETTE)[0], zorder=3)
            for _, r in data.iterrows():
                ax.annotate(_short(r["layer"]), (r[c], r[target]), fontsize=6.5, alpha=0.75,
                            xytext=(3, 2), textcoords="offset points")
            _scale_for(ax, "x", data[c])
            ax.set_xlabel(METRIC_LABELS.get(c, c))
            ax.set_title(f"Spearman ρ = {row['spearman']:.2f}")
        _scale_for(np.atleast_1d(axes)[0], "y", data[target])
        np.atleast_1d(axes)[0].set_ylabel(METRIC_LABELS.get(target, target) + "\n(one layer analog)")
        fig.suptitle(title, fontweight="bold")
    for _, row in corr.iterrows():
        data[f"spearman_{row['metric']}"] = row["spearman"]
    return fig, data


# ---------------------------------------------------------------- clustering (04)

def cluster_plane(clustered: pd.DataFrame, title: str = "Layers in the (log ELI, concentration) plane"
                  ) -> tuple[Figure, pd.DataFrame]:
    """Scatter of log10 ELI against spectral concentration, coloured by the robust/sensitive cluster, with
    point size proportional to the layer's MACs (where given) and every point labelled. A non-positive ELI
    estimate is placed where the clustering puts it (``hilal.cluster.log_eli``: a tenth of the smallest
    positive one)."""
    data = pd.DataFrame({"layer": clustered["layer"], "eli": clustered["eli"], "log10_eli": log_eli(clustered["eli"]),
                         "concentration": clustered["concentration"], "cluster": clustered["cluster"]})
    if "macs" in clustered:
        data["macs"] = clustered["macs"].to_numpy()
    sizes = (30 + 170 * data["macs"] / data["macs"].max()) if "macs" in data else 50
    with style():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name in _order(data["cluster"], ("robust", "sensitive")):
            m = data["cluster"] == name
            ax.scatter(data.loc[m, "log10_eli"], data.loc[m, "concentration"],
                       s=sizes[m] if not np.isscalar(sizes) else sizes, alpha=0.85, edgecolor="white",
                       color=CLUSTER_COLORS.get(name), zorder=3,
                       label=f"{name} ({int(m.sum())} layer{'s' if m.sum() != 1 else ''})")
        for _, r in data.iterrows():
            ax.annotate(_short(r["layer"], 24), (r["log10_eli"], r["concentration"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", alpha=0.8)
        ax.set_xlabel("log10 expected loss increase (ELI) under analog noise"
                      + ("\n(ELI ≤ 0 placed at a tenth of the smallest positive)" if (data["eli"] <= 0).any() else ""))
        ax.set_ylabel("spectral concentration λ_max / tr(H)")
        ax.set_title(title)
        leg = ax.legend(title="cluster" + (" (size ∝ MACs)" if "macs" in data else ""), frameon=True)
        for handle in leg.legend_handles:
            handle.set_sizes([50])
    return fig, data
