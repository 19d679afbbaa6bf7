"""Side-by-side benchmarks (``hilal bench hessian|search|analog|frontier``).

The entry points: :func:`run_bench` (one benchmark, its table printed, its JSON written), the argparse front
end :func:`main` / :func:`run_args` shared by ``hilal bench`` and the ``bench/*.py`` scripts (:func:`script`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hilal.bench.analog import bench_analog
from hilal.bench.config import KINDS, BenchConfig
from hilal.bench.frontier import bench_frontier
from hilal.bench.hessian import bench_hessian
from hilal.bench.search import bench_search
from hilal.bench.tables import markdown, search_criteria, search_records, table
from hilal.checks import parse_ints
from hilal.options import add_bench_options, retraining_overrides
from hilal.paths import atomic_json_dump, project_root
from hilal.registry import HilalError, check_choice
from hilal.runtime import keep_freed_memory, machine_info, utc_now

BENCHES: dict[str, Callable[[BenchConfig, list[str], bool], Iterator[dict[str, Any]]]] = {
    "hessian": bench_hessian, "search": bench_search, "analog": bench_analog, "frontier": bench_frontier}


def run_bench(kind: str, out: str | Path | None = None, quick: bool = False, progress: bool = True,
              **overrides: Any) -> dict[str, Any]:
    """Run one benchmark, print its table, and write ``{"kind", "machine", "config", "records", "notes"}`` as
    JSON to ``out`` (if given). ``overrides`` set :class:`BenchConfig` fields."""
    check_choice("kind", kind, KINDS)
    valid = {f.name for f in fields(BenchConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise HilalError(f"unknown benchmark setting(s) {bad}; valid: {sorted(valid)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    cfg = BenchConfig.quick(**overrides) if quick else BenchConfig(**overrides)
    from hilal.models import MODELS

    for name in cfg.search_models if kind == "search" else cfg.models:
        MODELS[name]  # noqa: B018  (an unknown model fails before any work, listing the valid ones)
    if cfg.device != "cpu" and not (cfg.device.startswith("cuda") and torch.cuda.is_available()):
        raise HilalError(f"device {cfg.device!r} is not available here; valid: 'cpu'"
                         + (", 'cuda'" if torch.cuda.is_available() else " (no CUDA GPU found)"))
    notes: list[str] = []
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []

    def result(complete: bool) -> dict[str, Any]:
        machine = {**machine_info(cfg.device), "date": utc_now("seconds")}
        return {"kind": kind, "quick": quick, "complete": complete, "machine": machine,
                "config": asdict(cfg), "records": records, "notes": notes, "wall_s": time.perf_counter() - t0}

    try:
        for rec in BENCHES[kind](cfg, notes, progress):
            records.append(rec)
            if out is not None:  # a partial file after every model, so that a long run leaves its results
                atomic_json_dump(result(False), out)
        final = result(True)
    finally:
        torch.set_num_threads(old_threads)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 4):
        print(table(kind, records).to_string(index=False))
        if kind == "search" and len(cfg.mapping_seeds) > 1 and records:
            print(search_criteria(records).to_string(index=False))
    for n in notes:
        print("note:", n)
    if out is not None:
        atomic_json_dump(final, out)
        print(f"-> {out}")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bench/*.py`` scripts: ``KIND`` and the options of :func:`hilal.options.add_bench_options`;
    the output defaults to ``bench/results/KIND.json``. ``search --criteria F [F ...]`` prints
    :func:`search_criteria` of finished result files instead of running."""
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS)
    add_bench_options(p)
    return run_args(p.parse_args(argv))


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark that parsed options ``a`` (of :func:`hilal.options.add_bench_options`, plus ``kind``)
    describe, or with ``criteria`` print the criteria table of those files."""
    if a.criteria:
        if a.kind != "search":
            raise HilalError(f"--criteria summarizes search results; got kind {a.kind!r}")
        notes: list[str] = []
        print(markdown(search_criteria(search_records(a.criteria, notes))))
        for n in notes:
            print("note:", n)
        return 0
    mapping = retraining_overrides(a)
    if mapping and a.kind not in ("search", "frontier"):
        raise HilalError(f"--confirm, --distill and --temperature set how the search and frontier benchmarks "
                         f"retrain; got kind {a.kind!r}")
    keep_freed_memory()

    out = a.out or project_root() / "bench" / "results" / f"{a.kind}.json"
    models = tuple(a.models.split(",")) if a.models else None
    key = "search_models" if a.kind in ("search", "frontier") else "models"
    seeds = parse_ints("--seeds", a.seeds) if a.seeds else None
    run_bench(a.kind, out=out, quick=a.quick, repeats=a.repeats, threads=a.threads, probes=a.probes,
              eli_samples=a.samples, mapping_seeds=seeds, device=a.device, seed=a.train_seed, mapping=mapping or None,
              **{key: models})
    return 0


def script(kind: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bench/KIND.py``: :func:`main` on the command line, bad input reported as one line on
    stderr (exit status 2), as ``hilal bench`` does."""
    try:
        return main([kind, *(sys.argv[1:] if argv is None else argv)])
    except HilalError as e:
        print(f"bench {kind}: error: {e}", file=sys.stderr)
        return 2
