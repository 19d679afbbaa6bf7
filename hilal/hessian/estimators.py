"""The estimators: Hutchinson traces (:func:`hutchinson_traces` in weight space, :func:`output_traces` with
per-sample probes in output space, shared out over gradient strata by :func:`probe_counts`), top eigenvalues by
power iteration (:func:`top_eigenvalues`) and the expected loss increase (:func:`expected_loss_increase`,
:func:`output_loss_increase`). Each loops batches (or pieces) outermost and redraws its probes and signs from
recorded generator states, so the estimates do not depend on the graph budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from pyhessian.utils import normalization
from torch import nn

from hilal.hessian.config import (
    MODES,
    _dot,
    _rademacher,
    _se,
)
from hilal.hessian.gauss_newton import GaussNewton
from hilal.hessian.graphs import (
    held_groups,
)
from hilal.hessian.noise import (
    AnalogOutputErrors,
    WeightOutputErrors,
    _draw_bytes,
)
from hilal.hessian.operators import HessianOperator, OutputOperator, OutputState
from hilal.registry import HilalError, check_choice


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


STRATUM_EXPONENT = 0.75
"""A sample's Monte-Carlo spread in :func:`output_traces` is taken to grow as (gradient scale)^0.75. Its
Hessian shrinks linearly with 1 - p_y as the model grows confident (the softmax curvature and the network's
own, carried by the loss gradient), but measured per-sample spreads scatter about that line and flatten
for uncertain samples; the lower power allots the middle strata more."""
STRATUM_FLOOR = 0.1
"""Share of the probes every stratum gets whatever its scale: a guard against a poor scale."""


def probe_counts(op: OutputOperator | GaussNewton, probes: int) -> list[int]:
    """Trace probes per batch of ``op``: ``probes`` each without strata; with strata, a Neyman allocation,
    n_b proportional to the root mean square of the batch's expected spreads (scale^STRATUM_EXPONENT), made
    to give the variance of ``probes`` probes on every sample under that model, with every stratum keeping
    STRATUM_FLOOR of ``probes`` and at least 2 (for its standard error): fewer products than equal counts
    for about their variance."""
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
                         mode: str = "joint", seed: int = 0, quadratic_samples: int | None = None,
                         return_samples: bool = False) -> dict[str, np.ndarray]:
    """ELI_l = E[g_l . e_l] + 1/2 E[e_l^T H_l e_l] in output space, summed over batches with their weights;
    the same estimators as :func:`expected_loss_increase`, except that the joint pass draws its random
    signs per sample and layer, not per layer: samples do not interact in the loss (the model is in eval
    mode), so the output Hessian is block-diagonal over samples and every cross-layer term vanishes in
    expectation sample by sample, leaving a sum of independent zero-mean terms instead of one coherent one
    (at no extra cost, and typically a smaller spread over sign draws than per-layer signs give). With
    :class:`GaussNewton` blocks as ``op`` the quadratic terms are exact (``mode`` is moot).

    ``errors``: a :func:`output_error_stream` or :func:`weight_output_errors` source, or the draws given as
    draws x batches x layers. Pieces of samples outermost: one pass over the data per group of draws the
    source holds (one for analog errors; weight draws by their ``hold_bytes``), with the signs drawn in the
    order draws, batches, layers and redrawn per piece from the generator state recorded for them.
    ``return_samples``: the per-draw terms instead, ``first`` (draws x layers) and ``quadratic`` (the
    quadratic draws x layers, halved), possibly without a quadratic draw; a layer a draw left out (``None``
    errors, first-order draws only) has NaN there."""
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
                f[s] += w * (fr * np.array([np.nan if ei is None else _dot(gi.detach(), ei)
                                            for gi, ei in zip(st.grads, err, strict=True)]))
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
    if return_samples:
        return {"first": np.asarray(first).reshape(-1, n), "quadratic": 0.5 * np.asarray(quad).reshape(-1, n)}
    if not quad:
        raise HilalError("the expected loss increase needs at least one noise sample")
    f, q = np.asarray(first), 0.5 * np.asarray(quad)
    se = np.sqrt(_se(f) ** 2 + _se(q) ** 2)
    return {"eli": f.mean(0) + q.mean(0), "eli_first": f.mean(0), "eli_second": q.mean(0), "eli_se": se}
