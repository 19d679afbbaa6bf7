"""A mapping's settings and outcome: :class:`MappingConfig` (one budget and one evaluation for every method),
:class:`MappingResult`, the choices its options take, and the curvature budget HILAL ranks layers with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pandas as pd
from torch import nn

from hilal.analog import PRESETS
from hilal.batched_eval import ENGINES
from hilal.checks import check_count, check_folder, check_number
from hilal.cluster import METHODS as CLUSTER_METHODS
from hilal.evaluate import ONE_DAY
from hilal.hardware import OBJECTIVES
from hilal.hessian import HessianConfig
from hilal.registry import HilalError, check_choice
from hilal.train import FinetuneConfig

SEARCHES = ("knapsack", "screen", "gallop", "bisect", "walk")
ORDERS = ("eli", "eli_per_mac")
ABLATIONS = {
    "eli-r": ("eli_norm", "r"),
    "eli-only": ("eli_norm",),
    "r-only": ("r",),
    "topeigen-only": ("lambda_max",),
    "topeigen/params": ("lambda_per_param",),
    "trace-only": ("trace",),
}
"""hilal-paper: the features each ablation clusters on."""
# What HILAL weighs a layer by: the curvature term of its ELI (1/2 E[e^T H e], from the noise's spread) or the
# full ELI (plus the first-order term g . E[e], from its systematic part)
COSTS = {"curvature": "eli_second", "eli": "eli"}
# Curvature budget inside a mapping: enough to rank layers (notebook 03 shows the full-budget metrics). ELI in
# output space, so converter and output noise, which the weight-space ELI leaves out, count too.
MAPPING_HESSIAN = {"probes": 16, "power_iters": 10, "noise": "output", "eli_samples": 16, "first_order_samples": 16,
                   "max_samples": 256}


@dataclass
class MappingConfig:
    """Settings shared by every mapping method (one budget and one evaluation for all)."""

    preset: str = "pcm_harsh"
    """aihwkit preset (hilal.analog.PRESETS)."""
    t_eval: float = ONE_DAY
    """Inference time (s) at which accuracy is judged."""
    reps: int = 10
    """Programming/drift repetitions per evaluation."""
    drop_threshold: float = 0.02
    """Tolerated accuracy drop (fraction) below the digital baseline (LionHeart's threshold; HILAL's
    tolerance for the sensitive extension)."""
    patience: int = 2
    """Retraining stops when this many evaluations in a row are below the best one (LionHeart's rule)."""
    max_rounds: int = 6
    """Upper bound on fine-tuning rounds per stage."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Optimizer settings and steps per round (one pass over the training split by default)."""
    stages: int = 1
    """HILAL: number of stages over which the robust cluster is offloaded."""
    robust_only: bool = False
    """HILAL: stop after the robust cluster."""
    search: str = "knapsack"
    """HILAL: how the stages are chosen. ``knapsack``: the sets carrying the most MACs per expected-loss
    budget (a 0/1-knapsack Pareto frontier over ``cost``, robust cluster first) bisected on zero-shot scores,
    each stage confirmed by one retrained stage; ``screen``: the same on prefixes of the ordered layers,
    corrected by the measured retraining recovery; ``gallop`` (1, 2, 4... then bisection), ``bisect`` or
    ``walk`` (one layer per stage) retrain at every probe, after the robust cluster's own ``stages``. Why
    zero-shot screens: a screen is one evaluation, a retraining stage several rounds of training and one."""
    order: str = "eli_per_mac"
    """HILAL: order inside each cluster: ``eli_per_mac`` (ascending cost per multiply-accumulate: the most
    analog work per unit of expected loss first) or ``eli`` (ascending cost, as published)."""
    cost: str = "curvature"
    """HILAL: a layer's expected loss in the order and the knapsack: ``curvature``, the second-order term of
    its ELI, 1/2 E[e^T H e], from the noise's spread (a fresh draw at every programming); or ``eli``, the
    full ELI as published, which adds the first-order term g . E[e] of the noise's systematic part (drift,
    converter bias: the same at every programming, so retrained output scales, biases and batch norm can
    correct it). Why ``curvature`` is the default: the first-order term moves the calibration loss without
    predicting accuracy, and can be negative (docs/benchmarks.md, "Notes moved from the code")."""
    min_gain: float = 0.02
    """HILAL ``knapsack``: after the first kept stage, a further stage must add at least this share of the
    network's MACs to be worth a retraining stage."""
    near_miss: float = 2.0
    """HILAL ``knapsack``: a candidate whose zero-shot score falls short of the floor by at most this many
    standard errors (of its repetitions) is retrained before the largest candidate that clears it, since
    retraining may lift it over (LionHeart keeps such layers after retraining); 0 turns this off, as do
    fewer than 5 ``reps`` (too few for a usable standard error). Only for the first stage: on a network
    already fine-tuned under noise, retraining recovers less, and a rejected near miss costs a full stage."""
    trim: bool = True
    """HILAL ``knapsack``: when a retrained stage falls below the floor, screen subsets of its layers (the
    knapsack frontier of the stage's own layers, bisected) on its best weights (retrained, or as they were
    when no round beat its zero-shot score) with the other layers digital again, and keep the largest that
    clears the floor without a further retraining stage (with ``confirm``, on a fresh evaluation as well)."""
    scan: int = 0
    """HILAL ``knapsack``: in a later round where no frontier set clears the floor, screen up to this many
    of the remaining single layers (ascending cost per MAC, sequential test) and retrain the first within one
    standard error of the floor (:func:`_scan`); 0 (the default) turns this off. It can recover layers
    that the digital model's ELI misranks once stages are kept, at the price of at most one more retraining
    stage per round."""
    recovery_prior: float = 0.0
    """HILAL ``screen`` and ``knapsack``: share of a zero-shot drop that retraining is assumed to recover
    (``screen`` replaces it by the recovery a stage measured; ``knapsack`` keeps it): 0 (none) to 1 (all).
    0 is conservative: a larger prior proposes larger stages, which retraining may not carry."""
    confirm: bool = False
    """Every method: accept a retraining stage on a fresh evaluation (``reps`` programmings that its rounds
    never drew, seeds from ``CONFIRM_SEED``) instead of its best round's score, the maximum of several noisy
    evaluations, which overstates what the mapping holds (:func:`recheck`); the best round's score is kept
    as ``best_round``. HILAL's ``trim`` likewise keeps a subset only if a fresh evaluation clears the floor
    (its screen score stays as ``zero_shot``). Off by default, as LionHeart accepts; one more evaluation per
    stage or trimmed subset."""
    layers: list[str] | None = None
    """The layers that may go analog, as names or shell-style patterns (``*.attention.*``); the others stay
    digital for every method (HILAL measures and ranks only these). ``None``: every mappable layer. Why: keep
    layers digital that a chip would not host (an embedding projection, a classifier head), or cut a paper-size
    model to a few candidates for a quick look or the dry run."""
    cluster: str = "kmeans"
    """Clustering method (hilal.cluster)."""
    hessian: dict[str, Any] = field(default_factory=dict)
    """Overrides of hilal.hessian.HessianConfig on top of ``MAPPING_HESSIAN`` (t_inference defaults to
    ``t_eval``)."""
    ablation: str = "eli-r"
    """hilal-paper: the features clustered (eli-r, eli-only, r-only, topeigen-only, topeigen/params,
    trace-only)."""
    paper_guard: bool = True
    """hilal-paper: judge each robust stage as every other method does (at ``t_eval``, against the floor) and
    reject one that breaks the tolerance. False is the paper-faithful variant (labelled ``paper-faithful`` in
    the result's ``variant``): every robust stage kept, retraining judged without drift, whatever the
    accuracy. Why on by default: the faithful variant can end far below the tolerance."""
    gamma: float = 0.08
    """hilal-paper: isotropic noise scale, sigma = gamma * max|W|."""
    sensitivity_batches: int = 1
    """hilal-paper: training mini-batches averaged for its descriptors."""
    seed: int = 0
    """Seed for noise, shuffling and random orders."""
    final_reps: int | None = None
    """Repetitions of the final test evaluation (default: ``reps``)."""
    objective: str = "macs"
    """HILAL ``knapsack``: the saving weighed against expected loss: ``macs`` (the analog MAC share), or the
    energy or latency per sample that putting a layer on tiles saves on ``chip`` (hilal.hardware; a layer that
    saves nothing there is never chosen for it)."""
    max_tiles: int | None = None
    """Analog tiles the mapping may use at most (None: no limit). HILAL's ``knapsack`` search, LionHeart and
    ``random`` honour it; the other methods and searches report in the result's ``hardware.budget`` that they
    do not."""
    chip: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`hilal.hardware.Chip` fields (the HERMES-like defaults; the tile size comes from
    ``preset``) for the ``hardware`` record and the ``energy`` / ``latency`` objectives."""
    engine: str = "batched"
    """Evaluation engine of every evaluation (:data:`hilal.batched_eval.ENGINES`): ``batched`` or the reference
    ``loop``; the same scores, so it is no part of :meth:`key`."""
    workdir: str | None = None
    """Folder for the resumable journal; an interrupted run started again with the same settings and code
    skips finished rounds."""

    def __post_init__(self) -> None:
        validate_mapping_config(self)

    def key(self) -> str:
        d = asdict(self)
        d.pop("workdir")
        d.pop("engine")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class MappingResult:
    """What every method returns (``to_dict`` gives the result.json of docs/design.md)."""

    method: str
    analog_layers: list[str]
    analog_mac_share: float
    accuracy_mean: float
    accuracy_std: float
    fp_accuracy: float
    t_eval: float
    reps: int
    timings: dict[str, float]
    rounds: int = 0
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    metrics: pd.DataFrame | None = None
    model: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("method", "analog_layers", "analog_mac_share", "accuracy_mean",
                                           "accuracy_std", "fp_accuracy", "t_eval", "reps", "timings",
                                           "rounds")}
        d["history"] = self.history.to_dict(orient="records")
        if self.metrics is not None:
            d["metrics"] = self.metrics.to_dict(orient="records")
        d.update(self.extra)
        return d

    @property
    def hardware(self) -> dict[str, Any] | None:
        """The mapping's cost on the chip (:func:`hilal.hardware.mapping_cost`: tiles, latency, energy, gains) and
        whether it keeps ``max_tiles`` (``budget``)."""
        return self.extra.get("hardware")


def validate_mapping_config(cfg: MappingConfig) -> None:
    """Check every field before any work (called on construction): names against their choices, counts and
    numbers against their ranges; a one-line HilalError naming the field and what is valid."""
    if isinstance(cfg.preset, str):
        PRESETS[cfg.preset]  # noqa: B018
    check_number("t_eval", cfg.t_eval, 0, low_open=True)
    check_count("reps", cfg.reps)
    check_number("drop_threshold", cfg.drop_threshold, 0)
    check_count("patience", cfg.patience)
    check_count("max_rounds", cfg.max_rounds)
    check_count("stages", cfg.stages)
    check_choice("search", cfg.search, SEARCHES)
    check_choice("order", cfg.order, ORDERS)
    check_choice("cost", cfg.cost, tuple(COSTS))
    check_number("min_gain", cfg.min_gain, 0, 1)
    check_number("near_miss", cfg.near_miss, 0)
    check_count("scan", cfg.scan, 0)
    check_number("recovery_prior", cfg.recovery_prior, 0, 1)
    check_choice("clustering method", cfg.cluster, CLUSTER_METHODS)
    check_choice("ablation", cfg.ablation, tuple(ABLATIONS))
    check_number("gamma", cfg.gamma, 0, low_open=True)
    check_count("sensitivity_batches", cfg.sensitivity_batches)
    check_count("seed", cfg.seed, 0)
    if cfg.final_reps is not None:
        check_count("final_reps", cfg.final_reps)
    for name in ("robust_only", "trim", "confirm", "paper_guard"):
        if not isinstance(getattr(cfg, name), bool):
            raise HilalError(f"{name} must be True or False; got {getattr(cfg, name)!r}")
    if not isinstance(cfg.finetune, FinetuneConfig):
        raise HilalError(f"finetune must be a hilal.train.FinetuneConfig; got {type(cfg.finetune).__name__}")
    if not isinstance(cfg.hessian, dict):
        raise HilalError(f"hessian must be a dict of HessianConfig fields; got {type(cfg.hessian).__name__}")
    bad = sorted(set(cfg.hessian) - {f.name for f in fields(HessianConfig)})
    if bad:
        raise HilalError(f"unknown HessianConfig setting(s) {bad} in hessian; valid: "
                         f"{', '.join(f.name for f in fields(HessianConfig))}")
    if cfg.workdir is not None:
        check_folder(cfg.workdir, "workdir")
    check_choice("engine", cfg.engine, ENGINES)
    check_choice("objective", cfg.objective, OBJECTIVES)
    if cfg.max_tiles is not None:
        check_count("max_tiles", cfg.max_tiles)
    if not isinstance(cfg.chip, dict):
        raise HilalError(f"chip must be a dict of hilal.hardware.Chip fields; got {type(cfg.chip).__name__}")
    if cfg.layers is not None and (isinstance(cfg.layers, str) or not isinstance(cfg.layers, (list, tuple))
                                   or not cfg.layers or not all(isinstance(x, str) and x for x in cfg.layers)):
        raise HilalError(f"layers must be None or a non-empty list of layer names or patterns; got {cfg.layers!r}")


def _hessian_cfg(cfg: MappingConfig) -> Any:
    """The ``HessianConfig`` HILAL ranks layers with: ``MAPPING_HESSIAN`` at ``t_eval`` and the mapping's seed,
    under ``cfg.hessian``'s overrides."""
    return HessianConfig(**{**MAPPING_HESSIAN, "t_inference": cfg.t_eval, "seed": cfg.seed, **cfg.hessian})
