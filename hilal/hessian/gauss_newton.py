"""Exact Hessian blocks from one backward pass per class (:class:`GaussNewton`), for classification networks
that are piecewise linear in every layer's weight, and the check that decides where they apply
(:func:`try_gauss_newton`, :func:`gauss_newton`): there they replace the Monte-Carlo traces and ELI terms."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hilal.device import model_device, to_device
from hilal.hessian.config import (
    _apply,
    _batch_size_of,
    _dot,
    _rademacher,
)
from hilal.hessian.graphs import (
    BatchCache,
    GraphBudget,
    PerBatch,
    rows,
    tensor_bytes,
)
from hilal.hessian.loss import _check_finite, _hooked
from hilal.hessian.operators import HessianOperator, OutputState, _Pieces
from hilal.registry import HilalError

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
