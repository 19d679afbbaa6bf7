"""The benchmarks' settings (:class:`BenchConfig`) and the helpers every benchmark shares: timing with a device
sync, medians, and the trained models they time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hilal.checks import check_count, check_number
from hilal.registry import HilalError

KINDS = ("hessian", "search", "analog", "frontier")


@dataclass
class BenchConfig:
    """Sizes of the benchmarks (``quick`` shrinks them)."""

    models: tuple[str, ...] = ("resnet8", "resnet20", "vit_tiny")
    """Models (``hilal.models.MODELS``); :func:`hilal.bench.run_bench` refuses names not registered."""
    dataset: str = "digits"
    """Dataset (``hilal.data.DATASETS``)."""
    preset: str = "pcm_harsh"
    """aihwkit preset for noise samples, mappings and analog models."""
    repeats: int = 3
    """Timed repeats per side; medians are reported."""
    seed: int = 0
    """Seed of the dataset split, training, probes and noise."""
    probes: int = 32
    """hessian: Hutchinson probes per layer (both sides)."""
    eli_samples: int = 16
    """hessian: noise samples for the ELI (both sides)."""
    max_samples: int = 512
    """hessian: calibration samples (one batch, both sides)."""
    pyhessian: bool = True
    """hessian: time the joint estimates against PyHessian one layer at a time (off: the curvature pass only)."""
    curvature_pass: bool = True
    """hessian: also time :func:`hilal.hessian.layer_metrics` at its default settings (on the preset, calibration
    samples and seed) with the batched, sequential noise draws against the loop of every draw (untimed
    agreement: z-scores of the ELI)."""
    pass_sides: tuple[str, ...] = ("batched", "loop")
    """hessian: sides of the curvature pass (:data:`hilal.bench.hessian.PASS_SIDES`), ``batched`` first, the
    last one the reference of the speed-up and the z-scores."""
    t_inference: float = 86400.0
    """hessian/analog: inference time (s) of the noise samples and of the drift evaluation."""
    search_models: tuple[str, ...] = ("resnet8", "resnet20")
    """search, frontier: models to map."""
    mapping: dict[str, Any] = field(default_factory=dict)
    """search, frontier: overrides of :class:`hilal.mapping.MappingConfig` (the same for both methods)."""
    frontier_points: int = 5
    """frontier: sets taken along HILAL's knapsack frontier (:func:`hilal.mapping.energy_frontier`)."""
    mapping_seeds: tuple[int, ...] = (0,)
    """search: mapping seeds (noise, shuffling, evaluation programmings; same trained model), one record
    each; the table adds the median over seeds per model and method."""
    recheck_reps: int = 50
    """search: programmings of each method's final mapping on the calibration split, with seeds its search
    never drew (:func:`hilal.mapping.recheck`, untimed, first repeat): whether the mapping holds the floor
    it was accepted at. 0 turns it off."""
    forward_iters: int = 20
    """analog: forward passes per timed repeat."""
    eval_reps: int = 10
    """analog: programmings of the evaluation timed with each engine (``loop`` and ``batched``)."""
    cifar_samples: int = 128
    """analog: test samples of the CIFAR-shaped evaluation timing (random 3x32x32 inputs, untrained model of the
    same architecture); 0 leaves it out."""
    batch_size: int = 256
    """analog: batch of test inputs for the forward timing."""
    device: str = "cpu"
    """Device of the models and data (``cpu`` or ``cuda``); PyHessian's side runs there too."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default). On a shared, loaded CPU, 1 avoids the large slow-down
    of oversubscribed OpenMP threads."""

    def __post_init__(self) -> None:
        for name in ("repeats", "probes", "eli_samples", "max_samples", "forward_iters", "batch_size"):
            check_count(name, getattr(self, name))
        check_count("recheck_reps", self.recheck_reps, 2, allow=(0,))
        check_count("seed", self.seed, 0)
        if self.threads is not None:
            check_count("threads", self.threads)
        check_number("t_inference", self.t_inference, 0, low_open=True)
        if not self.mapping_seeds or not all(isinstance(s, int) and s >= 0 for s in self.mapping_seeds):
            raise HilalError(f"mapping_seeds must be one or more whole numbers >= 0; got {self.mapping_seeds!r}")
        sides = ("batched", "sampled", "loop")  # hilal.bench.hessian.PASS_SIDES (that module imports this one)
        bad = [s for s in self.pass_sides if s not in sides]
        if bad or len(self.pass_sides) < 2 or len(set(self.pass_sides)) < len(self.pass_sides):
            raise HilalError(f"pass_sides must be two or three different sides of: {', '.join(sides)}; "
                             f"got {self.pass_sides!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """Smaller sizes for a quick look: 1 repeat, 16 probes, 8 noise samples, 256 calibration samples,
        5 forward passes, 10 recheck programmings, 4 evaluation programmings on 16 CIFAR-shaped samples, and
        mappings with ``reps=5``, ``max_rounds=4``. ``overrides``
        go on top (``mapping`` merged into those mapping settings)."""
        base = cls(repeats=1, probes=16, eli_samples=8, max_samples=256, forward_iters=5,
                   recheck_reps=10, mapping={"reps": 5, "max_rounds": 4}, eval_reps=4, cifar_samples=16)
        if "mapping" in overrides:  # settings of the mapping go on top of the quick sizes
            overrides = {**overrides, "mapping": {**base.mapping, **overrides["mapping"]}}
        return replace(base, **overrides)


def _median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, float)))


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _registered(names: Sequence[str], notes: list[str]) -> list[str]:
    from hilal.models import MODELS  # local: the report loads hilal.bench without the kit

    known = set(MODELS.names()) if hasattr(MODELS, "names") else set(MODELS)
    out = []
    for n in names:
        if n in known:
            out.append(n)
        else:
            notes.append(f"model {n!r} is not in the MODELS registry; skipped")
    return out


def _trained(name: str, splits: Any, seed: int, device: str = "cpu") -> nn.Module:
    from hilal.train import trained_model  # local: the report loads hilal.bench without the kit

    return trained_model(name, splits, seed=seed, progress=False).to(device).eval()
