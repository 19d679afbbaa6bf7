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

Memory stays bounded whatever the number of calibration samples: every operator keeps its per-batch state
(graphs, layer inputs, Gauss-Newton signals) only within ``HessianConfig.graph_bytes`` and rebuilds the rest
for each pass over the data (:mod:`hilal.graphs`); the estimators loop batches outermost and redraw their
probes and signs from recorded generator states, so the estimates are the same whatever the budget.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
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
from hilal.data import LossFn, Splits, loader
from hilal.device import model_device, to_device
from hilal.graphs import (
    DEFAULT_GRAPH_BYTES,
    BatchCache,
    GraphBudget,
    PerBatch,
    StateMeter,
    chunk_bounds,
    held_groups,
    rng_state,
    rows,
    set_rng_state,
    tensor_bytes,
)
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
    layers. The loss is the sample-weighted mean of the batch losses. Each batch's gradient graph is built
    when first needed (all of them at construction, for the gradient) and kept while ``graph_bytes`` (a
    byte count or a :class:`~hilal.graphs.GraphBudget` shared with other operators) allows, rebuilt for
    every pass over the batches beyond it: :meth:`hvp`, :meth:`block_hvp` and :meth:`block_hvps` are one
    pass each. ``hvps`` counts Hessian-vector products (one per vector, over all batches); ``calls`` counts
    backward calls; ``cache.builds`` counts graph builds."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                 graph_bytes: GraphBudget | float = math.inf, loss_fn: LossFn | None = None) -> None:
        mods = dict(model.named_modules())
        self.model = model
        self.loss = functools.partial(task_loss, loss_fn=loss_fn)
        self.batches = list(batches)
        self.layers = list(layers)
        self.params = [mods[n].weight for n in self.layers]
        self.device = model_device(model)
        sizes = [_batch_size_of(b) for b in self.batches]
        self.batch_weights = [s / sum(sizes) for s in sizes]
        self.cache: BatchCache[tuple[torch.Tensor, ...]] = BatchCache(self._build, graph_bytes)
        gradient = None
        for b, w in enumerate(self.batch_weights):
            term = [w * g.detach() for g in self.graph(b)]
            gradient = term if gradient is None else [a + t for a, t in zip(gradient, term, strict=True)]
        self.gradient: list[torch.Tensor] = gradient
        self.hvps = 0
        self.calls = 0
        self._batched_ok: bool | None = None

    def _build(self, b: int, measure: bool) -> tuple[tuple[torch.Tensor, ...], int]:
        with StateMeter(self.model, self.device) as meter, _hvp_graph(self.model, self.params):
            loss = self.loss(self.model, to_device(self.batches[b], self.device))
            _check_finite(loss)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
        return grads, meter.total(grads) if measure else 0

    def graph(self, b: int) -> tuple[torch.Tensor, ...]:
        """Batch ``b``'s loss gradient with its graph (kept, or built now)."""
        return self.cache.get(b)

    @property
    def grads(self) -> PerBatch[tuple[torch.Tensor, ...]]:
        """Every batch's loss gradient with its graph (:meth:`graph`, built when asked for beyond the budget)."""
        return PerBatch(len(self.batches), self.graph)

    def release(self) -> None:
        """Drops the kept graphs (later products rebuild them)."""
        self.cache.release()

    def _check(self, idx: Sequence[int], out: Sequence[torch.Tensor]) -> None:
        bad = _nonfinite([self.layers[i] for i in idx], out)
        if bad:
            raise HilalError(f"non-finite Hessian-vector product in layer(s) {', '.join(map(repr, bad))}; "
                             "the loss is not twice differentiable there (check the model and weights)")

    def batch_hvp(self, g: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_b v on one batch's gradient graph ``g`` (from :meth:`graph`), checked; not counted in ``hvps``."""
        out = hessian_vector_product(list(g), self.params, list(v))
        self.calls += 1
        self._check(range(len(out)), out)
        return out

    def batch_block_hvp(self, g: Sequence[torch.Tensor], i: int, v: torch.Tensor) -> torch.Tensor:
        """(H_b)_ii v on one batch's gradient graph ``g``, checked; not counted in ``hvps``."""
        (out,) = hessian_vector_product([g[i]], [self.params[i]], [v])
        self.calls += 1
        self._check([i], [out])
        return out

    def hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for a vector over all layers (one tensor per layer)."""
        out = [torch.zeros_like(p) for p in self.params]
        for b, w in enumerate(self.batch_weights):
            hv = hessian_vector_product(list(self.graph(b)), self.params, list(v))
            for o, h in zip(out, hv, strict=True):
                o.add_(h, alpha=w)
            self.calls += 1
        self.hvps += 1
        self._check(range(len(out)), out)
        return out

    def block_hvp(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """H_ii v for layer i only (block-restricted product)."""
        out = torch.zeros_like(self.params[i])
        for b, w in enumerate(self.batch_weights):
            (hv,) = hessian_vector_product([self.graph(b)[i]], [self.params[i]], [v])
            out.add_(hv, alpha=w)
            self.calls += 1
        self.hvps += 1
        self._check([i], [out])
        return out

    def block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor], batched: bool = True) -> list[torch.Tensor]:
        """H_ii v_i for several layers, in one pass over the batches. With ``batched``, one vmapped backward
        per batch serves all of them (``is_grads_batched``); it falls back to a loop where the model does not
        support that."""
        idx = list(idx)
        if batched and len(idx) > 1 and self._batched_ok is not False:
            try:
                out = self._batched_block_hvps(idx, vs)
                self._batched_ok = True
                return out
            except (RuntimeError, NotImplementedError):
                self._batched_ok = False
        out = [torch.zeros_like(self.params[i]) for i in idx]
        for b, w in enumerate(self.batch_weights):
            g = self.graph(b)
            for o, i, v in zip(out, idx, vs, strict=True):
                (hv,) = hessian_vector_product([g[i]], [self.params[i]], [v])
                o.add_(hv, alpha=w)
                self.calls += 1
            g = hv = None  # the next batch's graph is built without this one
        self.hvps += len(idx)
        self._check(idx, out)
        return out

    def _batched_block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        k = len(idx)
        params = [self.params[i] for i in idx]
        gouts = []
        for j, v in enumerate(vs):
            z = v.new_zeros((k, *v.shape))
            z[j] = v
            gouts.append(z)
        out = [torch.zeros_like(p) for p in params]
        for b, w in enumerate(self.batch_weights):
            g = self.graph(b)
            res = torch.autograd.grad([g[i] for i in idx], params, grad_outputs=gouts, retain_graph=True,
                                      is_grads_batched=True)
            for j in range(k):
                out[j].add_(res[j][j], alpha=w)
            self.calls += 1
            g = res = None
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
    With ``return_samples`` the raw (probes x layers) estimates are returned instead. Batches outermost:
    one pass over the batches (each graph built at most once), the probes drawn again for every batch
    from the same seed, a probe's estimate the weighted sum of its per-batch products."""
    check_choice("mode", mode, MODES)
    est = np.zeros((probes, len(op.params)))
    for b, w in enumerate(op.batch_weights):
        g = op.graph(b)
        gen = torch.Generator().manual_seed(seed)
        for p in range(probes):
            v = [_rademacher(x.shape, gen, x) for x in op.params]
            if mode == "joint":
                hv = op.batch_hvp(g, v)
                est[p] += w * np.array([_dot(a, h) for a, h in zip(v, hv, strict=True)])
            else:
                est[p] += w * np.array([_dot(v[i], op.batch_block_hvp(g, i, v[i])) for i in range(len(v))])
        g = hv = None  # the next batch's graph is built without this one
    op.hvps += probes * (1 if mode == "joint" else len(op.params))
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


def _draw_bytes(draw: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in draw)


def expected_loss_increase(op: HessianOperator, noise: Iterable[Sequence[torch.Tensor]], mode: str = "joint",
                           seed: int = 0, quadratic_samples: int | None = None,
                           hold_bytes: float = 2**30) -> dict[str, np.ndarray]:
    """Monte-Carlo ELI_l = E[g_l . dw_l] + 1/2 E[dw_l^T H_ll dw_l] over the noise samples given (any iterable).

    The first-order term is exact per sample and uses every sample (it needs no HVP); the quadratic term uses
    the first ``quadratic_samples`` (default: all) with one HVP per sample for all layers (``joint``, random
    signs) or one block HVP per layer and sample (``per_layer``). Returns arrays ``eli``, ``eli_first``,
    ``eli_second`` and ``eli_se`` (standard error of ``eli``: the two parts' errors combined as if
    independent). The draws are held in groups of at most ``hold_bytes`` (at least one draw), and each group
    with quadratic samples is one pass over the batches, batches outermost. :func:`layer_metrics` takes the
    same terms in output space (:func:`weight_output_errors`), where the joint pass can draw its signs per
    sample."""
    check_choice("mode", mode, MODES)
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(op.params)
    first, quad = [], []
    start = 0
    for group in held_groups(noise, _draw_bytes, hold_bytes):
        for dw in group:
            first.append([_dot(g, d) for g, d in zip(op.gradient, dw, strict=True)])
        todo = [k for k in range(len(group)) if quadratic_samples is None or start + k < quadratic_samples]
        signs = {k: (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).tolist() for k in todo} \
            if mode == "joint" else {}
        q = np.zeros((len(todo), n))
        for b, w in enumerate(op.batch_weights if todo else []):
            g = op.graph(b)
            for j, k in enumerate(todo):
                dw = group[k]
                if mode == "joint":
                    v = [sg * d for sg, d in zip(signs[k], dw, strict=True)]
                    hv = op.batch_hvp(g, v)
                    q[j] += w * np.array([_dot(a, h) for a, h in zip(v, hv, strict=True)])
                else:
                    q[j] += w * np.array([_dot(d, op.batch_block_hvp(g, i, d)) for i, d in enumerate(dw)])
            g = hv = None
        op.hvps += len(todo) * (1 if mode == "joint" else n)
        quad.extend(q)
        start += len(group)
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


@dataclass
class OutputState:
    """One piece of calibration samples in output space: the zero perturbations z_l, the loss gradient at
    them (with its graph for :class:`OutputOperator`, detached for :class:`GaussNewton`), the layers' inputs
    and, for :class:`GaussNewton`, the backward signals."""

    zs: list[torch.Tensor]
    grads: tuple[torch.Tensor, ...]
    inputs: list[torch.Tensor]
    signals: list[torch.Tensor] | None = None


class _Pieces:
    """The calibration batches of an output-space operator cut into pieces of at most ``chunk`` samples,
    each piece's state (:class:`OutputState`) kept in a :class:`~hilal.graphs.BatchCache`. Samples do not
    interact in the loss (eval mode), so batch b's quantities are the sums over its pieces, a piece of n_c
    of the batch's n_b samples weighing n_c / n_b (``frac``) of its own mean loss."""

    def _cut(self, batches: Sequence[Any], chunk: int) -> None:
        self.batches = list(batches)
        self.sizes = [_batch_size_of(b) for b in self.batches]
        self.batch_weights = [s / sum(self.sizes) for s in self.sizes]
        self.chunks = [(b, a, e) for b, n in enumerate(self.sizes) for a, e in chunk_bounds(n, chunk)]
        self.frac = [(e - a) / self.sizes[b] for b, a, e in self.chunks]

    def _record(self) -> None:
        """Builds the first piece (kept if the budget allows) and notes the layer inputs' dimensions and dtypes,
        which the probes' random draws depend on."""
        first = self.state(0)
        self.input_dims = [x.dim() for x in first.inputs]
        self.input_like = [torch.empty(0, dtype=x.dtype) for x in first.inputs]

    def state(self, c: int) -> OutputState:
        """Piece ``c``'s state (kept, or built now)."""
        return self.cache.get(c)

    def release(self) -> None:
        """Drops the kept states (later passes rebuild them)."""
        self.cache.release()

    def _batch(self, b: int, part: Callable[[int, OutputState], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        parts = [part(c, self.state(c)) for c, (bc, _, _) in enumerate(self.chunks) if bc == b]
        return list(parts[0]) if len(parts) == 1 else [torch.cat(t) for t in zip(*parts, strict=True)]

    @property
    def inputs(self) -> PerBatch[list[torch.Tensor]]:
        """Every batch's layer inputs (one list per batch, assembled from its pieces when asked for)."""
        return PerBatch(len(self.sizes), lambda b: self._batch(b, lambda c, s: s.inputs))

    @property
    def zs(self) -> PerBatch[list[torch.Tensor]]:
        """Every batch's zero perturbations of the layer outputs (assembled when asked for)."""
        return PerBatch(len(self.sizes), lambda b: self._batch(b, lambda c, s: s.zs))

    @property
    def grads(self) -> PerBatch[list[torch.Tensor]]:
        """Every batch's (detached) loss gradient at the layer outputs (assembled when asked for)."""
        return PerBatch(len(self.sizes), lambda b: self._batch(
            b, lambda c, s: [g.detach() if self.frac[c] == 1.0 else g.detach() * self.frac[c] for g in s.grads]))


class OutputOperator(_Pieces):
    """Gradient and Hessian-vector products of the calibration loss with respect to the outputs of the named
    layers: a zero perturbation z_l is added to every layer's output by a forward hook and the loss is
    differentiated twice with respect to the z_l. Keeps each batch's layer inputs, so the analog layers can
    be run on exactly the inputs the digital network gave them. With ``strata`` > 1 the samples are first
    regrouped into that many batches by :func:`gradient_strata` (``scales`` holds each batch's per-sample
    scales; None without strata). Graphs are built per piece of at most ``chunk`` samples (default: the
    largest batch given, so pieces are the batches unless strata merged them) and kept while
    ``graph_bytes`` allows (see :class:`HessianOperator`); the first is built at construction.
    ``hvps`` counts products per batch; ``full_hvps`` counts them in units of one product over all
    samples."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str], strata: int = 1,
                 graph_bytes: GraphBudget | float = math.inf, chunk: int | None = None,
                 loss_fn: LossFn | None = None) -> None:
        self.model = model
        self.loss = functools.partial(task_loss, loss_fn=loss_fn)
        self.layers = list(layers)
        mods = dict(model.named_modules())
        self.modules = [mods[n] for n in self.layers]
        self.device = model_device(model)
        self.scales: list[np.ndarray] | None = None
        _check_strata(strata)
        chunk = chunk or max(_batch_size_of(b) for b in batches)
        if strata > 1:
            batches, self.scales = gradient_strata(model, batches, self.layers, strata, loss_fn)
        self._cut(batches, chunk)
        self.cache: BatchCache[OutputState] = BatchCache(self._build, graph_bytes)
        self.hvps = 0
        self.full_hvps = 0.0
        self._record()

    def _build(self, c: int, measure: bool) -> tuple[OutputState, int]:
        b, a, e = self.chunks[c]
        with StateMeter(self.model, self.device) as meter, _hvp_graph(self.model):
            loss, z, x = _hooked(self.model, self.layers, rows(self.batches[b], a, e), self.loss)
            _check_finite(loss)
            grads = torch.autograd.grad(loss, z, create_graph=True)
        st = OutputState(z, grads, x)
        return st, meter.total([z, grads, x]) if measure else 0

    def chunk_hvp(self, c: int, st: OutputState, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_c v for piece ``c`` (its own mean loss; batch b's product on these samples is ``frac[c]`` times
        it), checked. Counts one product per batch at its first piece."""
        b, a, _ = self.chunks[c]
        out = hessian_vector_product(list(st.grads), st.zs, list(v))
        self.hvps += a == 0
        self.full_hvps += self.batch_weights[b] * self.frac[c]
        bad = _nonfinite(self.layers, out)
        if bad:
            raise HilalError(f"non-finite Hessian-vector product at the output of layer(s) {bad}")
        return out

    def hvp(self, b: int, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_b v for batch ``b`` (the output perturbations of different batches do not interact)."""
        parts = []
        for c, (bc, a, e) in enumerate(self.chunks):
            if bc == b:
                out = self.chunk_hvp(c, self.state(c), [vi[a:e] for vi in v])
                parts.append(out if self.frac[c] == 1.0 else [o * self.frac[c] for o in out])
        return list(parts[0]) if len(parts) == 1 else [torch.cat(t) for t in zip(*parts, strict=True)]


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
    return _probe_apply(mod, x, *_probe_signs(mod, x.shape[0], x.dim(), x, gen))


def _probe_signs(mod: nn.Module, n: int, ndim: int, like: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The signs (r, xi) of :func:`_rank_one_probe` for ``n`` samples of an ``ndim``-dimensional input."""
    if isinstance(mod, nn.Linear):
        ones = (1,) * (ndim - 2)
        r = _rademacher(torch.Size((n, *ones, mod.in_features)), gen, like)
        return r, _rademacher(torch.Size((n, *ones, mod.out_features)), gen, like)
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        raise HilalError(f"weight probes support Linear, Conv1d and Conv2d layers, not {type(mod).__name__}")
    r = _rademacher(torch.Size((n * mod.groups, *mod.weight.shape[1:])), gen, like)
    return r, _rademacher(torch.Size((n, mod.out_channels) + (1,) * (ndim - 2)), gen, like)


def _probe_rows(mod: nn.Module, signs: tuple[torch.Tensor, torch.Tensor], a: int, e: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The signs of samples ``a:e`` (a conv's r holds one row per sample and group)."""
    r, xi = signs
    g = mod.groups if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else 1
    return r[a * g:e * g], xi[a:e]


def _probe_apply(mod: nn.Module, x: torch.Tensor, r: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return (x * r).sum(-1, keepdim=True) * xi
    conv = nn.functional.conv1d if isinstance(mod, nn.Conv1d) else nn.functional.conv2d
    padding = mod.padding
    if mod.padding_mode != "zeros":
        x = nn.functional.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        padding = 0
    n, g = x.shape[0], mod.groups
    # one output channel per sample and group: u[n, j] = conv(x_n's group j, r_nj)
    u = conv(x.reshape(1, -1, *x.shape[2:]), r, None, mod.stride, padding, mod.dilation, n * g)
    u = u.reshape(n, g, *u.shape[2:]).repeat_interleave(mod.out_channels // g, dim=1)
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
    zero error (no probe).

    One pass over the data, pieces of batches outermost: the probes are drawn in the order probes, then
    batches, then layers (one generator), and each piece redraws its batch's probes from the generator
    state recorded for them, so the numbers do not depend on how many graphs are kept."""
    if isinstance(op, GaussNewton) and not return_samples:
        return op.traces(), np.zeros(len(op.layers))
    counts = probe_counts(op, probes)
    if return_samples and len(set(counts)) > 1:
        raise HilalError("return_samples needs equal probe counts per batch: build the operator with strata=1")
    gen = torch.Generator().manual_seed(seed)
    starts: dict[tuple[int, int], torch.Tensor] = {}
    for p in range(max(counts)):
        for b, n in enumerate(op.sizes):
            if p < counts[b]:
                starts[p, b] = gen.get_state()
                for m, nd, like in zip(op.modules, op.input_dims, op.input_like, strict=True):
                    _probe_signs(m, n, nd, like, gen)
    est = [np.zeros((n, len(op.layers))) for n in counts]
    for c, (b, a, e) in enumerate(op.chunks):
        st = op.state(c)
        for p in range(counts[b]):
            gen.set_state(starts[p, b])
            with torch.no_grad():
                ev = [_probe_apply(m, x, *_probe_rows(m, _probe_signs(m, op.sizes[b], x.dim(), x, gen), a, e))
                      for m, x in zip(op.modules, st.inputs, strict=True)]
            hv = op.chunk_hvp(c, st, ev)
            est[b][p] += op.frac[c] * np.array([_dot(u, h) for u, h in zip(ev, hv, strict=True)])
        st = ev = hv = None  # the next piece is built without this one
    w = op.batch_weights
    if return_samples:
        return sum(wb * e for wb, e in zip(w, est, strict=True))
    trace = sum(wb * e.mean(0) for wb, e in zip(w, est, strict=True))
    var = sum(wb**2 * (e.var(0, ddof=1) / len(e) if len(e) > 1 else np.full(e.shape[1], np.nan))
              for wb, e in zip(w, est, strict=True))
    return trace, np.sqrt(var)


class WeightOutputErrors:
    """The output change dW_l x_l of every layer for each weight-noise draw (one tensor per layer,
    weight-shaped), a source of errors for :func:`output_loss_increase`: the weight-space ELI in output space,
    whose joint pass draws its signs per sample (the quadratic terms are equal: H_ll = X_l^T H_{z_l} X_l).
    The draws are read once, held in groups of at most ``hold_bytes``, and applied to each piece of
    calibration samples in turn. Iterating it instead yields every draw's errors as (batches x layers)."""

    def __init__(self, op: OutputOperator | GaussNewton, noise: Iterable[Sequence[torch.Tensor]],
                 hold_bytes: float = 2**30) -> None:
        self.op, self.noise, self.hold_bytes = op, noise, hold_bytes
        self.held: dict[int, Sequence[torch.Tensor]] = {}

    def groups(self) -> Iterator[list[int]]:
        """The draws' numbers, a group at a time (the group's draws held meanwhile)."""
        start = 0
        for group in held_groups(self.noise, _draw_bytes, self.hold_bytes):
            self.held = dict(enumerate(group, start))
            yield list(self.held)
            start += len(group)
        self.held = {}

    def chunk_errors(self, c: int, st: OutputState, group: Sequence[int]
                     ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(draw, errors of piece ``c``'s samples per layer) for every draw of ``group``."""
        with torch.no_grad():
            for s in group:
                yield s, [_apply(m, x, d.to(x)) for m, x, d in zip(self.op.modules, st.inputs, self.held[s],
                                                                     strict=True)]

    def __iter__(self) -> Iterator[list[list[torch.Tensor]]]:
        for dw in self.noise:
            with torch.no_grad():
                yield [[_apply(m, x, d.to(x)) for m, x, d in zip(self.op.modules, xs, dw, strict=True)]
                       for xs in self.op.inputs]


def weight_output_errors(op: OutputOperator | GaussNewton, noise: Iterable[Sequence[torch.Tensor]],
                         hold_bytes: float = 2**30) -> WeightOutputErrors:
    """The output change dW_l x_l of every layer and batch for each weight-noise draw: a
    :class:`WeightOutputErrors` (iterable as draws x batches x layers)."""
    return WeightOutputErrors(op, noise, hold_bytes)


_PER_SAMPLE_CHUNK = 1 << 24  # elements of per-sample gradients held at once
_CURVED = (nn.LayerNorm, nn.GroupNorm, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.SiLU, nn.ELU, nn.Softplus,
           nn.MultiheadAttention)
"""Modules that put curvature between a weight and the logits: a model holding one is not tried (saves the
check); functional nonlinearities are caught by the check itself."""


class GaussNewton(_Pieces):
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
    gone. The signals (classes x every layer's output) are computed per batch and kept while ``graph_bytes``
    allows (see :class:`HessianOperator`), recomputed for each pass beyond it; construction fails where one
    batch's signals would exceed ``max_bytes`` (lower the batch size). :meth:`mismatch` measures how far this
    is from the true blocks (PyHessian's block-restricted HVPs on a random probe); :func:`gauss_newton` only
    returns one where they agree. Exposes ``layers``, ``batch_weights``, ``inputs``, ``grads`` (loss gradient
    at the layer outputs), ``signals`` and the pieces' :meth:`state` like :class:`OutputOperator`, so the
    output-space ELI runs on either; :meth:`traces`, :meth:`block_hvps` and :meth:`weight_quadratic` are one
    pass each (:meth:`traces` only over the batches not built yet: each batch's share is noted when it is
    first built)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                 max_bytes: float = 2**31, graph_bytes: GraphBudget | float = math.inf) -> None:
        mods = dict(model.named_modules())
        self.model = model
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
        self.max_bytes = max_bytes
        self._cut(batches, max(_batch_size_of(b) for b in batches))
        self.hvps = 0
        self.check = float("nan")
        """Relative mismatch with PyHessian's block HVPs measured by :func:`gauss_newton` (NaN: not checked)."""
        self._trace_parts: dict[int, np.ndarray] = {}
        self.cache: BatchCache[OutputState] = BatchCache(self._build, graph_bytes)
        self._record()

    def _build(self, c: int, measure: bool) -> tuple[OutputState, int]:
        b, a, e = self.chunks[c]
        batch = rows(self.batches[b], a, e)
        logits, z, x = _hooked(self.model, self.layers, batch, lambda m, bt: m(bt[0]))
        if logits.dim() != 2:
            raise HilalError(f"Gauss-Newton blocks need (samples, classes) logits, got {tuple(logits.shape)}")
        y = to_device(batch, self.device)[1]
        loss = nn.functional.cross_entropy(logits, y)
        _check_finite(loss)
        grads = tuple(g.detach() for g in torch.autograd.grad(loss, z, retain_graph=True))
        p = torch.softmax(logits.detach(), 1)
        k = p.shape[1]
        held = k * sum(zi.numel() * zi.element_size() for zi in z)
        if held > self.max_bytes:
            raise HilalError(f"Gauss-Newton signals of one batch would hold {held / 2**30:.1f} GiB ({k} classes x "
                             f"the layer outputs of {p.shape[0]} samples), over max_bytes="
                             f"{self.max_bytes / 2**30:.1f} GiB; lower the batch size")
        root = p.sqrt().T[:, :, None] * (torch.eye(k, dtype=p.dtype, device=p.device)[:, None, :] - p)
        st = OutputState([], grads, x, self._backward(logits, z, root))
        if c not in self._trace_parts:  # the traces come with the first build of each batch: no pass of their own
            self._trace_parts[c] = np.array([self._scale(b) * _per_sample_sq_norms(m, xi, d)
                                             for m, xi, d in zip(self.modules, x, st.signals, strict=True)])
        return st, tensor_bytes([st.grads, st.inputs, st.signals], self.model) if measure else 0

    @property
    def signals(self) -> PerBatch[list[torch.Tensor]]:
        """Every batch's backward signals d_ncl (one (classes, samples, ...) tensor per layer)."""
        return PerBatch(len(self.sizes), lambda b: self.state(b).signals)

    @staticmethod
    def _backward(logits: torch.Tensor, z: list[torch.Tensor], root: torch.Tensor) -> list[torch.Tensor]:
        """d_ncl for every class c (leading dimension): one backward pass per class (on a CPU a loop is faster
        than a vmapped ``is_grads_batched`` backward)."""
        out = [zi.new_empty((root.shape[0], *zi.shape)) for zi in z]  # filled class by class: no stacking copy
        for c, r in enumerate(root):
            for o, d in zip(out, torch.autograd.grad(logits, z, grad_outputs=r, retain_graph=True), strict=True):
                o[c] = d
        return out

    def _scale(self, b: int) -> float:
        return self.batch_weights[b] / self.sizes[b]

    def traces(self) -> np.ndarray:
        """tr(H_ll) of every layer, exactly: from the parts noted at each batch's first build (a pass only
        over batches not built yet)."""
        out = np.zeros(len(self.layers))
        for c in range(len(self.chunks)):
            if c not in self._trace_parts:
                self.state(c)
            out += self._trace_parts[c]
        return out

    def output_quadratic(self, b: int, e: Sequence[torch.Tensor], state: OutputState | None = None) -> np.ndarray:
        """(1/N) sum over batch ``b`` of e_l^T H_{z_l} e_l for output changes e (one tensor per layer);
        ``state``: batch b's, when at hand."""
        st = state if state is not None else self.state(b)
        return np.array([self._scale(b) * float(_class_dots(d, ei).square().sum())
                         for d, ei in zip(st.signals, e, strict=True)])

    def weight_quadratic(self, u: Sequence[torch.Tensor]) -> np.ndarray:
        """u_l^T H_ll u_l of every layer for weight changes u (one tensor per layer, weight-shaped)."""
        out = np.zeros(len(self.layers))
        for c, (b, _, _) in enumerate(self.chunks):
            st = self.state(c)
            with torch.no_grad():
                e = [_apply(m, x, ui.to(x)) for m, x, ui in zip(self.modules, st.inputs, u, strict=True)]
            out = out + self.output_quadratic(b, e, st)
            st = e = None
        return out

    def block_hvps(self, idx: Sequence[int], vs: Sequence[torch.Tensor], batched: bool = False
                   ) -> list[torch.Tensor]:
        """H_ii v_i (= G_ii v_i) for several layers, as :meth:`HessianOperator.block_hvps` gives them, for the
        power iteration: per layer and batch one layer forward and one layer weight-gradient, nothing through
        the rest of the network (``batched`` is ignored)."""
        out = [torch.zeros_like(self.params[i]) for i in idx]
        for c, (b, _, _) in enumerate(self.chunks):
            st = self.state(c)
            xs, ds = st.inputs, st.signals
            for o, i, v in zip(out, idx, vs, strict=True):
                w = v.detach().to(xs[i]).requires_grad_(True)
                with torch.enable_grad():
                    y = _apply(self.modules[i], xs[i], w)
                t = _class_dots(ds[i], y.detach())
                (g,) = torch.autograd.grad(y, w, grad_outputs=torch.einsum("cn,cn...->n...", t, ds[i]))
                o.add_(g.to(o), alpha=self._scale(b))
            st = xs = ds = y = t = g = None
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


def try_gauss_newton(model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                     op: HessianOperator | None = None, tol: float = 1e-3, seed: int = 0,
                     graph_bytes: GraphBudget | float = math.inf) -> tuple[GaussNewton | None, str]:
    """:class:`GaussNewton` blocks for ``layers`` if they apply (a classification loss, supported layers, and
    agreement with PyHessian's block HVPs, ``op``, built here when not given, to ``tol`` relative on a random
    probe, which fails for layers followed by curvature: tanh, GELU, attention, layer norm), else None; and
    a one-line reason either way."""
    curved = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _CURVED)})
    if curved:
        return None, f"the model holds {', '.join(curved)} modules (curvature between the weights and the logits)"
    try:
        gn = GaussNewton(model, batches, layers, graph_bytes=graph_bytes)
    except HilalError as err:
        return None, str(err)
    gn.check = gn.mismatch(op if op is not None else HessianOperator(model, batches, layers, graph_bytes), seed)
    if not gn.check <= tol:
        gn.release()
        return None, (f"the blocks differ from PyHessian's block HVPs by {gn.check:.2g} relative (tolerance "
                      f"{tol:g}): the network is not piecewise linear in every weight")
    return gn, f"exact blocks, {gn.check:.2g} relative from PyHessian's block HVPs"


def gauss_newton(model: nn.Module, batches: Sequence[Any], layers: Sequence[str],
                 op: HessianOperator | None = None, tol: float = 1e-3, seed: int = 0,
                 graph_bytes: GraphBudget | float = math.inf) -> GaussNewton | None:
    """:class:`GaussNewton` blocks for ``layers`` if they apply (:func:`try_gauss_newton`); None otherwise,
    with a warning that says why."""
    gn, reason = try_gauss_newton(model, batches, layers, op, tol, seed, graph_bytes)
    if gn is None:
        warnings.warn(f"Gauss-Newton blocks not used: {reason}", stacklevel=2)
    return gn


class AnalogOutputErrors:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer, a source of errors for
    :func:`output_loss_increase` (see :func:`output_error_stream`). For each piece of calibration samples in
    turn (:meth:`chunk_errors`) every draw is programmed again (seeded per draw), and torch's random state
    continues where the previous piece left it for that draw, so each draw's converter and output noise is
    the stream one draw over all pieces in order would see. Iterating it instead yields every draw's errors
    as (batches x layers), one programming per draw."""

    def __init__(self, model: nn.Module, op: OutputOperator | GaussNewton, preset: Any = "pcm",
                 t_inference: float = 86400.0, samples: int = 16, seed: int = 0,
                 cache_bytes: float = 2**30) -> None:
        self.model, self.op = model, op
        self.analog = to_analog(model, op.layers, preset)
        self.t_inference, self.samples, self.seed, self.cache_bytes = t_inference, samples, seed, cache_bytes
        self.cursors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def groups(self) -> Iterator[list[int]]:
        """All draws in one group: a draw is regenerated, not held."""
        yield list(range(self.samples))

    def chunk_errors(self, c: int, st: OutputState, group: Sequence[int]
                     ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(draw, errors of piece ``c``'s samples per layer) for every draw of ``group``; pieces in order."""
        from hilal.evaluate import inference_state, program_repetition

        mods, amods = dict(self.model.named_modules()), dict(self.analog.named_modules())
        device = model_device(self.model)
        with torch.no_grad():
            clean = [mods[n](x) for n, x in zip(self.op.layers, st.inputs, strict=True)]
            runs, left = [], float(self.cache_bytes)
            for n, x, y in zip(self.op.layers, st.inputs, clean, strict=True):
                size = unfolded_bytes(amods[n], x, y.shape)
                cache = size <= left
                runs.append(fixed_input_forward(amods[n], x, y.shape, cache=cache))
                left -= size if cache else 0
        with inference_state(self.analog), torch.no_grad():
            for s in group:
                program_repetition(self.analog, self.t_inference, self.seed, s)
                if c > 0:
                    set_rng_state(self.cursors[s], device)
                e = [run() - y for run, y in zip(runs, clean, strict=True)]
                self.cursors[s] = rng_state(device)
                yield s, e

    def __iter__(self) -> Iterator[list[list[torch.Tensor]]]:
        op = self.op
        for s in range(self.samples):
            pieces = [dict(self.chunk_errors(c, op.state(c), [s]))[s] for c in range(len(op.chunks))]
            yield [_cat_pieces([p for p, (bc, _, _) in zip(pieces, op.chunks, strict=True) if bc == b])
                   for b in range(len(op.sizes))]


def _cat_pieces(parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return list(parts[0]) if len(parts) == 1 else [torch.cat(t) for t in zip(*parts, strict=True)]


def output_error_stream(model: nn.Module, op: OutputOperator | GaussNewton, preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0, cache_bytes: float = 2**30
                        ) -> AnalogOutputErrors:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer and calibration batch (iterable as
    draws x batches x layers), sampled through aihwkit: the layers are converted once with the preset; each
    draw is a seeded programming + drift, and each analog layer then runs (in inference mode, with its
    converters and output noise) on the inputs the digital network gave it. Convolution inputs are unfolded
    once per piece of samples for all draws (:func:`fixed_input_forward`) where the unfolded copies fit in
    ``cache_bytes``; the rest unfold per draw. :func:`output_loss_increase` takes it piece by piece
    (:class:`AnalogOutputErrors`), one programming per draw and piece."""
    return AnalogOutputErrors(model, op, preset, t_inference, samples, seed, cache_bytes)


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


class _ListErrors:
    """Errors given as draws x batches x layers, read piece by piece."""

    def __init__(self, op: OutputOperator | GaussNewton, errors: Iterable[Sequence[Sequence[torch.Tensor]]]) -> None:
        self.op, self.errors = op, list(errors)

    def groups(self) -> Iterator[list[int]]:
        yield list(range(len(self.errors)))

    def chunk_errors(self, c: int, st: OutputState, group: Sequence[int]
                     ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        b, a, e = self.op.chunks[c]
        for s in group:
            yield s, [t[a:e] for t in self.errors[s][b]]


def output_loss_increase(op: OutputOperator | GaussNewton,
                         errors: AnalogOutputErrors | WeightOutputErrors | Iterable[Sequence[Sequence[torch.Tensor]]],
                         mode: str = "joint", seed: int = 0, quadratic_samples: int | None = None
                         ) -> dict[str, np.ndarray]:
    """ELI_l = E[g_l . e_l] + 1/2 E[e_l^T H_l e_l] in output space, summed over batches with their weights;
    the same estimators as :func:`expected_loss_increase`, except that the joint pass draws its random
    signs per sample and layer, not per layer: samples do not interact in the loss (the model is in eval
    mode), so the output Hessian is block-diagonal over samples and every cross-layer term vanishes in
    expectation sample by sample, leaving a sum of independent zero-mean terms instead of one coherent one
    (at no extra cost; on ResNet-8 the spread over sign draws is 0.6-1.1x, median 0.8x, that of per-layer
    signs). With :class:`GaussNewton` blocks as ``op`` the quadratic terms are exact (``mode`` is moot).

    ``errors``: a :func:`output_error_stream` or :func:`weight_output_errors` source, or the draws given as
    draws x batches x layers. Pieces of samples outermost: one pass over the data per group of draws the
    source holds (one for analog errors; weight draws by their ``hold_bytes``), with the signs drawn in the
    order draws, batches, layers and redrawn per piece from the generator state recorded for them."""
    check_choice("mode", mode, MODES)
    source = errors if isinstance(errors, (AnalogOutputErrors, WeightOutputErrors)) else _ListErrors(op, errors)
    exact = isinstance(op, GaussNewton)
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(op.layers)
    like = torch.empty(0)
    first, quad = [], []
    for group in source.groups():
        todo = [s for s in group if quadratic_samples is None or s < quadratic_samples]
        starts: dict[tuple[int, int], torch.Tensor] = {}
        if mode == "joint" and not exact:
            for s in todo:
                for b, size in enumerate(op.sizes):
                    starts[s, b] = gen.get_state()
                    for _ in range(n):
                        _rademacher(torch.Size((size,)), gen, like)
        f = {s: np.zeros(n) for s in group}
        q = {s: np.zeros(n) for s in todo}
        for c, (b, a, e) in enumerate(op.chunks):
            st = op.state(c)
            w, fr = op.batch_weights[b], op.frac[c]
            for s, err in source.chunk_errors(c, st, group):
                f[s] += w * (fr * np.array([_dot(gi.detach(), ei) for gi, ei in zip(st.grads, err, strict=True)]))
                if s not in q:
                    continue
                if exact:
                    q[s] += op.output_quadratic(b, err, st)
                elif mode == "joint":
                    gen.set_state(starts[s, b])
                    v = [ei * _rademacher(torch.Size((op.sizes[b],) + (1,) * (ei.dim() - 1)), gen, ei)[a:e]
                         for ei in err]
                    hv = op.chunk_hvp(c, st, v)
                    q[s] += w * (fr * np.array([_dot(u, h) for u, h in zip(v, hv, strict=True)]))
                else:
                    for i in range(n):
                        v = [ei if j == i else torch.zeros_like(ei) for j, ei in enumerate(err)]
                        q[s][i] += w * (fr * _dot(err[i], op.chunk_hvp(c, st, v)[i]))
            st = err = v = hv = None  # the next piece is built without this one
        first.extend(f[s] for s in group)
        quad.extend(q[s] for s in todo)
    if not quad:
        raise HilalError("the expected loss increase needs at least one noise sample")
    f, q = np.asarray(first), 0.5 * np.asarray(quad)
    se = np.sqrt(_se(f) ** 2 + _se(q) ** 2)
    return {"eli": f.mean(0) + q.mean(0), "eli_first": f.mean(0), "eli_second": q.mean(0), "eli_se": se}


# ---------------------------------------------------------------------------------------------------------
# The table


def layer_metrics(model: nn.Module, splits: Splits | Sequence[Any], preset: Any = "pcm",
                  cfg: HessianConfig | None = None, layers: Sequence[str] | None = None,
                  progress: bool = True, loss_fn: LossFn | None = None) -> pd.DataFrame:
    """One row per mappable layer (model order): params, MACs, Hutchinson trace (+ standard error), top
    eigenvalue, concentration, and the noise-aware expected loss increase (+ first/second-order parts and
    standard error), all on the calibration data. ``df.attrs`` holds the HVP counts (``hvps`` and per
    part), backward calls, the sample strata the traces used (1: none), timings in seconds, the curvature
    used (``curvature``: ``gauss-newton`` or ``hvp``, and ``curvature_reason``; falling back from the exact
    blocks in ``joint`` mode is also warned about), and the graph builds (``graph_builds``, weight and output
    space) with the peak bytes kept (``graph_bytes_kept``). The loss is ``loss_fn`` when given, else the
    splits' own (:attr:`hilal.data.Splits.loss_fn`), else the task loss of the batches' kind; the exact
    Gauss-Newton blocks need the softmax cross-entropy, so a custom loss takes HVPs.

    Memory: the calibration batches' state is kept within ``cfg.graph_bytes`` and rebuilt beyond it, one
    build per batch and pass over the data (the estimates do not depend on the budget). With nothing kept
    (budget 0), B batches and P output-space pieces (the batches, or the gradient strata in pieces of at
    most the batch size), the weight-space graphs are built B times at construction and B times per pass of:
    the Gauss-Newton check (1 pass), power iteration without Gauss-Newton blocks (1 per iteration),
    ``per_layer`` traces (1) and ``per_layer`` weight-noise ELI (1 per group of draws held). The output-space
    state (graphs, or Gauss-Newton signals) is built once at construction, then P times per pass of: the
    Gauss-Newton check (1), traces (1; none on Gauss-Newton blocks, whose traces come with the check's
    pass), power iteration on Gauss-Newton blocks (1 per iteration) and ELI (1; weight noise: 1 per 1 GiB of
    weight draws). With a budget that holds everything each is built once."""
    cfg = cfg or HessianConfig()
    check_choice("mode", cfg.mode, MODES)
    check_choice("noise", cfg.noise, NOISE_SPACES)
    check_choice("gauss_newton", cfg.gauss_newton, GAUSS_NEWTON)
    _check_strata(cfg.strata)
    budget = GraphBudget(cfg.graph_bytes)
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
    if loss_fn is None and isinstance(splits, Splits):
        loss_fn = splits.loss_fn
    bar = tqdm(total=3, desc="curvature", disable=not progress, leave=False)
    was_training = model.training
    flags = {n: mods[n].weight.requires_grad for n in layers}
    timings: dict[str, float] = {}
    model.eval()
    try:
        for n in layers:
            mods[n].weight.requires_grad_(True)
        t0 = time.perf_counter()
        op = HessianOperator(model, batches, layers, budget, loss_fn)
        gn = out_op = None
        reason = "gauss_newton='off'" if cfg.gauss_newton == "off" else "per_layer mode"
        if loss_fn is not None:
            reason = "a custom loss_fn (the exact blocks are those of the softmax cross-entropy)"
        elif cfg.mode == "joint" and cfg.gauss_newton == "auto":
            gn, reason = try_gauss_newton(model, batches, layers, op, seed=cfg.seed, graph_bytes=budget)
            if gn is None:
                warnings.warn(f"curvature from Monte-Carlo HVPs, not exact Gauss-Newton blocks: {reason}",
                              stacklevel=2)
            else:
                op.release()  # the blocks serve the power iteration too
        if cfg.mode == "joint":  # exact blocks, or output-space HVPs with per-sample probes
            strata = strata_for(cfg.strata, cfg.probes, samples)
            out_op = gn if gn is not None else OutputOperator(model, batches, layers, strata, budget, loss_fn=loss_fn)
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
            op.release()  # no more weight-space products
            if out_op is None:
                out_op = OutputOperator(model, batches, layers, graph_bytes=budget, loss_fn=loss_fn)
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
        builds_w, builds_o = op.cache.builds, (out_op.cache.builds if out_op is not None else 0)
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
                     "noise": cfg.noise, "curvature": curvature, "curvature_reason": reason,
                     "gauss_newton_mismatch": check, "strata": used_strata, "samples": samples,
                     "graph_builds": builds_w + builds_o, "graph_builds_weight": builds_w,
                     "graph_builds_output": builds_o, "graph_bytes": cfg.graph_bytes,
                     "graph_bytes_kept": budget.peak, **timings, "total_s": sum(timings.values())})
    return df
