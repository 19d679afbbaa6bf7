"""Accuracy (or F1) under programming noise and drift, over inference times and repetitions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import analog_tiles
from hilal.data import Splits
from hilal.train import score

ONE_DAY = 86400.0
ONE_YEAR = 365 * ONE_DAY
DEFAULT_TIMES: tuple[float, ...] = tuple(float(t) for t in np.logspace(np.log10(60), np.log10(ONE_YEAR), 6))
TIME_LABELS = {60.0: "1 min", 3600.0: "1 h", ONE_DAY: "1 day", 30 * ONE_DAY: "1 month", ONE_YEAR: "1 year"}


@contextmanager
def inference_state(model: nn.Module) -> Iterator[None]:
    """Within the block the analog tiles may be programmed and drifted; afterwards the clean (trained) tile
    weights, drift-compensation factors and programming references are restored, so training can go on and
    the next programming starts from the trained weights."""
    tiles = analog_tiles(model)
    saved = [(t.tile.weight.data.clone(), getattr(t, "alpha", None)) for t in tiles]
    for t in tiles:
        t.reference_combined_weights = None
        t.programmed_weights = None
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for t, (w, alpha) in zip(tiles, saved):
            t.tile.weight.data.copy_(w)
            if alpha is not None:
                t.alpha = alpha
            t.reference_combined_weights = None
            t.programmed_weights = None
            t.drift_baseline = None
        model.train(was_training)


def program_and_drift(model: nn.Module, t_inference: float) -> None:
    """Program every analog tile afresh from its reference weights and drift to ``t_inference`` seconds."""
    model.program_analog_weights()
    model.drift_analog_weights(t_inference)


def noisy_scores(model: nn.Module, splits: Splits, t_inference: float = ONE_DAY, reps: int = 10, seed: int = 0,
                 split: str = "test") -> np.ndarray:
    """``reps`` scores (fractions) of the model programmed and drifted to ``t_inference``; one seeded
    programming per repetition. A model without analog tiles is scored once and repeated."""
    if not analog_tiles(model):
        return np.full(reps, score(model, splits, split))
    out = np.empty(reps)
    with inference_state(model):
        for r in range(reps):
            torch.manual_seed(seed * 100_003 + r)
            program_and_drift(model, t_inference)
            out[r] = score(model, splits, split)
    return out


def drift_table(model: nn.Module, splits: Splits, times: Sequence[float] = DEFAULT_TIMES, reps: int = 10,
                seed: int = 0, split: str = "test", progress: bool = True, **labels: str) -> pd.DataFrame:
    """Tidy table: one row per (t_inference, rep) with the score; extra keyword labels become columns."""
    rows = []
    for t in tqdm(times, desc="drift", disable=not progress, leave=False):
        for r, s in enumerate(noisy_scores(model, splits, t, reps, seed, split)):
            rows.append({**labels, "t_inference": float(t), "rep": r, "accuracy": float(s)})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, by: Sequence[str] = ("t_inference",)) -> pd.DataFrame:
    """Mean and standard deviation of ``accuracy`` over repetitions."""
    g = df.groupby(list(by), sort=True)["accuracy"]
    return g.agg(mean="mean", std="std", reps="count").reset_index()


def time_label(t: float) -> str:
    """Human label of an inference time in seconds (``1 day``, ``3.2 h``...)."""
    for k, v in TIME_LABELS.items():
        if abs(t - k) / k < 1e-6:
            return v
    for unit, s in (("year", ONE_YEAR), ("day", ONE_DAY), ("h", 3600.0), ("min", 60.0)):
        if t >= s:
            return f"{t / s:.3g} {unit}"
    return f"{t:.3g} s"
