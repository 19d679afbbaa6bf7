"""The ELI's first-order surrogate: closed-form means against numerical integration and Monte-Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from test_draws import _Net

from hilal.analog import get_preset
from hilal.hessian.draws import layer_noise, surrogate_shift
from hilal.hessian.systematic import clamped_normal_mean, folded_exp_mean


@pytest.mark.parametrize("mean,sigma", [(0.0, 0.3), (2.0, 0.5), (-1.0, 0.7), (0.1, 2.0), (3.0, 0.0), (-3.0, 0.0)])
def test_clamped_normal_mean_is_the_integral(mean, sigma):
    got = float(clamped_normal_mean(torch.tensor([mean], dtype=torch.float64), sigma)[0])
    if sigma == 0:
        assert got == max(mean, 0.0)
        return
    want = integrate.quad(lambda x: max(x, 0.0) * stats.norm.pdf(x, mean, sigma), mean - 12 * sigma,
                          mean + 12 * sigma, points=[0.0], limit=200)[0]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mean,sigma,rate", [(0.05, 0.01, 8.4), (0.1, 0.045, 15.0), (0.0, 0.02, 3.0),
                                             (0.06, 0.04, 0.0)])
def test_folded_exp_mean_is_the_integral(mean, sigma, rate):
    m, s = torch.tensor([mean], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    got = float(folded_exp_mean(m, s, rate)[0])
    want = integrate.quad(lambda x: np.exp(-rate * abs(x)) * stats.norm.pdf(x, mean, sigma), mean - 12 * sigma,
                          mean + 12 * sigma, points=[0.0], limit=200)[0]
    assert got == pytest.approx(want, rel=1e-9)


def _projections(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("preset,t", [("pcm_harsh", 86400.0), ("pcm", 60.0), ("no-compensation", 3600.0)])
def test_surrogate_mean_is_the_closed_form_and_tracks_each_draw(preset, t):
    """The surrogate reported beside each draw has the closed-form mean (Monte-Carlo, within 4 standard errors,
    per layer along a fixed projection, as the ELI's first-order term reads it) and follows the draw closely
    on layers of many weights, so that the remainder sampled has a much smaller spread than the draw."""
    torch.manual_seed(0)
    model = _Net()
    cfg = get_preset("pcm")
    if preset == "no-compensation":
        cfg.drift_compensation = None
    else:
        cfg = preset
    layers = ["small", "conv", "fc", "head"]
    proj = _projections([getattr(model, n).weight.shape for n in layers])
    n = 120
    pairs = list(layer_noise(model, layers, layers, cfg, t, n, seed=2, surrogate=True))
    s = np.array([[float((p * d).sum()) for p, d in zip(proj, ds, strict=True)] for _, ds in pairs])
    f = np.array([[float((p * d.double()).sum()) for p, d in zip(proj, dw, strict=True)] for dw, _ in pairs])
    shift = surrogate_shift(model, layers, cfg, t)
    closed = np.array([float((p * m).sum()) for p, m in zip(proj, shift, strict=True)])
    z = (s.mean(0) - closed) / (s.std(0, ddof=1) / np.sqrt(n))
    assert (np.abs(z) < 4).all(), z
    spread = (f - s).std(0, ddof=1) / f.std(0, ddof=1)
    assert (spread[1:3] < 0.25).all(), spread  # conv and fc: hundreds of weights a tile
    # the draws beside their surrogates are the layers' own draws, as without them; a layer left out has neither
    plain = list(layer_noise(model, layers, layers, cfg, t, 3, seed=2))
    assert all(torch.equal(a, b) for (dw, _), p in zip(pairs[:3], plain, strict=True)
               for a, b in zip(dw, p, strict=True))
    some = list(layer_noise(model, layers, ["conv"], cfg, t, 2, seed=2, surrogate=True))
    assert all(dw[0] is None and ds[0] is None and torch.equal(ds[1], s1[1]) for (dw, ds), (_, s1) in
               zip(some, pairs[:2], strict=True))
