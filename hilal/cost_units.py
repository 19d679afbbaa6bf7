"""Unit costs of the paper profile measured at the paper's shapes (:func:`measure_units`, :func:`measure_all`):
one training step, one fine-tuning step, one HVP per calibration sample, one programming and one noisy
forward per sample; :mod:`hilal.cost` projects the profile from them."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch

from hilal.registry import HilalError, is_count

UNIT_COLUMNS = ("step_s", "ft_step_s", "hvp_sample_s", "program_s", "eval_sample_s")
"""The unit costs, in seconds (see :mod:`hilal.cost`)."""


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hvp_time(op: Any, repeats: int) -> float:
    """Median seconds of one HVP of ``op`` (a random vector over all its layers); the graph goes with ``op``."""
    v = [torch.randn_like(p) for p in op.params]
    return _median_time(lambda: op.hvp(v), repeats)


def _head(splits: Any, split: str, n: int) -> Any:
    """``splits`` with ``split`` cut to its first ``n`` samples (question answering: ``n`` windows, scored by
    a :class:`hilal.qa.SquadEvaluator` of its own)."""
    from torch.utils.data import Subset

    data = getattr(splits, split)
    if len(data) < n:
        raise HilalError(f"{splits.name}'s {split} split has {len(data)} samples; the measurement needs {n}")
    if splits.task != "qa":
        return dataclasses.replace(splits, **{split: Subset(data, range(n))})
    from hilal.qa import QAFeatures, SquadEvaluator

    feats = {k: v[:n].numpy() for k, v in data.tensors.items()}
    feats |= {"example_index": data.example_index[:n], "offsets": data.offsets[:n]}
    keep = sorted(set(int(i) for i in data.example_index[:n]))
    remap = {old: new for new, old in enumerate(keep)}
    feats["example_index"] = [remap[int(i)] for i in feats["example_index"]]
    part = QAFeatures([data.examples[i] for i in keep], feats)
    meta = {**splits.meta, "evaluator": SquadEvaluator({split: part})}
    return dataclasses.replace(splits, **{split: part}, meta=meta)


def measure_units(model_name: str, splits: Any, preset: str = "pcm", t_eval: float = 86400.0, repeats: int = 3,
                  hvp_samples: int | None = None, eval_samples: int = 64, max_batch: int | None = None,
                  seed: int = 0, strict: bool = True) -> dict[str, Any]:
    """The unit costs (module docstring) of ``model_name`` on ``splits`` (random weights: costs do not depend
    on them), each the median of ``repeats`` timings after a warm-up. ``hvp_samples``: calibration samples of
    the timed HVP (default 16, 1 for question answering, at most ``max_batch``); ``eval_samples``: test samples
    evaluated (at most the split's); ``max_batch``: time training steps at most this large and scale them per
    sample to the real batch (for models whose training batch, or whose HVP's graph over 16 samples, does not
    fit the machine). Without ``strict`` a unit whose code
    fails is NaN and its error goes into ``error`` (one line per unit), so the others are still measured."""
    from hilal.analog import mappable_layers, to_analog
    from hilal.evaluate import inference_state, program_repetition
    from hilal.hessian import HessianConfig, HessianOperator, calibration_batches
    from hilal.models import model_for
    from hilal.train import (
        FinetuneConfig,
        default_device,
        default_train_config,
        evaluate,
        finetune_round,
        make_optimizer,
        train_digital,
    )

    for name, v in (("repeats", repeats), ("eval_samples", eval_samples), ("max_batch", max_batch or 1)):
        if not is_count(v):
            raise HilalError(f"{name} must be a positive integer; got {v!r}")
    hvp_samples = hvp_samples or min(1 if splits.task == "qa" else 16, max_batch or 16)
    torch.manual_seed(seed)
    model = model_for(model_name, splits).to(default_device())
    layers = mappable_layers(model)
    out: dict[str, Any] = {}
    errors: list[str] = []

    def unit(names: tuple[str, ...], fn: Callable[[], tuple[float, ...]]) -> None:
        try:
            out.update(zip(names, fn(), strict=True))
        except Exception as e:
            if strict:
                raise
            out.update(dict.fromkeys(names, float("nan")))
            errors.append(f"{'/'.join(names)}: {type(e).__name__}: {e}".splitlines()[0][:300])

    def step() -> tuple[float]:
        full = default_train_config(splits, seed, epochs=1)
        cfg = dataclasses.replace(full, batch_size=min(full.batch_size, max_batch or full.batch_size))
        one = _head(splits, "train", cfg.batch_size)
        t = _median_time(lambda: train_digital(model, one, cfg, progress=False), repeats)
        model.eval()
        return (t * full.batch_size / cfg.batch_size,)

    def hvp() -> tuple[float]:
        batches = calibration_batches(_head(splits, "calib", hvp_samples),
                                      HessianConfig(max_samples=hvp_samples, batch_size=hvp_samples))
        return (_hvp_time(HessianOperator(model, batches, layers), repeats) / hvp_samples,)

    analog = to_analog(model, layers, preset)

    def finetune() -> tuple[float]:
        cfg = FinetuneConfig(steps=1)
        cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, max_batch or cfg.batch_size))
        opt = make_optimizer(analog, cfg)
        t = _median_time(lambda: finetune_round(analog, splits, cfg, opt, seed=seed), repeats)
        return (t * FinetuneConfig().batch_size / cfg.batch_size,)

    def noisy_eval() -> tuple[float, float]:
        n = min(eval_samples, len(splits.test))
        test = _head(splits, "test", n)
        analog.eval()
        with inference_state(analog):
            prog = _median_time(lambda: program_repetition(analog, t_eval, seed, 0), repeats)
            return prog, _median_time(lambda: evaluate(analog, test, "test"), repeats) / n

    unit(("step_s",), step)
    unit(("hvp_sample_s",), hvp)
    unit(("ft_step_s",), finetune)
    unit(("program_s", "eval_sample_s"), noisy_eval)
    if not strict:
        out["error"] = "; ".join(errors)
    return out


# --- counts ----------------------------------------------------------------------------------------------


def measure_all(pairs: list[tuple[str, str]], preset: str = "pcm", t_eval: float = 86400.0, repeats: int = 3,
                max_batch: Mapping[str, int] | None = None, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """:func:`measure_units` for each (model, dataset) on the data of ``HILAL_DATA_DIR`` (``max_batch``: per
    dataset); a unit that fails is NaN with its error in ``error``, a pair that fails to load or build gets NaN
    costs and that error."""
    from hilal.data import load_dataset

    rows, loaded = [], {}
    for model, dataset in pairs:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"model": model, "dataset": dataset, "error": ""}
        try:
            if dataset not in loaded:
                loaded[dataset] = load_dataset(dataset, seed=seed)
            row |= measure_units(model, loaded[dataset], preset, t_eval, repeats,
                                 max_batch=(max_batch or {}).get(dataset), seed=seed, strict=False)
        except Exception as e:  # noqa: BLE001 - recorded per pair: the report says which paper path failed
            row |= {c: float("nan") for c in UNIT_COLUMNS}
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        row["measure_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if progress:
            print(f"[cost] {model}/{dataset}: " + ", ".join(f"{c} {row[c]:.4g}" for c in UNIT_COLUMNS)
                  + (f" ({row['error']})" if row["error"] else ""), flush=True)
    return pd.DataFrame(rows)
