"""Layer-allocation methods: HILAL, the paper's variant, LionHeart, and plain baselines.

Every method shares one retraining routine (:func:`retrain`: the same optimizer settings, steps per round
and patience rule) and one evaluation (:func:`hilal.evaluate.noisy_scores` at ``t_eval`` over ``reps`` on the
calibration split inside the loop, on the test split at the end), so a HILAL stage and a LionHeart round cost
the same and any speed-up comes from the method.

Timings: ``search_s`` is the time spent deciding (curvature metrics, ordering, clustering, and retraining
rounds whose result was rejected), ``mapping_s`` the retraining whose result was kept, ``eval_s`` the final
evaluation, ``total_s`` everything including the floating-point baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import torch
from aihwkit.optim.context import AnalogContext
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import (
    analog_layers,
    analog_share,
    count_macs,
    extend_analog,
    mappable_layers,
    revert_to_digital,
    to_analog,
)
from hilal.batches import epoch_generator
from hilal.data import Splits, loader
from hilal.evaluate import ONE_DAY, noisy_metrics, noisy_scores
from hilal.paths import atomic_json_dump, atomic_torch_save, code_fingerprint
from hilal.registry import HilalError, Registry, check_choice
from hilal.train import FinetuneConfig, evaluate, finetune_round, make_optimizer, model_device, score, train_batch

SEARCHES = ("knapsack", "screen", "gallop", "bisect", "walk")
ORDERS = ("eli", "eli_per_mac")
# What HILAL weighs a layer by: the curvature term of its ELI (1/2 E[e^T H e], from the noise's spread) or the
# full ELI (plus the first-order term g . E[e], from its systematic part)
COSTS = {"curvature": "eli_second", "eli": "eli"}
# Curvature budget inside a mapping: enough to rank layers (notebook 03 shows the full-budget metrics). ELI in
# output space, so converter and output noise count too (they dominate the harsh preset's sensitivity).
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
    each stage confirmed by one retrained stage (typically one to three in all); ``screen``: the same on
    prefixes of the ordered layers, corrected by the measured retraining recovery; ``gallop`` (1, 2, 4...
    then bisection), ``bisect`` or ``walk`` (one layer per stage) retrain at every probe, after the robust
    cluster's own ``stages``."""
    order: str = "eli_per_mac"
    """HILAL: order inside each cluster: ``eli_per_mac`` (ascending cost per multiply-accumulate: the most
    analog work per unit of expected loss first) or ``eli`` (ascending cost, as published)."""
    cost: str = "curvature"
    """HILAL: a layer's expected loss in the order and the knapsack: ``curvature``, the second-order term of
    its ELI, 1/2 E[e^T H e], from the noise's spread (a fresh draw at every programming); or ``eli``, the
    full ELI as published, which adds the first-order term g . E[e] of the noise's systematic part (drift,
    converter bias: the same at every programming, so retrained output scales, biases and batch norm can
    correct it). That term moves the calibration loss without predicting accuracy (on ResNet-20 it is
    negative for four layers, down to -0.012, making them look the most robust); weighing by curvature alone
    raised ResNet-20's median analog MAC share from 0.38 to 0.67 over mapping seeds 0-5."""
    min_gain: float = 0.02
    """HILAL ``knapsack``: after the first kept stage, a further stage must add at least this share of the
    network's MACs to be worth a retraining stage."""
    near_miss: float = 2.0
    """HILAL ``knapsack``: a candidate whose zero-shot score falls short of the floor by at most this many
    standard errors (of its repetitions) is retrained before the largest candidate that clears it, since
    retraining may lift it over (LionHeart keeps such layers after retraining); 0 turns this off, as do
    fewer than 5 ``reps`` (too few for a usable standard error). Only for the first stage: on a network
    already fine-tuned under noise, retraining recovers less (later near misses were rejected 3 times in 5
    on ResNet-8/20, each costing a full stage)."""
    trim: bool = True
    """HILAL ``knapsack``: when a retrained stage falls below the floor, screen subsets of its layers (the
    knapsack frontier of the stage's own layers, bisected) on its best weights (retrained, or as they were
    when no round beat its zero-shot score) with the other layers digital again, and keep the largest that
    clears the floor without a further retraining stage (with ``confirm``, on a fresh evaluation as well)."""
    scan: int = 0
    """HILAL ``knapsack``: in a later round where no frontier set clears the floor, screen up to this many
    of the remaining single layers (ascending cost per MAC, sequential test) and retrain the first within one
    standard error of the floor (:func:`_scan`); 0 (the default) turns this off. With ``cost="eli"`` it
    recovered layers that the ELI misranked (ResNet-20 seeds 0-5: median share 0.38 to 0.44); with the
    default ``cost="curvature"`` it added one layer on two of six ResNet-20 seeds, and HILAL's median time
    there was 58 s with it against 33 s without (speed-up 4.3x against 6.9x)."""
    recovery_prior: float = 0.0
    """HILAL ``screen`` and ``knapsack``: share of a zero-shot drop that retraining is assumed to recover
    (``screen`` replaces it by the recovery a stage measured; ``knapsack`` keeps it). 0 is conservative; 0.5
    explored one more stage on ResNet-8/20 without gaining analog MACs."""
    confirm: bool = False
    """Every method: accept a retraining stage on a fresh evaluation (``reps`` programmings that its rounds
    never drew, seeds from ``CONFIRM_SEED``) instead of its best round's score, the maximum of several noisy
    evaluations, which overstates what the mapping holds (:func:`recheck`); the best round's score is kept
    as ``best_round``. HILAL's ``trim`` likewise keeps a subset only if a fresh evaluation clears the floor
    (its screen score stays as ``zero_shot``). Off by default, as LionHeart accepts; one more evaluation per
    stage or trimmed subset."""
    cluster: str = "kmeans"
    """Clustering method (hilal.cluster)."""
    hessian: dict[str, Any] = field(default_factory=dict)
    """Overrides of hilal.hessian.HessianConfig on top of ``MAPPING_HESSIAN`` (t_inference defaults to
    ``t_eval``)."""
    ablation: str = "eli-r"
    """hilal-paper: the features clustered (eli-r, eli-only, r-only, topeigen-only, topeigen/params,
    trace-only)."""
    gamma: float = 0.08
    """hilal-paper: isotropic noise scale, sigma = gamma * max|W|."""
    sensitivity_batches: int = 1
    """hilal-paper: training mini-batches averaged for its descriptors."""
    seed: int = 0
    """Seed for noise, shuffling and random orders."""
    final_reps: int | None = None
    """Repetitions of the final test evaluation (default: ``reps``)."""
    workdir: str | None = None
    """Folder for the resumable journal; an interrupted run started again with the same settings and code
    skips finished rounds."""

    def key(self) -> str:
        d = asdict(self)
        d.pop("workdir")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class MappingResult:
    """What every method returns (``to_dict`` gives DESIGN.md's result.json)."""

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


METHODS: Registry[Callable[..., MappingResult]] = Registry("method")


# --- shared machinery ----------------------------------------------------------------------------------

def _weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers, keyed ``p:``/``b:``, without aihwkit's ``AnalogContext`` placeholders (they hold
    no data; the tile weights are their own parameters, and aihwkit 1.2 refuses to read a placeholder)."""
    for k, v in model.named_parameters():
        if not isinstance(v, AnalogContext):
            yield f"p:{k}", v
    for k, v in model.named_buffers():
        yield f"b:{k}", v


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (cheaper than a state_dict of an aihwkit model)."""
    return {k: v.detach().clone() for k, v in _weights(model)}


@torch.no_grad()
def restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot` back into a model of the same structure."""
    for k, v in _weights(model):
        if k.startswith("p:") or k in snap:  # every parameter must be there; buffers may be new
            v.copy_(snap[k])


class Journal:
    """Resumable record of finished steps: one JSON index plus one weights file per kept model, in a folder
    keyed by the method, model, settings and code version (a change of the package's source starts a fresh
    journal beside the old one instead of replaying steps the old code took)."""

    def __init__(self, workdir: str | None, method: str, cfg: MappingConfig, tag: str) -> None:
        self.dir = Path(workdir) / _safe(f"{method}-{tag}-{cfg.key()}-{code_fingerprint()}") if workdir else None
        self.steps: dict[str, Any] = {}
        if self.dir and (self.dir / "journal.json").exists():
            self.steps = json.loads((self.dir / "journal.json").read_text())

    def get(self, key: str) -> Any:
        return self.steps.get(key)

    def put(self, key: str, value: Any, model: nn.Module | None = None) -> None:
        self.steps[key] = value
        if self.dir is None:
            return
        if model is not None:
            atomic_torch_save(snapshot(model), self.dir / f"{_safe(key)}.pt")
        atomic_json_dump(self.steps, self.dir / "journal.json")

    def load_model(self, key: str, model: nn.Module) -> bool:
        path = self.dir / f"{_safe(key)}.pt" if self.dir else None
        if path is None or not path.exists():
            return False
        restore(model, torch.load(path, map_location="cpu", weights_only=False))
        return True


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


@dataclass
class Round:
    """Outcome of one retraining stage."""

    score: float
    rounds: int
    seconds: float


def retrain(model: nn.Module, splits: Splits, cfg: MappingConfig, seed: int, drift: bool = True,
            progress: bool = False, start: float | None = None, teacher: nn.Module | None = None,
            noise_seed: int | None = None) -> Round:
    """Noise-injection fine-tuning until ``patience`` evaluations in a row fall below the best one (or
    ``max_rounds``); the best weights are kept in ``model``. Each evaluation is the mean score over ``reps``
    programmings at ``t_eval`` (or, with ``drift=False``, of the unprogrammed model) on the calibration split.
    ``start``, the score of ``model`` as given (already measured), makes it round 0: retraining stops once
    ``patience`` rounds in a row fail to beat it, and if none does the model is left as it was.
    ``teacher``: the digital model, needed when ``cfg.finetune.distill`` > 0. The tiles' training noise
    draws from torch's global generator, which is seeded with ``noise_seed`` (default ``seed``) first, so
    the result does not depend on what ran before.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed if noise_seed is None else noise_seed)
    opt = make_optimizer(model, cfg.finetune)
    best, best_snap, recent = -np.inf, None, []
    if start is not None:
        best, best_snap = float(start), snapshot(model)
    n = 0
    for n in range(1, cfg.max_rounds + 1):
        finetune_round(model, splits, cfg.finetune, opt, seed=seed * 101 + n, teacher=teacher)
        s = _in_loop_score(model, splits, cfg, seed + n, drift)
        recent.append(s)
        if s > best:
            best, best_snap = s, snapshot(model)
        if len(recent) >= cfg.patience and max(recent[-cfg.patience:]) < best:
            break
    if best_snap is not None:
        restore(model, best_snap)
    return Round(float(best), n, time.perf_counter() - t0)


def _se(x: np.ndarray) -> float:
    """Standard error of a mean over repetitions (0 for a single one, or when all are equal: the float sum
    of equal scores can leave a spread of 1e-17)."""
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 and np.ptp(x) > 0 else 0.0


def _decided(x: np.ndarray, threshold: float, z: float = 3.0, min_reps: int = 3) -> bool:
    """Sequential test: the mean of ``x`` lies more than ``z`` standard errors from ``threshold``."""
    return len(x) >= min_reps and abs(float(x.mean()) - threshold) > z * _se(x)


def _in_loop_score(model: nn.Module, splits: Splits, cfg: MappingConfig, seed: int, drift: bool) -> float:
    if drift:
        return float(noisy_scores(model, splits, cfg.t_eval, cfg.reps, seed, split="calib").mean())
    torch.manual_seed(seed)
    return float(np.mean([score(model, splits, "calib") for _ in range(cfg.reps)]))


class _Run:
    """Book-keeping shared by the methods: baseline, MACs, timings, history, journal, final evaluation."""

    def __init__(self, method: str, model: nn.Module, splits: Splits, cfg: MappingConfig, progress: bool) -> None:
        self.t0 = time.perf_counter()
        self.method, self.digital, self.splits, self.cfg, self.progress = method, model, splits, cfg, progress
        if not mappable_layers(model):
            raise HilalError("the model has no mappable layer (no Conv1d/Conv2d/Linear module)")
        if analog_layers(model):
            raise HilalError("pass the digital model to run_mapping; it already has analog layers")
        model.eval()
        self.macs = count_macs(model, splits.example_input(2))
        self.fp_metrics = evaluate(model, splits, "test")
        self.fp_test = float(self.fp_metrics["accuracy"])
        self.baseline = score(model, splits, "calib")
        self.timings = {"search_s": 0.0, "mapping_s": 0.0, "eval_s": 0.0}
        self.rows: list[dict[str, Any]] = []
        self.journal = Journal(cfg.workdir, method, cfg, f"{type(model).__name__}-{splits.name}")
        self.rounds = 0
        self.model: nn.Module = model
        self.layers: list[str] = []
        self.rejected: tuple[list[str], nn.Module, float] | None = None

    def floor(self) -> float:
        """The lowest score accepted. Scores are means of per-sample counts, so one that equals the floor
        exactly must not fail by float rounding (348.8/360 came out 1e-16 below 356/360 - 0.02)."""
        return self.baseline - self.cfg.drop_threshold - 1e-9

    def stage(self, key: str, layers: list[str], accept: Callable[[float], bool] | None = None,
              drift: bool = True, zero_shot: bool | float = False, keep_rejected: bool = False) -> bool:
        """Make ``layers`` analog on top of the current model, retrain, and keep the result if ``accept``
        (always when None). With ``zero_shot`` True the candidate is also scored before retraining (recorded
        as ``zero_shot``; a number is recorded as the already measured zero-shot score); that score is then
        the retraining's round 0 (:func:`retrain` ``start``): retraining stops once ``patience`` rounds fail
        to beat it, and a candidate that cleared the floor zero-shot is kept as it was if none does. With
        ``keep_rejected`` a rejected candidate's best weights (retrained, or as given when no round beat
        its zero-shot score) are kept aside for :meth:`screen`
        ``(retrained=True)`` and :meth:`adopt`. Journaled: a finished stage is replayed from disk, not
        recomputed."""
        new_layers = [n for n in self.layers + layers if n]
        done = self.journal.get(key)
        candidate = extend_analog(self.model, layers, self.cfg.preset)
        self.rejected = None
        if done is not None:
            ok = done["kept"]
            loaded = self.journal.load_model(key, candidate) if ok or keep_rejected else False
            if not ok and loaded:
                self.rejected = (list(layers), candidate, done["seconds"])
            self._record(key, layers, done, ok, replayed=True)
        else:
            seed = self._step_seed()
            t = time.perf_counter()
            if zero_shot is True:
                z = _in_loop_score(candidate, self.splits, self.cfg, seed, drift)
            else:
                z = None if zero_shot is False else float(zero_shot)
            scoring_s = time.perf_counter() - t
            r = retrain(candidate, self.splits, self.cfg, seed, drift, start=z, teacher=self.digital,
                        noise_seed=self.cfg.seed + len(self.rows))
            done = {"score": r.score, "rounds": r.rounds, "zero_shot": z}
            if self.cfg.confirm:
                fresh, fresh_s = self._fresh_score(candidate, seed, drift)
                done |= {"score": fresh, "best_round": r.score}
                scoring_s += fresh_s
            ok = True if accept is None else bool(accept(done["score"]))
            done |= {"kept": ok, "seconds": r.seconds + scoring_s}
            self.journal.put(key, done, candidate if ok or keep_rejected else None)
            self._record(key, layers, done, ok)
            if not ok and keep_rejected:
                self.rejected = (list(layers), candidate, done["seconds"])
        if ok:
            self.model, self.layers = candidate, new_layers
        return ok

    def _step_seed(self) -> int:
        """The seed of the next step's evaluations: different for every step of the history."""
        return self.cfg.seed + 7919 * len(self.rows)

    def _fresh_score(self, candidate: nn.Module, seed: int, drift: bool) -> tuple[float, float]:
        """``confirm``'s evaluation of ``candidate`` on programmings no step drew (seeds from ``CONFIRM_SEED``)
        and the seconds it took."""
        t = time.perf_counter()
        return _in_loop_score(candidate, self.splits, self.cfg, CONFIRM_SEED + seed, drift), time.perf_counter() - t

    def _trimmed(self, layers: list[str]) -> nn.Module:
        """The last rejected stage's retrained model with only ``layers`` of its new layers left analog."""
        if self.rejected is None:
            raise HilalError("no rejected stage to trim: call stage(..., keep_rejected=True) first")
        staged, model, _ = self.rejected
        unknown = [n for n in layers if n not in staged]
        if unknown:
            raise HilalError(f"layer(s) {unknown} were not in the rejected stage; its layers: {', '.join(staged)}")
        return revert_to_digital(model, [n for n in staged if n not in set(layers)])

    def adopt(self, key: str, layers: list[str], score: float) -> bool:
        """Keep the last rejected stage's retrained model with only ``layers`` of its new layers analog (a
        subset that :meth:`screen` ``(retrained=True)`` scored at ``score``), without retraining again. Its
        retraining time moves from search to mapping, since the kept model is its result. With ``confirm`` the
        subset is kept only if a fresh evaluation (seeds from ``CONFIRM_SEED``) clears the floor too, as a
        retraining stage is: its screen is one of several that the trim chose among. Returns whether it was
        kept (a rejected subset leaves the rejected stage in place for another)."""
        candidate = self._trimmed(layers)
        done = self.journal.get(key)
        replayed = done is not None
        if done is None:
            done = {"kept": True, "score": score, "rounds": 0, "seconds": 0.0, "zero_shot": score}
            if self.cfg.confirm:
                fresh, fresh_s = self._fresh_score(candidate, self._step_seed(), True)
                done |= {"score": fresh, "kept": fresh >= self.floor(), "seconds": fresh_s}
            self.journal.put(key, done, candidate if done["kept"] else None)
        elif done["kept"]:
            self.journal.load_model(key, candidate)
        self._record(key, layers, done, done["kept"], replayed=replayed)
        if not done["kept"]:
            return False
        seconds = self.rejected[2]
        self.timings["search_s"] -= seconds
        self.timings["mapping_s"] += seconds
        self.model, self.layers, self.rejected = candidate, self.layers + list(layers), None
        return True

    def screen(self, key: str, layers: list[str], threshold: float | None = None, retrained: bool = False) -> float:
        """Zero-shot score (no retraining) of the current model with ``layers`` made analog as well: the
        mean over ``reps`` programmings, or fewer once the mean is clearly (3 standard errors, at least 3
        repetitions) on one side of ``threshold``. Its standard error is recorded as ``zero_shot_se``. With
        ``retrained`` the model scored is instead the last rejected stage's retrained one with only ``layers``
        of its new layers left analog (the others digital again, with their retrained weights)."""
        done = self.journal.get(key)
        replayed = done is not None
        if done is None:
            t = time.perf_counter()
            candidate = self._trimmed(layers) if retrained else extend_analog(self.model, layers, self.cfg.preset)
            stop = None if threshold is None else lambda x: _decided(x, threshold)
            x = noisy_scores(candidate, self.splits, self.cfg.t_eval, self.cfg.reps,
                             self._step_seed(), split="calib", stop=stop)
            s = float(x.mean())
            done = {"kept": False, "score": s, "rounds": 0, "seconds": time.perf_counter() - t, "zero_shot": s,
                    "zero_shot_se": _se(x), "reps": len(x)}
            self.journal.put(key, done)
        self._record(key, layers, done, False, replayed=replayed)
        return float(done["score"])

    def _record(self, key: str, layers: list[str], done: dict[str, Any], kept: bool, replayed: bool = False) -> None:
        self.rounds += done["rounds"]
        self.timings["mapping_s" if kept else "search_s"] += done["seconds"]
        self.rows.append({"step": key, "layers": ",".join(layers), "score": done["score"],
                          "zero_shot": done.get("zero_shot"), "zero_shot_se": done.get("zero_shot_se"),
                          "best_round": done.get("best_round"),
                          "floor": self.floor(), "rounds": done["rounds"],
                          "seconds": done["seconds"], "kept": kept, "replayed": replayed})
        s, rounds, seconds = done["score"], done["rounds"], done["seconds"]
        verdict = "kept" if kept else "zero-shot" if not rounds else "rejected"
        if self.progress:
            tqdm.write(f"[{self.method}] {key}: +{layers} score={s:.4f} floor={self.floor():.4f} "
                       f"{verdict} ({rounds} rounds, {seconds:.1f}s)")

    def finish(self, metrics: pd.DataFrame | None = None, **extra: Any) -> MappingResult:
        t = time.perf_counter()
        reps = self.cfg.final_reps or self.cfg.reps
        table = noisy_metrics(self.model, self.splits, self.cfg.t_eval, reps, self.cfg.seed + 1, split="test")
        scores = table["accuracy"].to_numpy(dtype=float)
        # QA: exact match and F1 of the final evaluation too (F1 is the score the search used)
        for k in ("em", "f1"):
            if k in table:
                extra |= {f"{k}_mean": float(table[k].mean()), f"{k}_std": float(table[k].std(ddof=1)) if reps > 1
                          else 0.0, f"fp_{k}": self.fp_metrics[k]}
        self.timings["eval_s"] = time.perf_counter() - t
        self.timings["total_s"] = time.perf_counter() - self.t0
        layers = [n for n in mappable_layers(self.digital) if n in set(analog_layers(self.model))]
        return MappingResult(
            method=self.method, analog_layers=layers, analog_mac_share=analog_share(self.macs, layers),
            accuracy_mean=float(scores.mean()), accuracy_std=float(scores.std(ddof=1)) if reps > 1 else 0.0,
            fp_accuracy=self.fp_test, t_eval=self.cfg.t_eval, reps=reps,
            timings={k: round(v, 3) for k, v in self.timings.items()}, rounds=self.rounds,
            history=pd.DataFrame(self.rows), metrics=metrics, model=self.model,
            extra={"n_layers": len(self.macs), "baseline_calib": self.baseline, "floor": self.floor(),
                   "preset": self.cfg.preset,
                   **extra})

    def timed_search(self, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.timings["search_s"] += time.perf_counter() - t
        return out


RECHECK_SEED = 1_000_000
"""Offset of :func:`recheck`'s programming seeds, far from every seed a search draws (mapping seed plus
7919 per step, plus the round)."""
CONFIRM_SEED = 2_000_000
"""Offset (added to the stage's seed) of the programming seeds of ``MappingConfig.confirm``'s evaluations,
far from the search's rounds and from :func:`recheck`'s."""


def recheck(result: MappingResult | Mapping[str, Any], splits: Splits, reps: int = 50, seed: int = 0,
            model: nn.Module | None = None) -> dict[str, Any]:
    """Score ``result``'s final model on the calibration split over ``reps`` programmings that its search never
    drew (seeds ``RECHECK_SEED + seed`` on), against the floor the search accepted it at.

    ``result`` is a :class:`MappingResult` (its ``model`` is scored, unless ``model`` is given) or its
    ``to_dict()`` form, as stored in result.json and by :func:`hilal.reproduce.mapping_results`, with the
    mapped ``model`` passed alongside.
    A search keeps the best of several noisy evaluations (each retraining round is one, and a greedy loop runs
    one stage per layer), so the score it accepted a mapping at overstates what the mapping holds. Returns
    ``calib_mean``, ``calib_se`` (standard error over the repetitions), ``reps``, ``floor``, ``margin``
    (``calib_mean - floor``; negative: the mapping does not hold its tolerance on fresh programmings),
    ``z`` (``margin / calib_se``; None when every repetition scored the same), ``holds_floor``
    (``margin >= 0``) and ``accepted`` (the score of the search's last kept step, the evaluation the final
    mapping was kept on; None when no step was kept)."""
    if isinstance(result, MappingResult):
        model = result.model if model is None else model
        floor, t_eval, history = result.extra.get("floor"), result.t_eval, result.history.to_dict(orient="records")
    else:
        floor, t_eval, history = result.get("floor"), result["t_eval"], list(result.get("history") or [])
    if model is None:
        raise HilalError("recheck needs the mapped model: result.model is None (it was dropped after the run) "
                         "and no model= was given")
    if floor is None:
        raise HilalError("recheck needs the floor the search used: the result has no 'floor' (results of "
                         "run_mapping record one in extra)")
    if reps < 2:
        raise HilalError(f"recheck needs reps >= 2 for a standard error; got {reps}")
    x = noisy_scores(model, splits, t_eval, reps, RECHECK_SEED + seed, split="calib")
    mean, se, floor = float(x.mean()), _se(x), float(floor)
    kept = [float(r["score"]) for r in history if r.get("kept")]
    return {"calib_mean": mean, "calib_se": se, "reps": reps, "floor": floor, "margin": mean - floor,
            "z": (mean - floor) / se if se > 0 else None, "holds_floor": mean >= floor,
            "accepted": kept[-1] if kept else None}


def fresh_pass_rate(check: Mapping[str, Any], test_reps: int) -> float:
    """The chance that one more run of a search's own acceptance test (the mean score over ``test_reps``
    fresh programmings at least the floor) passes the mapping that ``check``, a :func:`recheck` record,
    re-scored: Phi(margin / (sd / sqrt(test_reps))), with the spread over programmings sd = calib_se *
    sqrt(reps) (the normal approximation of a mean of ``test_reps`` programmings). A mapping exactly at its
    floor passes half the time; 1 or 0 when every programming scored the same."""
    if test_reps < 1:
        raise HilalError(f"test_reps must be at least 1; got {test_reps}")
    margin, se = float(check["margin"]), float(check["calib_se"])
    if se <= 0:
        return float(margin >= 0)
    return NormalDist(0.0, se * math.sqrt(int(check["reps"]) / test_reps)).cdf(margin)


def run_mapping(method: str, model: nn.Module, splits: Splits, cfg: MappingConfig | None = None,
                progress: bool = True) -> MappingResult:
    """Run one allocation method on a trained digital ``model`` (left unmodified)."""
    fn = METHODS[method]
    cfg = cfg or MappingConfig()
    check_choice("search", cfg.search, SEARCHES)
    check_choice("order", cfg.order, ORDERS)
    check_choice("cost", cfg.cost, tuple(COSTS))
    return fn(_Run(method, model, splits, cfg, progress))


# --- HILAL ---------------------------------------------------------------------------------------------

def _hessian_cfg(cfg: MappingConfig) -> Any:
    from hilal.hessian import HessianConfig

    return HessianConfig(**{**MAPPING_HESSIAN, "t_inference": cfg.t_eval, "seed": cfg.seed, **cfg.hessian})


def _metrics(run: _Run) -> pd.DataFrame:
    from hilal.cluster import cluster_layers
    from hilal.hessian import layer_metrics

    cached = run.journal.get("metrics")
    if cached is not None:
        return pd.DataFrame(cached)
    df = layer_metrics(run.digital, run.splits, run.cfg.preset, _hessian_cfg(run.cfg), progress=run.progress)
    df = cluster_layers(df, method=run.cfg.cluster, seed=run.cfg.seed)
    run.journal.put("metrics", df.to_dict(orient="records"))
    return df


@METHODS.register("hilal")
def hilal(run: _Run) -> MappingResult:
    """Curvature metrics -> robust/sensitive clusters -> layers offloaded robust cluster first, each cluster
    in ascending ``cost`` (or cost per MAC), with noise-injection fine-tuning after every stage, as far as accuracy
    stays within the tolerance. ``search="knapsack"`` (:func:`_knapsack`) and ``"screen"``
    (:func:`_screened`) pick each stage from zero-shot scores (the robust cluster is proposed first and kept
    if it clears the tolerance); the other searches offload the robust cluster unconditionally in ``stages``
    stages, then find the longest feasible prefix of the sensitive layers with retraining at every probe."""
    cfg = run.cfg
    df = run.timed_search(lambda: _metrics(run))
    cost = df[COSTS[cfg.cost]].astype(float)
    if cost.isna().any():
        raise HilalError(f"HILAL's cost {cfg.cost!r} needs the ELI: set hessian eli_samples > 0")
    key = cost / df["macs"] if cfg.order == "eli_per_mac" else cost
    order = df.assign(_key=key).sort_values("_key", kind="stable")
    robust = order.loc[order["cluster"] == "robust", "layer"].tolist()
    sensitive = [] if cfg.robust_only else order.loc[order["cluster"] == "sensitive", "layer"].tolist()
    if cfg.search == "knapsack":
        _knapsack(run, dict(zip(df["layer"], cost, strict=True)), robust, sensitive)
    elif cfg.search == "screen":
        _screened(run, robust + sensitive, len(robust))
    else:
        chunks = np.array_split(np.array(robust, dtype=object), max(1, min(cfg.stages, len(robust))))
        for i, chunk in enumerate(c for c in chunks if len(c)):
            run.stage(f"robust-{i}", list(chunk))
        if sensitive:
            _extend_prefix(run, sensitive)
    return run.finish(metrics=df, robust=robust, sensitive=sensitive)


def pareto_sets(cost: Sequence[float], value: Sequence[float], max_points: int = 4096
                ) -> list[tuple[float, float, tuple[int, ...]]]:
    """The 0/1-knapsack Pareto frontier of items with ``cost`` and ``value``: (total cost, total value, item
    indices) of every set that has more value than any set of lower or equal cost, in increasing cost (and
    value). Items of cost <= 0 are in every set. Nemhauser-Ullmann list merging; past ``max_points`` the
    list is thinned to the cheapest set per value bin (1/max_points of the value range) and the largest."""
    free = tuple(i for i, c in enumerate(cost) if c <= 0)
    points = [(float(sum(cost[i] for i in free)), float(sum(value[i] for i in free)), free)]
    for i, (ci, vi) in enumerate(zip(cost, value, strict=True)):
        if ci <= 0:
            continue
        merged = sorted(points + [(c + ci, v + vi, s + (i,)) for c, v, s in points], key=lambda p: (p[0], -p[1]))
        points, best = [], -math.inf
        for p in merged:
            if p[1] > best:
                points.append(p)
                best = p[1]
        if len(points) > max_points:
            width = (points[-1][1] - points[0][1]) / max_points
            thinned, last = [], -math.inf
            for p in points:
                b = math.floor(p[1] / width)
                if b > last:
                    thinned.append(p)
                    last = b
            points = thinned if thinned[-1] is points[-1] else [*thinned, points[-1]]
    return [(c, v, tuple(sorted(s))) for c, v, s in points]


def _knapsack(run: _Run, cost: dict[str, float], robust: list[str], sensitive: list[str]) -> None:
    """Stages chosen as knapsack sets: since independent noise in different layers adds expected loss
    increases (the cross terms vanish in expectation), the layers that carry the most MACs for an ELI budget
    form the knapsack optimum, and as the budget grows these optima trace a Pareto frontier. Each round
    bisects that frontier, without retraining, for the largest set whose zero-shot score z, plus the share
    ``recovery_prior`` of the drop that retraining is assumed to recover, clears the floor (the first round
    keeps the robust cluster in every set, and proposes it when only a near miss cleared the floor; if the
    robust cluster alone fails its screen, the next round searches all layers without it). A near miss
    (short by at most ``near_miss`` standard errors; first stage only) counts as clearing it in the
    bisection: it is retrained first, and if rejected (and, with ``trim``, no subset of it clears the floor
    on its retrained weights: :func:`_trim`) the largest screened set that did clear it; a kept stage starts
    the next round from the grown model (sets adding at least ``min_gain`` of the MACs; its cheapest set is
    screened first, and if it fails, so would every costlier one: the round ends after one screen, which
    after a kept stage is the usual case), a rejected one caps the total ELI of later sets. Recovery is not
    extrapolated from one stage to the next: a stage's best score is the maximum of noisy evaluations, which
    overstates it. ``cost`` maps every layer to its expected loss (the ``MappingConfig.cost`` chosen)."""
    cfg, base, floor = run.cfg, run.baseline, run.floor()
    candidates_pool = robust + sensitive
    rho, cap, it = cfg.recovery_prior, math.inf, 0
    thr = (floor - rho * base) / (1 - rho)  # z + rho * (base - z) >= floor
    while True:
        # near misses for the first stage only; a standard error from fewer than 5 repetitions is too rough
        margin = cfg.near_miss if cfg.reps >= 5 and not run.layers else 0.0
        forced = [n for n in robust if n not in run.layers] if it == 0 else []
        rest = [n for n in candidates_pool if n not in run.layers and n not in forced]
        spent, forced_cost = sum(cost[n] for n in run.layers), sum(cost[n] for n in forced)
        cands = [forced + [rest[i] for i in idx] for c, _, idx in
                 pareto_sets([cost[n] for n in rest], [run.macs[n] for n in rest]) if spent + forced_cost + c < cap]
        gain = cfg.min_gain * sum(run.macs.values()) if run.layers else 0.0
        cands = [c for c in cands if c and sum(run.macs[n] for n in c) >= gain]
        if not cands:
            return
        z: dict[int, float] = {}
        se: dict[int, float] = {}
        lo, hi = -1, len(cands) - 1  # bisection for the largest set that clears the floor or nearly misses it
        cheapest_first = bool(run.layers)  # after a kept stage: if the cheapest set fails, so would the rest
        while lo < hi:
            k = 0 if cheapest_first else (lo + hi + 1) // 2
            cheapest_first = False
            z[k] = run.screen(f"screen-{it}-{k}", cands[k], threshold=thr)
            se[k] = run.rows[-1]["zero_shot_se"] or 0.0
            lo, hi = (k, hi) if z[k] >= thr - margin * se[k] else (lo, k - 1)
        if lo < 0 and forced:  # the robust cluster alone fails its screen: search every layer instead
            it += 1
            continue
        if lo < 0 and run.layers and cfg.scan:  # a later round where no frontier set clears: single layers
            tried = {tuple(c) for k, c in enumerate(cands) if k in z and len(c) == 1}
            singles = [n for n in rest if (n,) not in tried and run.macs[n] >= gain and spent + cost[n] < cap]
            singles = sorted(singles, key=lambda n: cost[n] / run.macs[n])[: cfg.scan]
            if _scan(run, f"single-{it}", singles, floor):
                it += 1
                continue
            return
        tries = [lo] if lo >= 0 else []
        if lo < 0 or z[lo] < thr:  # a near miss (or nothing): fall back to the largest set that cleared it
            strict = max((k for k in z if k < max(lo, 0) and z[k] >= thr), default=-1)
            if strict >= 0:
                tries.append(strict)
            elif forced:
                tries.append(0)
        if not tries:
            return
        for k in tries:  # a near miss first, then the largest set that cleared the floor
            if run.stage(f"stage-{it}-{k}", cands[k], lambda sc: sc >= floor, zero_shot=z.get(k, True),
                         keep_rejected=cfg.trim):
                break
            cap = min(cap, spent + sum(cost[n] for n in cands[k]))
            if cfg.trim and _trim(run, f"trim-{it}-{k}", cands[k], cost, floor, gain):
                break
        it += 1


def _scan(run: _Run, key: str, layers: list[str], floor: float) -> bool:
    """Screen single ``layers`` in order (sequential test against the floor) and retrain the first whose
    zero-shot score is within one standard error of the floor; keep it if it then clears the floor. Once
    stages are kept, the digital model's ELI ranks the remaining layers less well (their sensitivities moved
    with the retraining, and its Monte-Carlo error is of the order of the gaps between them), so the
    frontier's cheapest set may fail where the next single layer clears (ResNet-20: the successful single
    layers were among the first three in ELI-per-MAC order). At most one retraining."""
    for n in layers:
        z = run.screen(f"{key}-{n}", [n], threshold=floor)
        if z >= floor - (run.rows[-1]["zero_shot_se"] or 0.0):
            return run.stage(f"{key}-{n}-stage", [n], lambda sc: sc >= floor, zero_shot=z)
    return False


def _trim(run: _Run, key: str, layers: list[str], cost: dict[str, float], floor: float, gain: float) -> bool:
    """After the stage of ``layers`` was retrained and rejected: bisect the knapsack frontier of its own
    layers (most MACs per expected-loss budget, the full set excluded) on zero-shot scores of its retrained model with
    the rest of its layers digital again, and keep the largest subset that clears the floor and adds at least
    ``gain`` MACs. Retraining adapted the whole network to the stage's noise, so a subset usually clears the
    floor where it would not on the model before the stage (ResNet-8: 1-2 points higher); this replaces a
    second retraining stage by a few evaluations (when no round beat the stage's zero-shot score, its weights
    are those it had before retraining, and the subsets are screened on them). With ``confirm`` the subsets
    that cleared are tried largest first until one also clears a fresh evaluation (:meth:`_Run.adopt`).
    Returns whether a subset was kept."""
    full = set(layers)
    subsets = [[layers[i] for i in idx] for _, _, idx in
               pareto_sets([cost[n] for n in layers], [run.macs[n] for n in layers])]
    subsets = [x for x in subsets if x and set(x) != full and sum(run.macs[n] for n in x) >= gain]
    z: dict[int, float] = {}
    lo, hi = -1, len(subsets) - 1
    while lo < hi:
        k = (lo + hi + 1) // 2
        z[k] = run.screen(f"{key}-{k}", subsets[k], threshold=floor, retrained=True)
        lo, hi = (k, hi) if z[k] >= floor else (lo, k - 1)
    # the largest subset that cleared the floor first; the smaller ones only when ``confirm`` rejects it
    cleared = sorted((k for k in z if z[k] >= floor), reverse=True)
    for i, k in enumerate(cleared):
        if run.adopt(key if i == 0 else f"{key}-{k}-adopt", subsets[k], z[k]):
            return True
    return False


def _screened(run: _Run, order: list[str], n_robust: int) -> None:
    """Stages chosen from zero-shot scores over ``order`` (robust layers first). Each round bisects, without
    retraining, for the longest prefix whose zero-shot score z, plus the share rho of the drop
    (baseline - z) that retraining recovers (``recovery_prior`` until a stage has measured it), clears the
    floor; the first round proposes at least the whole robust cluster. The chosen stage is retrained once and
    kept if it clears the floor: a kept stage moves the start forward, a rejected one lowers the upper end and
    updates rho, until no longer prefix is worth a stage. Typically two or three retrained stages in all."""
    base, floor = run.baseline, run.floor()
    rho, done, hi, it = run.cfg.recovery_prior, 0, len(order), 0
    while True:
        lo_s, hi_s = done, hi
        while lo_s < hi_s:
            k = (lo_s + hi_s + 1) // 2
            z = run.screen(f"screen-{it}-{k}", order[done:k], threshold=(floor - rho * base) / (1 - rho))
            if z + rho * max(base - z, 0.0) >= floor:
                lo_s = k
            else:
                hi_s = k - 1
        k = max(lo_s, min(n_robust, hi)) if it == 0 else lo_s
        if k == done:
            return
        kept = run.stage(f"stage-{it}", order[done:k], lambda s: s >= floor, zero_shot=True)
        z, s = run.rows[-1]["zero_shot"], run.rows[-1]["score"]
        if z is not None and (base - z > run.cfg.drop_threshold or not kept):
            rho = min(max((s - z) / max(base - z, 1e-9), 0.0), 0.95)
        if kept:
            done = k
        else:
            hi = k - 1
        it += 1


def _extend_prefix(run: _Run, layers: list[str]) -> None:
    """Find the longest prefix of ``layers`` whose offloading keeps the calibration score above the floor,
    retraining at every probe and assuming feasibility is monotone in the prefix length (the ELI order)."""
    ok = lambda s: s >= run.floor()  # noqa: E731
    lo, hi = 0, len(layers)  # prefix lo is known feasible, hi + 1 known infeasible
    if run.cfg.search == "walk":
        for i, name in enumerate(layers):
            if not run.stage(f"sensitive-{i}", [name], ok):
                return
        return
    if run.cfg.search == "gallop":
        step = 1
        while lo < hi:
            k = min(lo + step, hi)
            if run.stage(f"prefix-{k}", layers[lo:k], ok):
                lo, step = k, step * 2
            else:
                hi = k - 1
                break
    while lo < hi:
        k = (lo + hi + 1) // 2
        if run.stage(f"prefix-{k}", layers[lo:k], ok):
            lo = k
        else:
            hi = k - 1


# --- the paper's own variant ----------------------------------------------------------------------------

ABLATIONS = {
    "eli-r": ("eli_norm", "r"),
    "eli-only": ("eli_norm",),
    "r-only": ("r",),
    "topeigen-only": ("lambda_max",),
    "topeigen/params": ("lambda_per_param",),
    "trace-only": ("trace",),
}


def paper_descriptors(run: _Run) -> pd.DataFrame:
    """The paper's descriptors on ``sensitivity_batches`` training mini-batches: ELI_norm =
    ½ (gamma max|W|)² tr(H_ll) / n_params, r = lambda_max / trace, and the ablation features."""
    from hilal.hessian import layer_metrics

    cfg = run.cfg
    it = iter(loader(run.splits.train, batch_size=run.cfg.finetune.batch_size, shuffle=True, seed=cfg.seed))
    gen, device = epoch_generator(cfg.seed, 0), model_device(run.digital)
    batches = [train_batch(run.splits, next(it), device, gen) for _ in range(cfg.sensitivity_batches)]  # augmented
    hcfg = _hessian_cfg(cfg)
    hcfg.eli_samples = hcfg.first_order_samples = 0  # the paper's ELI uses isotropic noise, below
    df = layer_metrics(run.digital, batches, cfg.preset, hcfg, progress=run.progress)
    mods = dict(run.digital.named_modules())
    wmax = np.array([float(mods[n].weight.detach().abs().max()) for n in df["layer"]])
    df["eli_norm"] = 0.5 * (cfg.gamma * wmax) ** 2 * df["trace"] / df["params"]
    df["r"] = df["lambda_max"] / df["trace"]
    df["lambda_per_param"] = df["lambda_max"] / df["params"]
    return df


def paper_clusters(df: pd.DataFrame, ablation: str, seed: int, restarts: int = 8) -> pd.DataFrame:
    """k-means (k=2, restarts) on the z-scored ablation features; robust = cluster whose centroid has the
    lower first feature."""
    from sklearn.cluster import KMeans

    cols = list(ABLATIONS[check_choice("ablation", ablation, tuple(ABLATIONS))])
    x = df[cols].to_numpy(float)
    z = (x - x.mean(0)) / (x.std(0) + 1e-12)
    out = df.copy()
    if len(df) < 2:
        out["cluster"] = "robust"
        return out
    km = KMeans(2, n_init=restarts, random_state=seed).fit(z)
    robust = int(np.argmin(km.cluster_centers_[:, 0]))
    out["cluster"] = np.where(km.labels_ == robust, "robust", "sensitive")
    return out


@METHODS.register("hilal-paper")
def hilal_paper(run: _Run) -> MappingResult:
    """The HILAL paper's variant: descriptors on training batches, isotropic noise, k-means on
    [ELI_norm, r] (or an ablation's feature), robust layers sorted by (ELI_norm, r) and offloaded one per
    stage with retraining judged without drift; sensitive layers never tried."""
    cfg = run.cfg
    df = run.timed_search(lambda: paper_clusters(paper_descriptors(run), cfg.ablation, cfg.seed))
    robust = df[df["cluster"] == "robust"].sort_values(["eli_norm", "r"], kind="stable")["layer"].tolist()
    for i, name in enumerate(robust):
        run.stage(f"robust-{i}", [name], drift=False)
    res = run.finish(metrics=df, robust=robust, ablation=cfg.ablation)
    nodrift = noisy_scores(run.model, run.splits, 0.0, res.reps, cfg.seed + 2, split="test")
    res.extra["accuracy_t0_mean"] = float(nodrift.mean())
    return res


# --- LionHeart and baselines ---------------------------------------------------------------------------

def _greedy(run: _Run, order: list[str]) -> MappingResult:
    ok = lambda s: s >= run.floor()  # noqa: E731
    for i, name in enumerate(tqdm(order, desc=run.method, disable=not run.progress, leave=False)):
        run.stage(f"candidate-{i}", [name], ok)
    return run.finish(order=order)


@METHODS.register("lionheart")
def lionheart(run: _Run) -> MappingResult:
    """IBM/lionheart's greedy loop: candidates by descending MACs; add one, retrain with patience, keep it if
    the best score stays within ``drop_threshold`` of the digital baseline, else revert."""
    order = run.timed_search(lambda: sorted(run.macs, key=lambda n: -run.macs[n]))
    return _greedy(run, order)


@METHODS.register("random")
def random_order(run: _Run) -> MappingResult:
    """LionHeart's accept/reject loop over a random (seeded) layer order."""
    order = list(run.macs)
    random.Random(run.cfg.seed).shuffle(order)
    return _greedy(run, order)


@METHODS.register("all-digital")
def all_digital(run: _Run) -> MappingResult:
    """Nothing analog: the floating-point reference."""
    return run.finish()


@METHODS.register("all-analog")
def all_analog(run: _Run) -> MappingResult:
    """Every mappable layer analog, no fine-tuning."""
    run.model = to_analog(run.digital, mappable_layers(run.digital), run.cfg.preset)
    run.layers = mappable_layers(run.digital)
    return run.finish()


@METHODS.register("all-analog-ft")
def all_analog_ft(run: _Run) -> MappingResult:
    """Every mappable layer analog, with one noise-injection retraining stage."""
    run.stage("all", mappable_layers(run.digital))
    return run.finish()
