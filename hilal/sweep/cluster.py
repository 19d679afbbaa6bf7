"""Where a sweep's tasks run: an embedded ``LocalCluster`` (one process per worker, one thread each), an
existing scheduler (``--scheduler ADDRESS``), or Slurm / PBS jobs through dask-jobqueue, with the job resources
from the grid's ``cluster`` section (:func:`job_script` shows the batch script it submits)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hilal
from hilal.registry import HilalError, check_choice
from hilal.sweep.grid import CLUSTERS, Grid

JOB_KEYS = ("cores", "memory", "processes", "queue", "account", "project", "walltime", "job_extra_directives",
            "job_directives_skip", "job_script_prologue", "local_directory", "log_directory", "interface", "python",
            "job_cpu", "job_mem", "resource_spec", "worker_extra_args", "shebang", "job_name")
"""The job resources a grid's ``cluster`` section may set for ``slurm`` / ``pbs`` (dask-jobqueue's names)."""


def worker_env(threads: int) -> dict[str, str]:
    """Environment of the worker processes: one set of torch threads each, and this copy of the kit importable
    (a checkout that is not installed)."""
    root = str(Path(hilal.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path}


def _jobqueue(grid: Grid) -> Any:
    kind = check_choice("cluster kind", str(grid.cluster.get("kind", "local")), CLUSTERS)
    if kind == "local":
        raise HilalError("job_script needs a grid whose cluster kind is slurm or pbs")
    resources = {k: v for k, v in grid.cluster.items() if k != "kind"}
    bad = sorted(set(resources) - set(JOB_KEYS))
    if bad:
        raise HilalError(f"unknown {kind} job resource(s) {bad}; valid: {', '.join(JOB_KEYS)}")
    for k in ("cores", "memory"):
        if k not in resources:
            raise HilalError(f"a {kind} cluster needs {k!r} in the grid's cluster section (per job)")
    if "job_name" in resources:
        resources["name"] = resources.pop("job_name")
    env = worker_env(grid.threads)
    prologue = [f"export {k}={v}" for k, v in env.items() if k != "PYTHONPATH"]
    resources["job_script_prologue"] = [*prologue, *resources.get("job_script_prologue", [])]
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        return SLURMCluster(**resources)
    from dask_jobqueue import PBSCluster

    return PBSCluster(**resources)


SUBMIT = {"slurm": "sbatch", "pbs": "qsub"}
"""The command each jobqueue cluster kind submits its jobs with."""


def check_submit(grid: Grid, kind: str | None = None) -> None:
    """Raise a one-line HilalError, before any work, when the cluster of ``kind`` (default: the grid's) cannot
    submit jobs from here (no ``sbatch`` / ``qsub`` on the PATH): the sweep would otherwise wait for workers that
    never come."""
    import shutil

    kind = check_choice("cluster kind", kind or str(grid.cluster.get("kind", "local")), CLUSTERS)
    if kind in SUBMIT and shutil.which(SUBMIT[kind]) is None:
        raise HilalError(f"a {kind} cluster submits jobs with {SUBMIT[kind]!r}, which is not on this machine's PATH; "
                         "run from a login node, give --scheduler ADDRESS, or use --cluster local "
                         "(--job-script prints the job script)")


def job_script(grid: Grid) -> str:
    """The batch script dask-jobqueue submits for one job of the grid's Slurm or PBS cluster (no scheduler of
    either kind is needed to see it)."""
    cluster = _jobqueue(grid)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def connect(grid: Grid, scheduler: str | None = None, kind: str | None = None) -> tuple[Any, Callable[[], None]]:
    """A Dask ``Client`` for the sweep and a function that closes what was started here: the scheduler at
    ``scheduler`` if given, else the cluster of ``kind`` (default: the grid's): a ``LocalCluster`` of
    ``grid.workers`` processes, or ``grid.workers`` Slurm / PBS jobs."""
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        return client, client.close
    kind = check_choice("cluster kind", kind or str(grid.cluster.get("kind", "local")), CLUSTERS)
    if kind == "local":
        cluster = LocalCluster(n_workers=grid.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR, env=worker_env(grid.threads))
    else:
        cluster = _jobqueue(_with_kind(grid, kind))
        cluster.scale(jobs=grid.workers)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def _with_kind(grid: Grid, kind: str) -> Grid:
    from dataclasses import replace

    return replace(grid, cluster={**grid.cluster, "kind": kind})
