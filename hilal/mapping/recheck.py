"""After a mapping: whether its final model holds the floor it was accepted at on programmings its search never
drew (:func:`recheck`), and how often one more run of the search's own acceptance test would pass it
(:func:`fresh_pass_rate`). A search keeps the best of several noisy evaluations, so its accepted score overstates
what the mapping holds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

from torch import nn

from hilal.data import Splits
from hilal.evaluate import noisy_scores
from hilal.mapping.config import MappingResult
from hilal.mapping.run import _se
from hilal.registry import HilalError

RECHECK_SEED = 1_000_000
"""Offset of :func:`recheck`'s programming seeds, far from every seed a search draws (mapping seed plus
7919 per step, plus the round)."""


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
