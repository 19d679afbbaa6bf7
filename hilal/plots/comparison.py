"""Mapping comparison figures and tables (notebooks 05, 06): analog share and accuracy cost per method, which
layers each put on analog tiles, the recheck on fresh programmings, and search and mapping time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from hilal.mapping import fresh_pass_rate
from hilal.plots.base import METHOD_ORDER, PALETTE, _order, _percent_axis, _short, style
from hilal.registry import HilalError

# ---------------------------------------------------------------- mapping comparison (05, 06)

HARDWARE_COLUMNS = ("analog_tiles", "energy_uj", "energy_gain", "latency_us", "latency_gain")
"""The :func:`hilal.hardware.mapping_cost` fields the mapping tables show."""


def mapping_table(results: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per mapping result (``MappingResult.to_dict()`` form): method, analog layers and MAC share,
    accuracy mean/std, drop from floating point, timings, and the hardware cost (:data:`HARDWARE_COLUMNS`; NaN
    for a record without one)."""
    rows = []
    for r in results:
        t, hw = r.get("timings", {}), r.get("hardware") or {}
        rows.append({"method": r["method"], "analog_layers": len(r["analog_layers"]),
                     "analog_mac_share": float(r["analog_mac_share"]), "accuracy_mean": float(r["accuracy_mean"]),
                     "accuracy_std": float(r["accuracy_std"]), "fp_accuracy": float(r["fp_accuracy"]),
                     "accuracy_drop": float(r["fp_accuracy"]) - float(r["accuracy_mean"]),
                     "search_s": float(t.get("search_s", np.nan)), "mapping_s": float(t.get("mapping_s", np.nan)),
                     "total_s": float(t.get("total_s", np.nan)), "rounds": int(r.get("rounds", 0)),
                     **{k: float(hw[k]) if hw.get(k) is not None else np.nan for k in HARDWARE_COLUMNS}})
    df = pd.DataFrame(rows)
    order = _order(df["method"], METHOD_ORDER)
    return df.set_index("method").loc[order].reset_index()


def mapping_summary(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Headline numbers per method for :func:`save_summary`: analog layer names and MAC share, accuracy mean,
    std and drop from floating point, rounds, total seconds and the hardware cost (None without a record)."""
    results = list(results)
    table = mapping_table(results).set_index("method")
    out = {}
    for r in results:
        row = table.loc[r["method"]]
        out[r["method"]] = {"analog_layers": list(r["analog_layers"]), "analog_mac_share": row["analog_mac_share"],
                            "accuracy_mean": row["accuracy_mean"], "accuracy_std": row["accuracy_std"],
                            "accuracy_drop": row["accuracy_drop"], "rounds": int(row["rounds"]),
                            "total_s": row["total_s"],
                            **{k: None if pd.isna(row[k]) else row[k] for k in HARDWARE_COLUMNS}}
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
