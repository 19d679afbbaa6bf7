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
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyhessian.utils import group_product, hessian_vector_product, normalization
from torch import nn
from tqdm.auto import tqdm

from hilal.analog import ANALOG_TYPES, check_layers, count_macs, mappable_layers, to_analog
from hilal.data import Splits, loader
from hilal.registry import HilalError, check_choice
from hilal.train import model_device, task_loss, to_device

MODES = ("joint", "per_layer")
NOISE_SPACES = ("weight", "output")
COLUMNS = ["layer", "params", "macs", "trace", "trace_se", "lambda_max", "concentration", "eli", "eli_first",
           "eli_second", "eli_se"]


@dataclass
class HessianConfig:
    """Settings of the curvature metrics."""

    probes: int = 32
    """Hutchinson probes (Rademacher vectors) for the traces."""
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
            loss = task_loss(model, to_device(batch, self.device))
            if not torch.isfinite(loss):
                raise HilalError(f"non-finite calibration loss ({loss.item()}); check the model and data")
            self.grads.append(torch.autograd.grad(loss, self.params, create_graph=True))
        self.gradient = [sum(w * g[i].detach() for w, g in zip(self.batch_weights, self.grads, strict=True))
                         for i in range(len(self.params))]
        self.hvps = 0
        self.calls = 0
        self._batched_ok: bool | None = None

    def _check(self, idx: Sequence[int], out: Sequence[torch.Tensor]) -> None:
        bad = [self.layers[i] for i, h in zip(idx, out, strict=True) if not torch.isfinite(h).all()]
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
    return (torch.randint(0, 2, tuple(shape), generator=gen) * 2 - 1).to(device=like.device, dtype=like.dtype)


def _sample_signs(e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random signs, one per sample (leading dimension) of an output-space tensor, broadcastable to it."""
    return _rademacher(torch.Size((e.shape[0],) + (1,) * (e.dim() - 1)), gen, e)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(group_product([a], [b]))


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


def top_eigenvalues(op: HessianOperator, iters: int = 20, tol: float = 1e-3, seed: int = 0,
                    batched: bool = False) -> np.ndarray:
    """Dominant (largest-magnitude) eigenvalue of every block H_ll by power iteration on block-restricted
    HVPs. All layers iterate together (one batched backward where supported); a layer stops once its
    estimate changes by less than ``tol`` relative."""
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
    from hilal.evaluate import inference_state, program_and_drift

    layers = check_layers(model, layers)
    analog = to_analog(model, layers, preset)
    mods, amods = dict(model.named_modules()), dict(analog.named_modules())
    ref = [mods[n].weight.detach() for n in layers]
    with inference_state(analog):
        for s in range(samples):
            torch.manual_seed(seed * 100_003 + s)
            program_and_drift(analog, t_inference)
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
    independent)."""
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


class OutputOperator:
    """Gradient and Hessian-vector products of the calibration loss with respect to the outputs of the named
    layers: a zero perturbation z_l is added to every layer's output by a forward hook and the loss is
    differentiated twice with respect to the z_l. Keeps each batch's layer inputs, so the analog layers can
    be run on exactly the inputs the digital network feeds them."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.layers = list(layers)
        self.device = model_device(model)
        sizes = [_batch_size_of(b) for b in batches]
        self.batch_weights = [s / sum(sizes) for s in sizes]
        self.inputs: list[list[torch.Tensor]] = []
        self.zs: list[list[torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, ...]] = []
        self.hvps = 0
        for batch in batches:
            loss, z, x = self._hooked_loss(model, mods, batch)
            self.zs.append(z)
            self.inputs.append(x)
            self.grads.append(torch.autograd.grad(loss, z, create_graph=True))

    def _hooked_loss(self, model: nn.Module, mods: dict[str, nn.Module], batch: Any
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        zs: dict[int, torch.Tensor] = {}
        xs: dict[int, torch.Tensor] = {}

        def hook(i: int) -> Any:
            def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
                zs[i] = torch.zeros_like(out, requires_grad=True)
                xs[i] = inp[0].detach()
                return out + zs[i]
            return fn

        handles = [mods[n].register_forward_hook(hook(i)) for i, n in enumerate(self.layers)]
        try:
            loss = task_loss(model, to_device(batch, self.device))
        finally:
            for h in handles:
                h.remove()
        if not torch.isfinite(loss):
            raise HilalError(f"non-finite calibration loss ({loss.item()}); check the model and data")
        missing = [n for i, n in enumerate(self.layers) if i not in zs]
        if missing:
            raise HilalError(f"layer(s) {missing} are not used in the forward pass")
        idx = range(len(self.layers))
        return loss, [zs[i] for i in idx], [xs[i] for i in idx]

    def hvp(self, b: int, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_b v for batch ``b`` (the output perturbations of different batches do not interact)."""
        out = hessian_vector_product(list(self.grads[b]), self.zs[b], list(v))
        self.hvps += 1
        bad = [self.layers[i] for i, h in enumerate(out) if not torch.isfinite(h).all()]
        if bad:
            raise HilalError(f"non-finite Hessian-vector product at the output of layer(s) {bad}")
        return out


def output_error_stream(model: nn.Module, op: OutputOperator, preset: Any = "pcm", t_inference: float = 86400.0,
                        samples: int = 16, seed: int = 0) -> Iterator[list[list[torch.Tensor]]]:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer and calibration batch (batches x layers),
    sampled through aihwkit: the layers are converted once with the preset; each draw is a seeded
    programming + drift, and each analog layer then runs (in inference mode, with its converters and output
    noise) on the inputs the digital network gave it."""
    from hilal.evaluate import inference_state, program_and_drift

    analog = to_analog(model, op.layers, preset)
    mods, amods = dict(model.named_modules()), dict(analog.named_modules())
    with torch.no_grad():
        clean = [[mods[n](x) for n, x in zip(op.layers, xs, strict=True)] for xs in op.inputs]
    with inference_state(analog), torch.no_grad():
        for s in range(samples):
            torch.manual_seed(seed * 100_003 + s)
            program_and_drift(analog, t_inference)
            yield [[amods[n](x) - y for n, x, y in zip(op.layers, xs, ys, strict=True)]
                   for xs, ys in zip(op.inputs, clean, strict=True)]


def output_loss_increase(op: OutputOperator, errors: Iterable[Sequence[Sequence[torch.Tensor]]],
                         mode: str = "joint", seed: int = 0, quadratic_samples: int | None = None
                         ) -> dict[str, np.ndarray]:
    """ELI_l = E[g_l . e_l] + 1/2 E[e_l^T H_l e_l] in output space, summed over batches with their weights;
    the same estimators as :func:`expected_loss_increase`, except that the joint pass draws its random
    signs per sample and layer, not per layer: samples do not interact in the loss (the model is in eval
    mode), so the output Hessian is block-diagonal over samples and every cross-layer term vanishes in
    expectation sample by sample, leaving a sum of independent zero-mean terms instead of one coherent one
    (at no extra cost; on ResNet-8 the spread over sign draws is 0.6-1.1x, median 0.8x, that of per-layer
    signs)."""
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
            if mode == "joint":
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
    part), backward calls and timings in seconds."""
    cfg = cfg or HessianConfig()
    check_choice("mode", cfg.mode, MODES)
    check_choice("noise", cfg.noise, NOISE_SPACES)
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
        timings["graph_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trace, trace_se = hutchinson_traces(op, cfg.probes, cfg.mode, cfg.seed)
        timings["trace_s"] = time.perf_counter() - t0
        hv_trace = op.hvps
        bar.update()
        t0 = time.perf_counter()
        lam = top_eigenvalues(op, cfg.power_iters, cfg.power_tol, cfg.seed)
        timings["eig_s"] = time.perf_counter() - t0
        hv_eig = op.hvps - hv_trace
        bar.update()
        t0 = time.perf_counter()
        draws = max(cfg.first_order_samples, cfg.eli_samples)
        if draws == 0 or cfg.eli_samples == 0:  # curvature only
            eli = {k: np.full(len(layers), np.nan) for k in ("eli", "eli_first", "eli_second", "eli_se")}
            hv_eli = 0
        elif cfg.noise == "output":
            out_op = OutputOperator(model, batches, layers)
            errors = output_error_stream(model, out_op, preset, cfg.t_inference, draws, cfg.seed)
            eli = output_loss_increase(out_op, errors, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
            hv_eli = out_op.hvps // len(batches)
            del out_op
        else:
            noise = weight_noise_stream(model, layers, preset, cfg.t_inference, draws, cfg.seed)
            eli = expected_loss_increase(op, noise, cfg.mode, cfg.seed, quadratic_samples=cfg.eli_samples)
            hv_eli = op.hvps - hv_trace - hv_eig
        timings["eli_s"] = time.perf_counter() - t0
        calls = op.calls
        bar.update()
        del op
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
    df.attrs.update({"hvps": hv_trace + hv_eig + hv_eli, "hvps_trace": hv_trace, "hvps_eig": hv_eig,
                     "hvps_eli": hv_eli, "backward_calls": calls, "mode": cfg.mode, "noise": cfg.noise,
                     "samples": sum(_batch_size_of(b) for b in batches),
                     **timings, "total_s": sum(timings.values())})
    return df
