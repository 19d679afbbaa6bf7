"""What a sweep's workers execute: train a digital checkpoint once (:func:`train_checkpoint`), then map
(:func:`map_run`) one :class:`~hilal.sweep.grid.Run` and write its row.

Each task seeds itself (the run's mapping seed) and runs on ``threads`` torch threads, so a run gives the same
row whichever worker, process or order it runs in; where GPUs are present, a worker uses the one its name
picks (workers share the GPUs out round-robin).
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hilal.registry import HilalError
from hilal.runtime import utc_now
from hilal.sweep.grid import Run, mapping_config
from hilal.sweep.store import write_error, write_row

try:  # the driver and the workers have distributed; the plugin's base class only where it is installed
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object  # type: ignore[assignment,misc]

RUNNING = "running"
"""Folder of ``<run_id>.json`` markers of the runs in progress (the progress display and the fault test)."""


@functools.lru_cache(maxsize=8)
def _splits(dataset: str, seed: int) -> Any:
    from hilal.data import load_dataset  # local: the driver loads the grid without the kit

    return load_dataset(dataset, seed=seed)


def _train_cfg(splits: Any, seed: int, epochs: int | None) -> Any:
    from hilal.train import default_train_config

    return default_train_config(splits, seed, **({"epochs": epochs} if epochs else {}))


def _device() -> str:
    """``cuda:<i>`` for this worker (its name picks a GPU, round-robin) where GPUs are present, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        name = "0"
    index = int(name) if name.isdigit() else sum(map(ord, name))
    device = index % torch.cuda.device_count()
    torch.cuda.set_device(device)
    return f"cuda:{device}"


class WorkerSetup(WorkerPlugin):
    """Set up every worker of a sweep when it starts (a restarted or late one too): the allocator setting of
    :func:`hilal.runtime.keep_freed_memory`, ``threads`` torch threads, and the kit's modules imported. Why:
    workers then import side by side while the first checkpoint trains, instead of each paying its imports in
    its first run."""

    name = "hilal-sweep-setup"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def setup(self, worker: Any = None) -> None:
        import hilal.api  # noqa: F401  (the mapping methods, aihwkit, the models)
        from hilal.runtime import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(self.threads)


def _seed(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_checkpoint(model: str, dataset: str, seed: int, epochs: int | None, threads: int = 1) -> str:
    """Train (or find in the cache) the digital checkpoint of ``model`` on ``dataset`` and return its path:
    the runs that start from it then load it instead of each training it again."""
    from hilal.train import checkpoint_path, trained_model

    _device()
    _seed(seed, threads)
    splits = _splits(dataset, seed)
    cfg = _train_cfg(splits, seed, epochs)
    trained_model(model, splits, seed, cfg, progress=False)
    return str(checkpoint_path(model, splits, seed, cfg))


def map_run(run: Run, folder: str | Path, threads: int = 1, attempt: int = 1, checkpoint: str | None = None
            ) -> dict[str, Any]:
    """Map one run and write its row (:func:`hilal.sweep.store.write_row`); a failure is recorded under
    ``errors/`` and raised again (the driver retries it). ``checkpoint``: the path :func:`train_checkpoint`
    returned (passing it makes the run wait for it). Returns the row."""
    marker = Path(folder) / RUNNING / f"{run.run_id}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "started": utc_now()}))
    try:
        row = _map(run, folder, threads, attempt)
    except Exception as e:  # noqa: BLE001 - recorded, then raised for the driver's retry
        write_error(folder, run.run_id, attempt, _one_line(e),
                    {"run": asdict(run), "host": socket.gethostname(), "traceback": traceback.format_exc()})
        raise
    finally:
        marker.unlink(missing_ok=True)
    return row


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:500]


def _map(run: Run, folder: str | Path, threads: int, attempt: int) -> dict[str, Any]:
    from hilal.api import allocate
    from hilal.paths import provenance_source
    from hilal.train import trained_model

    device = _device()
    cfg = mapping_config(run)
    started, t0 = utc_now(), time.perf_counter()
    splits = _splits(run.dataset, run.train_seed)
    model = trained_model(run.model, splits, run.train_seed, _train_cfg(splits, run.train_seed, run.epochs),
                          progress=False, device=device)
    _seed(run.mapping_seed, threads)
    settings = {k: getattr(cfg, k) for k in asdict(cfg)}
    result = allocate(model, splits, run.method, recheck_reps=run.recheck, progress=False, **settings)
    record = result.to_dict()
    record.pop("metrics", None)  # the per-layer table belongs to `hilal analyze`; keep the row small
    source = provenance_source(threads=threads)
    if not np.isfinite(result.accuracy_mean):
        raise HilalError(f"run {run.run_id}: the mapping's accuracy is not finite")
    check = record.get("recheck", {})
    row = {"run_id": run.run_id, "model": run.model, "dataset": run.dataset, "preset": run.preset,
           "method": run.method, "mapping_seed": run.mapping_seed, "train_seed": run.train_seed,
           "epochs": run.epochs, "recheck_reps": run.recheck,
           "settings": json.dumps(run.settings, sort_keys=True, default=str),
           "analog_layers": list(result.analog_layers), "n_layers": int(record.get("n_layers", 0)),
           "analog_mac_share": float(result.analog_mac_share), "accuracy_mean": float(result.accuracy_mean),
           "accuracy_std": float(result.accuracy_std), "fp_accuracy": float(result.fp_accuracy),
           "rounds": int(result.rounds), "floor": float(record.get("floor", np.nan)),
           **{k: float(result.timings.get(k, np.nan)) for k in ("search_s", "mapping_s", "eval_s", "total_s")},
           "holds_floor": check.get("holds_floor"), "floor_margin": float(check.get("margin", np.nan)),
           "record": json.dumps(record, default=_jsonable),
           "code": source["code"], "commit": source.get("commit"), "machine": json.dumps(source["machine"]),
           "host": socket.gethostname(), "device": device, "pid": os.getpid(), "attempt": attempt,
           "started": started, "finished": utc_now(), "wall_s": round(time.perf_counter() - t0, 3)}
    write_row(folder, row)
    return row


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
