"""Hessian-vector products of the calibration loss: with respect to the layers' weights
(:class:`HessianOperator`, PyHessian's primitives, one graph per batch) and with respect to their outputs
(:class:`OutputOperator`, per piece of samples, where probes and signs can be drawn per sample). Both keep
their per-batch state within a :class:`~hilal.hessian.graphs.GraphBudget` and rebuild the rest per pass."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyhessian.utils import hessian_vector_product
from torch import nn

from hilal.data import LossFn
from hilal.device import model_device, to_device
from hilal.hessian.config import (
    _batch_size_of,
)
from hilal.hessian.graphs import (
    BatchCache,
    GraphBudget,
    PerBatch,
    StateMeter,
    chunk_bounds,
    rows,
)
from hilal.hessian.loss import _check_finite, _hooked, _hvp_graph, _nonfinite
from hilal.hessian.strata import _check_strata, gradient_strata
from hilal.registry import HilalError
from hilal.train import task_loss

BATCHED_BLOCK_BYTES = 2**30
"""Largest memory the vmapped block products of :meth:`HessianOperator.block_hvps` may hold; beyond it (ViT-B/16's
74 layers would hold 74 x 86 M weights) the layers take one product each in the same pass."""


class HessianOperator:
    """Gradient and Hessian-vector products of the calibration loss with respect to the weights of the named
    layers. The loss is the sample-weighted mean of the batch losses. Each batch's gradient graph is built
    when first needed (all of them at construction, for the gradient) and kept while ``graph_bytes`` (a
    byte count or a :class:`~hilal.hessian.graphs.GraphBudget` shared with other operators) allows, rebuilt for
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
        support that, or where the vmapped form would hold more than :data:`BATCHED_BLOCK_BYTES` (it holds
        every layer's vector once per layer: k layers x all their weights, twice)."""
        idx = list(idx)
        held = 2 * len(idx) * sum(v.numel() * v.element_size() for v in vs)  # vmapped grad_outputs and results
        if batched and len(idx) > 1 and self._batched_ok is not False and held <= BATCHED_BLOCK_BYTES:
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
    each piece's state (:class:`OutputState`) kept in a :class:`~hilal.hessian.graphs.BatchCache`. Samples do not
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
