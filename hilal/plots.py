"""Every figure the notebooks draw, one style, and the one place that writes figures.

Each figure function returns ``(fig, data)``: the figure and a tidy DataFrame holding exactly the numbers
it plots. ``savefig(fig, name, data)`` writes ``figures/<name>.png`` and ``figures/<name>.csv`` side by side
(``HILAL_FIGURES_DIR`` overrides the folder); ``save_summary`` writes a notebook's headline numbers as JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from hilal.evaluate import ONE_DAY, ONE_YEAR, time_label
from hilal.paths import atomic_json_dump, figures_dir, provenance_source, write_provenance
from hilal.registry import HilalError
from hilal.runtime import utc_now

_RC: dict[str, Any] = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("notebook", font_scale=0.95),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.titleweight": "bold",
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.constrained_layout.use": True,
}
PALETTE = "colorblind"
CLUSTER_COLORS = {"robust": "#2a9d8f", "sensitive": "#e76f51"}
METHOD_ORDER = ("hilal", "hilal-paper", "lionheart", "random", "all-analog", "all-analog-ft", "all-digital")
_NAME = re.compile(r"^\d\d_[A-Za-z0-9_\-]+$")
# ticks drawn on time axes, where they fall inside the plotted range
_TIME_TICKS = (1.0, 60.0, 3600.0, ONE_DAY, 30 * ONE_DAY, ONE_YEAR, 10 * ONE_YEAR)


@contextmanager
def style():
    """The kit's single figure style (seaborn whitegrid, compact fonts) as a matplotlib rc context."""
    with plt.rc_context(_RC):
        yield


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise HilalError(f"figure name {name!r} must look like 'NN_what' (two digits of the notebook, an "
                         "underscore, letters/digits/_/-), without extension")
    return name


def savefig(fig: Figure, name: str, data: pd.DataFrame) -> Path:
    """Write ``fig`` as ``<figures>/<name>.png`` and the plotted numbers ``data`` as ``<name>.csv``.

    The folder is ``hilal.paths.figures_dir()`` (``HILAL_FIGURES_DIR`` overrides it). Returns the PNG path.
    """
    _check_name(name)
    if not isinstance(data, pd.DataFrame) or data.empty:
        raise HilalError(f"savefig({name!r}) needs the plotted numbers as a non-empty DataFrame")
    out = figures_dir()
    png = out / f"{name}.png"
    with style():
        fig.savefig(png, bbox_inches="tight")
    data.to_csv(out / f"{name}.csv", index=False)
    return png


def save_summary(notebook: str, values: Mapping[str, Any]) -> Path:
    """Record a notebook's headline numbers in ``<figures>/<NN>_summary.json`` (read back by the tests), and
    the code and machine they came from as the notebook's entry in ``<figures>/provenance.json``
    (:data:`hilal.paths.PROVENANCE`; ``hilal reproduce`` adds the profile and parameters)."""
    if not re.fullmatch(r"\d\d", str(notebook)):
        raise HilalError(f"notebook {notebook!r} must be its two-digit number, e.g. '00'")
    path = atomic_json_dump(dict(values), figures_dir() / f"{notebook}_summary.json")
    write_provenance(str(notebook), {"profile": None, "parameters": None, **provenance_source(),
                                     "written": utc_now()})
    return path


def time_axis(ax: plt.Axes, times: Iterable[float]) -> None:
    """Log-scaled time axis with human tick labels (1 min, 1 h, 1 day, ...) inside the plotted range."""
    times = np.asarray(list(times), dtype=float)
    lo, hi = times.min(), times.max()
    ax.set_xscale("log")
    ticks = [t for t in _TIME_TICKS if lo / 1.5 <= t <= hi * 1.5] or sorted(set(times))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_tick_label(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_xlabel("time since programming (log scale)")


def _tick_label(t: float) -> str:
    return "10 years" if t == 10 * ONE_YEAR else time_label(t)


def _percent_axis(ax: plt.Axes, axis: str = "y") -> None:
    fmt = matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _order(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


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


def _short(layer: str, width: int = 20) -> str:
    return layer if len(layer) <= width else "…" + layer[-(width - 1):]


# ---------------------------------------------------------------- clustering (04)

def cluster_plane(clustered: pd.DataFrame, title: str = "Layers in the (log ELI, concentration) plane"
                  ) -> tuple[Figure, pd.DataFrame]:
    """Scatter of log10 ELI against spectral concentration, coloured by the robust/sensitive cluster, with
    point size proportional to the layer's MACs (where given) and every point labelled. A non-positive ELI
    estimate is placed where the clustering puts it (``hilal.cluster.log_eli``: a tenth of the smallest
    positive one)."""
    from hilal.cluster import log_eli

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


# ---------------------------------------------------------------- mapping comparison (05, 06)

def mapping_table(results: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per mapping result (``MappingResult.to_dict()`` form): method, analog layers and MAC share,
    accuracy mean/std, drop from floating point, and timings."""
    rows = []
    for r in results:
        t = r.get("timings", {})
        rows.append({"method": r["method"], "analog_layers": len(r["analog_layers"]),
                     "analog_mac_share": float(r["analog_mac_share"]), "accuracy_mean": float(r["accuracy_mean"]),
                     "accuracy_std": float(r["accuracy_std"]), "fp_accuracy": float(r["fp_accuracy"]),
                     "accuracy_drop": float(r["fp_accuracy"]) - float(r["accuracy_mean"]),
                     "search_s": float(t.get("search_s", np.nan)), "mapping_s": float(t.get("mapping_s", np.nan)),
                     "total_s": float(t.get("total_s", np.nan)), "rounds": int(r.get("rounds", 0))})
    df = pd.DataFrame(rows)
    order = _order(df["method"], METHOD_ORDER)
    return df.set_index("method").loc[order].reset_index()


def mapping_summary(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Headline numbers per method for :func:`save_summary`: analog layer names and MAC share, accuracy mean,
    std and drop from floating point, rounds and total seconds."""
    results = list(results)
    table = mapping_table(results).set_index("method")
    out = {}
    for r in results:
        row = table.loc[r["method"]]
        out[r["method"]] = {"analog_layers": list(r["analog_layers"]), "analog_mac_share": row["analog_mac_share"],
                            "accuracy_mean": row["accuracy_mean"], "accuracy_std": row["accuracy_std"],
                            "accuracy_drop": row["accuracy_drop"], "rounds": int(row["rounds"]),
                            "total_s": row["total_s"]}
    return out


def layer_matrix(results: Iterable[Mapping[str, Any]], layers: Sequence[str]) -> pd.DataFrame:
    """Layer × method table: 1 where the method put the layer on analog tiles, 0 where it stayed digital."""
    results = list(results)
    order = _order([r["method"] for r in results], METHOD_ORDER)
    by = {r["method"]: set(r["analog_layers"]) for r in results}
    return pd.DataFrame({m: [int(layer in by[m]) for layer in layers] for m in order}, index=list(layers))


def mapping_overview(results: Iterable[Mapping[str, Any]], drop_threshold: float | None = None,
                     title: str = "Analog share and accuracy cost per method") -> tuple[Figure, pd.DataFrame]:
    """Two bar panels per method: share of MACs on analog tiles, and accuracy drop from floating point
    (mean ± std over repetitions); ``drop_threshold`` draws the tolerance."""
    data = mapping_table(results)
    colors = dict(zip(data["method"], sns.color_palette(PALETTE, len(data)), strict=True))
    with style():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.45 * len(data) + 2.2), sharey=True)
        y = np.arange(len(data))
        a1.barh(y, data["analog_mac_share"], color=[colors[m] for m in data["method"]])
        for yi, (v, n) in enumerate(zip(data["analog_mac_share"], data["analog_layers"], strict=True)):
            a1.text(v + 0.01, yi, f"{v:.0%} ({n} layers)", va="center", fontsize=8)
        a1.set_xlim(0, 1.25)
        _percent_axis(a1, "x")
        a1.set_xlabel("MACs on analog tiles (higher = more offloaded)")
        a1.set_yticks(y)
        a1.set_yticklabels(data["method"])
        a1.invert_yaxis()
        a2.barh(y, data["accuracy_drop"], xerr=data["accuracy_std"], color=[colors[m] for m in data["method"]],
                capsize=3, error_kw={"lw": 0.9})
        for yi, (v, s) in enumerate(zip(data["accuracy_drop"], data["accuracy_std"], strict=True)):
            a2.text(max(v, 0) + s + 0.004, yi, f"{v:+.1%}", va="center", fontsize=8)
        if drop_threshold is not None:
            a2.axvline(drop_threshold, color="0.3", ls="--", lw=1, label=f"tolerance {drop_threshold:.0%}")
            a2.legend(loc="lower right", frameon=True)
        a2.axvline(0, color="0.4", lw=0.6)
        a2.set_xlim(min(0.0, data["accuracy_drop"].min() - 0.01), (data["accuracy_drop"] + data["accuracy_std"]).max()
                    * 1.35 + 0.01)
        _percent_axis(a2, "x")
        a2.set_xlabel("accuracy drop from floating point (lower = better)")
        fig.suptitle(title, fontweight="bold")
    return fig, data


def layer_heatmap(results: Iterable[Mapping[str, Any]], layers: Sequence[str],
                  macs: Mapping[str, int] | None = None,
                  title: str = "Which layers each method put on analog tiles") -> tuple[Figure, pd.DataFrame]:
    """Layer × method heat map (analog / digital); with ``macs`` each layer's share of MACs labels its row."""
    mat = layer_matrix(results, layers)
    rows = list(layers)
    if macs:
        total = sum(macs[name] for name in layers)
        rows = [f"{_short(name, 22)}  ({macs[name] / total:.0%})" for name in layers]
    with style():
        fig, ax = plt.subplots(figsize=(1.0 * mat.shape[1] + 3.2, 0.32 * len(layers) + 1.6))
        cmap = matplotlib.colors.ListedColormap(["#e9ecef", "#3a86ff"])
        sns.heatmap(mat.set_axis(rows, axis=0), cmap=cmap, vmin=0, vmax=1, cbar=False, linewidths=0.6,
                    linecolor="white", ax=ax, annot=mat.replace({1: "A", 0: "D"}).to_numpy(), fmt="",
                    annot_kws={"fontsize": 7, "color": "0.25"})
        ax.set_xlabel("method")
        ax.set_ylabel("layer (model order, share of MACs)" if macs else "layer (model order)")
        ax.tick_params(axis="x", rotation=30)
        ax.set_title(title + "\nA = analog, D = digital")
    data = mat.reset_index(names="layer")
    if macs:
        data.insert(1, "macs", [macs[name] for name in layers])
    return fig, data


def recheck_table(checks: Mapping[str, Mapping[str, Any]], test_reps: int | None = None) -> pd.DataFrame:
    """One row per method from :func:`hilal.mapping.recheck` outputs (``{method: check}``): the score the
    search kept the final mapping at, its fresh score with standard error and 95 % interval, the floor,
    the margin and whether it holds, in the kit's method order. With ``test_reps`` (the programmings of the
    search's own evaluation), also ``pass_rate``: the chance that one more such evaluation on fresh
    programmings clears the floor (:func:`hilal.mapping.fresh_pass_rate`)."""
    if not checks:
        raise HilalError("recheck_table needs at least one method's recheck")
    if test_reps is not None:
        from hilal.mapping import fresh_pass_rate
    rows = []
    for method in _order(checks, METHOD_ORDER):
        c = checks[method]
        acc = c.get("accepted")
        rows.append({"method": method, "accepted": np.nan if acc is None else float(acc),
                     "calib_mean": float(c["calib_mean"]), "calib_se": float(c["calib_se"]),
                     "ci_low": float(c["calib_mean"]) - 1.96 * float(c["calib_se"]),
                     "ci_high": float(c["calib_mean"]) + 1.96 * float(c["calib_se"]),
                     "floor": float(c["floor"]), "margin": float(c["margin"]), "holds_floor": bool(c["holds_floor"]),
                     "reps": int(c["reps"]),
                     **({} if test_reps is None else {"pass_rate": fresh_pass_rate(c, test_reps)})})
    return pd.DataFrame(rows)


def recheck_plot(checks: Mapping[str, Mapping[str, Any]],
                 title: str = "Does each mapping hold its tolerance on fresh programmings?",
                 test_reps: int | None = None) -> tuple[Figure, pd.DataFrame]:
    """Per method, the calibration score its search kept the final mapping at (open diamond) and the same
    mapping's score over programmings the search never drew (dot, 95 % interval), against the floor (dashed;
    a tick per row where the floors differ). The data is :func:`recheck_table`'s, ``test_reps`` included."""
    data = recheck_table(checks, test_reps)
    colors = dict(zip(data["method"], sns.color_palette(PALETTE, len(data)), strict=True))
    with style():
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(data) + 1.9))
        y = np.arange(len(data))
        for yi, r in data.iterrows():
            col = colors[r["method"]]
            ax.errorbar(r["calib_mean"], yi, xerr=1.96 * r["calib_se"], fmt="o", color=col, capsize=3, ms=6,
                        label="fresh programmings (95 % interval)" if yi == 0 else None)
            if np.isfinite(r["accepted"]):
                ax.plot(r["accepted"], yi, marker="D", mfc="none", mec=col, ms=7, ls="none",
                        label="score the search kept it at" if yi == data["accepted"].first_valid_index() else None)
            verdict = "holds" if r["holds_floor"] else "below"
            ax.annotate(f"{100 * r['margin']:+.2f} points ({verdict})", (np.nanmax([r["ci_high"], r["accepted"]]), yi),
                        xytext=(10, 0), textcoords="offset points", va="center", fontsize=8)
        if data["floor"].nunique() == 1:
            ax.axvline(data["floor"].iloc[0], color="0.3", ls="--", lw=1, label="floor (tolerance)")
        else:
            ax.plot(data["floor"], y, marker="|", ms=14, color="0.3", ls="none", label="floor (tolerance)")
        lo = min(data["ci_low"].min(), data["floor"].min())
        hi = np.nanmax(data[["ci_high", "accepted", "floor"]].to_numpy(float))
        ax.set_xlim(lo - 0.01, min(hi + 0.3 * (hi - lo) + 0.01, 1.002))
        _percent_axis(ax, "x")
        ax.set_yticks(y)
        ax.set_yticklabels(data["method"])
        ax.invert_yaxis()
        ax.set_xlabel("calibration accuracy at the evaluation time (margin = fresh score - floor)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, frameon=False)
        ax.set_title(title)
    return fig, data


def runtime_bars(results: Iterable[Mapping[str, Any]], reference: str = "lionheart",
                 title: str = "Search and mapping time per method") -> tuple[Figure, pd.DataFrame]:
    """Stacked horizontal bars of search time (curvature, clustering, ordering, rejected retraining rounds)
    and mapping time (retraining rounds that were kept) per method, each labelled with its total, its
    fine-tuning rounds and (for methods that retrain) the speed-up over ``reference``."""
    data = mapping_table(results)[["method", "search_s", "mapping_s", "total_s", "rounds", "analog_layers"]]
    ref = data.loc[data["method"] == reference, "total_s"]
    data["speedup_vs_" + reference] = (float(ref.iloc[0]) / data["total_s"]) if len(ref) else np.nan
    pal = sns.color_palette(PALETTE)
    with style():
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(data) + 1.8))
        y = np.arange(len(data))
        ax.barh(y, data["search_s"], color=pal[0], label="search (curvature, ordering, rejected rounds)")
        ax.barh(y, data["mapping_s"], left=data["search_s"], color=pal[1], label="mapping (kept retraining rounds)")
        top = data["total_s"].max()
        for yi, r in data.iterrows():
            sp = r["speedup_vs_" + reference]
            txt = f"{r['total_s']:.1f} s in all, {int(r['rounds'])} rounds"
            if np.isfinite(sp) and r["method"] != reference and r["rounds"] > 0:  # methods that search
                txt += f"  ({sp:.1f}× vs {reference})"
            ax.text(r["total_s"] + 0.01 * top, yi, txt, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.6)
        ax.set_yticks(y)
        ax.set_yticklabels(data["method"])
        ax.invert_yaxis()
        ax.set_xlabel("wall-clock time (s)")
        ax.legend(loc="lower right", frameon=True)
        ax.set_title(title)
    return fig, data


def speedup(results: Iterable[Mapping[str, Any]], method: str = "hilal", reference: str = "lionheart") -> float:
    """Total time of ``reference`` divided by total time of ``method``."""
    by = {r["method"]: r for r in results}
    for m in (method, reference):
        if m not in by:
            raise HilalError(f"no result for method {m!r}; have {', '.join(by)}")
    return float(by[reference]["timings"]["total_s"]) / float(by[method]["timings"]["total_s"])


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


# ---------------------------------------------------------------- transformers (08)

_BLOCK = re.compile(r"^(?P<pre>.*?)(?:blocks|layers|layer|encoder_layer|h)[._](?P<idx>\d+)\.(?P<proj>.+)$")
# readable names of the projections inside a block (ViT, transformers' ViT and MobileBERT, torchvision ViT), in order
_PROJ_SHORT = ((r"\.dense$", ""), (r"^attention\.self\.", ""), (r"^attention\.attention\.", ""),
               (r"^attention\.(q|k|v)_proj$", r"\1"), (r"^attention\.o_proj$", "out"), (r"^mlp\.(fc\d)$", r"\1"),
               (r"^attn\.", ""), (r"^self_attention\.", ""),
               (r"^attention\.output$", "attn.out"), (r"^bottleneck\.input$", "bn.in"),
               (r"^bottleneck\.attention$", "bn.attn"), (r"^output\.bottleneck$", "out.bn"),
               (r"intermediate", "inter"), (r"^ffn\.(\d+)\.", r"ffn\1."), (r"^query$", "q"), (r"^key$", "k"),
               (r"^value$", "v"), (r"^out_proj$", "out"), (r"^mlp\.(\d+)$", r"mlp\1"))


def projection_groups(layers: Sequence[str]) -> pd.DataFrame:
    """Block and projection type of each transformer layer name (model order kept).

    Layers inside a numbered block (``blocks.0.attn.q``, ``encoder.layer.1.attention.self.query``,
    ``encoder_layer_3.mlp.0``) get ``block`` = "block N" and a short projection name (q, k, v, out, fc1,
    attn.out, inter, ffn0.inter, bn.in, ...); layers before the first block are the "embedding" group, those
    after the last one the "head" group (projection = the last part of their name)."""
    rows, seen_block = [], False
    for name in layers:
        m = _BLOCK.match(name)
        if m:
            seen_block, proj = True, m["proj"]
            for pat, rep in _PROJ_SHORT:
                proj = re.sub(pat, rep, proj)
            rows.append({"layer": name, "block": f"block {int(m['idx'])}", "projection": proj})
        else:
            rows.append({"layer": name, "block": "head" if seen_block else "embedding",
                         "projection": name.split(".")[-1]})
    return pd.DataFrame(rows)


def transformer_layers(clustered: Mapping[str, pd.DataFrame], columns: Sequence[str] = ("eli", "concentration"),
                       title: str = "Curvature of every projection, block by block") -> tuple[Figure, pd.DataFrame]:
    """Per-layer bars of ``columns`` for one or more transformers (``{label: cluster_layers(...) frame}``),
    one row of panels per model and column, layers in model order grouped by block (shaded bands, block
    names on top) and labelled by projection type, bars coloured by robust/sensitive cluster."""
    from matplotlib.patches import Patch

    frames = []
    for label, df in clustered.items():
        g = projection_groups(df["layer"].tolist())
        part = df[["layer", *columns, *(["cluster"] if "cluster" in df else [])]].merge(g, on="layer", how="left")
        frames.append(part.assign(model=label))
    data = pd.concat(frames, ignore_index=True)
    data = data[["model", "layer", "block", "projection", *[c for c in data if c not in
                                                             ("model", "layer", "block", "projection")]]]
    labels = list(clustered)
    width = max(len(clustered[m]) for m in labels)
    with style():
        fig, axes = plt.subplots(len(labels) * len(columns), 1, squeeze=False,
                                 figsize=(max(7.0, 0.34 * width + 2.5), 1.75 * len(labels) * len(columns) + 1.2))
        for i, label in enumerate(labels):
            sub = data[data["model"] == label].reset_index(drop=True)
            x = np.arange(len(sub))
            colors = [CLUSTER_COLORS.get(c, "0.5") for c in sub.get("cluster", ["?"] * len(sub))]
            spans = sub.groupby("block", sort=False).indices
            for j, c in enumerate(columns):
                ax = axes[i * len(columns) + j][0]
                ax.bar(x, sub[c], color=colors, width=0.75)
                for k, (block, idx) in enumerate(spans.items()):
                    if k % 2:
                        ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color="0.93", zorder=0, lw=0)
                    if j == 0:
                        ax.text((idx.min() + idx.max()) / 2, 1.02, block, transform=ax.get_xaxis_transform(),
                                ha="center", va="bottom", fontsize=8, color="0.3")
                _scale_for(ax, "y", sub[c])
                ax.axhline(0, color="0.4", lw=0.6)
                ax.set_xlim(-0.6, len(sub) - 0.4)
                ax.set_ylabel(METRIC_LABELS.get(c, c).split(" (")[0].replace(" ", "\n", 1), fontsize=8)
                ax.set_xticks(x)
                ax.set_xticklabels(sub["projection"] if j == len(columns) - 1 else [], rotation=60, ha="right",
                                   fontsize=7.5)
                ax.grid(axis="x", visible=False)
                if j == 0:
                    ax.set_title(label, loc="left", pad=14)
        handles = [Patch(color=v, label=k) for k, v in CLUSTER_COLORS.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        fig.suptitle(title, fontweight="bold")
    return fig, data


def transformer_mapping(table: pd.DataFrame, title: str = "Mapping transformers: analog share, score, time"
                        ) -> tuple[Figure, pd.DataFrame]:
    """Three panels of grouped bars (one group per model, one bar per method): share of MACs on analog
    tiles, score (mean ± std over programmings, floating-point score as a black tick) and total mapping
    time. ``table`` holds :func:`mapping_table` rows plus a ``model`` column."""
    data = table[["model", "method", "analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy", "total_s",
                  "rounds", "analog_layers"]].copy()
    models = list(dict.fromkeys(data["model"]))
    methods = _order(data["method"], METHOD_ORDER)
    colors = dict(zip(methods, sns.color_palette(PALETTE, len(methods)), strict=True))
    w = 0.8 / len(methods)
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(4.0 * 3, 3.9))
        for k, method in enumerate(methods):
            sub = data[data["method"] == method].set_index("model").reindex(models)
            x = np.arange(len(models)) + (k - (len(methods) - 1) / 2) * w
            axes[0].bar(x, sub["analog_mac_share"], w, color=colors[method], label=method)
            axes[1].bar(x, sub["accuracy_mean"], w, yerr=sub["accuracy_std"], color=colors[method], capsize=3,
                        error_kw={"lw": 0.9})
            axes[2].bar(x, sub["total_s"], w, color=colors[method])
            for xi, r in zip(x, sub.itertuples(), strict=True):
                axes[0].text(xi, r.analog_mac_share + 0.02, f"{r.analog_mac_share:.0%}\n{int(r.analog_layers)} L",
                             ha="center", va="bottom", fontsize=7.5)
                axes[1].text(xi, r.accuracy_mean + r.accuracy_std + 0.02, f"{r.accuracy_mean:.2f}", ha="center",
                             va="bottom", fontsize=7.5)
                axes[2].text(xi, r.total_s * 1.15, f"{r.total_s:.0f} s\n{int(r.rounds)} rnd", ha="center",
                             va="bottom", fontsize=7.5)
        fp = data.groupby("model", sort=False)["fp_accuracy"].first().reindex(models)
        for i, v in enumerate(fp):
            axes[1].plot([i - 0.45, i + 0.45], [v, v], color="black", lw=1.6, ls="--",
                         label="floating point" if i == 0 else None)
        axes[0].set_ylim(0, 1.3)
        _percent_axis(axes[0])
        axes[0].set_ylabel("MACs on analog tiles")
        axes[1].set_ylim(0, min(1.3, max(1.0, float((data["accuracy_mean"] + data["accuracy_std"]).max())) + 0.2))
        axes[1].set_ylabel("test score (accuracy or F1)")
        axes[2].set_yscale("log")
        axes[2].set_ylim(data["total_s"].min() / 2, data["total_s"].max() * 4)
        axes[2].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[2].set_ylabel("total mapping time (s, log scale)")
        for ax, t in zip(axes, ("analog share (L = layers)", "score after mapping", "time (rnd = retraining rounds)"),
                         strict=True):
            ax.set_xticks(np.arange(len(models)))
            ax.set_xticklabels(models, fontsize=8.5)
            ax.grid(axis="x", visible=False)
            ax.set_title(t)
        handles, labs = axes[0].get_legend_handles_labels()
        h1, l1 = axes[1].get_legend_handles_labels()
        fig.legend(handles + h1, labs + l1, loc="outside lower center", ncol=len(methods) + 1, frameon=False)
        fig.suptitle(title, fontweight="bold")
    return fig, data
