"""A sweep's results on disk: one Parquet file per finished run under ``<sweep>/table/`` (together one
Parquet dataset, read as one tidy table), one JSON file per failed attempt under ``<sweep>/errors/``.

Each row is written atomically (a temporary file, then a rename) and named by its run's id, so a run done
twice (a worker killed after writing, a task rescheduled) still leaves exactly one row, and an interrupted
sweep never leaves half a row. Why one file per run: a shared file would need a lock across machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from hilal.paths import _atomic, atomic_json_dump
from hilal.registry import HilalError

TABLE = "table"
ERRORS = "errors"
RECORD_COLUMNS = ("record", "settings", "machine")
"""Columns holding JSON text (nested records); :func:`read_table` can decode them."""


def row_path(folder: str | Path, run_id: str) -> Path:
    return Path(folder) / TABLE / f"{run_id}.parquet"


def write_row(folder: str | Path, row: dict[str, Any]) -> Path:
    """Write one run's row (a flat dict; nested values as JSON text) atomically as ``table/<run_id>.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([row])
    return _atomic(row_path(folder, row["run_id"]), lambda tmp: pq.write_table(table, tmp))


def finished(folder: str | Path) -> set[str]:
    """The ids of the runs with a row."""
    return {p.stem for p in (Path(folder) / TABLE).glob("*.parquet")}


def read_table(folder: str | Path, decode: bool = False) -> pd.DataFrame:
    """The sweep's table: one row per finished run (empty when none). ``decode``: the JSON columns
    (:data:`RECORD_COLUMNS`) as Python objects."""
    files = sorted((Path(folder) / TABLE).glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if decode:
        for c in RECORD_COLUMNS:
            if c in df:
                df[c] = [json.loads(v) if isinstance(v, str) else v for v in df[c]]
    return df


def write_error(folder: str | Path, run_id: str, attempt: int, error: str, info: dict[str, Any]) -> Path:
    """Record a failed attempt of a run (``errors/<run_id>-<attempt>.json``)."""
    return atomic_json_dump({"run_id": run_id, "attempt": attempt, "error": error, **info},
                            Path(folder) / ERRORS / f"{run_id}-{attempt}.json")


def read_errors(folder: str | Path) -> pd.DataFrame:
    """Every recorded failed attempt: run_id, attempt, error and the run's settings."""
    rows = []
    for p in sorted((Path(folder) / ERRORS).glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return pd.DataFrame(rows)


def require_table(folder: str | Path) -> pd.DataFrame:
    """:func:`read_table` (decoded), or a one-line error when the sweep has no finished run."""
    df = read_table(folder, decode=True)
    if df.empty:
        raise HilalError(f"no finished runs under {str(Path(folder) / TABLE)!r}; run the sweep first")
    return df
