"""The command-line options that ``hilal`` (:mod:`hilal.cli`) and ``hilal bench`` / ``bench/*.py``
(:mod:`hilal.bench`) share, defined once: both import them from here, so the command depends on the benchmarks
and never the other way round (docs/design.md, "one-way layer order")."""

from __future__ import annotations

import argparse
from typing import Any


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
    from hilal.train import FinetuneConfig  # here, not at the top: the command parses its options without torch

    out: dict[str, Any] = {"confirm": True} if args.confirm else {}
    finetune = FinetuneConfig(distill=args.distill, temperature=args.temperature)
    if finetune != FinetuneConfig():
        out["finetune"] = finetune
    return out


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
