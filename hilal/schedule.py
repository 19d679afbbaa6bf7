"""``hilal reproduce --workers N``: the notebooks of a profile executed N at a time, each by papermill in a
process of its own (:func:`hilal.reproduce.reproduce` for that one notebook), a notebook starting only once
the notebooks it reads results from have finished (:data:`DEPENDS`), and kernel starts spaced by ``stagger``
seconds. Why processes: papermill drives one kernel at a time per call, and ``reproduce`` sets its kernels'
environment in its own process."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from hilal.paths import data_dir, project_root
from hilal.registry import HilalError, is_count
from hilal.reproduce import ReproduceError, load_profile, plan, reproduce

DEPENDS: dict[str, tuple[str, ...]] = {"04": ("03",), "06": ("05",), "07": ("05",)}
"""Notebook -> the notebooks whose stored results it reuses (03's layer metrics for 04, 05's mappings for 06 and
07): when both are selected, it starts after them."""


def _one(profile: str | Path, key: str, run_dir: str, figures: str | None, notebooks: str | None,
         threads: int | None, overrides: Mapping[str, Any] | None, kernel_name: str) -> list[dict[str, Any]]:
    """One notebook through :func:`reproduce` (in a worker process); its row of the table, failed or not."""
    try:
        table = reproduce(profile, only=key, out_dir=run_dir, figures=figures, kernel_name=kernel_name,
                          overrides=overrides, progress=False, notebooks=notebooks, threads=threads)
    except ReproduceError as e:
        table = e.table
    return table.to_dict(orient="records")


def reproduce_parallel(profile: str | Path = "smoke", workers: int = 2,
                       only: str | int | Iterable[str | int] | None = None, stagger: float = 5.0,
                       out_dir: str | Path | None = None, figures: str | Path | None = None,
                       notebooks: str | Path | None = None, threads: int | None = None,
                       overrides: Mapping[str, Any] | None = None, kernel_name: str = "python3",
                       depends: Mapping[str, Iterable[str]] | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`hilal.reproduce.reproduce` with up to ``workers`` notebooks at a time: the same arguments, table,
    provenance and errors (a :class:`~hilal.reproduce.ReproduceError` after every notebook ran when one
    failed), plus ``started``/``finished`` offsets in seconds. ``depends`` (default :data:`DEPENDS`) holds
    notebooks back until those they read have finished; ``stagger``: seconds between two kernel starts (kernels
    starting together compete for the CPU while they import torch)."""
    if not is_count(workers):
        raise HilalError(f"workers must be a positive integer (notebooks executed at a time); got {workers!r}")
    if not isinstance(stagger, (int, float)) or stagger < 0:
        raise HilalError(f"stagger must be a number of seconds >= 0; got {stagger!r}")
    if threads is not None and not is_count(threads):
        raise HilalError(f"threads must be a positive integer (torch threads per notebook kernel); got {threads!r}")
    prof = load_profile(profile)
    todo = list(plan(prof, only, folder=notebooks, overrides=overrides))  # every parameter checked first
    deps = {k: [d for d in (depends if depends is not None else DEPENDS).get(k, ()) if d in todo] for k in todo}
    home = data_dir() if prof.get("dryrun") else project_root()
    run_dir = Path(out_dir) if out_dir else home / "runs" / f"{prof['name']}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    args = (prof["path"], str(run_dir), str(figures) if figures else None, str(notebooks) if notebooks else None,
            threads, dict(overrides) if overrides else None, kernel_name)
    rows: dict[str, dict[str, Any]] = {}
    running: dict[Future, tuple[str, float]] = {}
    t0, last_start = time.perf_counter(), -float("inf")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while len(rows) < len(todo):
            ready = [k for k in todo if k not in rows and k not in {v[0] for v in running.values()}
                     and all(d in rows for d in deps[k])]
            while ready and len(running) < workers:
                time.sleep(max(0.0, last_start + stagger - time.perf_counter()))
                key = ready.pop(0)
                last_start = time.perf_counter()
                running[pool.submit(_one, args[0], key, *args[1:])] = (key, last_start - t0)
                if progress:
                    print(f"[reproduce] {key} started ({len(running)} running, {len(rows)}/{len(todo)} done)",
                          flush=True)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                key, started = running.pop(fut)
                try:
                    row = fut.result()[0]
                except Exception as e:  # noqa: BLE001 - a crashed worker process: recorded as a failure
                    row = {"notebook": key, "name": key, "status": "failed", "seconds": float("nan"), "output": "",
                           "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
                rows[key] = {**row, "started": round(started, 1), "finished": round(time.perf_counter() - t0, 1)}
                if progress:
                    print(f"[reproduce] {key}: {row['status']} in {row['seconds']} s", flush=True)
    table = pd.DataFrame([rows[k] for k in todo])
    table.to_csv(run_dir / "reproduce.csv", index=False)
    if progress:
        print(table[["notebook", "name", "status", "seconds", "started", "finished"]].to_string(index=False),
              flush=True)
    failed = table[table["status"] != "ok"]
    if len(failed):
        raise ReproduceError(f"{len(failed)} notebook(s) failed: " + "; ".join(
            f"{r.name}: {r.error}" for r in failed.itertuples()) + f" (executed notebooks in {run_dir})", table)
    return table
