"""Batched weight-noise draws (hilal.hessian.draws) against aihwkit's per-draw path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hilal.analog import get_preset, to_analog
from hilal.hessian import HessianConfig, batched_weight_noise, draws_unsupported, layer_metrics, weight_noise_stream
from hilal.registry import HilalError


class _Net(nn.Module):
    """Small layers, a conv split over two tiles and a linear layer over four (<= 256 x 255)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(1, 5, 3)
        self.conv = nn.Conv2d(40, 8, 3)
        self.fc = nn.Linear(300, 260)
        self.head = nn.Linear(7, 3)


def _equal(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for da, db in zip(a, b, strict=True):
        for x, y in zip(da, db, strict=True):
            assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("preset", ["pcm", "pcm_harsh", "pcm_hilal"])
def test_batched_draws_are_the_loop_draws_to_the_bit(preset):
    torch.manual_seed(0)
    model = _Net()
    layers = ["head", "small", "conv", "fc"]  # not model order: aihwkit draws in module order all the same
    loop = list(weight_noise_stream(model, layers, preset, 86400.0, 5, seed=3, draws="loop"))
    batched = list(weight_noise_stream(model, layers, preset, 86400.0, 5, seed=3))
    _equal(loop, batched)
    # groups of two draws (a group's state is bounded by hold_bytes) give the same draws
    hold = 2.5 * 5 * sum(getattr(model, n).weight.numel() * 4 for n in layers)
    _equal(loop, list(batched_weight_noise(model, layers, preset, 86400.0, 5, seed=3, hold_bytes=hold)))


def test_batched_draws_with_perfect_io_and_no_compensation():
    torch.manual_seed(0)
    model = _Net()
    cfg = get_preset("pcm")
    cfg.forward.is_perfect = True
    loop = list(weight_noise_stream(model, ["conv", "head"], cfg, 3600.0, 3, seed=1, draws="loop"))
    _equal(loop, list(weight_noise_stream(model, ["conv", "head"], cfg, 3600.0, 3, seed=1)))
    cfg.drift_compensation = None
    loop = list(weight_noise_stream(model, ["fc"], cfg, 0.0, 2, seed=1, draws="loop"))
    _equal(loop, list(weight_noise_stream(model, ["fc"], cfg, 0.0, 2, seed=1)))


def test_unsupported_noise_models_run_the_loop():
    torch.manual_seed(0)
    model = _Net()
    analog = to_analog(model, ["head"], "ideal")
    assert "StateIndependentNoiseModel" in draws_unsupported(analog, ["head"])
    with pytest.raises(HilalError, match="draws='loop'"):
        next(batched_weight_noise(model, ["head"], "ideal", 60.0, 1))
    _equal(list(weight_noise_stream(model, ["head"], "ideal", 60.0, 2, draws="loop")),
           list(weight_noise_stream(model, ["head"], "ideal", 60.0, 2)))


def test_noise_draws_option_is_checked():
    with pytest.raises(HilalError, match="noise_draws"):
        layer_metrics(nn.Sequential(nn.Linear(4, 2)), [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))],
                      cfg=HessianConfig(noise_draws="fast"), progress=False)
    with pytest.raises(HilalError, match="draws"):
        next(weight_noise_stream(_Net(), ["head"], "pcm", 60.0, 1, draws="fast"))
