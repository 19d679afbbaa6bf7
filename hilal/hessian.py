"""Per-layer curvature metrics on held-out calibration data, on top of PyHessian's HVP primitives.

For every mappable layer l (weights w_l, Hessian block H_ll of the task loss):

- ``trace``: tr(H_ll) by Hutchinson with Rademacher probes;
- ``lambda_max``: the dominant eigenvalue of H_ll by power iteration on block-restricted HVPs;
- ``concentration``: lambda_max / trace;
- ``eli``: the noise-aware expected loss increase E[g_l . dw_l] + 1/2 E[dw_l^T H_ll dw_l], where dw_l is the
  change of the effective weights an aihwkit analog tile computes with after programming and drift to
  ``t_inference`` (sampled through aihwkit itself).

In ``joint`` mode one HVP per probe (or noise sample) serves every layer: with independent random signs
s_l and v = sum_l s_l u_l, E_s[s_l u_l . (H v)_l] = u_l^T H_ll u_l because the cross blocks carry a
zero-mean sign product. ``per_layer`` mode does one block-restricted HVP per layer (the reference).
:func:`layer_metrics` takes these HVPs in output space (with respect to each layer's output, where a
layer's weight block is the output Hessian pulled back through its inputs), which lets the probes and signs
be drawn per sample as well as per layer (:func:`output_traces`, :func:`output_loss_increase`), and the trace
probes go mostly to the samples that carry the curvature (:func:`gradient_strata`, :func:`probe_counts`).
Where the network is piecewise linear in every layer's weight, ``joint`` mode replaces the Monte-Carlo traces
and ELI quadratic terms by exact ones from :class:`GaussNewton` blocks (one backward pass per class).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from aihwkit.nn import AnalogConv2d
from pyhessian.utils import hessian_vector_product, normalization
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import ANALOG_TYPES, check_layers, count_macs, mappable_layers, to_analog
from hilal.data import Splits, loader
from hilal.device import model_device, to_device
from hilal.registry import HilalError, check_choice, is_count
from hilal.second_order import SecondOrderRules
from hilal.train import task_loss

MODES = ("joint", "per_layer")
GAUSS_NEWTON = ("auto", "off")
NOISE_SPACES = ("weight", "output")
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
    t_inference: float = 86400.0
    """Inference time in seconds after programming at which the weight noise is sampled."""
    max_samples: int = 512
    """Calibration samples the loss is averaged over (the first ones of the split)."""
    batch_size: int = 256
    """Mini-batch size of the calibration loss (each batch's graph is kept for all HVPs)."""
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


# ---------------------------------------------------------------------------------------------------------
# The loss and its Hessian-vector products


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


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise HilalError(f"non-finite calibration loss ({loss.item()}); check the model and data")


def _nonfinite(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity. One sum per tensor decides (a sum is finite
    unless an entry is not, or the sum overflows, which the full check then clears); an elementwise
    ``isfinite`` on every product cost 12% of an output-space HVP of vit_tiny."""
    if torch.isfinite(torch.stack([t.sum() for t in tensors])).all():
        return []
    return [n for n, t in zip(names, tensors, strict=True) if not torch.isfinite(t).all()]


@contextmanager
def _hvp_graph(model: nn.Module, params: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Around the forward and ``create_graph`` backward of a graph for many HVPs: only ``params`` (by
    identity) require grad, so the graph holds nothing else, and :class:`SecondOrderRules` differentiate the
    transformer nonlinearities. The other parameters' flags are restored afterwards; ``params`` keep
    requiring grad, which the products need."""
    keep = {id(p) for p in params}
    flags = {p: p.requires_grad for p in model.parameters() if id(p) not in keep}
    try:
        for p in params:
            p.requires_grad_(True)
        for p in flags:
            p.requires_grad_(False)
        with SecondOrderRules():
            yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


class HessianOperator:
    """Gradient and Hessian-vector products of the calibration loss with respect to the weights of the named
    layers. The loss is the sample-weighted mean of the batch losses; each batch's gradient graph is built
    once and kept for every product. ``hvps`` counts Hessian-vector products (one per vector, over all
    batches); ``calls`` counts backward calls."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.layers = list(layers)
        self.params = [mods[n].weight for n in self.layers]
        self.device = model_device(model)
        sizes = [_batch_size_of(b) for b in batches]
        self.batch_weights = [s / sum(sizes) for s in sizes]
        self.grads: list[tuple[torch.Tensor, ...]] = []
        for batch in batches:
            with _hvp_graph(model, self.params):
                loss = task_loss(model, to_device(batch, self.device))
                _check_finite(loss)
                self.grads.append(torch.autograd.grad(loss, self.params, create_graph=True))
        self.gradient = [sum(w * g[i].detach() for w, g in zip(self.batch_weights, self.grads, strict=True))
                         for i in range(len(self.params))]
        self.hvps = 0
        self.calls = 0
        self._batched_ok: bool | None = None

    def _check(self, idx: Sequence[int], out: Sequence[torch.Tensor]) -> None:
        bad = _nonfinite([self.layers[i] for i in idx], out)
        if bad:
            raise HilalError(f"non-finite Hessian-vector product in layer(s) {', '.join(map(repr, bad))}; "
                             "the loss is not twice differentiable there (check the model and weights)")

    def hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for a vector over all layers (one tensor per layer)."""
        out = [torch.zeros_like(p) for p in self.params]
        for w, g in zip(self.batch_weights, self.grads, strict=True):
            hv = hessian_vector_product(g, self.params, list(v))
            for o, h in zip(out, hv, strict=True):
                o.add_(h, alpha=w)
            self.calls += 1
        self.hvps += 1
        self._check(range(len(out)), out)
        return out

    def block_hvp(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """H_ii v for layer i only (block-restricted product)."""
        out = torch.zeros_like(self.params[i])
        for w, g in zip(self.batch_weights, self.grads, strict=True):
            (hv,) = hessian_vector_product([g[i]], [self.params[i]], [v])
            out.add_(hv, alpha=w)
            self.calls += 1
        self.hvps += 1
        self._check([i], [out])
        return out

    def block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor], batched: bool = True) -> list[torch.Tensor]:
        """H_ii v_i for several layers. With ``batched``, one vmapped backward per batch serves all of them
        (``is_grads_batched``); it falls back to a loop where the model does not support that."""
        if batched and len(idx) > 1 and self._batched_ok is not False:
            try:
                out = self._batched_block_hvps(idx, vs)
                self._batched_ok = True
                return out
            except (RuntimeError, NotImplementedError):
                self._batched_ok = False
        return [self.block_hvp(i, v) for i, v in zip(idx, vs, strict=True)]

    def _batched_block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        k = len(idx)
        params = [self.params[i] for i in idx]
        gouts = []
        for j, v in enumerate(vs):
            z = v.new_zeros((k, *v.shape))
            z[j] = v
            gouts.append(z)
        out = [torch.zeros_like(p) for p in params]
        for w, g in zip(self.batch_weights, self.grads, strict=True):
            res = torch.autograd.grad([g[i] for i in idx], params, grad_outputs=gouts, retain_graph=True,
                                      is_grads_batched=True)
            for j in range(k):
                out[j].add_(res[j][j], alpha=w)
            self.calls += 1
        self.hvps += k
        self._check(idx, out)
        return out


def _rademacher(shape: torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # drawn straight into a floating dtype: the same stream as int64 draws (checked in the tests), without
    # the int64 buffer and its conversion (5x faster for a (360, 17, 64) probe)
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


# ---------------------------------------------------------------------------------------------------------
# Estimators


def hutchinson_traces(op: HessianOperator, probes: int = 32, mode: str = "joint", seed: int = 0,
                      return_samples: bool = False) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Per-layer tr(H_ll) and its Monte-Carlo standard error (std / sqrt(probes)), Rademacher probes.
    ``joint``: one full HVP per probe for all layers; ``per_layer``: one block HVP per layer and probe.
    With ``return_samples`` the raw (probes x layers) estimates are returned instead."""
    check_choice("mode", mode, MODES)
    gen = torch.Generator().manual_seed(seed)
    est = np.empty((probes, len(op.params)))
    for p in range(probes):
        v = [_rademacher(w.shape, gen, w) for w in op.params]
        if mode == "joint":
            hv = op.hvp(v)
            est[p] = [_dot(a, b) for a, b in zip(v, hv, strict=True)]
        else:
            est[p] = [_dot(v[i], op.block_hvp(i, v[i])) for i in range(len(v))]
    if return_samples:
        return est
    return est.mean(0), _se(est)


def _se(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    return x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1:], np.nan)


def top_eigenvalues(op: HessianOperator | GaussNewton, iters: int = 20, tol: float = 1e-3, seed: int = 0,
                    batched: bool = False) -> np.ndarray:
    """Dominant (largest-magnitude) eigenvalue of every block H_ll by power iteration on block-restricted
    HVPs (or exact :class:`GaussNewton` block products). All layers iterate together (one batched backward
    where supported); a layer stops once its estimate changes by less than ``tol`` relative."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(op.params)
    v = [normalization([_rademacher(w.shape, gen, w)])[0] for w in op.params]
    lam = np.full(n, np.nan)
    active = list(range(n))
    for _ in range(max(iters, 1)):
        hv = op.block_hvps(active, [v[i] for i in active], batched=batched)
        still = []
        for i, h in zip(active, hv, strict=True):
            new = _dot(v[i], h)
            converged = np.isfinite(lam[i]) and abs(new - lam[i]) <= tol * (abs(lam[i]) + 1e-12)
            lam[i] = new
            norm = float(h.norm())
            if norm == 0.0:  # zero block (e.g. a layer the loss does not depend on)
                continue
            v[i] = h / norm
            if not converged:
                still.append(i)
        active = still
        if not active:
            break
    return lam


def _analog_weight(layer: nn.Module) -> torch.Tensor:
    """The effective weight an analog layer computes with: tile conductance weights x mapping and learned
    output scales x drift-compensation factor, tiles assembled, in the digital layer's shape."""
    mod = layer.analog_module

    def tile_weight(tile: Any) -> torch.Tensor:
        if getattr(tile, "analog_bias", False):
            raise HilalError("effective weights of tiles with an analog bias are not supported")
        w = tile.tile.weight.detach()
        scales = tile.get_scales()
        if scales is not None:
            w = w * scales.detach().to(w.device).view(-1, 1)
        if getattr(tile.rpu_config, "drift_compensation", None) is not None:
            w = w * torch.as_tensor(tile.alpha).detach().to(w.device).reshape(-1)[0]
        return w

    if hasattr(mod, "array"):  # TileModuleArray: rows of the array split the input, columns the output
        w = torch.cat([torch.cat([tile_weight(t) for t in in_tiles], 0) for in_tiles in mod.array], 1)
    else:
        w = tile_weight(mod)
    return w


def weight_noise_stream(model: nn.Module, layers: Sequence[str], preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0) -> Iterator[list[torch.Tensor]]:
    """Draws of dw_l = (effective analog weight at ``t_inference``) - (digital weight) for every named layer,
    sampled through aihwkit: the layers are converted once with the preset, and each draw is a seeded
    ``program_analog_weights`` + ``drift_analog_weights`` (programming noise, drift, read noise and the
    drift compensation measured with the preset's IO). Yields one list per draw, tensors shaped like the
    digital weights, on the model's device and dtype."""
    from hilal.evaluate import inference_state, program_repetition

    layers = check_layers(model, layers)
    analog = to_analog(model, layers, preset)
    mods, amods = dict(model.named_modules()), dict(analog.named_modules())
    ref = [mods[n].weight.detach() for n in layers]
    with inference_state(analog):
        for s in range(samples):
            program_repetition(analog, t_inference, seed, s)
            yield [_analog_weight(amods[n]).to(device=r.device, dtype=r.dtype).reshape(r.shape) - r
                   for n, r in zip(layers, ref, strict=True)]


def sample_weight_noise(model: nn.Module, layers: Sequence[str], preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0) -> list[list[torch.Tensor]]:
    """``samples`` draws of :func:`weight_noise_stream` as a list (samples x layers)."""
    return list(weight_noise_stream(model, layers, preset, t_inference, samples, seed))


def expected_loss_increase(op: HessianOperator, noise: Iterable[Sequence[torch.Tensor]], mode: str = "joint",
                           seed: int = 0, quadratic_samples: int | None = None) -> dict[str, np.ndarray]:
    """Monte-Carlo ELI_l = E[g_l . dw_l] + 1/2 E[dw_l^T H_ll dw_l] over the noise samples given (any iterable).

    The first-order term is exact per sample and uses every sample (it needs no HVP); the quadratic term uses
    the first ``quadratic_samples`` (default: all) with one HVP per sample for all layers (``joint``, random
    signs) or one block HVP per layer and sample (``per_layer``). Returns arrays ``eli``, ``eli_first``,
    ``eli_second`` and ``eli_se`` (standard error of ``eli``: the two parts' errors combined as if
    independent). :func:`layer_metrics` takes the same terms in output space (:func:`weight_output_errors`),
    where the joint pass can draw its signs per sample."""
    check_choice("mode", mode, MODES)
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(op.params)
    first, quad = [], []
    for s, dw in enumerate(noise):
        first.append([_dot(g, d) for g, d in zip(op.gradient, dw, strict=True)])
        if quadratic_samples is not None and s >= quadratic_samples:
            continue
        if mode == "joint":
            signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).tolist()
            v = [sg * d for sg, d in zip(signs, dw, strict=True)]
            hv = op.hvp(v)
            quad.append([_dot(a, b) for a, b in zip(v, hv, strict=True)])
        else:
            quad.append([_dot(d, op.block_hvp(i, d)) for i, d in enumerate(dw)])
    if not quad:
        raise HilalError("the expected loss increase needs at least one noise sample")
    f, q = np.asarray(first), 0.5 * np.asarray(quad)
    se = np.sqrt(_se(f) ** 2 + _se(q) ** 2)
    return {"eli": f.mean(0) + q.mean(0), "eli_first": f.mean(0), "eli_second": q.mean(0), "eli_se": se}


# ---------------------------------------------------------------------------------------------------------
# ELI in output space: the whole analog error of each layer, converters included


def _hooked(model: nn.Module, layers: Sequence[str], batch: Any, fn: Any
            ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``fn(model, batch)`` with a zero perturbation z_l (requiring grad) added to the output of every named
    layer by a forward hook; returns the result, the z_l and the layers' (detached) inputs."""
    mods = dict(model.named_modules())
    zs: dict[int, torch.Tensor] = {}
    xs: dict[int, torch.Tensor] = {}

    def hook(i: int) -> Any:
        def f(mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
            zs[i] = torch.zeros_like(out, requires_grad=True)
            xs[i] = inp[0].detach()
            return out + zs[i]
        return f

    handles = [mods[n].register_forward_hook(hook(i)) for i, n in enumerate(layers)]
    try:
        out = fn(model, to_device(batch, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    missing = [n for i, n in enumerate(layers) if i not in zs]
    if missing:
        raise HilalError(f"layer(s) {missing} are not used in the forward pass")
    return out, [zs[i] for i in range(len(layers))], [xs[i] for i in range(len(layers))]


class OutputOperator:
    """Gradient and Hessian-vector products of the calibration loss with respect to the outputs of the named
    layers: a zero perturbation z_l is added to every layer's output by a forward hook and the loss is
    differentiated twice with respect to the z_l. Keeps each batch's layer inputs, so the analog layers can
    be run on exactly the inputs the digital network gave them. With ``strata`` > 1 the samples are first
    regrouped into that many batches by :func:`gradient_strata` (``scales`` holds each batch's per-sample
    scales; None without strata). ``hvps`` counts products per batch; ``full_hvps`` counts them in units of
    one product over all samples."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str], strata: int = 1) -> None:
        self.layers = list(layers)
        mods = dict(model.named_modules())
        self.modules = [mods[n] for n in self.layers]
        self.device = model_device(model)
        self.scales: list[np.ndarray] | None = None
        _check_strata(strata)
        if strata > 1:
            batches, self.scales = gradient_strata(model, batches, self.layers, strata)
        self.sizes = [_batch_size_of(b) for b in batches]
        self.batch_weights = [s / sum(self.sizes) for s in self.sizes]
        self.inputs: list[list[torch.Tensor]] = []
        self.zs: list[list[torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, ...]] = []
        self.hvps = 0
        self.full_hvps = 0.0
        for batch in batches:
            with _hvp_graph(model):
                loss, z, x = _hooked(model, self.layers, batch, task_loss)
                _check_finite(loss)
                self.grads.append(torch.autograd.grad(loss, z, create_graph=True))
            self.zs.append(z)
            self.inputs.append(x)

    def hvp(self, b: int, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_b v for batch ``b`` (the output perturbations of different batches do not interact)."""
        out = hessian_vector_product(list(self.grads[b]), self.zs[b], list(v))
        self.hvps += 1
        self.full_hvps += self.batch_weights[b]
        bad = _nonfinite(self.layers, out)
        if bad:
            raise HilalError(f"non-finite Hessian-vector product at the output of layer(s) {bad}")
        return out


def _check_strata(strata: int) -> None:
    if not is_count(strata):
        raise HilalError(f"strata must be a whole number >= 1 (1: no strata), got {strata!r}")


MIN_STRATUM_PROBES = 8
MIN_STRATUM_SAMPLES = 32


def strata_for(strata: int, probes: int, samples: int) -> int:
    """The strata used for ``strata`` asked, ``probes`` and ``samples``: at most one per MIN_STRATUM_PROBES
    probes and per MIN_STRATUM_SAMPLES samples, at least 1. A stratum's standard error comes from its own
    probes, and the smallest strata get a tenth of them: with 8 probes and 64 samples, 4 strata gave
    vit_tiny a median 1.35x the standard error of none."""
    _check_strata(strata)
    return max(1, min(strata, probes // MIN_STRATUM_PROBES, samples // MIN_STRATUM_SAMPLES))


STRATUM_EXPONENT = 0.75
"""A sample's Monte-Carlo spread in :func:`output_traces` is taken to grow as (gradient scale)^0.75. Its
Hessian shrinks linearly with 1 - p_y as the model grows confident (the softmax curvature and the network's
own, carried by the loss gradient), but the per-sample spreads on vit_tiny scatter about that line and
flatten for uncertain samples; the lower power allots the middle strata more."""
STRATUM_FLOOR = 0.1
"""Share of the probes every stratum gets whatever its scale: a guard against a poor scale."""


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


def gradient_strata(model: nn.Module, batches: Sequence[Any], layers: Sequence[str], strata: int
                    ) -> tuple[list[Any], list[np.ndarray]]:
    """The calibration samples regrouped into ``strata`` batches of (nearly) equal size, by decreasing scale
    of their loss gradient at the named layers' outputs (one backward pass, no graph kept), and each new
    batch's per-sample scales. A sample's scale is the root mean over layers of its squared gradient norm
    relative to the layer's mean over samples; the loss Hessian of a sample the model fits with confidence
    shrinks with its gradient (both scale with 1 - p_y), so the scale ranks how much curvature, and
    Monte-Carlo spread, each sample carries."""
    sq = []
    for batch in batches:
        with _hvp_graph(model):
            loss, z, _ = _hooked(model, layers, batch, task_loss)
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


def probe_counts(op: OutputOperator | GaussNewton, probes: int) -> list[int]:
    """Trace probes per batch of ``op``: ``probes`` each without strata; with strata, a Neyman allocation,
    n_b proportional to the root mean square of the batch's expected spreads (scale^STRATUM_EXPONENT), made
    to give the variance of ``probes`` probes on every sample under that model, with every stratum keeping
    STRATUM_FLOOR of ``probes`` and at least 2 (for its standard error). On vit_tiny (digits, 4 strata) it
    costs 0.46 of the products of equal counts at a median 0.95 of their variance."""
    scales = getattr(op, "scales", None)
    if scales is None:
        return [probes] * len(op.batch_weights)
    spread = [s ** STRATUM_EXPONENT for s in scales]
    total = float(sum(np.sum(x**2) for x in spread))
    if total == 0:  # no sample has a gradient: nothing to allot by
        return [probes] * len(scales)
    rms = np.array([math.sqrt(float(np.mean(x**2))) for x in spread])
    kappa = probes * float(sum(len(x) * r for x, r in zip(spread, rms, strict=True))) / total
    return [max(2, int(round((1 - STRATUM_FLOOR) * kappa * r + STRATUM_FLOOR * probes))) for r in rms]


def _rank_one_probe(mod: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The output change V_n x_n of a Linear/Conv layer on its inputs ``x`` for an independent weight probe
    per sample n, V_n = xi_n r_n^T with Rademacher xi_n (fan-out) and r_n (fan-in). Its entries are +-1 with
    E[vec(V) vec(V)^T] = I, so E[e^T H_z e] = tr(X^T H_z X) = tr(H_ll): a Hutchinson probe of the weight block
    that costs one fan-in dot product per position instead of a weight-sized product."""
    n = x.shape[0]
    if isinstance(mod, nn.Linear):
        ones = (1,) * (x.dim() - 2)
        r = _rademacher(torch.Size((n, *ones, x.shape[-1])), gen, x)
        xi = _rademacher(torch.Size((n, *ones, mod.out_features)), gen, x)
        return (x * r).sum(-1, keepdim=True) * xi
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        raise HilalError(f"weight probes support Linear, Conv1d and Conv2d layers, not {type(mod).__name__}")
    conv = nn.functional.conv1d if isinstance(mod, nn.Conv1d) else nn.functional.conv2d
    padding = mod.padding
    if mod.padding_mode != "zeros":
        x = nn.functional.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        padding = 0
    g = mod.groups
    r = _rademacher(torch.Size((n * g, *mod.weight.shape[1:])), gen, x)
    # one output channel per sample and group: u[n, j] = conv(x_n's group j, r_nj)
    u = conv(x.reshape(1, -1, *x.shape[2:]), r, None, mod.stride, padding, mod.dilation, n * g)
    u = u.reshape(n, g, *u.shape[2:]).repeat_interleave(mod.out_channels // g, dim=1)
    xi = _rademacher(torch.Size((n, mod.out_channels) + (1,) * (u.dim() - 2)), gen, x)
    return u * xi


def output_traces(op: OutputOperator | GaussNewton, probes: int = 32, seed: int = 0, return_samples: bool = False
                  ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Per-layer tr(H_ll) of the weight blocks and their Monte-Carlo standard errors, from one output-space
    HVP per probe and batch for all layers. A layer's weight enters only its own output linearly, so its
    block is the output Hessian pulled back through its inputs, H_ll = X_l^T H_{z_l} X_l, and a weight probe
    can be applied in output space (:func:`_rank_one_probe`). The probes are drawn independently per sample
    and layer: every cross term (other layers, other samples) has zero mean, and in eval mode, where samples
    do not interact, the estimate is a sum of independent per-sample terms rather than one coherent
    quadratic form. Each batch b gets :func:`probe_counts` probes (``probes``, unless ``op`` has strata);
    the trace is the sample-weighted sum of the batches' means, with the stratified standard error
    sqrt(sum_b w_b^2 var_b / n_b). With ``return_samples`` the raw (probes x layers) estimates are returned
    instead (equal probe counts only). With :class:`GaussNewton` blocks as ``op``: their exact traces and a
    zero error (no probe)."""
    if isinstance(op, GaussNewton) and not return_samples:
        return op.traces(), np.zeros(len(op.layers))
    counts = probe_counts(op, probes)
    if return_samples and len(set(counts)) > 1:
        raise HilalError("return_samples needs equal probe counts per batch: build the operator with strata=1")
    gen = torch.Generator().manual_seed(seed)
    est = [np.zeros((n, len(op.layers))) for n in counts]
    for p in range(max(counts)):
        for b, xs in enumerate(op.inputs):
            if p >= counts[b]:
                continue
            with torch.no_grad():
                e = [_rank_one_probe(m, x, gen) for m, x in zip(op.modules, xs, strict=True)]
            hv = op.hvp(b, e)
            est[b][p] = [_dot(a, h) for a, h in zip(e, hv, strict=True)]
    w = op.batch_weights
    if return_samples:
        return sum(wb * e for wb, e in zip(w, est, strict=True))
    trace = sum(wb * e.mean(0) for wb, e in zip(w, est, strict=True))
    var = sum(wb**2 * (e.var(0, ddof=1) / len(e) if len(e) > 1 else np.full(e.shape[1], np.nan))
              for wb, e in zip(w, est, strict=True))
    return trace, np.sqrt(var)


def weight_output_errors(op: OutputOperator | GaussNewton, noise: Iterable[Sequence[torch.Tensor]]
                         ) -> Iterator[list[list[torch.Tensor]]]:
    """The output change dW_l x_l of every layer and batch (batches x layers) for each weight-noise draw
    (one tensor per layer, weight-shaped): the weight-space ELI through :func:`output_loss_increase`, whose
    joint pass draws its signs per sample (the quadratic terms are equal: H_ll = X_l^T H_{z_l} X_l)."""
    for dw in noise:
        with torch.no_grad():
            yield [[_apply(m, x, d.to(x)) for m, x, d in zip(op.modules, xs, dw, strict=True)]
                   for xs in op.inputs]


_PER_SAMPLE_CHUNK = 1 << 24  # elements of per-sample gradients held at once
_CURVED = (nn.LayerNorm, nn.GroupNorm, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.SiLU, nn.ELU, nn.Softplus,
           nn.MultiheadAttention)
"""Modules that put curvature between a weight and the logits: a model holding one is not tried (saves the
check); functional nonlinearities are caught by the check itself."""


class GaussNewton:
    """Exact Hessian blocks of a classification loss for networks that are piecewise linear in every layer's
    weight (ReLU, max-pooling, eval-mode batch norm, residual sums: no curvature between a layer and the
    logits). There the block H_ll equals the Gauss-Newton block (1/N) sum_n J_nl^T A_n J_nl, with
    A_n = diag(p_n) - p_n p_n^T the softmax cross-entropy Hessian in the logits, and with B_n (columns
    b_nc = sqrt(p_nc) (e_c - p_n)) a square root of A_n, all that HILAL needs of it follows from one
    backward pass per class, giving d_ncl, the backward signal of b_nc . f_n at layer l's output:

    - tr(H_ll) = (1/N) sum_{n,c} ||d_ncl x_nl^T||^2 (per-sample gradients, summed over positions);
    - u^T H_ll u = (1/N) sum_{n,c} (d_ncl . (u x_nl))^2 for a weight change u;
    - e^T H_{z_l} e = (1/N) sum_{n,c} (d_ncl . e_nl)^2 for a change e of the layer's output.

    No Hessian-vector product and no Monte-Carlo error: the random-sign cross terms of the joint pass are
    gone. The signals (classes x every layer's output) are kept; beyond ``max_bytes`` construction fails.
    :meth:`mismatch` measures how far this is from the true blocks (PyHessian's block-restricted HVPs on a
    random probe); :func:`gauss_newton` only returns one where they agree. Exposes ``layers``,
    ``batch_weights``, ``inputs`` and ``grads`` (loss gradient at the layer outputs) like
    :class:`OutputOperator`, so the output-space ELI runs on either."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                 max_bytes: float = 2**31) -> None:
        mods = dict(model.named_modules())
        self.layers = list(layers)
        self.modules = [mods[n] for n in self.layers]
        self.params = [m.weight for m in self.modules]
        unsupported = [n for n, m in zip(self.layers, self.modules, strict=True) if not (
            isinstance(m, nn.Linear) or isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))]
        if unsupported:
            raise HilalError("Gauss-Newton blocks support Linear and explicitly zero-padded Conv1d/Conv2d "
                             f"layers, not {unsupported}")
        if any(isinstance(b, dict) for b in batches):
            raise HilalError("Gauss-Newton blocks need a classification loss (inputs, labels)")
        self.device = model_device(model)
        sizes = [_batch_size_of(b) for b in batches]
        self.batch_weights = [s / sum(sizes) for s in sizes]
        self.inputs: list[list[torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, ...]] = []
        self.signals: list[list[torch.Tensor]] = []
        self.hvps = 0
        self.check = float("nan")
        """Relative mismatch with PyHessian's block HVPs measured by :func:`gauss_newton` (NaN: not checked)."""
        for batch in batches:
            logits, z, x = _hooked(model, self.layers, batch, lambda m, b: m(b[0]))
            if logits.dim() != 2:
                raise HilalError(f"Gauss-Newton blocks need (samples, classes) logits, got {tuple(logits.shape)}")
            y = to_device(batch, self.device)[1]
            loss = nn.functional.cross_entropy(logits, y)
            _check_finite(loss)
            self.grads.append(tuple(g.detach() for g in torch.autograd.grad(loss, z, retain_graph=True)))
            p = torch.softmax(logits.detach(), 1)
            k = p.shape[1]
            held = k * sum(zi.numel() * zi.element_size() for zi in z) + sum(
                d.numel() * d.element_size() for sig in self.signals for d in sig)
            if held > max_bytes:
                raise HilalError(f"Gauss-Newton signals would hold {held / 2**30:.1f} GiB ({k} classes x the "
                                 f"layer outputs), over max_bytes={max_bytes / 2**30:.1f} GiB")
            root = p.sqrt().T[:, :, None] * (torch.eye(k, dtype=p.dtype, device=p.device)[:, None, :] - p)
            self.signals.append(self._backward(logits, z, root))
            self.inputs.append(x)

    @staticmethod
    def _backward(logits: torch.Tensor, z: list[torch.Tensor], root: torch.Tensor) -> list[torch.Tensor]:
        """d_ncl for every class c (leading dimension): one backward pass per class (on a CPU a loop is faster
        than a vmapped ``is_grads_batched`` backward)."""
        per_class = [torch.autograd.grad(logits, z, grad_outputs=r, retain_graph=True) for r in root]
        return [torch.stack(d) for d in zip(*per_class, strict=True)]

    def _scale(self, b: int) -> float:
        return self.batch_weights[b] / self.inputs[b][0].shape[0]

    def traces(self) -> np.ndarray:
        """tr(H_ll) of every layer, exactly."""
        out = np.zeros(len(self.layers))
        for b, (xs, ds) in enumerate(zip(self.inputs, self.signals, strict=True)):
            for i, (m, x, d) in enumerate(zip(self.modules, xs, ds, strict=True)):
                out[i] += self._scale(b) * _per_sample_sq_norms(m, x, d)
        return out

    def output_quadratic(self, b: int, e: Sequence[torch.Tensor]) -> np.ndarray:
        """(1/N) sum over batch ``b`` of e_l^T H_{z_l} e_l for output changes e (one tensor per layer)."""
        return np.array([self._scale(b) * float(_class_dots(d, ei).square().sum())
                         for d, ei in zip(self.signals[b], e, strict=True)])

    def weight_quadratic(self, u: Sequence[torch.Tensor]) -> np.ndarray:
        """u_l^T H_ll u_l of every layer for weight changes u (one tensor per layer, weight-shaped)."""
        (errors,) = weight_output_errors(self, [u])
        return sum((self.output_quadratic(b, e) for b, e in enumerate(errors)), np.zeros(len(self.layers)))

    def block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor], batched: bool = False
                   ) -> list[torch.Tensor]:
        """H_ii v_i (= G_ii v_i) for several layers, as :meth:`HessianOperator.block_hvps` gives them, for the
        power iteration: per layer and batch one layer forward and one layer weight-gradient, nothing through
        the rest of the network (``batched`` is ignored)."""
        out = [torch.zeros_like(self.params[i]) for i in idx]
        for b, (xs, ds) in enumerate(zip(self.inputs, self.signals, strict=True)):
            for o, i, v in zip(out, idx, vs, strict=True):
                w = v.detach().to(xs[i]).requires_grad_(True)
                with torch.enable_grad():
                    y = _apply(self.modules[i], xs[i], w)
                t = _class_dots(ds[i], y.detach())
                (g,) = torch.autograd.grad(y, w, grad_outputs=torch.einsum("cn,cn...->n...", t, ds[i]))
                o.add_(g.to(o), alpha=self._scale(b))
        return out

    def mismatch(self, op: HessianOperator, seed: int = 0) -> float:
        """Largest relative difference, over layers, between v_l^T H_ll v_l from PyHessian's block-restricted
        HVPs (``op``, same batches and layers) and from these blocks, for one Rademacher probe v."""
        gen = torch.Generator().manual_seed(seed + 3)
        v = [_rademacher(w.shape, gen, w) for w in op.params]
        hv = op.block_hvps(range(len(v)), v, batched=False)
        ref = np.array([_dot(a, h) for a, h in zip(v, hv, strict=True)])
        mine = self.weight_quadratic(v)
        return float(np.max(np.abs(mine - ref) / np.maximum(np.abs(ref), 1e-30)))


def _apply(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output change for a weight change ``w`` (its linear part: no bias)."""
    if isinstance(mod, nn.Linear):
        return nn.functional.linear(x, w)
    return mod._conv_forward(x, w, None)


def _class_dots(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(classes, samples) dot products of backward signals d (classes, samples, ...) with e (samples, ...)."""
    return (d * e.unsqueeze(0)).flatten(2).sum(-1)


def _positions(mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (samples', positions, fan-in) and signals (classes, samples', positions, fan-out) of a layer
    as a sum of matrix products over positions (conv groups folded into the sample dimension), so that a
    sample's weight gradient is sum_t d_t x_t^T."""
    k = d.shape[0]
    if isinstance(mod, nn.Linear):
        n = x.shape[0]
        return x.reshape(n, -1, x.shape[-1]), d.reshape(k, n, -1, d.shape[-1])
    if isinstance(mod, nn.Conv1d):
        x, d = x.unsqueeze(2), d.unsqueeze(3)
        ks, dil, pad, st = ((1, mod.kernel_size[0]), (1, mod.dilation[0]), (0, mod.padding[0]), (1, mod.stride[0]))
    else:
        ks, dil, pad, st = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    n, g = x.shape[0], mod.groups
    cols = nn.functional.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (n, fan-in * g, positions)
    cols = cols.reshape(n, g, -1, cols.shape[-1]).permute(0, 1, 3, 2).reshape(n * g, cols.shape[-1], -1)
    sig = d.reshape(k, n, g, d.shape[2] // g, -1).permute(0, 1, 2, 4, 3).reshape(k, n * g, -1, d.shape[2] // g)
    return cols, sig


def _per_sample_sq_norms(mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> float:
    """sum over classes and samples of ||sum_t d_t x_t^T||^2, by whichever is cheaper: the per-sample
    gradients (fan-out x fan-in per sample) or their Gram form sum_{t,t'} (d_t . d_t') (x_t . x_t')."""
    xs, ds = _positions(mod, x, d)
    n, t, fin = xs.shape
    fout = ds.shape[-1]
    total = 0.0
    if t * t * (fin + fout) < t * fin * fout:
        gx = xs @ xs.transpose(1, 2)
        for dc in ds:
            total += float((dc @ dc.transpose(1, 2) * gx).sum())
        return total
    step = max(1, _PER_SAMPLE_CHUNK // (fin * fout))
    for dc in ds:
        for a in range(0, n, step):
            total += float((dc[a:a + step].transpose(1, 2) @ xs[a:a + step]).square().sum())
    return total


def gauss_newton(model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                 op: HessianOperator | None = None, tol: float = 1e-3, seed: int = 0) -> GaussNewton | None:
    """:class:`GaussNewton` blocks for ``layers`` if they apply: a classification loss, supported layers, and
    agreement with PyHessian's block HVPs (``op``, built here when not given) to ``tol`` relative on a
    random probe (which fails for layers followed by curvature: tanh, GELU, attention, layer norm). None
    otherwise."""
    if any(isinstance(m, _CURVED) for m in model.modules()):
        return None
    try:
        gn = GaussNewton(model, batches, layers)
    except HilalError:
        return None
    gn.check = gn.mismatch(op if op is not None else HessianOperator(model, batches, layers), seed)
    return gn if gn.check <= tol else None


def output_error_stream(model: nn.Module, op: OutputOperator, preset: Any = "pcm", t_inference: float = 86400.0,
                        samples: int = 16, seed: int = 0, cache_bytes: float = 2**30
                        ) -> Iterator[list[list[torch.Tensor]]]:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer and calibration batch (batches x layers),
    sampled through aihwkit: the layers are converted once with the preset; each draw is a seeded
    programming + drift, and each analog layer then runs (in inference mode, with its converters and output
    noise) on the inputs the digital network gave it. Convolution inputs are unfolded once for all draws
    (:func:`fixed_input_forward`) while the unfolded copies fit in ``cache_bytes``; the rest unfold per draw."""
    from hilal.evaluate import inference_state, program_repetition

    analog = to_analog(model, op.layers, preset)
    mods, amods = dict(model.named_modules()), dict(analog.named_modules())
    with torch.no_grad():
        clean = [[mods[n](x) for n, x in zip(op.layers, xs, strict=True)] for xs in op.inputs]
        runs, left = [], float(cache_bytes)
        for xs, ys in zip(op.inputs, clean, strict=True):
            runs.append([])
            for n, x, y in zip(op.layers, xs, ys, strict=True):
                size = unfolded_bytes(amods[n], x, y.shape)
                cache = size <= left
                runs[-1].append(fixed_input_forward(amods[n], x, y.shape, cache=cache))
                left -= size if cache else 0
    with inference_state(analog), torch.no_grad():
        for s in range(samples):
            program_repetition(analog, t_inference, seed, s)
            yield [[run() - y for run, y in zip(rs, ys, strict=True)] for rs, ys in zip(runs, clean, strict=True)]


def _unfolds(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether aihwkit's forward of ``module`` on ``x`` is an ``AnalogConv2d`` on its unfold path (the torch
    tiles' only one): the module's own ``use_indexed``, or when it leaves that open, aihwkit's rule."""
    if not isinstance(module, AnalogConv2d) or x.dim() != 4:
        return False
    indexed = module.use_indexed
    if indexed is None:
        indexed = module.analog_module.is_cuda
    return not indexed


def unfolded_bytes(module: nn.Module, x: torch.Tensor, out_shape: torch.Size) -> int:
    """Bytes of ``x`` unfolded for ``module`` (positions x fan-in per sample) where it unfolds, else 0."""
    if not _unfolds(module, x):
        return 0
    positions = math.prod(out_shape[2:])
    return x.shape[0] * positions * module.in_channels * math.prod(module.kernel_size) * x.element_size()


def fixed_input_forward(module: nn.Module, x: torch.Tensor, out_shape: torch.Size,
                        cache: bool = True) -> Callable[[], torch.Tensor]:
    """A function that returns ``module(x)`` (of shape ``out_shape``) for an input that stays fixed while the
    module's tiles are programmed again and again: with ``cache``, an aihwkit ``AnalogConv2d`` on its unfold
    path gets its input unfolded once (:func:`unfolded_bytes` held) instead of at every call, then runs exactly
    the operations of its own forward on it (the same result to the bit, from the same random state); any
    other module, or any module without ``cache``, is simply called."""
    if not cache or not _unfolds(module, x):
        return lambda: module(x)
    cols = nn.functional.unfold(x, kernel_size=module.kernel_size, dilation=module.dilation,
                                padding=module.padding, stride=module.stride).transpose(-1, -2)
    return lambda: module.analog_module(cols).transpose(-1, -2).view(out_shape)


def output_loss_increase(op: OutputOperator | GaussNewton, errors: Iterable[Sequence[Sequence[torch.Tensor]]],
                         mode: str = "joint", seed: int = 0, quadratic_samples: int | None = None
                         ) -> dict[str, np.ndarray]:
    """ELI_l = E[g_l . e_l] + 1/2 E[e_l^T H_l e_l] in output space, summed over batches with their weights;
    the same estimators as :func:`expected_loss_increase`, except that the joint pass draws its random
    signs per sample and layer, not per layer: samples do not interact in the loss (the model is in eval
    mode), so the output Hessian is block-diagonal over samples and every cross-layer term vanishes in
    expectation sample by sample, leaving a sum of independent zero-mean terms instead of one coherent one
    (at no extra cost; on ResNet-8 the spread over sign draws is 0.6-1.1x, median 0.8x, that of per-layer
    signs). With :class:`GaussNewton` blocks as ``op`` the quadratic terms are exact (``mode`` is moot)."""
    check_choice("mode", mode, MODES)
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(op.layers)
    first, quad = [], []
    for s, err in enumerate(errors):
        f = np.zeros(n)
        for w, g, e in zip(op.batch_weights, op.grads, err, strict=True):
            f += w * np.array([_dot(gi.detach(), ei) for gi, ei in zip(g, e, strict=True)])
        first.append(f)
        if quadratic_samples is not None and s >= quadratic_samples:
            continue
        q = np.zeros(n)
        for b, (w, e) in enumerate(zip(op.batch_weights, err, strict=True)):
            if isinstance(op, GaussNewton):
                q += op.output_quadratic(b, e)
            elif mode == "joint":
                v = [ei * _sample_signs(ei, gen) for ei in e]
                hv = op.hvp(b, v)
                q += w * np.array([_dot(a, h) for a, h in zip(v, hv, strict=True)])
            else:
                for i in range(n):
                    v = [ei if j == i else torch.zeros_like(ei) for j, ei in enumerate(e)]
                    q[i] += w * _dot(e[i], op.hvp(b, v)[i])
        quad.append(q)
    if not quad:
        raise HilalError("the expected loss increase needs at least one noise sample")
    f, q = np.asarray(first), 0.5 * np.asarray(quad)
    se = np.sqrt(_se(f) ** 2 + _se(q) ** 2)
    return {"eli": f.mean(0) + q.mean(0), "eli_first": f.mean(0), "eli_second": q.mean(0), "eli_se": se}


# ---------------------------------------------------------------------------------------------------------
# The table


def layer_metrics(model: nn.Module, splits: Splits | Sequence[Any], preset: Any = "pcm",
                  cfg: HessianConfig | None = None, layers: Sequence[str] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """One row per mappable layer (model order): params, MACs, Hutchinson trace (+ standard error), top
    eigenvalue, concentration, and the noise-aware expected loss increase (+ first/second-order parts and
    standard error), all on the calibration data. ``df.attrs`` holds the HVP counts (``hvps`` and per
    part), backward calls, the sample strata the traces used (1: none) and timings in seconds."""
    cfg = cfg or HessianConfig()
    check_choice("mode", cfg.mode, MODES)
    check_choice("noise", cfg.noise, NOISE_SPACES)
    check_choice("gauss_newton", cfg.gauss_newton, GAUSS_NEWTON)
    _check_strata(cfg.strata)
    all_layers = mappable_layers(model)
    if not all_layers:
        raise HilalError("the model has no mappable (Conv1d/Conv2d/Linear) layer")
    layers = check_layers(model, layers if layers is not None else all_layers)
    if not layers:
        raise HilalError("no layers selected")
    order = {n: i for i, n in enumerate(all_layers)}
    layers = sorted(layers, key=order.__getitem__)
    mods = dict(model.named_modules())
    analog = [n for n in layers if isinstance(mods[n], ANALOG_TYPES)]
    if analog:
        raise HilalError(f"curvature is measured on the digital model; layer(s) {analog} are already analog")

    batches = calibration_batches(splits, cfg)
    samples = sum(_batch_size_of(b) for b in batches)
    bar = tqdm(total=3, desc="curvature", disable=not progress, leave=False)
    was_training = model.training
    flags = {n: mods[n].weight.requires_grad for n in layers}
    timings: dict[str, float] = {}
    model.eval()
    try:
        for n in layers:
            mods[n].weight.requires_grad_(True)
        t0 = time.perf_counter()
        op = HessianOperator(model, batches, layers)
        gn = out_op = None
        if cfg.mode == "joint" and cfg.gauss_newton == "auto":
            gn = gauss_newton(model, batches, layers, op, seed=cfg.seed)
        if cfg.mode == "joint":  # exact blocks, or output-space HVPs with per-sample probes
            strata = strata_for(cfg.strata, cfg.probes, samples)
            out_op = gn if gn is not None else OutputOperator(model, batches, layers, strata)
        timings["graph_s"] = time.perf_counter() - t0
        hv_check = op.hvps

        def hvps() -> int:  # HVPs so far, weight and output space (the latter in products over all samples)
            return op.hvps + (round(out_op.full_hvps) if isinstance(out_op, OutputOperator) else 0)

        t0 = time.perf_counter()
        if out_op is not None:
            trace, trace_se = output_traces(out_op, cfg.probes, cfg.seed)
        else:
            trace, trace_se = hutchinson_traces(op, cfg.probes, cfg.mode, cfg.seed)
        timings["trace_s"] = time.perf_counter() - t0
        hv_trace = hvps()
        bar.update()
        t0 = time.perf_counter()
        lam = top_eigenvalues(gn if gn is not None else op, cfg.power_iters, cfg.power_tol, cfg.seed)
        timings["eig_s"] = time.perf_counter() - t0
        hv_eig = hvps() - hv_trace
        bar.update()
        t0 = time.perf_counter()
        draws = max(cfg.first_order_samples, cfg.eli_samples)
        if draws == 0 or cfg.eli_samples == 0:  # curvature only
            eli = {k: np.full(len(layers), np.nan) for k in ("eli", "eli_first", "eli_second", "eli_se")}
        elif out_op is not None or cfg.noise == "output":
            if out_op is None:
                out_op = OutputOperator(model, batches, layers)
            if cfg.noise == "output":
                errors = output_error_stream(model, out_op, preset, cfg.t_inference, draws, cfg.seed)
            else:
                errors = weight_output_errors(
                    out_op, weight_noise_stream(model, layers, preset, cfg.t_inference, draws, cfg.seed))
            eli = output_loss_increase(out_op, errors, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
        else:  # per_layer mode, weight noise
            noise = weight_noise_stream(model, layers, preset, cfg.t_inference, draws, cfg.seed)
            eli = expected_loss_increase(op, noise, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
        hv_eli = hvps() - hv_trace - hv_eig
        timings["eli_s"] = time.perf_counter() - t0
        calls = op.calls
        used_strata = len(out_op.sizes) if isinstance(out_op, OutputOperator) and out_op.scales is not None else 1
        curvature, check = ("gauss-newton", gn.check) if gn is not None else ("hvp", float("nan"))
        bar.update()
        op = gn = out_op = None  # frees the kept graphs
    finally:
        for n, f in flags.items():
            mods[n].weight.requires_grad_(f)
        model.train(was_training)
        bar.close()

    x = batches[0][0] if not isinstance(batches[0], dict) else _truncate(
        {k: v for k, v in batches[0].items() if k not in ("start_positions", "end_positions", "example_id",
                                                         "offset_mapping")}, 2)
    if not isinstance(x, dict):
        x = x[:2]
    macs = count_macs(model, to_device(x, model_device(model)))
    with np.errstate(divide="ignore", invalid="ignore"):
        conc = np.where(trace != 0, lam / trace, np.nan)
    df = pd.DataFrame({"layer": layers, "params": [int(mods[n].weight.numel()) for n in layers],
                       "macs": [int(macs.get(n, 0)) for n in layers], "trace": trace, "trace_se": trace_se,
                       "lambda_max": lam, "concentration": conc, **eli})[COLUMNS]
    df.attrs.update({"hvps": hv_trace + hv_eig + hv_eli, "hvps_check": hv_check, "hvps_trace": hv_trace - hv_check,
                     "hvps_eig": hv_eig, "hvps_eli": hv_eli, "backward_calls": calls, "mode": cfg.mode,
                     "noise": cfg.noise, "curvature": curvature, "gauss_newton_mismatch": check, "strata": used_strata,
                     "samples": samples,
                     **timings, "total_s": sum(timings.values())})
    return df
