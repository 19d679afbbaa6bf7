"""Curvature in bounded memory: the estimates do not depend on HessianConfig.graph_bytes (how many batches keep
their graphs), the graphs are rebuilt as often as layer_metrics' docstring says, and the exact Gauss-Newton
path stays on beyond the budget or says why it is off."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hilal.hessian import (
    GaussNewton,
    HessianConfig,
    OutputOperator,
    layer_metrics,
    output_error_stream,
    output_loss_increase,
)
from hilal.registry import HilalError

FIELDS = ["trace", "trace_se", "lambda_max", "eli", "eli_first", "eli_second", "eli_se"]


class _Net(nn.Module):
    """Two convolutions and a classifier; ``act`` a function (the Gauss-Newton check decides) or a module."""

    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(100, 5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        return self.fc(self.act(self.conv2(h)).flatten(1))


def _model(act) -> nn.Module:
    torch.manual_seed(0)
    return _Net(act)


def _data(n: int = 150, size: int = 64) -> list:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[a:a + size], y[a:a + size]) for a in range(0, n, size)]


def _cfg(**kw) -> HessianConfig:
    base = dict(probes=16, power_iters=3, power_tol=0.0, eli_samples=3, first_order_samples=4, strata=2,
                batch_size=64, t_inference=3600.0)
    return HessianConfig(**{**base, **kw})


def _run(act, budget: float, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tanh model's fallback from Gauss-Newton (tested below)
        return layer_metrics(_model(act), _data(), "pcm_harsh", _cfg(graph_bytes=budget, **kw), progress=False)


@pytest.mark.parametrize("act", [torch.relu, torch.tanh], ids=["relu", "tanh"])
@pytest.mark.parametrize("mode", ["joint", "per_layer"])
@pytest.mark.parametrize("noise", ["weight", "output"])
def test_estimates_do_not_depend_on_the_budget(act, mode, noise):
    """Nothing kept (0), some batches kept (300 kB) and everything kept give the same numbers to the bit:
    every estimator runs the same arithmetic in the same order whatever is kept, a rebuilt graph computes
    exactly what the kept one did, and the probes and signs are redrawn from recorded generator states. The
    joint ReLU cases take the Gauss-Newton path, the tanh ones output-space HVPs on 2 gradient strata of 75
    samples, each cut into pieces of at most 64 (the batch size), 3 batches otherwise."""
    runs = {b: _run(act, b, mode=mode, noise=noise) for b in (0.0, 300e3, math.inf)}
    ref = runs[math.inf]
    expect = "gauss-newton" if act is torch.relu and mode == "joint" else "hvp"
    for budget, df in runs.items():
        assert df.attrs["curvature"] == expect
        for f in FIELDS:
            assert df[f].tolist() == ref[f].tolist(), (budget, f)
    assert np.all(np.isfinite(ref.eli)) and np.all(ref.trace > 0)
    # the budget decides what is kept: nothing, part, everything (each batch built once)
    kept = [runs[b].attrs["graph_bytes_kept"] for b in (0.0, 300e3, math.inf)]
    assert kept[0] == 0 and 0 < kept[1] <= 300e3 < kept[2]
    builds = [runs[b].attrs["graph_builds"] for b in (0.0, 300e3, math.inf)]
    assert builds[0] > builds[1] > builds[2]


def _passes(df) -> tuple[int, int]:
    return df.attrs["graph_builds_weight"], df.attrs["graph_builds_output"]


def test_graph_builds_are_what_the_docstring_says():
    """Counted with nothing kept (budget 0) and everything kept, B = 3 batches, P output-space pieces, I = 3
    power iterations (tolerance 0: all run), one group of held weight draws."""
    b, iters = 3, 3
    # curved (an nn.Tanh module, not even tried for Gauss-Newton), joint: 2 strata of 75 in pieces of 64
    for budget in (0.0, math.inf):
        with pytest.warns(UserWarning, match="Tanh"):
            df = layer_metrics(_model(nn.Tanh()), _data(), "pcm_harsh", _cfg(graph_bytes=budget), progress=False)
        p = 4
        assert df.attrs["strata"] == 2
        # weight space: construction + one pass per power iteration; output space: the first piece at
        # construction, then traces and ELI, one pass each
        assert _passes(df) == ((b + iters * b, 1 + 2 * p) if budget == 0 else (b, p)), budget
    # piecewise linear: Gauss-Newton blocks. Weight space: construction + the check's block HVPs; blocks:
    # construction (first batch), the check (which notes the traces), one per power iteration, ELI
    for budget in (0.0, math.inf):
        df = layer_metrics(_model(torch.relu), _data(), "pcm_harsh", _cfg(graph_bytes=budget), progress=False)
        assert df.attrs["curvature"] == "gauss-newton"
        assert _passes(df) == ((2 * b, 1 + b + iters * b + b) if budget == 0 else (b, b)), budget
    # per_layer, weight noise: construction, traces, power iteration, ELI; nothing in output space
    df = layer_metrics(_model(torch.relu), _data(), "pcm_harsh", _cfg(graph_bytes=0, mode="per_layer"),
                       progress=False)
    assert _passes(df) == (b + b + iters * b + b, 0)


def test_gauss_newton_stays_on_beyond_the_budget_and_the_old_cap():
    """Signals of all batches over the budget and over max_bytes (the old cap on all of them): the exact blocks
    are still used, batch by batch, with the traces of the unlimited run."""
    model, data = _model(torch.relu), _data()
    gn = GaussNewton(model, data, ["conv", "conv2", "fc"])
    per_batch = [sum(s.numel() * s.element_size() for s in sig) for sig in gn.signals]
    assert len(per_batch) == 3
    small = GaussNewton(model, data, ["conv", "conv2", "fc"], max_bytes=max(per_batch), graph_bytes=0)
    assert sum(per_batch) > small.max_bytes
    np.testing.assert_array_equal(small.traces(), gn.traces())
    assert small.cache.builds == 1 + 2 and small.cache.kept == {}  # the first batch's traces came with it
    df = layer_metrics(model, data, "pcm_harsh", _cfg(graph_bytes=min(per_batch) // 2), progress=False)
    assert df.attrs["curvature"] == "gauss-newton" and df.attrs["graph_bytes_kept"] < min(per_batch)
    assert "exact blocks" in df.attrs["curvature_reason"]
    with pytest.raises(HilalError, match="one batch .* lower the batch size"):
        GaussNewton(model, data, ["conv", "conv2", "fc"], max_bytes=min(per_batch) - 1)


def test_falling_back_from_gauss_newton_is_warned_and_recorded():
    with pytest.warns(UserWarning, match="not exact Gauss-Newton blocks: the model holds Tanh modules"):
        df = layer_metrics(_model(nn.Tanh()), _data(), "pcm", _cfg(eli_samples=0), progress=False)
    assert df.attrs["curvature"] == "hvp" and "Tanh" in df.attrs["curvature_reason"]
    with pytest.warns(UserWarning, match="differ from PyHessian's block HVPs"):  # functional tanh: the check
        df = layer_metrics(_model(torch.tanh), _data(), "pcm", _cfg(eli_samples=0), progress=False)
    assert "not piecewise linear" in df.attrs["curvature_reason"]
    df = layer_metrics(_model(torch.tanh), _data(), "pcm", _cfg(eli_samples=0, gauss_newton="off"), progress=False)
    assert df.attrs["curvature_reason"] == "gauss_newton='off'"


@pytest.mark.parametrize("bad", [-1, float("nan"), "2GiB", True, None])
def test_graph_bytes_is_validated(bad):
    with pytest.raises(HilalError, match="graph_bytes must be a number of bytes >= 0"):
        layer_metrics(_model(torch.relu), _data(), cfg=_cfg(graph_bytes=bad), progress=False)


def test_analog_errors_piece_by_piece_are_the_draws_of_one_pass():
    """Piece by piece each draw is programmed again and torch's random state continues from the previous piece:
    the ELI equals that of the same draws made in one pass over all batches (converter and output noise
    included), on strata cut into pieces."""
    model = _model(torch.tanh).eval()
    data = _data()
    op = OutputOperator(model, data, ["conv", "conv2", "fc"], strata=2, graph_bytes=0)
    assert len(op.sizes) == 2 and len(op.chunks) == 4
    piecewise = output_loss_increase(op, output_error_stream(model, op, "pcm_harsh", 3600.0, 3, seed=2), seed=1)
    one_pass = list(output_error_stream(model, op, "pcm_harsh", 3600.0, 3, seed=2))
    assert not torch.equal(one_pass[0][0][0], one_pass[1][0][0])  # draws differ
    whole = output_loss_increase(op, one_pass, seed=1)
    for k in piecewise:
        np.testing.assert_array_equal(piecewise[k], whole[k])


def test_graphs_beyond_the_budget_are_freed_after_use():
    """A graph that is not kept dies once used (nothing, such as a saved-tensor hook, ties it in a cycle):
    the activations it saved are gone, while a kept graph keeps them."""
    import weakref

    from hilal.hessian import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(2)]
    for budget, alive in ((0.0, 0), (math.inf, 2)):
        saved = []  # the ReLU outputs: saved by the ReLU and by the second layer for backward
        hook = model[1].register_forward_hook(lambda m, i, o, saved=saved: saved.append(weakref.ref(o)))
        op = HessianOperator(model, data, ["0", "2"], graph_bytes=budget)
        op.hvp([torch.ones(8, 6), torch.ones(3, 8)])
        hook.remove()
        assert len(saved) == 4 - 2 * (alive > 0)  # rebuilt for the product, or kept
        assert sum(r() is not None for r in saved) == alive, budget
        assert op.cache.builds == len(saved) and len(op.cache.kept) == alive
