"""What a sweep's table says: per-model medians over seeds per method (:func:`medians`), the criteria counts of
HILAL against LionHeart that the README's seed tables show (:func:`criteria`, through
:func:`hilal.bench.search_criteria`), and the same records as a ``search`` benchmark file
(:func:`bench_json`), so that ``python -m hilal.bench.report`` regenerates the docs' tables from a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from hilal.paths import atomic_json_dump
from hilal.registry import HilalError

GROUP = ["dataset", "preset", "train_seed", "settings"]
"""The columns that make one comparison: runs differing only in model, method and mapping seed."""
MEDIANS = ["analog_mac_share", "accuracy_mean", "fp_accuracy", "total_s", "search_s", "rounds"]


def varied(settings: pd.Series) -> pd.Series:
    """Each row's settings (JSON text) cut to the ones that differ between rows, as ``key=value`` text (``-``
    when none differ): what tells the comparisons of a sweep apart, short enough for a printed table."""
    parsed = [json.loads(v) for v in settings]
    keys = sorted({k for d in parsed for k in d if len({json.dumps(x.get(k), sort_keys=True) for x in parsed}) > 1})
    return pd.Series([", ".join(f"{k}={json.dumps(d.get(k))}" for k in keys) or "-" for d in parsed],
                     index=settings.index)


def _decoded(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["record"] = [json.loads(v) if isinstance(v, str) else v for v in df["record"]]
    return df


def medians(df: pd.DataFrame) -> pd.DataFrame:
    """Per comparison (:data:`GROUP`), model and method: how many mapping seeds finished and the medians over
    them of the analog MAC share, accuracy, times and retraining rounds."""
    if df.empty:
        raise HilalError("the sweep's table is empty; run the sweep first")
    keys = [*GROUP, "model", "method"]
    out = df.groupby(keys, sort=False)[MEDIANS].median().reset_index()
    out.insert(len(keys), "seeds", df.groupby(keys, sort=False).size().to_numpy())
    return out


def search_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The runs of ``df`` as ``search`` benchmark records (:func:`hilal.bench.bench_search`'s shape): one per
    model, comparison and mapping seed where both HILAL and LionHeart finished, with the speed-up of the total
    time."""
    recs = []
    df = _decoded(df)
    for key, g in df.groupby([*GROUP, "model", "mapping_seed"], sort=False):
        by = {m: r for m, r in zip(g["method"], g["record"], strict=True)}
        if not {"hilal", "lionheart"} <= set(by):
            continue
        dataset, preset, train_seed, settings, model, seed = key
        h, lh = by["hilal"], by["lionheart"]
        recs.append({"model": model, "dataset": dataset, "preset": preset, "train_seed": int(train_seed),
                     "mapping_seed": int(seed),
                     "config": {**json.loads(settings), "preset": preset, "seed": int(seed), "reps": h["reps"]},
                     "hilal": h, "lionheart": lh, "speedup": lh["timings"]["total_s"] / h["timings"]["total_s"]})
    return recs


def criteria(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`hilal.bench.search_criteria` per comparison (:data:`GROUP`): per model, how many mapping seeds
    meet each criterion of HILAL against LionHeart, and the medians behind them."""
    from hilal.bench import search_criteria

    recs = search_records(df)
    if not recs:
        raise HilalError("the sweep has no mapping seed where both hilal and lionheart finished; the criteria "
                         "compare the two")
    parts = []
    for key, group in pd.DataFrame({"i": range(len(recs)), **{k: [_group_value(r, k) for r in recs]
                                                                for k in GROUP}}).groupby(GROUP, sort=False):
        table = search_criteria([recs[i] for i in group["i"]])
        for k, v in zip(GROUP, key, strict=True):
            table.insert(GROUP.index(k), k, v)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def _group_value(rec: dict[str, Any], key: str) -> Any:
    if key == "settings":
        return json.dumps({k: v for k, v in rec["config"].items() if k not in ("preset", "seed", "reps")},
                          sort_keys=True)
    return rec[key]


def bench_json(df: pd.DataFrame, path: str | Path, notes: list[str] | None = None) -> Path:
    """Write the sweep's HILAL-against-LionHeart records as a ``search`` benchmark file (what
    ``hilal bench search`` writes), for the tables of ``python -m hilal.bench.report``."""
    recs = search_records(df)
    if not recs:
        raise HilalError("the sweep has no mapping seed where both hilal and lionheart finished")
    machines = sorted({m for m in df["machine"]}) if "machine" in df else []
    return atomic_json_dump({"kind": "search", "complete": True, "source": "hilal sweep",
                             "notes": list(notes or []), "machines": [json.loads(m) for m in machines],
                             "records": recs}, path)
