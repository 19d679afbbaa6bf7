"""Gradient strata: the calibration samples regrouped by the size of their loss gradient
(:func:`gradient_strata`), so that the output-space trace probes can go mostly to the samples that carry the
curvature (:func:`hilal.hessian.probe_counts`), and how many strata a measurement uses (:func:`strata_for`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hilal.data import LossFn
from hilal.hessian.config import (
    _batch_size_of,
)
from hilal.hessian.loss import _check_finite, _hooked, _hvp_graph
from hilal.registry import HilalError, is_count
from hilal.train import task_loss


def _check_strata(strata: int) -> None:
    if not is_count(strata):
        raise HilalError(f"strata must be a whole number >= 1 (1: no strata), got {strata!r}")


MIN_STRATUM_PROBES = 8
MIN_STRATUM_SAMPLES = 32


def strata_for(strata: int, probes: int, samples: int) -> int:
    """The strata used for ``strata`` asked, ``probes`` and ``samples``: at most one per MIN_STRATUM_PROBES
    probes and per MIN_STRATUM_SAMPLES samples, at least 1. A stratum's standard error comes from its own
    probes, and the smallest strata get a tenth of them: below those counts the strata raise the standard
    error above that of no strata."""
    _check_strata(strata)
    return max(1, min(strata, probes // MIN_STRATUM_PROBES, samples // MIN_STRATUM_SAMPLES))


def _concat(batches: Sequence[Any]) -> Any:
    """The batches as one (per-sample tensors only; other fields are dropped)."""
    if isinstance(batches[0], dict):
        keys = [k for k, v in batches[0].items() if torch.is_tensor(v) and v.dim() > 0]
        return {k: torch.cat([b[k] for b in batches]) for k in keys}
    return type(batches[0])(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))


def _index(batch: Any, idx: torch.Tensor) -> Any:
    if isinstance(batch, dict):
        return {k: v[idx.to(v.device)] for k, v in batch.items()}
    return type(batch)(v[idx.to(v.device)] for v in batch)


def gradient_strata(model: nn.Module, batches: Sequence[Any], layers: Sequence[str], strata: int,
                    loss_fn: LossFn | None = None) -> tuple[list[Any], list[np.ndarray]]:
    """The calibration samples regrouped into ``strata`` batches of (nearly) equal size, by decreasing scale
    of their loss gradient at the named layers' outputs (one backward pass, no graph kept), and each new
    batch's per-sample scales. A sample's scale is the root mean over layers of its squared gradient norm
    relative to the layer's mean over samples; the loss Hessian of a sample the model fits with confidence
    shrinks with its gradient (both scale with 1 - p_y), so the scale ranks how much curvature, and
    Monte-Carlo spread, each sample carries."""
    sq = []
    for batch in batches:
        with _hvp_graph(model):
            loss, z, _ = _hooked(model, layers, batch, functools.partial(task_loss, loss_fn=loss_fn))
            _check_finite(loss)
            grads = torch.autograd.grad(loss, z)
        n = _batch_size_of(batch)
        sq.append(torch.stack([(g.detach() * n).reshape(n, -1).double().pow(2).sum(1).cpu() for g in grads]))
    sq_all = torch.cat(sq, 1)  # layers x samples
    mean = sq_all.mean(1, keepdim=True)
    keep = mean[:, 0] > 0
    scale = (sq_all[keep] / mean[keep]).mean(0).sqrt() if bool(keep.any()) else torch.ones(sq_all.shape[1])
    order = torch.argsort(scale, descending=True, stable=True)
    groups = [g for g in torch.tensor_split(order, min(strata, len(order))) if len(g)]
    pool = _concat(batches)
    return [_index(pool, g) for g in groups], [scale[g].numpy() for g in groups]
