"""The calibration loss made ready to differentiate twice, with respect to the layers' weights
(:func:`_hvp_graph`) or to their outputs (:func:`_hooked`), and the finiteness checks of losses and products:
one place for what the weight-space and output-space operators build their graphs with."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hilal.device import model_device, to_device
from hilal.hessian.second_order import SecondOrderRules
from hilal.registry import HilalError


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise HilalError(f"non-finite calibration loss ({loss.item()}); check the model and data")


def _nonfinite(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity. One sum per tensor decides (a sum is finite
    unless an entry is not, or the sum overflows, which the full check then clears): cheaper than an
    elementwise ``isfinite`` on every product."""
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
