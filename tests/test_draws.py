"""Batched weight-noise draws (hilal.hessian.draws) against aihwkit's per-draw path."""

from __future__ import annotations

import numpy as np
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


class _DrawsNet(nn.Module):  # a name of its own: aihwkit caches its analog wrapper classes by class name
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _small_case() -> tuple[nn.Module, list, list[str]]:
    torch.manual_seed(0)
    model = _DrawsNet().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 2, 5, 5, generator=g), torch.randint(0, 5, (24,), generator=g)
    return model, [(x[:16], y[:16]), (x[16:], y[16:])], ["conv", "fc"]


def test_sequential_eli_without_stopping_is_the_one_pass_estimate_and_stops_on_a_prefix():
    from hilal.hessian import OutputOperator, output_loss_increase, weight_output_errors
    from hilal.hessian.sequential import eli_summary, sequential_loss_increase

    model, batches, layers = _small_case()
    op = OutputOperator(model, batches, layers)

    def errors(start: int, count: int):
        return weight_output_errors(op, weight_noise_stream(model, layers, "pcm_harsh", 3600.0, count, 2,
                                                            start=start))

    whole = output_loss_increase(op, errors(0, 20), "joint", 1, quadratic_samples=4)
    seq, taken = sequential_loss_increase(op, errors, 20, 4, "joint", 1, rtol=0.0, block=3)
    assert taken.tolist() == [20, 20]
    for k in whole:
        np.testing.assert_array_equal(seq[k], whole[k])
    # a tolerance every layer meets at once: the first block only, the estimates of that prefix
    seq, taken = sequential_loss_increase(op, errors, 20, 4, "joint", 1, rtol=1e9, block=6)
    assert taken.tolist() == [6, 6]
    part = output_loss_increase(op, errors(0, 6), "joint", 1, quadratic_samples=4, return_samples=True)
    for k, v in eli_summary(part["first"], part["quadratic"]).items():
        np.testing.assert_array_equal(seq[k], v)
    # an unreachable one: every draw
    assert sequential_loss_increase(op, errors, 20, 4, "joint", 1, rtol=1e-12, block=6)[1].tolist() == [20, 20]


def test_settled_needs_a_small_error_against_the_value_or_the_gap():
    from hilal.hessian.sequential import settled

    eli = np.array([1.0, 1.05, 10.0, -0.001])
    se = np.array([0.05, 0.05, 0.5, 0.05])
    # 0: 5 % of its value; 1 likewise; 2: 5 % of its value; 3: tiny value but far (1.001) from the rest
    assert settled(eli, se, 0.06).tolist() == [True, True, True, True]
    assert settled(eli, se, 0.04).tolist() == [False, False, False, False]
    assert settled(np.array([0.0, 0.0]), np.array([0.1, 0.1]), 1.0).tolist() == [False, False]
    assert settled(np.array([1.0]), np.array([np.nan]), 1.0).tolist() == [False]


def test_layer_metrics_reports_the_draws_and_checks_the_rule():
    model, batches, layers = _small_case()
    cfg = HessianConfig(probes=4, power_iters=3, eli_samples=4, first_order_samples=40, eli_block=4)
    df = layer_metrics(model, batches, "pcm_harsh", cfg, progress=False)
    assert all(4 <= d <= 40 for d in df.attrs["eli_draws"])
    full = layer_metrics(model, batches, "pcm_harsh",
                         HessianConfig(**{**cfg.__dict__, "eli_rtol": 0.0}), progress=False)
    assert full.attrs["eli_draws"] == [40, 40]
    loop = layer_metrics(model, batches, "pcm_harsh",
                         HessianConfig(**{**cfg.__dict__, "eli_rtol": 0.0, "noise_draws": "loop"}), progress=False)
    np.testing.assert_array_equal(full["eli"].to_numpy(), loop["eli"].to_numpy())
    # every draw taken (a rule that never settles): the surrogate's layers take the first 4 draws for the
    # quadratic term and 36 of their own around the surrogate, at the same estimand and a smaller error
    never = {**cfg.__dict__, "eli_rtol": 1e-12}
    plain = layer_metrics(model, batches, "pcm_harsh", HessianConfig(**{**never, "first_order": "sampled"}),
                          progress=False)
    sur = layer_metrics(model, batches, "pcm_harsh", HessianConfig(**never), progress=False)
    assert plain.attrs["eli_draws"] == sur.attrs["eli_draws"] == [40, 40]
    np.testing.assert_array_equal(sur["eli_second"].to_numpy(), plain["eli_second"].to_numpy())
    z = (sur["eli"] - plain["eli"]).abs() / np.hypot(sur["eli_se"], plain["eli_se"])
    assert (z < 4).all() and (sur["eli_se"] < plain["eli_se"]).all()
    for bad in ({"eli_rtol": -1.0}, {"eli_rtol": float("nan")}, {"eli_block": 0}, {"first_order": "exact"}):
        with pytest.raises(HilalError, match=next(iter(bad))):
            layer_metrics(model, batches, "pcm_harsh", HessianConfig(**{**cfg.__dict__, **bad}), progress=False)


@pytest.mark.parametrize("t", [60.0, 86400.0])
def test_layer_streams_follow_the_loop_draws_distribution(t):
    """Each layer's own stream (the sequential ELI's extra draws) against the loop's draws, per layer and time:
    two statistics per draw (a fixed projection, like the first-order term, and the mean square: the first and
    second moments), a two-sample Kolmogorov-Smirnov test (p > 1e-3) and means within 4 standard errors."""
    from scipy.stats import ks_2samp

    from hilal.hessian.draws import layer_noise

    torch.manual_seed(0)
    model = _Net()
    layers = ["small", "conv", "fc", "head"]
    n = 30
    loop = list(weight_noise_stream(model, layers, "pcm_harsh", t, n, seed=0, draws="loop"))
    own = list(layer_noise(model, layers, layers, "pcm_harsh", t, n, seed=0, start=n))
    g = torch.Generator().manual_seed(1)
    for i in range(len(layers)):
        proj = torch.randn(loop[0][i].shape, generator=g)
        for stat in (lambda d, p=proj: float((d * p).sum()), lambda d: float(d.pow(2).mean())):
            a, b = np.array([stat(d[i]) for d in loop]), np.array([stat(d[i]) for d in own])
            assert ks_2samp(a, b).pvalue > 1e-3, (layers[i], t)
            assert abs(a.mean() - b.mean()) <= 4 * np.hypot(a.std(ddof=1), b.std(ddof=1)) / np.sqrt(n)


def test_layer_streams_draw_only_the_layers_asked_for():
    from hilal.hessian import OutputOperator, output_loss_increase, weight_output_errors
    from hilal.hessian.draws import layer_noise

    model, batches, layers = _small_case()
    draws = list(layer_noise(model, layers, ["fc"], "pcm", 3600.0, 3, seed=0, start=16))
    assert all(d[0] is None and d[1].shape == model.fc.weight.shape for d in draws)
    # the same layer's draws whatever else is drawn beside it
    both = list(layer_noise(model, layers, layers, "pcm", 3600.0, 3, seed=0, start=16))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(draws, both, strict=True))
    op = OutputOperator(model, batches, layers)
    out = output_loss_increase(op, weight_output_errors(op, draws), "joint", 0, 0, return_samples=True)
    assert out["first"].shape == (3, 2) and np.isnan(out["first"][:, 0]).all() and np.isfinite(out["first"][:, 1]).all()


def test_first_order_terms_from_weight_gradients_equal_the_output_space_ones():
    from hilal.hessian import OutputOperator, gauss_newton, output_loss_increase, weight_output_errors
    from hilal.hessian.sequential import sequential_loss_increase, weight_gradients

    model, batches, layers = _small_case()
    draws = list(weight_noise_stream(model, layers, "pcm_harsh", 3600.0, 4, seed=1))
    for op in (OutputOperator(model, batches, layers), gauss_newton(model, batches, layers)):
        out = output_loss_increase(op, weight_output_errors(op, draws), "joint", 0, 0, return_samples=True)
        grads = weight_gradients(op)
        dots = np.array([[float((g * d.double()).sum()) for g, d in zip(grads, dw, strict=True)] for dw in draws])
        np.testing.assert_allclose(dots, out["first"], rtol=1e-4, atol=1e-9)
    # the sequential rule with its extra draws from the layers' own streams: counts within the bounds
    from hilal.hessian.draws import layer_noise

    seq, taken = sequential_loss_increase(
        op, lambda a, n: weight_output_errors(op, weight_noise_stream(model, layers, "pcm_harsh", 3600.0, n, 1,
                                                                      start=a)),
        24, 4, "joint", 0, rtol=0.05, block=4,
        draws=lambda a, n, only: layer_noise(model, layers, [layers[i] for i in only], "pcm_harsh", 3600.0, n, 1, a))
    assert all(4 <= t <= 24 for t in taken) and np.isfinite(seq["eli"]).all() and np.isfinite(seq["eli_se"]).all()
