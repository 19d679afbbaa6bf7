"""The command's boundary check: every option, path and profile value of ``hilal analyze|map|reproduce|bench``
checked before any work (no dataset read, no model trained), each failure a one-line
:class:`~hilal.registry.HilalError` naming the option and what is valid (docs/design.md, "Reliability and
security"). The public API checks the same values in the settings classes it builds
(:class:`~hilal.mapping.MappingConfig`, :class:`~hilal.hessian.HessianConfig`, :class:`~hilal.train.TrainConfig`,
:class:`~hilal.bench.BenchConfig`), so both entry points refuse the same input."""

from __future__ import annotations

import argparse

from hilal.checks import check_count, check_folder, check_input_file, check_number, check_output_file, parse_ints
from hilal.registry import HilalError, check_choice


def validate_args(args: argparse.Namespace) -> None:
    """Check the parsed options of one ``hilal`` subcommand; a HilalError for the first bad one."""
    check = {"analyze": _analyze, "map": _map, "reproduce": _reproduce, "bench": _bench, "sweep": _sweep}[args.command]
    check(args)


def _model_options(args: argparse.Namespace) -> None:
    from hilal.analog import PRESETS  # local: the command parses its options without torch
    from hilal.data import DATASETS
    from hilal.models import MODELS

    MODELS[args.model], DATASETS[args.dataset], PRESETS[args.preset]  # noqa: B018  (unknown names list the valid)
    check_count("--seed", args.seed, 0)
    if args.epochs is not None and not (isinstance(args.epochs, int) and args.epochs >= 1):
        raise HilalError(f"--epochs must be a whole number >= 1; got {args.epochs} (to map given weights without "
                         "training, pass them as --checkpoint)")
    check_number("--t-eval", args.t_eval, 0, low_open=True)
    if args.checkpoint is not None:
        check_input_file(args.checkpoint, "--checkpoint")
    check_output_file(args.out)


def _analyze(args: argparse.Namespace) -> None:
    from hilal.cluster import METHODS
    from hilal.hessian import HessianConfig

    _model_options(args)
    for name in ("probes", "samples"):
        if getattr(args, name) is not None:
            check_count(f"--{name}", getattr(args, name))
    check_choice("clustering method (--cluster)", args.cluster, METHODS)
    HessianConfig(t_inference=args.t_eval, noise=args.noise)


def _map(args: argparse.Namespace) -> None:
    from hilal.cluster import METHODS as CLUSTERS
    from hilal.mapping import ABLATIONS, METHODS, SEARCHES

    METHODS[args.method]  # noqa: B018
    _model_options(args)
    for name in ("reps", "patience", "max_rounds", "stages"):
        check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    check_number("--drop-threshold", args.drop_threshold, 0, 1)
    check_count("--recheck", args.recheck, 2, allow=(0,))
    check_choice("--search", args.search, SEARCHES)
    check_choice("--cluster", args.cluster, CLUSTERS)
    check_choice("--ablation", args.ablation, tuple(ABLATIONS))
    if args.workdir is not None:
        check_folder(args.workdir, "--workdir")
    # the rest (--distill, --temperature, ...) is checked by MappingConfig, built before any model is trained


def _reproduce(args: argparse.Namespace) -> None:
    from hilal.reproduce import load_profile

    if args.threads is not None:
        check_count("--threads", args.threads)
    if args.out_dir is not None:
        check_folder(args.out_dir, "--out-dir")
    if args.workers is not None:
        check_count("--workers", args.workers)
    load_profile(args.profile)  # unknown name, missing file, unparsable YAML, unknown section


def _sweep(args: argparse.Namespace) -> None:
    check_input_file(args.grid, "sweep grid")
    if args.workers is not None:
        check_count("--workers", args.workers)
    if args.bench_json is not None:
        check_output_file(args.bench_json, "--bench-json")
    # the grid itself (names, settings, cluster) is checked by hilal.sweep.load_grid before any work


def _bench(args: argparse.Namespace) -> None:
    from hilal.bench import KINDS

    check_choice("benchmark", args.kind, KINDS)
    if args.criteria:
        for f in args.criteria:
            check_input_file(f, "--criteria")
        return
    if args.out is None:
        raise HilalError("hilal bench needs --out F (where the JSON goes), or --criteria F [F ...] to summarize")
    check_output_file(args.out)
    for name in ("repeats", "threads", "probes", "samples"):
        if getattr(args, name) is not None:
            check_count(f"--{name}", getattr(args, name))
    if args.train_seed is not None:
        check_count("--train-seed", args.train_seed, 0)
    if args.seeds is not None:
        parse_ints("--seeds", args.seeds)
    if args.device is not None and args.device != "cpu" and not args.device.startswith("cuda"):
        raise HilalError(f"unknown device {args.device!r}; valid choices: cpu, cuda")
    if args.models:
        from hilal.models import MODELS

        for name in args.models.split(","):
            MODELS[name.strip()]  # noqa: B018
