"""Sweeps: a YAML grid over models, datasets, presets, methods, mapping and training seeds and mapping settings,
one Dask task per mapping run, into one Parquet table (``hilal sweep SWEEP.yaml``).

One concern per module, each importing only from those listed before it:

- ``grid``: :class:`Grid` and :func:`load_grid` (the YAML, checked before any work), :class:`Run` (one mapping run)
- ``store``: the table on disk, a Parquet file per finished run written atomically (:func:`read_table`), and
  the errors of failed attempts (:func:`read_errors`)
- ``tasks``: what workers execute: :func:`train_checkpoint` (each digital checkpoint once) and :func:`map_run`
- ``cluster``: :func:`connect` (LocalCluster, a scheduler address, or Slurm / PBS through dask-jobqueue) and
  :func:`job_script`
- ``runner``: :func:`run` (resume, retries, progress, Ctrl-C) and :func:`failed_runs`
- ``summary``: :func:`medians`, :func:`criteria` (the README's seed tables) and :func:`bench_json` (the docs'
  tables through ``hilal.bench.report``)

Why one file per run rather than one table file: a row is then written by the worker that finished the run,
atomically and at most once, without a lock across processes or machines.
"""

from __future__ import annotations

from hilal.sweep.cluster import connect, job_script
from hilal.sweep.grid import CLUSTERS, Grid, Run, load_grid, mapping_config
from hilal.sweep.runner import failed_runs, run
from hilal.sweep.store import read_errors, read_table
from hilal.sweep.summary import bench_json, criteria, medians, search_records, varied
from hilal.sweep.tasks import map_run, train_checkpoint

__all__ = ["CLUSTERS", "Grid", "Run", "bench_json", "connect", "criteria", "failed_runs", "job_script", "load_grid",
           "map_run", "mapping_config", "medians", "read_errors", "read_table", "run", "search_records",
           "train_checkpoint", "varied"]
