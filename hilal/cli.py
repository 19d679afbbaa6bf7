"""The ``hilal`` command: analyze, map, reproduce, bench (the contract in docs/design.md)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, NoReturn

from hilal.checks import check_finite_record
from hilal.options import add_bench_options, add_retraining_options, retraining_overrides
from hilal.registry import HilalError
from hilal.runtime import keep_freed_memory
from hilal.validate import validate_args

if TYPE_CHECKING:  # the command imports torch and aihwkit only when a subcommand needs them
    from hilal.mapping import MappingConfig


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (see hilal.models.MODELS)")
    p.add_argument("--dataset", required=True, help="dataset name (see hilal.data.DATASETS)")
    p.add_argument("--preset", default="pcm_harsh", help="aihwkit preset: pcm, pcm_harsh, pcm_hilal, ideal")
    p.add_argument("--checkpoint", default=None, help="digital weights to start from (default: train and cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="digital training epochs when no checkpoint is given")
    p.add_argument("--t-eval", type=float, default=86400.0, help="inference time in seconds (default 1 day)")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    from hilal.analog import PRESETS  # local: no torch or aihwkit until a subcommand runs
    from hilal.data import load_dataset
    from hilal.device import default_device
    from hilal.models import MODELS, model_for
    from hilal.train import default_train_config, trained_model

    MODELS[args.model], PRESETS[args.preset]  # noqa: B018  (validate names before any work)
    splits = load_dataset(args.dataset, seed=args.seed)
    if args.checkpoint:
        model = model_for(args.model, splits, checkpoint=args.checkpoint).to(default_device()).eval()
    else:
        cfg = default_train_config(splits, args.seed, **({"epochs": args.epochs} if args.epochs is not None else {}))
        model = trained_model(args.model, splits, seed=args.seed, cfg=cfg, progress=not args.quiet)
    return model, splits


def cmd_analyze(args: argparse.Namespace) -> None:
    from hilal.api import analyze  # local: no torch or aihwkit until a subcommand runs
    from hilal.paths import atomic_json_dump

    overrides = {k: v for k, v in (("probes", args.probes), ("eli_samples", args.samples)) if v is not None}
    model, splits = _model(args)
    df = analyze(model, splits, args.preset, cluster=args.cluster, seed=args.seed, progress=not args.quiet,
                 t_inference=args.t_eval, noise=args.noise, **overrides)
    cols = ["layer", "params", "macs", "trace", "lambda_max", "concentration", "eli", "cluster"]
    extra = [c for c in df.columns if c.endswith("_se")]
    print(df[cols].to_string(index=False))
    layers = df[cols + extra].rename(columns={"layer": "name"}).to_dict(orient="records")
    check_finite_record([{k: r[k] for k in cols[1:-1]} for r in layers], "the metrics table")
    atomic_json_dump({"model": args.model, "dataset": args.dataset, "preset": args.preset, "t_inference": args.t_eval,
                      "noise": args.noise, "hvps": df.attrs.get("hvps"), "layers": layers}, args.out)


def mapping_config(args: argparse.Namespace) -> MappingConfig:
    """The :class:`hilal.mapping.MappingConfig` that ``hilal map``'s options describe."""
    from hilal.hardware import OBJECTIVES  # local: no torch or aihwkit until a subcommand runs
    from hilal.mapping import MappingConfig, check_max_tiles
    from hilal.registry import check_choice

    check_choice("objective", args.objective, OBJECTIVES)
    check_max_tiles(args.max_tiles)
    return MappingConfig(preset=args.preset, objective=args.objective, max_tiles=args.max_tiles,
                         t_eval=args.t_eval, reps=args.reps, drop_threshold=args.drop_threshold,
                         patience=args.patience, max_rounds=args.max_rounds, stages=args.stages, search=args.search,
                         robust_only=args.robust_only, cluster=args.cluster, ablation=args.ablation, layers=args.layers,
                         seed=args.seed,
                         workdir=args.workdir, **retraining_overrides(args))


def cmd_map(args: argparse.Namespace) -> None:
    from hilal.api import allocate  # local: no torch or aihwkit until a subcommand runs
    from hilal.mapping import METHODS
    from hilal.paths import atomic_json_dump

    METHODS[args.method]  # noqa: B018
    if args.recheck and args.recheck < 2:
        raise HilalError(f"--recheck needs at least 2 programmings (or 0 for none); got {args.recheck}")
    cfg = mapping_config(args)  # settings are checked before a model is trained
    model, splits = _model(args)
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    res = allocate(model, splits, args.method, recheck_reps=args.recheck, progress=not args.quiet, **settings)
    d = res.to_dict()
    d.update(model=args.model, dataset=args.dataset)
    check_finite_record({k: d.get(k) for k in _HEADLINE} | {"history": [r.get("score") for r in d["history"]]})
    atomic_json_dump(d, args.out)
    t, x = res.timings, res.extra
    quality = (f"accuracy {res.accuracy_mean:.4f} ± {res.accuracy_std:.4f} (FP {res.fp_accuracy:.4f})"
               if "em_mean" not in x else
               f"EM {x['em_mean']:.4f} ± {x['em_std']:.4f} (FP {x['fp_em']:.4f}), "
               f"F1 {x['f1_mean']:.4f} ± {x['f1_std']:.4f} (FP {x['fp_f1']:.4f})")
    print(f"{res.method}: {len(res.analog_layers)}/{x['n_layers']} analog layers, "
          f"analog MAC share {res.analog_mac_share:.3f}, {quality} at t={res.t_eval:g}s; search {t['search_s']:.1f}s, "
          f"mapping {t['mapping_s']:.1f}s, total {t['total_s']:.1f}s -> {args.out}")
    hw = res.hardware
    budget = f", {hw['budget']} budget of {hw['max_tiles']} tiles" if "budget" in hw else ""
    print(f"hardware ({hw['chip']}): {hw['analog_tiles']} analog tiles of {hw['chip_tiles']}{budget}; per sample "
          f"{hw['energy_uj']:.3g} µJ ({hw['energy_gain']:.2f}x less than all-digital), "
          f"{hw['latency_us']:.3g} µs ({hw['latency_gain']:.2f}x)")
    if args.recheck:
        c = d["recheck"]
        print(f"recheck: {c['calib_mean']:.4f} ± {c['calib_se']:.4f} on {c['reps']} fresh programmings of the "
              f"calibration split against a floor of {c['floor']:.4f}: "
              f"{'holds' if c['holds_floor'] else 'does not hold'} its tolerance")


_HEADLINE = ("analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy", "baseline_calib", "floor", "em_mean",
             "f1_mean")
"""The numbers of a mapping record that must be finite for it to be written."""


def cmd_reproduce(args: argparse.Namespace) -> None:
    from hilal.reproduce import headlines, reproduce  # local: no torch or aihwkit until a subcommand runs

    if args.workers is not None and args.workers != 1:
        from hilal.schedule import reproduce_parallel  # local: no papermill until the subcommand runs

        table = reproduce_parallel(args.profile, workers=args.workers, only=args.only, threads=args.threads,
                                   out_dir=args.out_dir)
    else:
        table = reproduce(args.profile, only=args.only, threads=args.threads, out_dir=args.out_dir)
    print(headlines(table["notebook"].tolist()))


def cmd_sweep(args: argparse.Namespace) -> None:
    from hilal.sweep import bench_json, criteria, failed_runs, job_script, load_grid, medians, read_table, run, varied

    grid = load_grid(args.grid, workers=args.workers, out=args.out)  # the whole grid is checked before any work
    if args.job_script:
        kind = args.cluster or grid.cluster.get("kind", "local")
        print(job_script(replace(grid, cluster={**grid.cluster, "kind": kind})))
        return
    if not args.summary:
        try:
            run(grid, scheduler=args.scheduler, cluster=args.cluster, progress=not args.quiet)
        except KeyboardInterrupt:  # every finished row is on disk already; the next run does the rest
            print(f"hilal sweep: interrupted; finished runs are kept in {grid.folder()}; run again to finish",
                  file=sys.stderr)
            raise SystemExit(130) from None
        missing = failed_runs(grid)
        if len(missing):
            print(missing.to_string(index=False))
            raise HilalError(f"{len(missing)} of {len(grid.runs())} runs have no row (errors above; run again "
                             "to retry them)")
    df = read_table(grid.folder())
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        for table in (medians(df), criteria(df) if {"hilal", "lionheart"} <= set(df["method"]) else None):
            if table is not None:  # the settings column cut to what differs between comparisons
                print(table.assign(settings=varied(table["settings"])).round(4).to_string(index=False))
    if args.bench_json:
        print(f"search records -> {bench_json(df, args.bench_json)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from hilal.bench import run_args  # local: no torch or aihwkit until a subcommand runs

    if not args.criteria and args.out is None:
        raise HilalError("hilal bench needs --out F (where the JSON goes), or --criteria F [F ...] to summarize")
    run_args(args)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``hilal map: error: ...``), exit status 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hilal", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="per-layer curvature metrics and robust/sensitive clusters")
    _common(a)
    a.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default: the mapping's, 16)")
    a.add_argument("--samples", type=int, default=None,
                   help="Monte-Carlo noise samples for ELI's second-order term (default: the mapping's, 16)")
    a.add_argument("--noise", default="output", choices=("output", "weight"),
                   help="ELI's noise space: output (the mapping's: each layer's whole analog output error, "
                        "converters included) or weight (the effective-weight change only)")
    a.add_argument("--cluster", default="kmeans", help="kmeans, gmm or agglomerative")
    a.set_defaults(fn=cmd_analyze)

    m = sub.add_parser("map", help="allocate layers to analog tiles with one method")
    _common(m)
    m.add_argument("--method", required=True,
                   help="hilal, hilal-paper, hilal-zeroshot, max-norm, lionheart, random, all-analog, all-analog-ft, "
                        "all-digital")
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--drop-threshold", type=float, default=0.02, help="tolerated accuracy drop (fraction)")
    m.add_argument("--patience", type=int, default=2)
    m.add_argument("--max-rounds", type=int, default=6)
    m.add_argument("--stages", type=int, default=1)
    m.add_argument("--search", default="knapsack", help="HILAL search: knapsack, screen, gallop, bisect or walk")
    m.add_argument("--robust-only", action="store_true")
    m.add_argument("--cluster", default="kmeans")
    m.add_argument("--ablation", default="eli-r", help="hilal-paper features")
    m.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                   help="only these layers may go analog: names or shell-style patterns such as '*.attention.*' "
                        "(default: every mappable layer)")
    add_retraining_options(m)
    m.add_argument("--objective", default="macs",
                   help="HILAL knapsack: the saving weighed against expected loss: macs, energy or latency "
                        "(per sample, on the chip of hilal.hardware)")
    m.add_argument("--max-tiles", type=int, default=None,
                   help="analog tiles the mapping may use at most (HILAL knapsack, lionheart and random keep it; "
                        "the other methods report that they do not); default: no limit")
    m.add_argument("--recheck", type=int, default=0,
                   help="re-score the final mapping on this many programmings its search never drew (calibration "
                        "split) against the floor it was accepted at; 0: none")
    m.add_argument("--workdir", default=None,
                   help="journal folder: an interrupted run resumes from it (same settings and code version)")
    m.set_defaults(fn=cmd_map)

    r = sub.add_parser("reproduce", help="execute the notebooks with papermill and regenerate figures/")
    r.add_argument("--profile", default="smoke",
                   help="smoke, paper, or dryrun (synthetic data: see python -m hilal.dryrun)")
    r.add_argument("--only", default=None, help="notebook number(s), e.g. 03 or 00,05")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads per notebook kernel (default: OMP_NUM_THREADS if set, else 1)")
    r.add_argument("--out-dir", default=None, help="folder of the executed notebooks (default: runs/PROFILE-TIME)")
    r.add_argument("--workers", type=int, default=None,
                   help="notebooks executed at a time, each in its own process (03 before 04, 05 before 06 and 07; "
                        "default 1)")
    r.set_defaults(fn=cmd_reproduce)

    s = sub.add_parser("sweep", help="a grid of mapping runs on Dask, into one Parquet table")
    s.add_argument("grid", help="the sweep's YAML file (e.g. sweeps/smoke.yaml)")
    s.add_argument("--workers", type=int, default=None, help="worker processes or jobs (default: the grid's)")
    s.add_argument("--scheduler", default=None, help="address of a running Dask scheduler to use instead")
    s.add_argument("--cluster", default=None, choices=("local", "slurm", "pbs"),
                   help="where workers run (default: the grid's cluster kind, local)")
    s.add_argument("--out", default=None, help="the sweep's folder (default: the grid's, runs/sweeps/NAME)")
    s.add_argument("--summary", action="store_true",
                   help="print the per-model medians and criteria of the finished runs instead of running")
    s.add_argument("--bench-json", default=None, metavar="F",
                   help="also write the runs as a search benchmark file (for python -m hilal.bench.report)")
    s.add_argument("--job-script", action="store_true",
                   help="print the Slurm/PBS job script dask-jobqueue would submit, and stop")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_sweep)

    b = sub.add_parser("bench", help="side-by-side benchmarks")
    b.add_argument("kind", help="hessian, search, analog or frontier")
    add_bench_options(b)
    b.set_defaults(fn=cmd_bench)
    for sp in (a, m, r, s, b):
        sp.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: its options checked first (:func:`hilal.validate.validate_args`), user errors as one
    line ``hilal CMD: error: ...`` with exit status 2 (``--debug``: the traceback), Ctrl-C as one line saying
    how to resume, with exit status 130."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        validate_args(args)
        args.fn(args)
    except (HilalError, OSError) as e:  # OSError: a file the user named could not be read or written
        if args.debug:
            raise
        print(f"hilal {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"hilal {args.command}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(args: argparse.Namespace) -> str:
    """How to pick up an interrupted run (one line)."""
    if args.command == "map" and args.workdir:
        return f"run the same command again to resume from the journal in {args.workdir}"
    if args.command in ("map", "analyze"):
        more = "" if args.command == "analyze" else "; add --workdir DIR to make the mapping itself resumable"
        return f"nothing was written to {args.out}; run it again (digital training resumes from its cache{more})"
    return "run the same command again (trained checkpoints, mappings and metrics cached so far are reused)"


if __name__ == "__main__":
    sys.exit(main())
