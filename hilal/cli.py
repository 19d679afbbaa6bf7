"""The ``hilal`` command: analyze, map, reproduce, bench (the contract in DESIGN.md)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from hilal.registry import HilalError

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
    from hilal.analog import PRESETS
    from hilal.data import load_dataset
    from hilal.models import MODELS, model_for
    from hilal.train import default_device, default_train_config, trained_model

    MODELS[args.model], PRESETS[args.preset]  # noqa: B018  (validate names before any work)
    splits = load_dataset(args.dataset, seed=args.seed)
    if args.checkpoint:
        model = model_for(args.model, splits, checkpoint=args.checkpoint).to(default_device()).eval()
    else:
        cfg = default_train_config(splits, args.seed, **({"epochs": args.epochs} if args.epochs else {}))
        model = trained_model(args.model, splits, seed=args.seed, cfg=cfg, progress=not args.quiet)
    return model, splits


def cmd_analyze(args: argparse.Namespace) -> None:
    from hilal.cluster import cluster_layers
    from hilal.hessian import HessianConfig, layer_metrics
    from hilal.paths import atomic_json_dump

    model, splits = _model(args)
    cfg = HessianConfig(t_inference=args.t_eval, seed=args.seed, probes=args.probes, eli_samples=args.samples)
    df = cluster_layers(layer_metrics(model, splits, args.preset, cfg, progress=not args.quiet),
                        method=args.cluster, seed=args.seed)
    cols = ["layer", "params", "macs", "trace", "lambda_max", "concentration", "eli", "cluster"]
    extra = [c for c in df.columns if c.endswith("_se")]
    print(df[cols].to_string(index=False))
    layers = df[cols + extra].rename(columns={"layer": "name"}).to_dict(orient="records")
    atomic_json_dump({"model": args.model, "dataset": args.dataset, "preset": args.preset, "t_inference": args.t_eval,
                      "hvps": df.attrs.get("hvps"), "layers": layers}, args.out)


def add_retraining_options(p: argparse.ArgumentParser) -> None:
    """How every method retrains and accepts a stage: the options of ``hilal map`` and ``hilal bench search``."""
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of distilling the digital model's outputs while retraining (0: off)")
    p.add_argument("--temperature", type=float, default=4.0, help="softening temperature of --distill")
    p.add_argument("--confirm", action="store_true",
                   help="accept each retraining stage on a fresh evaluation, not on its best round's score")


def retraining_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`hilal.mapping.MappingConfig` fields that :func:`add_retraining_options` set away from their
    defaults (checked here, before any model is trained)."""
    from hilal.train import FinetuneConfig

    out: dict[str, Any] = {"confirm": True} if args.confirm else {}
    finetune = FinetuneConfig(distill=args.distill, temperature=args.temperature)
    if finetune != FinetuneConfig():
        out["finetune"] = finetune
    return out


def mapping_config(args: argparse.Namespace) -> MappingConfig:
    """The :class:`hilal.mapping.MappingConfig` that ``hilal map``'s options describe."""
    from hilal.mapping import MappingConfig

    return MappingConfig(preset=args.preset, t_eval=args.t_eval, reps=args.reps, drop_threshold=args.drop_threshold,
                         patience=args.patience, max_rounds=args.max_rounds, stages=args.stages, search=args.search,
                         robust_only=args.robust_only, cluster=args.cluster, ablation=args.ablation, seed=args.seed,
                         workdir=args.workdir, **retraining_overrides(args))


def cmd_map(args: argparse.Namespace) -> None:
    from hilal.mapping import METHODS, recheck, run_mapping
    from hilal.paths import atomic_json_dump
    from hilal.registry import HilalError

    METHODS[args.method]  # noqa: B018
    if args.recheck and args.recheck < 2:
        raise HilalError(f"--recheck needs at least 2 programmings (or 0 for none); got {args.recheck}")
    cfg = mapping_config(args)  # settings are checked before a model is trained
    model, splits = _model(args)
    res = run_mapping(args.method, model, splits, cfg, progress=not args.quiet)
    d = res.to_dict()
    d.update(model=args.model, dataset=args.dataset)
    if args.recheck:
        d["recheck"] = recheck(res, splits, args.recheck, args.seed)
    atomic_json_dump(d, args.out)
    t, x = res.timings, res.extra
    quality = (f"accuracy {res.accuracy_mean:.4f} ± {res.accuracy_std:.4f} (FP {res.fp_accuracy:.4f})"
               if "em_mean" not in x else
               f"EM {x['em_mean']:.4f} ± {x['em_std']:.4f} (FP {x['fp_em']:.4f}), "
               f"F1 {x['f1_mean']:.4f} ± {x['f1_std']:.4f} (FP {x['fp_f1']:.4f})")
    print(f"{res.method}: {len(res.analog_layers)}/{x['n_layers']} analog layers, "
          f"analog MAC share {res.analog_mac_share:.3f}, {quality} at t={res.t_eval:g}s; search {t['search_s']:.1f}s, "
          f"mapping {t['mapping_s']:.1f}s, total {t['total_s']:.1f}s -> {args.out}")
    if args.recheck:
        c = d["recheck"]
        print(f"recheck: {c['calib_mean']:.4f} ± {c['calib_se']:.4f} on {c['reps']} fresh programmings of the "
              f"calibration split against a floor of {c['floor']:.4f}: "
              f"{'holds' if c['holds_floor'] else 'does not hold'} its tolerance")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from hilal.reproduce import headlines, reproduce

    table = reproduce(args.profile, only=args.only, threads=args.threads)
    print(headlines(table["notebook"].tolist()))


def cmd_bench(args: argparse.Namespace) -> None:
    from hilal.bench import run_args

    if not args.criteria and args.out is None:
        raise HilalError("hilal bench needs --out F (where the JSON goes), or --criteria F [F ...] to summarize")
    run_args(args)


def add_bench_options(p: argparse.ArgumentParser) -> None:
    """The options of ``hilal bench`` and of ``python bench/*.py``, defined once for both entry points."""
    p.add_argument("--out", default=None, help="JSON output (bench/*.py: default bench/results/KIND.json)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for a quick look)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (medians are reported)")
    p.add_argument("--models", default=None, help="comma-separated model names")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 on a shared machine)")
    p.add_argument("--probes", type=int, default=None, help="hessian: Hutchinson probes")
    p.add_argument("--samples", type=int, default=None, help="hessian: ELI noise samples")
    p.add_argument("--seeds", default=None, help="search: comma-separated mapping seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of the data split, the digital model's training (another checkpoint) and, for "
                        "hessian, its probes and noise (default 0)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    add_retraining_options(p)  # search: the same for both methods
    p.add_argument("--criteria", nargs="+", default=None, metavar="JSON",
                   help="search: print the per-model criteria table (HILAL against LionHeart over mapping seeds) "
                        "of these finished result files instead of running")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hilal", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="per-layer curvature metrics and robust/sensitive clusters")
    _common(a)
    a.add_argument("--probes", type=int, default=32, help="Hutchinson probes")
    a.add_argument("--samples", type=int, default=16, help="Monte-Carlo noise samples for ELI")
    a.add_argument("--cluster", default="kmeans", help="kmeans, gmm or agglomerative")
    a.set_defaults(fn=cmd_analyze)

    m = sub.add_parser("map", help="allocate layers to analog tiles with one method")
    _common(m)
    m.add_argument("--method", required=True,
                   help="hilal, hilal-paper, lionheart, random, all-analog, all-analog-ft, all-digital")
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--drop-threshold", type=float, default=0.02, help="tolerated accuracy drop (fraction)")
    m.add_argument("--patience", type=int, default=2)
    m.add_argument("--max-rounds", type=int, default=6)
    m.add_argument("--stages", type=int, default=1)
    m.add_argument("--search", default="knapsack", help="HILAL search: knapsack, screen, gallop, bisect or walk")
    m.add_argument("--robust-only", action="store_true")
    m.add_argument("--cluster", default="kmeans")
    m.add_argument("--ablation", default="eli-r", help="hilal-paper features")
    add_retraining_options(m)
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
    r.set_defaults(fn=cmd_reproduce)

    b = sub.add_parser("bench", help="side-by-side benchmarks")
    b.add_argument("kind", help="hessian, search or analog")
    add_bench_options(b)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hilal.runtime import keep_freed_memory

    keep_freed_memory()
    try:
        args.fn(args)
    except HilalError as e:
        print(f"hilal {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
