"""One mapping run's machinery, shared by every method: the retraining routine (:func:`retrain`: the same
optimizer settings, steps per round and patience rule for all) and the run object (:class:`_Run`) whose steps
(a retrained stage, a zero-shot screen, the adoption of a trimmed subset) every method is built from, each
journaled and recorded, with one evaluation (:func:`hilal.evaluate.noisy_scores` at ``t_eval`` over ``reps``
on the calibration split inside the loop, on the test split at the end)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hilal.analog import (
    analog_layers,
    analog_share,
    count_macs,
    extend_analog,
    mappable_layers,
    revert_to_digital,
    select_layers,
)
from hilal.data import Splits
from hilal.evaluate import noisy_metrics, noisy_scores
from hilal.hardware import chip_costs, make_chip, mapping_cost, savings
from hilal.mapping.config import MappingConfig, MappingResult
from hilal.mapping.journal import Journal, restore, snapshot
from hilal.mapping.ledger import Ledger
from hilal.registry import HilalError
from hilal.train import evaluate, finetune_round, make_optimizer, score


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
    """The score a step is judged by: the mean over ``reps`` programmings at ``t_eval`` on the calibration split
    (with ``drift=False``, of the unprogrammed model)."""
    if drift:
        return float(noisy_scores(model, splits, cfg.t_eval, cfg.reps, seed, split="calib", engine=cfg.engine).mean())
    torch.manual_seed(seed)
    return float(np.mean([score(model, splits, "calib") for _ in range(cfg.reps)]))


CONFIRM_SEED = 2_000_000
"""Offset (added to the stage's seed) of the programming seeds of ``MappingConfig.confirm``'s evaluations,
far from the search's rounds and from :func:`recheck`'s."""


class _Run:
    """One mapping run, shared by the methods: the digital baseline, MACs and floor, the current model and its
    analog layers, and the steps every method is built from (:meth:`stage`, :meth:`screen`, :meth:`adopt`),
    each journaled (:class:`Journal`) and recorded (:class:`Ledger`), then the final evaluation
    (:meth:`finish`)."""

    def __init__(self, method: str, model: nn.Module, splits: Splits, cfg: MappingConfig, progress: bool) -> None:
        self.ledger = Ledger(method, progress)
        self.method, self.digital, self.splits, self.cfg, self.progress = method, model, splits, cfg, progress
        if not mappable_layers(model):
            raise HilalError("the model has no mappable layer (no Conv1d/Conv2d/Linear module)")
        if analog_layers(model):
            raise HilalError("pass the digital model to run_mapping; it already has analog layers")
        model.eval()
        self.candidates = mappable_layers(model) if cfg.layers is None else select_layers(model, cfg.layers)
        """The layers this run may make analog (``cfg.layers``), in model order."""
        self.macs = count_macs(model, splits.example_input(2))
        self.chip = make_chip(cfg.chip, cfg.preset)
        self.costs = chip_costs(model, splits.example_input(2), self.chip)
        self.tiles: dict[str, int] = {n: int(t) for n, t in zip(self.costs["layer"], self.costs["tiles"], strict=True)}
        self.value = savings(self.costs, cfg.objective)  # what analog saves per layer, by ``objective``
        self.honours_budget = False  # set by the methods that keep ``max_tiles``
        self.fp_metrics = evaluate(model, splits, "test")
        self.fp_test = float(self.fp_metrics["accuracy"])
        self.baseline = score(model, splits, "calib")
        self.journal = Journal(cfg.workdir, method, cfg, f"{type(model).__name__}-{splits.name}")
        self.model: nn.Module = model
        self.layers: list[str] = []
        self.rejected: tuple[list[str], nn.Module, float] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The history so far, one row per step (the searches read the last one's ``zero_shot_se``)."""
        return self.ledger.rows

    @property
    def timings(self) -> dict[str, float]:
        """Seconds so far by kind (:mod:`hilal.mapping.ledger`)."""
        return self.ledger.timings

    def timed_search(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, its time counted as search (:meth:`Ledger.timed_search`)."""
        return self.ledger.timed_search(fn)

    def tiles_left(self) -> float:
        """Analog tiles the budget (``max_tiles``) leaves beside the current analog layers (inf: no budget)."""
        if self.cfg.max_tiles is None:
            return math.inf
        return self.cfg.max_tiles - sum(self.tiles[n] for n in self.layers)

    def floor(self) -> float:
        """The lowest score accepted: the digital baseline less ``drop_threshold``, less 1e-9. Scores are means
        of per-sample counts, so one that equals the floor exactly must not fail by float rounding."""
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
        self.ledger.credit_mapping(self.rejected[2])
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
                             self._step_seed(), split="calib", stop=stop, engine=self.cfg.engine)
            s = float(x.mean())
            done = {"kept": False, "score": s, "rounds": 0, "seconds": time.perf_counter() - t, "zero_shot": s,
                    "zero_shot_se": _se(x), "reps": len(x)}
            self.journal.put(key, done)
        self._record(key, layers, done, False, replayed=replayed)
        return float(done["score"])

    def convert(self, layers: list[str]) -> None:
        """Make ``layers`` analog on top of the current model as they are, without retraining (the last step of
        a retraining-free method, whose screens already judged them)."""
        if layers:
            self.model = extend_analog(self.model, layers, self.cfg.preset)
            self.layers = self.layers + list(layers)

    def _record(self, key: str, layers: list[str], done: dict[str, Any], kept: bool, replayed: bool = False) -> None:
        """Record a step against the current floor (:meth:`Ledger.record`)."""
        self.ledger.record(key, layers, done, kept, self.floor(), replayed)

    def finish(self, metrics: pd.DataFrame | None = None, **extra: Any) -> MappingResult:
        """The result: the current model evaluated on the test split (``final_reps`` programmings at ``t_eval``),
        the history and timings, ``metrics`` and ``extra`` (into ``MappingResult.extra``)."""
        t = time.perf_counter()
        reps = self.cfg.final_reps or self.cfg.reps
        table = noisy_metrics(self.model, self.splits, self.cfg.t_eval, reps, self.cfg.seed + 1, split="test",
                              engine=self.cfg.engine)
        scores = table["accuracy"].to_numpy(dtype=float)
        # QA: exact match and F1 of the final evaluation too (F1 is the score the search used)
        for k in ("em", "f1"):
            if k in table:
                extra |= {f"{k}_mean": float(table[k].mean()), f"{k}_std": float(table[k].std(ddof=1)) if reps > 1
                          else 0.0, f"fp_{k}": self.fp_metrics[k]}
        timings = self.ledger.close(time.perf_counter() - t)
        layers = [n for n in mappable_layers(self.digital) if n in set(analog_layers(self.model))]
        hardware = mapping_cost(self.costs, layers, self.chip)
        cap = self.cfg.max_tiles
        if cap is not None:
            hardware |= {"max_tiles": cap, "within_budget": hardware["analog_tiles"] <= cap,
                         "budget": "honoured" if self.honours_budget else "not honoured"}
        extra = {"objective": self.cfg.objective, "hardware": hardware, **extra}
        return MappingResult(
            method=self.method, analog_layers=layers, analog_mac_share=analog_share(self.macs, layers),
            accuracy_mean=float(scores.mean()), accuracy_std=float(scores.std(ddof=1)) if reps > 1 else 0.0,
            fp_accuracy=self.fp_test, t_eval=self.cfg.t_eval, reps=reps,
            timings=timings, rounds=self.ledger.rounds,
            history=pd.DataFrame(self.rows), metrics=metrics, model=self.model,
            extra={"n_layers": len(self.macs), "baseline_calib": self.baseline, "floor": self.floor(),
                   "preset": self.cfg.preset,
                   **({"candidates": list(self.candidates)} if self.cfg.layers is not None else {}), **extra})
