"""Accuracy (or F1) under programming noise and drift, over inference times and repetitions.

Every evaluation here runs on an engine (:data:`hilal.batched_eval.ENGINES`): ``batched`` (the default)
scores a turn of programmings in one pass (:func:`hilal.batched_eval.per_programming`), ``loop`` runs the
network once per programming (the reference path). Both give the same scores for the same seeds."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import analog_tiles, check_layers, mappable_layers, to_analog
from hilal.batched_eval import MAX_BYTES, capture, check_engine, per_programming, unsupported
from hilal.data import Splits, loader
from hilal.device import model_device, to_device
from hilal.train import evaluate, score, split_of, task_loss

T = TypeVar("T")
ONE_DAY = 86400.0
ONE_YEAR = 365 * ONE_DAY
DEFAULT_TIMES: tuple[float, ...] = tuple(float(t) for t in np.logspace(np.log10(60), np.log10(ONE_YEAR), 6))
STOP_TURN = 3
"""Programmings per batched turn when a sequential test may stop early (it decides from 3 scores on)."""
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


def per_repetition(model: nn.Module, fn: Callable[[nn.Module], T], t_inference: float, reps: int, seed: int,
                   stop: Callable[[list[T]], bool] | None = None, engine: str = "batched",
                   max_bytes: float = MAX_BYTES) -> list[T]:
    """``fn(model)`` under each of ``reps`` seeded programmings (:func:`program_repetition`) drifted to
    ``t_inference``, in order; ``stop`` (given the results so far) ends the repetitions early when it returns
    True. ``engine="batched"`` runs turns of programmings in one pass (all at once without ``stop``, else
    :data:`STOP_TURN` at a time; models it cannot batch, :func:`hilal.batched_eval.unsupported`, run the
    loop), ``"loop"`` one programming at a time: the same results, and torch's random state is left where
    the loop leaves it. Clean weights are restored afterwards (:func:`inference_state`)."""
    check_engine(engine)
    out: list[T] = []
    with inference_state(model):
        if engine == "loop" or unsupported(model) is not None:
            for r in range(reps):
                program_repetition(model, t_inference, seed, r)
                out.append(fn(model))
                if stop is not None and r + 1 < reps and stop(out):
                    break
            return out
        turn = reps if stop is None else STOP_TURN
        for start in range(0, reps, turn):
            progs = []
            for r in range(start, min(reps, start + turn)):
                program_repetition(model, t_inference, seed, r)
                progs.append(capture(model))
            for prog, res in zip(progs, per_programming(fn, model, progs, max_bytes), strict=True):
                out.append(res)
                if stop is not None and len(out) < reps and stop(out):
                    prog.restore_rng()
                    return out
            progs[-1].restore_rng()
    return out


def noisy_metrics(model: nn.Module, splits: Splits, t_inference: float = ONE_DAY, reps: int = 10, seed: int = 0,
                  split: str = "test", stop: Callable[[np.ndarray], bool] | None = None,
                  engine: str = "batched") -> pd.DataFrame:
    """Every task metric (:func:`hilal.train.evaluate`: accuracy, or F1 as ``accuracy`` plus ``em`` and ``f1``
    for QA) of ``reps`` seeded programmings drifted to ``t_inference``, one row per repetition. A model
    without analog tiles is evaluated once and the row repeated. ``stop`` (given the scores so far) ends
    the repetitions early when it returns True (a sequential test); repetition r always uses the same seed.
    ``engine``: ``batched`` or ``loop`` (:func:`per_repetition`), the same rows."""
    check_engine(engine)
    if not analog_tiles(model):
        return pd.DataFrame([evaluate(model, splits, split)] * reps)
    test = None if stop is None else (lambda rows: stop(np.array([x["accuracy"] for x in rows])))
    rows = per_repetition(model, lambda m: evaluate(m, splits, split), t_inference, reps, seed, test, engine)
    return pd.DataFrame(rows)


def noisy_scores(model: nn.Module, splits: Splits, t_inference: float = ONE_DAY, reps: int = 10, seed: int = 0,
                 split: str = "test", stop: Callable[[np.ndarray], bool] | None = None,
                 engine: str = "batched") -> np.ndarray:
    """The scores (fractions: accuracy, or F1 for QA) of :func:`noisy_metrics`, one per repetition."""
    table = noisy_metrics(model, splits, t_inference, reps, seed, split, stop, engine)
    return table["accuracy"].to_numpy(dtype=float)


def drift_table(model: nn.Module, splits: Splits, times: Sequence[float] = DEFAULT_TIMES, reps: int = 10,
                seed: int = 0, split: str = "test", progress: bool = True, engine: str = "batched",
                **labels: str) -> pd.DataFrame:
    """Tidy table: one row per (t_inference, rep) with the score; extra keyword labels become columns.
    ``engine``: as in :func:`noisy_metrics`."""
    check_engine(engine)
    rows = []
    for t in tqdm(times, desc="drift", disable=not progress, leave=False):
        for r, s in enumerate(noisy_scores(model, splits, t, reps, seed, split, engine=engine)):
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
                             layers: Sequence[str] | None = None, progress: bool = False,
                             engine: str = "batched") -> pd.DataFrame:
    """Measured sensitivity of every mappable layer: only that layer analog (``to_analog``), ``reps`` seeded
    programmings + drift to ``t_inference``, mean task loss and accuracy on ``split`` compared with the
    digital model. Columns: layer, loss, loss_increase, loss_increase_se, accuracy, accuracy_drop.

    This is what the expected loss increase (ELI) predicts; it also contains converter and output noise,
    which ELI does not model. ``engine``: as in :func:`noisy_metrics`."""
    check_engine(engine)
    layers = check_layers(model, layers if layers is not None else mappable_layers(model))
    base_loss, base_acc = _loss_and_accuracy(model, splits, split)
    rows = []
    for name in tqdm(layers, desc="single-layer", disable=not progress, leave=False):
        analog = to_analog(model, [name], preset)
        res = per_repetition(analog, lambda m: _loss_and_accuracy(m, splits, split), t_inference, reps, seed,
                             engine=engine)
        losses, accs = np.array([x[0] for x in res]), np.array([x[1] for x in res])
        se = losses.std(ddof=1) / np.sqrt(reps) if reps > 1 else float("nan")
        rows.append({"layer": name, "loss": float(losses.mean()), "loss_increase": float(losses.mean() - base_loss),
                     "loss_increase_se": float(se), "accuracy": float(accs.mean()),
                     "accuracy_drop": float(base_acc - accs.mean())})
    return pd.DataFrame(rows, columns=["layer", "loss", "loss_increase", "loss_increase_se", "accuracy",
                                       "accuracy_drop"])
