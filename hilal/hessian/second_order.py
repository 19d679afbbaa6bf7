"""Second-order rules for the nonlinearities of transformers, for graphs that many Hessian-vector products
share.

An HVP by double backward differentiates the graph of the first backward pass. For GELU, layer norm and
softmax, torch's double-backward formulas re-derive, on every product, quantities that do not depend on the
vector (gelu''(x), the normalized inputs, the backward signal's row statistics). The rules here take those
once, when the first backward (``create_graph=True``) builds the graph, and leave a few elementwise products
per HVP. The values and first derivatives are torch's own kernels; the second derivatives are the exact
formulas below (checked against torch's double backward and dense Hessians in the tests). Third derivatives
are not supported (``once_differentiable``).

:class:`SecondOrderRules` applies them, as a ``TorchFunctionMode``, to whatever the model calls while a graph
is built: ``nn.GELU`` / ``nn.functional.gelu`` (exact, not the tanh form), ``nn.LayerNorm`` /
``nn.functional.layer_norm`` over the last dimension with weights that do not require grad, and
``softmax`` without a dtype. Anything else runs as is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_aten = torch.ops.aten


class _GeluGrad(torch.autograd.Function):
    """g * gelu'(x), with d1 = gelu'(x) from torch's ``gelu_backward`` (g * d1 is that kernel's own value,
    bit for bit). Derivatives: d/dg = gelu'(x), d/dx = g * gelu''(x) with gelu''(x) = phi(x) (2 - x^2)."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, x: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        ctx.d1 = d1
        ctx.gd2 = g * torch.exp(-0.5 * x * x) * (2.0 - x * x) * _INV_SQRT_2PI
        return g * d1

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return u * ctx.d1, u * ctx.gd2, None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return nn.functional.gelu(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the node that later HVPs differentiate
            ctx.d1 = _aten.gelu_backward(torch.ones_like(x), x)  # gelu'(x), for the products below too
            return _GeluGrad.apply(g, x, ctx.d1)
        return g * ctx.d1 if hasattr(ctx, "d1") else _aten.gelu_backward(g, x)


class _LayerNormGrad(torch.autograd.Function):
    """The input gradient of a layer norm over the last dimension (size D), gx = J (w * gy) with
    J = r (I - 11^T/D - x^ x^^T/D), x^ the normalized input and r the inverse standard deviation (torch's
    ``native_layer_norm_backward``). For a vector u, with g^ = w * gy, s = u^T J g^ and the row sums
    U = sum u, w_u = u . x^, a = u . g^, c = mean(g^ * x^):

    - ds/dgy = w * J u;
    - ds/dx = -(r^2/D)(a - mean(g^) U - c w_u) x^ - (r w_u/D) J g^ - r c J u (dr/dx = -r^2 x^/D,
      dx^/dx = J, and J g^ is gx itself)."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                rstd: torch.Tensor) -> torch.Tensor:
        gx = _aten.native_layer_norm_backward(gy, x, [x.shape[-1]], mean, rstd, weight, None,
                                              [True, False, False])[0]
        xhat = (x - mean) * rstd
        gh = gy * weight if weight is not None else gy
        ctx.stats = (xhat, rstd, gh, gh.mean(-1, keepdim=True), (gh * xhat).mean(-1, keepdim=True), gx, weight)
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, r, gh, gbar, c, gx, weight = ctx.stats
        d = xhat.shape[-1]
        usum = u.sum(-1, keepdim=True)
        a = (u * gh).sum(-1, keepdim=True)
        wu = (u * xhat).sum(-1, keepdim=True)
        ju = torch.addcmul(u, xhat, wu / d, value=-1).sub_(usum / d).mul_(r)  # J u (fused: these are the hot loops)
        g_gy = ju * weight if weight is not None else ju
        g_x = torch.addcmul(xhat * (-(r * r / d) * (a - gbar * usum - c * wu)), gx, r * wu / d, value=-1)
        return g_gy, g_x.addcmul_(ju, r * c, value=-1), None, None, None


class _LayerNorm(torch.autograd.Function):
    """Layer norm over the last dimension with a weight and bias that take no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        y, mean, rstd = _aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.weight = weight
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            gx = _LayerNormGrad.apply(gy, x, ctx.weight, mean, rstd)
        else:
            gx = _aten.native_layer_norm_backward(gy, x, [x.shape[-1]], mean, rstd, ctx.weight, None,
                                                  [True, False, False])[0]
        return gx, None, None, None


class _SoftmaxGrad(torch.autograd.Function):
    """The input gradient of a softmax, p * (gp - (gp . p)) (torch's ``_softmax_backward_data``). For a
    vector u, with m = u . p (along ``dim``): d/dgp = p * (u - m), d/dp = u * (gp - gp . p) - m gp."""

    @staticmethod
    def forward(ctx: Any, gp: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.stats = (p.detach(), gp - (gp * p).sum(dim, keepdim=True), gp.detach(), dim)
        return _aten._softmax_backward_data(gp, p, dim, p.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, q, gp, dim = ctx.stats
        m = (u * p).sum(dim, keepdim=True)
        return p * (u - m), u * q - m * gp, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, dim: int) -> torch.Tensor:
        p = torch.softmax(s, dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx: Any, gp: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _SoftmaxGrad.apply(gp, p, ctx.dim), None
        return _aten._softmax_backward_data(gp, p, ctx.dim, p.dtype), None


_SOFTMAX = (nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class SecondOrderRules(TorchFunctionMode):
    """Runs exact GELUs, last-dimension layer norms (weights without grad) and softmaxes (no dtype) with the
    rules above while active; meant around the forward and the ``create_graph`` backward of a graph that
    many HVPs share. Everything else, and these calls in other forms, run unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is nn.functional.gelu:
            if len(args) == 1 and kwargs.get("approximate", "none") == "none":
                return _Gelu.apply(args[0])
        elif func is nn.functional.layer_norm:
            x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
            weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
            if len(shape) == 1 and not any(t is not None and t.requires_grad for t in (weight, bias)):
                return _LayerNorm.apply(x, weight, bias, _arg(args, kwargs, 4, "eps", 1e-5))
        elif func in _SOFTMAX:
            dim = _arg(args, kwargs, 1, "dim")
            if isinstance(dim, int) and len(args) <= 2 and kwargs.get("dtype") is None:
                return _Softmax.apply(args[0], dim)
        return func(*args, **kwargs)
