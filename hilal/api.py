"""The public entry points: which layers of *your* network can run on analog tiles.

``analyze`` measures every mappable layer's curvature and expected loss under the preset's analog noise and
splits the layers into robust and sensitive; ``allocate`` maps the network with one method (HILAL by default)
and returns its result. Both take the user's ``nn.Module`` and either a registered dataset name or the user's
own train / calibration / test ``DataLoader`` s or ``Dataset`` s, with an optional loss for tasks beyond
classification and extractive question answering (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hilal.cluster import cluster_layers
from hilal.data import LossFn, Splits, load_dataset, loader
from hilal.hessian import HessianConfig, layer_metrics
from hilal.mapping import MAPPING_HESSIAN, METHODS, MappingConfig, MappingResult, recheck, run_mapping
from hilal.registry import HilalError
from hilal.train import FinetuneConfig, split_of

SPLITS = ("train", "calib", "test")
ScoreFn = Callable[[nn.Module, Any], float]
"""A task score: ``score_fn(model, batches)`` -> a number where higher is better (``batches``: the split's
loader); the mapping's tolerance is a drop of this score."""


def as_splits(data: str | Splits | Sequence[Any] | Mapping[str, Any], seed: int = 0,
              loss_fn: LossFn | None = None, score_fn: ScoreFn | None = None) -> Splits:
    """The :class:`~hilal.data.Splits` that ``data`` names or holds: a registered dataset name (split with
    ``seed``), a ``Splits``, or the user's ``(train, calib, test)`` (a sequence or a mapping with those keys) of
    ``DataLoader`` s, used as they are (batch size, sampler, collate), or ``Dataset`` s (the kit's loaders).
    The calibration split must be held out of training: curvature on fitted data says little."""
    if isinstance(data, str):
        splits = load_dataset(data, seed=seed)
    elif isinstance(data, Splits):
        splits = data
    else:
        parts = _parts(data)
        splits = Splits("custom", *parts, **_shape_of(parts[1]))
    if loss_fn is not None:
        if not callable(loss_fn):
            raise HilalError(f"loss_fn must be a function (model, batch) -> loss; got {type(loss_fn).__name__}")
        splits.loss_fn = loss_fn
    if score_fn is not None:
        if not callable(score_fn):
            raise HilalError(f"score_fn must be a function (model, batches) -> score; got {type(score_fn).__name__}")
        splits.meta["evaluator"] = lambda model, split: {
            "accuracy": float(score_fn(model, loader(split_of(splits, split))))}
    return splits


def _parts(data: Any) -> list[Any]:
    if isinstance(data, Mapping):
        missing = [k for k in SPLITS if k not in data]
        if missing:
            raise HilalError(f"data is missing the split(s) {missing}; give train, calib and test")
        parts = [data[k] for k in SPLITS]
    elif isinstance(data, Sequence) and len(data) == 3:
        parts = list(data)
    else:
        raise HilalError("data must be a registered dataset name, a hilal.data.Splits, or (train, calib, test) "
                         f"DataLoaders or Datasets; got {type(data).__name__}")
    for name, part in zip(SPLITS, parts, strict=True):
        if not isinstance(part, (DataLoader, Dataset)):
            raise HilalError(f"the {name} split must be a torch DataLoader or Dataset; got {type(part).__name__}")
    return parts


def _shape_of(calib: Any) -> dict[str, Any]:
    """Channels and size of image batches (informative only: the user's model is built already)."""
    batch = next(iter(loader(calib, batch_size=2)), None)
    if batch is None:
        raise HilalError("the calibration split is empty")
    x = batch[0] if isinstance(batch, (list, tuple)) else None
    if torch.is_tensor(x) and x.dim() == 4:
        return {"in_channels": int(x.shape[1]), "image_size": int(x.shape[-1])}
    return {}


def _settings(cls: type, settings: Mapping[str, Any], what: str) -> None:
    valid = [f.name for f in fields(cls)]
    bad = sorted(set(settings) - set(valid))
    if bad:
        raise HilalError(f"unknown {what} setting(s) {bad}; valid: {', '.join(valid)}")


def analyze(model: nn.Module, data: str | Splits | Sequence[Any] | Mapping[str, Any], preset: Any = "pcm", *,
            cluster: str | None = "kmeans", seed: int = 0, loss_fn: LossFn | None = None, progress: bool = True,
            **settings: Any) -> pd.DataFrame:
    """Per-layer curvature metrics of a trained ``model`` on the calibration split, with the robust /
    sensitive clusters: one row per mappable layer (params, MACs, trace, lambda_max, concentration, eli and
    their standard errors, cluster). Defaults are the ones :func:`allocate`'s HILAL search uses
    (:data:`hilal.mapping.MAPPING_HESSIAN`: output-space ELI, the analog error of each layer's output,
    converters included), so the clusters read here are the ones the mapping acts on; ``settings`` override
    :class:`~hilal.hessian.HessianConfig` fields (e.g. ``noise="weight"`` for the weight-space ELI);
    ``cluster=None`` leaves the clusters out.

    >>> metrics = hilal.analyze(model, (train_loader, calib_loader, test_loader), preset="pcm")
    >>> metrics[metrics.cluster == "robust"].layer.tolist()
    """
    _settings(HessianConfig, settings, "HessianConfig")
    splits = as_splits(data, seed, loss_fn)
    cfg = HessianConfig(**{**MAPPING_HESSIAN, "seed": seed, **settings})
    metrics = layer_metrics(model, splits, preset, cfg, progress=progress)
    return metrics if cluster is None else cluster_layers(metrics, method=cluster, seed=seed)


def allocate(model: nn.Module, data: str | Splits | Sequence[Any] | Mapping[str, Any], method: str = "hilal", *,
             preset: Any = "pcm", seed: int = 0, loss_fn: LossFn | None = None, score_fn: ScoreFn | None = None,
             recheck_reps: int = 0, progress: bool = True, **settings: Any) -> MappingResult:
    """Map a trained ``model`` with one method (``hilal``, ``hilal-paper``, ``lionheart``, ``random``,
    ``all-analog``, ``all-analog-ft``, ``all-digital``). ``settings`` override
    :class:`~hilal.mapping.MappingConfig` fields (``drop_threshold``, ``t_eval``, ``reps``, ``finetune`` as a
    dict of :class:`~hilal.train.FinetuneConfig` fields, ...). Returns the :class:`~hilal.mapping.MappingResult`:
    ``result.to_dict()`` is the record ``hilal map`` writes, ``result.model`` the mapped network,
    ``result.hardware`` its tiles, energy and latency per sample on the chip (:mod:`hilal.hardware`;
    ``objective="energy"`` and ``max_tiles=N`` make HILAL save energy within N tiles). With
    ``recheck_reps`` >= 2 the record gains ``recheck``: the final mapping re-scored on that many programmings
    its search never drew, against the floor it was accepted at.

    >>> result = hilal.allocate(model, (train_loader, calib_loader, test_loader), drop_threshold=0.01)
    >>> result.analog_layers, result.analog_mac_share, result.accuracy_mean
    """
    METHODS[method]  # noqa: B018  (an unknown name fails before any work, listing the valid ones)
    _settings(MappingConfig, settings, "MappingConfig")
    if isinstance(settings.get("finetune"), Mapping):
        _settings(FinetuneConfig, settings["finetune"], "FinetuneConfig")
        settings["finetune"] = FinetuneConfig(**settings["finetune"])
    if recheck_reps and recheck_reps < 2:
        raise HilalError(f"recheck_reps needs at least 2 programmings (or 0 for none); got {recheck_reps}")
    cfg = MappingConfig(**{"preset": preset, "seed": seed, **settings})
    splits = as_splits(data, seed, loss_fn, score_fn)
    result = run_mapping(method, model, splits, cfg, progress=progress)
    if recheck_reps:
        result.extra["recheck"] = recheck(result, splits, recheck_reps, seed)
    return result
