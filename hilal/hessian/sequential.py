"""The ELI's noise draws spent where they matter (:func:`sequential_loss_increase`): the first-order term's
draws come in blocks, and drawing stops once every layer's ELI is known well enough, its standard error small
against its value or against the gap to its neighbours in the ranking (:func:`settled`), the settings' count
the upper bound. The draws taken are a prefix of the full count's, so a rule that never stops gives exactly
the estimates of one pass over all draws."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from hilal.hessian.config import _apply, _dot, _se
from hilal.hessian.estimators import output_loss_increase
from hilal.hessian.gauss_newton import GaussNewton
from hilal.hessian.noise import WeightOutputErrors
from hilal.hessian.operators import OutputOperator
from hilal.registry import HilalError


def eli_summary(first: np.ndarray | list[np.ndarray], quad: np.ndarray, offset: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """``eli``, ``eli_first``, ``eli_second`` and ``eli_se`` from per-draw terms (draws x layers, or one array of
    draws per layer), as :func:`hilal.hessian.output_loss_increase` combines them; ``offset`` (per layer)
    is added to the first-order means (the surrogate's closed-form part, the draws being remainders)."""
    if len(quad) == 0:
        raise HilalError("the expected loss increase needs at least one noise sample")
    if not isinstance(first, np.ndarray) and len({len(f) for f in first}) == 1:
        first = np.stack(first, 1)  # one count: the column means of one pass, to the bit
    if isinstance(first, np.ndarray):
        mean, se_f = first.mean(0), _se(first)
    else:
        mean = np.array([f.mean() for f in first])
        se_f = np.array([_se(f[:, None])[0] for f in first])
    se = np.sqrt(se_f**2 + _se(quad) ** 2)
    if offset is not None:
        mean = mean + offset
    return {"eli": mean + quad.mean(0), "eli_first": mean, "eli_second": quad.mean(0), "eli_se": se}


def settled(eli: np.ndarray, se: np.ndarray, rtol: float) -> np.ndarray:
    """Per layer, whether its ELI is known well enough: standard error at most ``rtol`` times the larger of
    |ELI| and the distance to the nearest other layer's ELI (its neighbours in the ranking). Why: a layer
    either has a precise value or a rank no draw will change."""
    gap = np.full(len(eli), np.inf)
    if len(eli) > 1:
        order = np.argsort(eli)
        d = np.diff(eli[order])
        gap[order] = np.minimum(np.concatenate([[np.inf], d]), np.concatenate([d, [np.inf]]))
    scale = np.maximum(np.abs(eli), np.where(np.isfinite(gap), gap, 0.0))
    return np.isfinite(se) & (se <= rtol * scale)


def weight_gradients(op: OutputOperator | GaussNewton) -> list[torch.Tensor]:
    """Per layer the weight gradient G_l = sum_n x_n^T g_n (batch weights included) that the first-order term
    of :func:`hilal.hessian.output_loss_increase` sums over pieces: g . (dW x) = <dW, G_l>, so a draw's
    first-order term costs one dot product over the weights instead of a pass over the data."""
    grads = [torch.zeros_like(m.weight, dtype=torch.float64) for m in op.modules]
    for c, (b, _, _) in enumerate(op.chunks):
        st = op.state(c)
        scale = op.batch_weights[b] * op.frac[c]
        for i, (m, x, g) in enumerate(zip(op.modules, st.inputs, st.grads, strict=True)):
            with torch.enable_grad():
                w = torch.zeros_like(m.weight, requires_grad=True)
                (gw,) = torch.autograd.grad((_apply(m, x.detach(), w) * g.detach()).sum(), w)
            grads[i] += scale * gw.double()
        st = None
    return grads


def sequential_loss_increase(op: OutputOperator | GaussNewton, errors: Callable[[int, int], WeightOutputErrors],
                             samples: int, quadratic_samples: int, mode: str = "joint", seed: int = 0,
                             rtol: float = 0.0, block: int = 16,
                             draws: Callable[[int, int, list[int]], Iterable[Any]] | None = None,
                             shift: Callable[[], Sequence[torch.Tensor]] | None = None
                             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The output-space ELI of :func:`hilal.hessian.output_loss_increase` over at most ``samples`` draws per
    layer: the first ``quadratic_samples`` (at least ``block``) for all layers together, then ``block`` more
    at a time for each layer not yet :func:`settled` (``rtol`` 0: all ``samples`` in one pass, the estimates of
    :func:`hilal.hessian.output_loss_increase` to the bit). ``errors(start, count)``: the error source of draws
    ``start`` to ``start + count - 1`` of every layer. ``draws(start, count, layers)``: the weight changes of
    those draws for the layers numbered (``None`` for the others), whose first-order terms are dot products
    with :func:`weight_gradients`; without it the extra draws come from ``errors``.

    ``shift``: the closed-form mean of the draws' first-order surrogates per layer
    (:func:`hilal.hessian.draws.surrogate_shift`, called once, when needed); ``draws`` then yields (changes,
    surrogates) pairs, and a layer not settled after the first draws takes its first-order term from its own
    draws alone, as <E[dS], G> plus the mean of <dW - dS, G> (the first draws' plain terms, ten to fifty times
    more spread, are set aside; its quadratic term keeps them). Returns the estimates and the draws each
    layer took."""
    head = min(samples, max(quadratic_samples, block if rtol > 0 else samples))
    out = output_loss_increase(op, errors(0, head), mode, seed, quadratic_samples, return_samples=True)
    quad = out["quadratic"]
    n = out["first"].shape[1]
    first = [out["first"][:, i] for i in range(n)]
    taken, offset = np.full(n, len(out["first"])), np.zeros(n)
    own = np.zeros(n, bool)  # first-order terms from the layer's own surrogate draws
    grads = closed = None
    while len(quad) > 0 and rtol > 0:
        est = eli_summary(first, quad, offset)
        done = settled(est["eli"], est["eli_se"], rtol)
        todo = [i for i, ok in enumerate(done) if not ok and taken[i] < samples]
        if not todo:
            break
        if draws is not None:
            grads = grads if grads is not None else weight_gradients(op)
            if shift is not None and not own[todo].all():
                if closed is None:  # once: a layer settled before may need draws again as its neighbours move
                    closed = np.array([_dot(g, m) for g, m in zip(grads, shift(), strict=True)])
                for i in todo:
                    if not own[i]:
                        own[i], first[i], offset[i] = True, np.empty(0), closed[i]
        start = min(len(first[i]) for i in todo)
        todo = [i for i in todo if len(first[i]) == start]
        count = int(min(block, min(samples - taken[i] for i in todo)))
        if draws is None:
            more = output_loss_increase(op, errors(start, count), mode, seed, 0, return_samples=True)["first"]
        elif shift is None:
            more = np.array([[np.nan if d is None else _dot(g, d.to(g)) for g, d in zip(grads, dw, strict=True)]
                             for dw in draws(start, count, todo)])
        else:
            more = np.array([[np.nan if d is None else _dot(g, d.to(g)) - _dot(g, ds)
                              for g, d, ds in zip(grads, dw, dss, strict=True)]
                             for dw, dss in draws(start, count, todo)])
        for i in todo:
            first[i] = np.concatenate([first[i], more[:, i]])
            taken[i] += count
    return eli_summary(first, quad, offset), taken
