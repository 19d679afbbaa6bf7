"""Accuracy (or F1) under programming noise and drift, over inference times and repetitions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import analog_tiles, check_layers, mappable_layers, to_analog
from hilal.data import Splits, loader
from hilal.device import model_device, to_device
from hilal.train import evaluate, score, split_of, task_loss

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
        for t, (w, alpha) in zip(tiles, saved, strict=True):
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


def program_repetition(model: nn.Module, t_inference: float, seed: int, rep: int) -> None:
    """:func:`program_and_drift` for repetition ``rep`` of an evaluation seeded with ``seed``: the same
    (``seed``, ``rep``) always draws the same programming."""
    torch.manual_seed(seed * 100_003 + rep)
    program_and_drift(model, t_inference)


def noisy_metrics(model: nn.Module, splits: Splits, t_inference: float = ONE_DAY, reps: int = 10, seed: int = 0,
                  split: str = "test", stop: Callable[[np.ndarray], bool] | None = None) -> pd.DataFrame:
    """Every task metric (:func:`hilal.train.evaluate`: accuracy, or F1 as ``accuracy`` plus ``em`` and ``f1``
    for QA) of ``reps`` seeded programmings drifted to ``t_inference``, one row per repetition. A model
    without analog tiles is evaluated once and the row repeated. ``stop`` (given the scores so far) ends
    the repetitions early when it returns True (a sequential test); repetition r always uses the same seed."""
    if not analog_tiles(model):
        return pd.DataFrame([evaluate(model, splits, split)] * reps)
    rows: list[dict[str, float]] = []
    with inference_state(model):
        for r in range(reps):
            program_repetition(model, t_inference, seed, r)
            rows.append(evaluate(model, splits, split))
            if stop is not None and r + 1 < reps and stop(np.array([x["accuracy"] for x in rows])):
                break
    return pd.DataFrame(rows)


def noisy_scores(model: nn.Module, splits: Splits, t_inference: float = ONE_DAY, reps: int = 10, seed: int = 0,
                 split: str = "test", stop: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
    """The scores (fractions: accuracy, or F1 for QA) of :func:`noisy_metrics`, one per repetition."""
    return noisy_metrics(model, splits, t_inference, reps, seed, split, stop)["accuracy"].to_numpy(dtype=float)


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


def _loss_and_accuracy(model: nn.Module, splits: Splits, split: str, batch_size: int = 512) -> tuple[float, float]:
    """Sample-weighted mean task loss and accuracy (or F1) of ``model`` on a split, in eval mode."""
    model.eval()
    device = model_device(model)
    custom = "evaluator" in splits.meta or splits.loss_fn is not None
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader(split_of(splits, split), batch_size=batch_size):
            batch = to_device(batch, device)
            if custom or isinstance(batch, dict):
                n = int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0]) \
                    if isinstance(batch, dict) else int(batch[0].shape[0])
                loss_sum += float(task_loss(model, batch, loss_fn=splits.loss_fn)) * n
            else:
                x, y = batch[0], batch[1]
                n = int(y.shape[0])
                logits = model(x)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
            total += n
    acc = score(model, splits, split) if custom else correct / max(total, 1)
    return loss_sum / max(total, 1), float(acc)


def single_layer_sensitivity(model: nn.Module, splits: Splits, preset: str | object = "pcm",
                             t_inference: float = ONE_DAY, reps: int = 20, seed: int = 0, split: str = "calib",
                             layers: Sequence[str] | None = None, progress: bool = False) -> pd.DataFrame:
    """Measured sensitivity of every mappable layer: only that layer analog (``to_analog``), ``reps`` seeded
    programmings + drift to ``t_inference``, mean task loss and accuracy on ``split`` compared with the
    digital model. Columns: layer, loss, loss_increase, loss_increase_se, accuracy, accuracy_drop.

    This is what the expected loss increase (ELI) predicts; it also contains converter and output noise,
    which ELI does not model."""
    layers = check_layers(model, layers if layers is not None else mappable_layers(model))
    base_loss, base_acc = _loss_and_accuracy(model, splits, split)
    rows = []
    for name in tqdm(layers, desc="single-layer", disable=not progress, leave=False):
        analog = to_analog(model, [name], preset)
        losses, accs = np.empty(reps), np.empty(reps)
        with inference_state(analog):
            for r in range(reps):
                program_repetition(analog, t_inference, seed, r)
                losses[r], accs[r] = _loss_and_accuracy(analog, splits, split)
        se = losses.std(ddof=1) / np.sqrt(reps) if reps > 1 else float("nan")
        rows.append({"layer": name, "loss": float(losses.mean()), "loss_increase": float(losses.mean() - base_loss),
                     "loss_increase_se": float(se), "accuracy": float(accs.mean()),
                     "accuracy_drop": float(base_acc - accs.mean())})
    return pd.DataFrame(rows, columns=["layer", "loss", "loss_increase", "loss_increase_se", "accuracy",
                                       "accuracy_drop"])
