"""Result tables of finished benchmarks: the summary :func:`table` of each kind, the search criteria over
mapping seeds (:func:`search_criteria`), reading result files and writing markdown pipe tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hilal.bench.config import KINDS
from hilal.bench.hessian import agreement
from hilal.registry import HilalError, check_choice


def table(kind: str, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The summary table of a benchmark's records (what is printed and shown in the README)."""
    check_choice("kind", kind, (*KINDS, "sweep"))
    if kind == "sweep":  # bench/sweep.py: one grid on 1 worker against N
        return pd.DataFrame(records, columns=["grid", "runs", "workers", "gpus", "repeats", "wall_s", "runs_s",
                                              "speedup", "same_rows"])
    if kind == "hessian":
        cols = ["model", "layers", "curvature", "hvps_joint", "hvps_per_layer", "joint_s", "per_layer_s", "speedup",
                "output_hvp_cost_ratio", "max_rel_diff", "max_z_trace", "max_z_eli", "se_ratio_trace", "se_ratio_eli",
                "equal_error_speedup"]
        passes = ["pass_loop_s", "pass_sampled_s", "pass_batched_s", "pass_speedup", "eli_share_loop",
                  "eli_share_sampled", "eli_share_batched", "eli_draws_loop", "eli_draws_sampled",
                  "eli_draws_batched", "pass_max_z_eli"]
        cols += [c for c in passes if any(c in r for r in records)]
        return pd.DataFrame([r if "equal_error_speedup" in r or "estimates" not in r else agreement(dict(r))
                             for r in records], columns=cols)
    if kind == "analog":
        cols = ["model", "layers", "batch", "digital_s", "analog_s", "overhead", "digital_eval_s", "drift_eval_s",
                "drift_eval_overhead"]
        engines = ["eval_loop_s", "eval_batched_s", "eval_speedup", "cifar_eval_loop_s", "cifar_eval_batched_s",
                   "cifar_eval_speedup"]
        return pd.DataFrame(records, columns=cols + [c for c in engines if any(c in r for r in records)])
    if kind == "frontier":
        return frontier_table(records)
    rows = []
    for r in records:
        for method in ("hilal", "lionheart"):
            d = r[method]
            rows.append({"model": r["model"], "seed": r.get("mapping_seed", 0), "method": method,
                         "search_s": d["timings"]["search_s"],
                         "mapping_s": d["timings"]["mapping_s"], "total_s": d["timings"]["total_s"],
                         "rounds": d["rounds"], "analog_layers": f"{len(d['analog_layers'])}/{d['n_layers']}",
                         "analog_mac_share": d["analog_mac_share"], "accuracy_mean": d["accuracy_mean"],
                         "accuracy_std": d["accuracy_std"], "fp_accuracy": d["fp_accuracy"],
                         "floor_margin": d.get("recheck", {}).get("margin", np.nan),
                         "speedup": r["speedup"] if method == "hilal" else 1.0,
                         **{k: d["hardware"][k] for k in HARDWARE if "hardware" in d}})
    df = pd.DataFrame(rows)
    if df["seed"].nunique() > 1:  # the median over mapping seeds, per model and method
        num = ["search_s", "mapping_s", "total_s", "rounds", "analog_mac_share", "accuracy_mean", "accuracy_std",
               "fp_accuracy", "floor_margin", "speedup"]
        med = df.groupby(["model", "method"], sort=False)[num].median().reset_index()
        df = pd.concat([df, med.assign(seed="median", analog_layers="")], ignore_index=True)[df.columns]
    return df


HARDWARE = ("analog_tiles", "energy_uj", "energy_gain", "latency_us", "latency_gain")
"""The hardware record's columns (:func:`hilal.hardware.mapping_cost`) the search and frontier tables show; a
search record from before the record existed shows none."""


def frontier_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per frontier point and per LionHeart mapping of ``frontier`` records: model, seed, kind (all-digital,
    hilal, all-analog, lionheart), analog layers, test accuracy and its drop from floating point, the hardware
    columns, and whether the point beats LionHeart (less energy at no larger drop)."""
    rows = []
    for r in records:
        lh = r["lionheart"]
        lh_drop = lh["fp_accuracy"] - lh["accuracy_mean"]
        for p in [*r["frontier"], {"kind": "lionheart", "n_analog": len(lh["analog_layers"]),
                                   "accuracy_mean": lh["accuracy_mean"], "accuracy_drop": lh_drop,
                                   **lh["hardware"]}]:
            rows.append({"model": r["model"], "seed": r.get("mapping_seed", 0), "kind": p["kind"],
                         "analog_layers": p["n_analog"], "accuracy_mean": p["accuracy_mean"],
                         "accuracy_drop": p["accuracy_drop"], **{k: p[k] for k in HARDWARE},
                         "beats_lionheart": p["kind"] == "hilal" and p["energy_uj"] < lh["hardware"]["energy_uj"]
                         and p["accuracy_drop"] <= lh_drop + 1e-12})
    return pd.DataFrame(rows)


TARGET_SPEEDUP = 5.0
"""The speed-up HILAL's total time should reach against LionHeart's (issue target, ``search_criteria``)."""


def search_criteria(records: Sequence[dict[str, Any]], target: float = TARGET_SPEEDUP) -> pd.DataFrame:
    """Per model, over its mapping seeds: how often HILAL meets each criterion against LionHeart, and the
    medians behind them. ``speedup`` (median, with ``speedup_min``/``speedup_max``) and ``fast_seeds``, the
    seeds at ``target`` or more; ``share_*`` the analog MAC shares and ``share_seeds`` the seeds where
    HILAL's is at least as high; ``acc_*`` the test accuracies and ``acc_seeds`` the seeds where HILAL's is
    at least as high (both start from the same digital model, so its drop is no larger); ``holds_*`` the
    seeds whose final mapping holds its floor on fresh programmings, ``margin_*`` the median margins
    (fractions) and ``pass_*`` the median chance that one more run of the search's acceptance test, on
    fresh programmings, passes the final mapping (:func:`hilal.mapping.fresh_pass_rate`; the last three NaN
    without a recheck); ``all_seeds`` the seeds that meet the first three at once."""
    from hilal.mapping import fresh_pass_rate  # local: the report loads hilal.bench without the kit

    if not records:
        raise HilalError("no search records to summarize")
    rows = []
    for r in records:
        h, lh = r["hilal"], r["lionheart"]
        rows.append({"model": r["model"], "seed": int(r.get("mapping_seed", 0)), "speedup": r["speedup"],
                     **{f"{k}_{m}": d[f] for m, d in (("hilal", h), ("lionheart", lh))
                        for k, f in (("share", "analog_mac_share"), ("acc", "accuracy_mean"))},
                     **{f"{k}_{m}": d.get("recheck", {}).get(f, np.nan) for m, d in (("hilal", h), ("lionheart", lh))
                        for k, f in (("holds", "holds_floor"), ("margin", "margin"))},
                     **{f"pass_{m}": fresh_pass_rate(d["recheck"], r["config"]["reps"]) if "recheck" in d else np.nan
                        for m, d in (("hilal", h), ("lionheart", lh))}})
    df = pd.DataFrame(rows)
    dup = df[df.duplicated(["model", "seed"])]
    if len(dup):
        raise HilalError(f"{dup['model'].iat[0]} mapping seed {dup['seed'].iat[0]} appears twice; pass each "
                         "seed's record once")
    df["fast"] = df["speedup"] >= target
    df["share"] = df["share_hilal"] >= df["share_lionheart"] - 1e-12  # one set of layers: the same float
    df["acc"] = df["acc_hilal"] >= df["acc_lionheart"]
    df["all"] = df["fast"] & df["share"] & df["acc"]

    def count(x: pd.Series) -> float:  # NaN when a record has no recheck
        return int(x.astype(float).sum()) if x.notna().all() else np.nan

    return df.groupby("model", sort=False).agg(
        seeds=("seed", "size"), speedup=("speedup", "median"), speedup_min=("speedup", "min"),
        speedup_max=("speedup", "max"), fast_seeds=("fast", "sum"), share_hilal=("share_hilal", "median"),
        share_lionheart=("share_lionheart", "median"), share_seeds=("share", "sum"),
        acc_hilal=("acc_hilal", "median"), acc_lionheart=("acc_lionheart", "median"), acc_seeds=("acc", "sum"),
        all_seeds=("all", "sum"), holds_hilal=("holds_hilal", count), holds_lionheart=("holds_lionheart", count),
        margin_hilal=("margin_hilal", "median"), margin_lionheart=("margin_lionheart", "median"),
        pass_hilal=("pass_hilal", "median"), pass_lionheart=("pass_lionheart", "median")).reset_index()


def load_bench(path: str | Path) -> dict[str, Any]:
    """A JSON file written by :func:`run_bench` (missing or unreadable files get a one-line error)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise HilalError(f"no benchmark file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HilalError(f"{str(path)!r} is not a benchmark JSON file ({e})") from None
    if not isinstance(data, dict) or "records" not in data:
        raise HilalError(f"{str(path)!r} is not a benchmark JSON file (no records)")
    return data


def search_records(paths: Sequence[str | Path], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of one or more JSON files written by the ``search`` benchmark, in order; a file left by an
    interrupted run (``complete`` false) is read too, with a line in ``notes``."""
    records: list[dict[str, Any]] = []
    for p in paths:
        path, data = Path(p), load_bench(p)
        if data.get("kind") != "search":
            raise HilalError(f"{str(path)!r} holds a {data.get('kind')!r} benchmark; the criteria need 'search' files")
        if not data.get("complete", True) and notes is not None:
            notes.append(f"{path} is from an interrupted run: {len(data['records'])} record(s)")
        records += data["records"]
    return records


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table of ``df`` for the README (floats to ``digits`` significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown_from_json(path: str | Path) -> str:
    """The README table of a JSON file written by :func:`run_bench`."""
    data = load_bench(path)
    return markdown(table(data["kind"], data["records"]))
