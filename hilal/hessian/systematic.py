"""Closed-form means of the parts of aihwkit's PCM noise model that act element by element (docs/design.md,
"The ELI's noise draws"): the programmed conductance (a normal clamped at zero), the drift factor
(t/t0)^-nu with nu the absolute value of a normal, and the read noise (zero mean). Why: the ELI's first-order
term E[<dW, G>] is mostly the mean of a surrogate built from these parts in each draw, known exactly, so only
the draw's small remainder around it needs sampling (:func:`hilal.hessian.draws.surrogate_shift`)."""

from __future__ import annotations

import math

import torch

_SQRT2 = math.sqrt(2.0)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / _SQRT2)


def clamped_normal_mean(mean: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """E[max(mean + sigma Z, 0)] for a standard normal Z (float64): mean Phi(mean/sigma) + sigma phi(mean/sigma);
    ``max(mean, 0)`` where sigma is 0."""
    m = mean.double()
    s = torch.as_tensor(sigma, dtype=torch.float64).expand_as(m)
    pos = s > 0
    z = torch.where(pos, m / torch.where(pos, s, 1.0), 0.0)
    return torch.where(pos, m * _cdf(z) + s * _phi(z), m.clamp(min=0.0))


def folded_exp_mean(mean: torch.Tensor, sigma: torch.Tensor, rate: float) -> torch.Tensor:
    """E[exp(-rate |X|)] for X ~ N(mean, sigma^2), sigma > 0 (float64): the drift factor (t/t0)^-nu of a
    drift coefficient nu = |X| at rate = ln(t/t0) (times the preset's drift scale)."""
    m, s = mean.double(), sigma.double()
    half = 0.5 * (rate * s) ** 2
    return (torch.exp(half - rate * m) * _cdf(m / s - rate * s)
            + torch.exp(half + rate * m) * _cdf(-m / s - rate * s))
