"""Run a sweep on Dask (:func:`run`): skip the runs that have a row, train each digital checkpoint once, map
every other run as one task, retry failed ones, and show runs done / running / failed with an ETA.

A worker killed mid-task is Dask's to handle (the scheduler gives the task to another worker); a run's row is
named by its id, so it is written once however often the run executes. Ctrl-C cancels what is pending and
keeps every row already written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm.auto import tqdm

from hilal.paths import atomic_write_text
from hilal.sweep.cluster import check_submit, connect
from hilal.sweep.grid import Grid, Run, load_grid
from hilal.sweep.store import finished, read_errors, read_table
from hilal.sweep.tasks import WorkerSetup, map_run, train_checkpoint


def run(grid: Grid | str | Path | Mapping[str, Any], client: Any = None, scheduler: str | None = None,
        cluster: str | None = None, progress: bool = True, **overrides: Any) -> pd.DataFrame:
    """Execute every run of ``grid`` (a :class:`Grid`, a YAML path or a mapping; ``overrides`` such as
    ``workers`` or ``out`` go on top) that has no row yet in the sweep's folder, and return the sweep's table
    (:func:`hilal.sweep.read_table`). ``client``: a Dask client to use as it is; else one for ``scheduler``
    (an address) or for a new cluster of kind ``cluster`` (default: the grid's, a LocalCluster). Failed runs
    are tried ``grid.retries`` more times; those that still fail are left out of the table, their errors in
    :func:`hilal.sweep.read_errors`."""
    grid = grid if isinstance(grid, Grid) else load_grid(grid, **overrides)
    if client is None and scheduler is None:
        check_submit(grid, cluster)
    folder = grid.folder()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml.safe_dump(_as_yaml(grid), sort_keys=False), folder / "grid.yaml")
    runs = grid.runs()
    done = finished(folder)
    todo = [r for r in runs if r.run_id not in done]
    if progress:
        print(f"[sweep] {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} finished before, {len(todo)} to run "
              f"-> {folder}", flush=True)
    if todo:
        close = None
        if client is None:
            client, close = connect(grid, scheduler, cluster)
        try:
            _execute(client, grid, todo, folder, progress)
        finally:
            if close is not None:
                close()
    return read_table(folder)


def _as_yaml(grid: Grid) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(grid)


def _execute(client: Any, grid: Grid, todo: list[Run], folder: Path, progress: bool) -> None:
    ckpts: dict[tuple[Any, ...], Any] = {}
    client.register_plugin(WorkerSetup(grid.threads))  # workers present now and any that start later

    def checkpoint(run: Run) -> Any:
        key = run.checkpoint
        if key not in ckpts or ckpts[key].status in ("error", "cancelled", "lost"):
            model, dataset, seed, epochs = key
            ckpts[key] = client.submit(train_checkpoint, model, dataset, seed, epochs, grid.threads, pure=False,
                                       key=f"train-{model}-{dataset}-{seed}-{epochs}-{time.time_ns()}")
        return ckpts[key]

    def submit(run: Run, attempt: int) -> Any:
        return client.submit(map_run, run, str(folder), grid.threads, attempt, checkpoint(run), pure=False,
                             key=f"map-{run.run_id}-{attempt}")

    pending = {submit(r, 1): (r, 1) for r in todo}
    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc=f"sweep {grid.name}", unit="run", disable=not progress)
    shown: tuple[int, int] = (-1, -1)
    try:
        while pending:
            for fut in [f for f in pending if f.status != "pending"]:
                run, attempt = pending.pop(fut)
                if fut.status == "finished":
                    bar.update(1)
                    continue
                error = _error_of(fut)
                if attempt <= grid.retries:
                    pending[submit(run, attempt + 1)] = (run, attempt + 1)
                else:
                    failed[run.run_id] = error
                    bar.update(1)
            state = (_running(client) if progress else 0, len(failed))
            if state != shown:  # runs done, running and failed, with tqdm's ETA
                bar.set_postfix(running=state[0], failed=state[1], refresh=True)
                shown = state
            if pending:
                time.sleep(0.25)
    except KeyboardInterrupt:
        for fut in pending:
            fut.cancel()
        bar.close()
        print(f"[sweep] interrupted: {len(finished(folder))} finished run(s) kept in {folder}", flush=True)
        raise
    bar.close()
    if progress and failed:
        print(f"[sweep] {len(failed)} run(s) failed after {grid.retries + 1} attempt(s): "
              + "; ".join(f"{k}: {v}" for k, v in failed.items()) + f" (details in {folder / 'errors'})", flush=True)


def _error_of(fut: Any) -> str:
    try:
        e = fut.exception(timeout=10)
    except Exception as err:  # noqa: BLE001 - a lost or cancelled future
        e = err
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _running(client: Any) -> int:
    """Mapping tasks executing now: those the scheduler has handed to workers, at most one per worker thread
    (a worker may hold a few queued beyond its threads)."""
    try:
        threads = client.nthreads()
        return sum(min(threads.get(w, 1), sum(1 for k in keys if str(k).startswith("map-")))
                   for w, keys in client.processing().items())
    except Exception:  # noqa: BLE001 - progress only; a busy scheduler may not answer
        return 0


def failed_runs(grid: Grid | str | Path | Mapping[str, Any]) -> pd.DataFrame:
    """The runs of ``grid`` without a row, with the last error recorded for each (empty error: never tried)."""
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    folder = grid.folder()
    done = finished(folder)
    errors = read_errors(folder)
    last = errors.sort_values("attempt").groupby("run_id").last() if len(errors) else pd.DataFrame()
    rows = []
    for r in grid.runs():
        if r.run_id not in done:
            err = last.loc[r.run_id] if r.run_id in last.index else None
            rows.append({"run_id": r.run_id, "model": r.model, "method": r.method, "mapping_seed": r.mapping_seed,
                         "attempts": int(err["attempt"]) if err is not None else 0,
                         "error": err["error"] if err is not None else ""})
    return pd.DataFrame(rows)
