"""Settings of the curvature metrics (:class:`HessianConfig`), the calibration batches they are measured on,
and the small helpers every estimator shares: Rademacher draws, dot products, standard errors, a layer's
output change for a weight change."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hilal.checks import check_count, check_number
from hilal.data import Splits, loader
from hilal.hessian.graphs import (
    DEFAULT_GRAPH_BYTES,
)
from hilal.registry import HilalError, check_choice

MODES = ("joint", "per_layer")
GAUSS_NEWTON = ("auto", "off")
NOISE_SPACES = ("weight", "output")
NOISE_DRAWS = ("batched", "loop")
FIRST_ORDER = ("surrogate", "sampled")
COLUMNS = ["layer", "params", "macs", "trace", "trace_se", "lambda_max", "concentration", "eli", "eli_first",
           "eli_second", "eli_se"]


@dataclass
class HessianConfig:
    """Settings of the curvature metrics."""

    probes: int = 32
    """Hutchinson probes (Rademacher vectors) for the traces; with ``strata``, the error aimed at is that of
    this many probes on every sample, and the counts per stratum vary around it."""
    power_iters: int = 20
    """Maximum power iterations for each layer's top eigenvalue."""
    power_tol: float = 1e-3
    """Relative change of the eigenvalue estimate below which a layer's power iteration stops."""
    eli_samples: int = 16
    """Monte-Carlo noise samples (aihwkit programmings + drift) for the quadratic ELI term (one HVP each in
    ``joint`` mode); 0 skips ELI (curvature only)."""
    first_order_samples: int = 128
    """Noise samples for the first-order ELI term g . dw (no HVP, only a programming each; its Monte-Carlo
    error dominates otherwise). The larger of this and ``eli_samples`` is drawn."""
    eli_rtol: float = 0.1
    """Sequential rule for the first-order draws (weight noise, ``joint`` mode): after the quadratic draws (at
    least ``eli_block``), each layer whose ELI standard error exceeds ``eli_rtol`` times the larger of |ELI| and
    its gap to the nearest other layer's ELI gets ``eli_block`` more, from a stream of its own
    (:func:`hilal.hessian.draws.layer_noise`), until it does not; the larger of ``first_order_samples`` and
    ``eli_samples`` stays the upper bound. 0 takes them all from the loop's stream (the estimates before the
    rule, to the bit)."""
    eli_block: int = 16
    """Draws per step of the sequential rule (``eli_rtol``)."""
    t_inference: float = 86400.0
    """Inference time in seconds after programming at which the weight noise is sampled."""
    max_samples: int = 512
    """Calibration samples the loss is averaged over (the first ones of the split)."""
    batch_size: int = 256
    """Mini-batch size of the calibration loss: the unit whose graph is built, kept or rebuilt (the gradient
    strata are cut into pieces of this size too), so the memory floor of one batch's graph."""
    graph_bytes: float = DEFAULT_GRAPH_BYTES
    """Memory budget in bytes for the state kept per calibration batch (autograd graphs, layer inputs,
    Gauss-Newton signals): batches are kept while it allows and rebuilt for each pass over the data beyond
    it (:func:`layer_metrics` lists the passes). The estimates are the same whatever the budget; 0 rebuilds
    every batch every time, ``math.inf`` keeps them all (memory then grows with ``max_samples``). It bounds
    the bytes the kept state holds (the tensors the graphs save, on CUDA the allocated memory); the process
    needs one batch's transient memory besides, and on a CPU the allocator's freed pages."""
    mode: str = "joint"
    """``joint``: one HVP per probe/noise sample for all layers; ``per_layer``: one block HVP per layer."""
    noise: str = "weight"
    """What ELI expands the loss in. ``weight``: the effective-weight change dw_l (programming, drift, read
    noise), with the weight Hessian block. ``output``: the whole analog error of the layer's output on the
    calibration inputs, e_l = y_analog(x_l) - y_digital(x_l) (also converter quantization and output noise),
    with the Hessian with respect to the layer's output. For weight noise alone the two are identical, since
    e_l = dW_l x_l and a linear layer's weight Hessian is the output Hessian pulled back through x_l."""
    strata: int = 4
    """``joint`` mode with output-space HVPs: the calibration samples are regrouped into this many batches
    by the size of their loss gradient, and the trace probes are shared out between them by their expected
    spread (:func:`probe_counts`). A sample the model fits with confidence has a small gradient and little
    curvature, so it needs fewer probes; the estimate stays unbiased. Fewer strata are used where there are
    under 8 probes or 32 samples per stratum (:func:`strata_for`); 1 gives every sample ``probes`` probes."""
    gauss_newton: str = "auto"
    """``auto``: in ``joint`` mode, where the network is piecewise linear in every layer's weight (checked
    against PyHessian's block HVPs on a random probe, see :class:`GaussNewton`), the traces and the ELI's
    quadratic terms are computed exactly from one backward pass per class instead of by Monte-Carlo HVPs;
    ``off``: always HVPs."""
    seed: int = 0
    """Seed of the probes, power-iteration starts and noise samples."""
    noise_draws: str = "batched"
    """How the weight-noise draws are taken from aihwkit: ``batched`` replays groups of programmings at once
    (:func:`hilal.hessian.draws.batched_weight_noise`), ``loop`` programs the converted model once per draw
    (the reference); the same draws to the bit."""
    first_order: str = "surrogate"
    """How the ELI's first-order term is estimated from the draws (``batched`` draws, ``joint`` mode):
    ``surrogate`` takes each draw's term around a surrogate built from the same noise whose mean is known in
    closed form (programming noise clamped at zero, drift, read noise; :mod:`hilal.hessian.systematic`), so
    only the draw's remainder is sampled, a much smaller spread at the same mean; ``sampled`` averages the
    draws' terms as they are (the estimates before, to the bit)."""

    def __post_init__(self) -> None:
        for name, low in (("probes", 1), ("power_iters", 1), ("eli_samples", 0), ("first_order_samples", 0),
                          ("max_samples", 1), ("batch_size", 1), ("strata", 1), ("seed", 0)):
            check_count(name, getattr(self, name), low)
        check_number("power_tol", self.power_tol, 0)
        check_number("t_inference", self.t_inference, 0, low_open=True)
        check_choice("mode", self.mode, MODES)
        check_choice("noise space", self.noise, NOISE_SPACES)
        check_choice("gauss_newton", self.gauss_newton, GAUSS_NEWTON)
        check_choice("first_order", self.first_order, FIRST_ORDER)


def _batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
    return int(batch[0].shape[0])


def _check_labels(batch: Any) -> None:
    if isinstance(batch, dict):
        if "start_positions" not in batch or "end_positions" not in batch:
            raise HilalError("a question-answering batch needs 'start_positions' and 'end_positions' labels")
    elif not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise HilalError("curvature needs labelled batches (inputs, labels); got a batch without labels")


def _truncate(batch: Any, n: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}
    return type(batch)(b[:n] if torch.is_tensor(b) else b for b in batch)


def calibration_batches(data: Splits | Sequence[Any], cfg: HessianConfig | None = None) -> list[Any]:
    """The batches the curvature is measured on: the first ``cfg.max_samples`` samples of the calibration
    split (or of the batches given), in mini-batches of ``cfg.batch_size``. Batches stay on their device."""
    cfg = cfg or HessianConfig()
    source = loader(data.calib, batch_size=cfg.batch_size) if isinstance(data, Splits) else data
    out, total = [], 0
    for batch in source:
        _check_labels(batch)
        n = _batch_size_of(batch)
        if total + n > cfg.max_samples:
            batch, n = _truncate(batch, cfg.max_samples - total), cfg.max_samples - total
        if n > 0:
            out.append(batch)
            total += n
        if total >= cfg.max_samples:
            break
    if not out:
        raise HilalError("no calibration samples to measure curvature on")
    return out


def _rademacher(shape: torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # drawn straight into a floating dtype: the same stream as int64 draws (checked in the tests), without
    # the int64 buffer and its conversion (faster per draw)
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    r = torch.randint(0, 2, tuple(shape), generator=gen, dtype=dtype).mul_(2).sub_(1)
    return r.to(device=like.device, dtype=like.dtype)


def _sample_signs(e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random signs, one per sample (leading dimension) of an output-space tensor, broadcastable to it."""
    return _rademacher(torch.Size((e.shape[0],) + (1,) * (e.dim() - 1)), gen, e)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """a . b over all entries (one fused pass: PyHessian's ``group_product`` multiplies, then sums)."""
    if a.dtype != b.dtype:  # vdot does not promote
        t = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(t), b.to(t)
    return float(torch.vdot(a.reshape(-1), b.reshape(-1)))


def _se(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    return x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1:], np.nan)


def _apply(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output change for a weight change ``w`` (its linear part: no bias)."""
    if isinstance(mod, nn.Linear):
        return nn.functional.linear(x, w)
    return mod._conv_forward(x, w, None)
