"""The retraining-free methods (``max-norm``, ``hilal-zeroshot``) and the paper variant's ablations and guard:
searches against exhaustive search on stand-in runs with known scores, criteria against hand computation."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import hilal.mapping.paper as hm_paper
from hilal.analog import analog_layers
from hilal.evaluate import noisy_scores
from hilal.mapping import (
    ABLATIONS,
    MappingConfig,
    hilal_paper,
    longest_prefix,
    paper_clusters,
    row_norm_ratio,
    run_mapping,
    zeroshot_knapsack,
)
from hilal.registry import HilalError
from hilal.train import FinetuneConfig


class ExactRun:
    """A run whose score falls by the summed loss of its analog layers; screens are exact, stages forbidden."""

    def __init__(self, loss: dict, macs: dict, budget: float, tiles: dict | None = None,
                 max_tiles: int | None = None) -> None:
        self.loss, self.value, self.tiles = loss, macs, tiles or dict.fromkeys(loss, 1)
        self.cfg = MappingConfig(drop_threshold=budget, max_tiles=max_tiles)
        self.layers, self.screens, self.baseline = [], 0, 1.0

    def floor(self) -> float:
        return self.baseline - self.cfg.drop_threshold

    def tiles_left(self) -> float:
        cap = self.cfg.max_tiles
        return math.inf if cap is None else cap - sum(self.tiles[n] for n in self.layers)

    def screen(self, key, layers, threshold=None, retrained=False):
        assert not retrained
        self.screens += 1
        return self.baseline - sum(self.loss[n] for n in self.layers + list(layers))

    def stage(self, *a, **k):
        raise AssertionError("a retraining-free method retrained")


def best_share(names, loss, macs, budget, forced=(), tiles=None, cap=math.inf):
    best = 0
    for r in range(len(names) + 1):
        for sub in itertools.combinations(names, r):
            fits = sum((tiles or dict.fromkeys(names, 1))[n] for n in sub) <= cap
            if set(forced) <= set(sub) and sum(loss[n] for n in sub) <= budget and fits:
                best = max(best, sum(macs[n] for n in sub))
    return best


@pytest.mark.parametrize("budgeted", [False, True])
def test_zeroshot_knapsack_against_exhaustive(budgeted):
    """With exact zero-shot scores the chosen set carries the most MACs of any set within the tolerance (the
    robust cluster in it whenever it fits), within the tile budget, in about log2(frontier) screens."""
    rng = random.Random(3)
    for _ in range(150):
        n = rng.randint(1, 7)
        names = [f"l{i}" for i in range(n)]
        loss = {m: rng.choice([0.0, rng.uniform(0.0, 1.0)]) for m in names}
        macs = {m: rng.choice([1, 2, 4, 8]) for m in names}
        tiles = {m: rng.randint(1, 3) for m in names} if budgeted else None
        cap = rng.randint(1, 8) if budgeted else None
        robust = sorted(names, key=loss.get)[: rng.randint(0, n)]
        budget = rng.uniform(0.2, 2.0)
        run = ExactRun(loss, macs, budget, tiles, cap)
        got = zeroshot_knapsack(run, dict(loss), robust, [m for m in names if m not in robust])
        assert len(set(got)) == len(got) and sum(loss[m] for m in got) <= budget + 1e-9
        limit = math.inf if cap is None else cap
        assert sum((tiles or dict.fromkeys(names, 1))[m] for m in got) <= limit
        fits = sum(loss[m] for m in robust) <= budget and sum((tiles or dict.fromkeys(names, 1))[m]
                                                              for m in robust) <= limit
        optimum = best_share(names, loss, macs, budget, robust if fits else (), tiles, limit)
        assert sum(macs[m] for m in got) == optimum, (loss, macs, robust, budget, got)
        assert run.screens <= 2 * (math.ceil(math.log2(2**n + 1)) + 1)


def test_longest_prefix_against_exhaustive():
    """Bisection finds the longest feasible prefix of a monotone order in at most ceil(log2(n + 1)) screens."""
    for n in range(0, 9):
        names = [f"l{i}" for i in range(n)]
        for k in range(n + 1):
            run = ExactRun({m: (0.0 if i < k else 1.0) for i, m in enumerate(names)}, dict.fromkeys(names, 1), 0.5)
            assert longest_prefix(run, "p", names) == names[:k]
            assert run.screens <= math.ceil(math.log2(n + 1))


def test_row_norm_ratio_by_hand():
    """Channel-wise remapping measures each row against its own max |w|, layer-wise against the layer's."""
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, -3.0]]))
    model = nn.Sequential(lin)
    assert row_norm_ratio(model, ["0"], "pcm")["0"] == pytest.approx(max(math.sqrt(3) / 1, 5 / 4))
    assert row_norm_ratio(model, ["0"], "pcm_hilal")["0"] == pytest.approx(max(math.sqrt(3), 5) / 4)
    conv = nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[2.0, 0.0], [0.0, -2.0]]]]))
    assert row_norm_ratio(nn.Sequential(conv), ["0"], "pcm")["0"] == pytest.approx(math.sqrt(2))


def tiny_cfg(**kw) -> MappingConfig:
    base = dict(preset="pcm_harsh", reps=2, patience=1, max_rounds=1, finetune=FinetuneConfig(steps=3), seed=0,
                hessian={"probes": 4, "power_iters": 4, "eli_samples": 4, "first_order_samples": 4,
                         "max_samples": 64})
    return MappingConfig(**{**base, **kw})


def test_max_norm_offloads_the_lowest_norm_prefix_without_retraining(resnet8_digits, digits):
    """``max-norm`` makes analog a prefix of the layers in ascending row-norm ratio, never retrains, and its
    longest kept prefix cleared the floor on its screen while the next one (if screened) did not."""
    res = run_mapping("max-norm", resnet8_digits, digits, tiny_cfg(drop_threshold=0.05), progress=False)
    h, order, scores = res.history, res.extra["order"], res.extra["max_norm"]
    assert order == sorted(scores, key=scores.get) and set(scores) == set(order)
    assert set(res.analog_layers) == set(order[: len(res.analog_layers)])
    assert h["rounds"].eq(0).all() and res.rounds == 0 and res.timings["mapping_s"] == 0
    k = len(res.analog_layers)
    screened = {len(x.split(",")) if x else 0: s for x, s in zip(h["layers"], h["score"], strict=True)}
    assert k == 0 or screened[k] >= res.extra["floor"]
    assert all(s < res.extra["floor"] for j, s in screened.items() if j > k)
    assert analog_layers(resnet8_digits) == []


def test_hilal_zeroshot_converts_its_screened_set_as_it_is(resnet8_digits, digits):
    """``hilal-zeroshot`` never retrains; its final model is the digital weights with its set analog: the
    chosen set's screen score is reproduced by scoring that model on the screen's programming seeds."""
    cfg = tiny_cfg(drop_threshold=0.05)
    res = run_mapping("hilal-zeroshot", resnet8_digits, digits, cfg, progress=False)
    h = res.history
    assert h["rounds"].eq(0).all() and res.rounds == 0
    if res.analog_layers:
        row = h.index[h["layers"].map(lambda x: set(x.split(",")) == set(res.analog_layers))][-1]
        assert h.loc[row, "score"] >= res.extra["floor"]
        x = noisy_scores(res.model, digits, cfg.t_eval, cfg.reps, cfg.seed + 7919 * row, split="calib")
        assert float(x.mean()) == pytest.approx(h.loc[row, "score"], abs=1e-12)
    assert set(res.extra["robust"]) | set(res.extra["sensitive"]) == set(res.metrics["layer"])


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_paper_clusters_against_brute_force(ablation):
    """Every ablation clusters its own features (z-scored, as the brute force recomputes them) into a k-means
    fixed point, robust being the side with the lower mean of its first feature. Not asserted: the
    least-squares split itself, which k-means' 8 restarts miss on some sets of 8 layers, even on one feature."""
    rng = np.random.default_rng(7)
    cols = ["eli_norm", "r", "lambda_max", "lambda_per_param", "trace"]
    for _ in range(12):
        n = int(rng.integers(3, 9))
        df = pd.DataFrame(rng.lognormal(size=(n, len(cols))), columns=cols).assign(layer=[f"l{i}" for i in range(n)])
        out = paper_clusters(df, ablation, seed=0)
        feats = list(ABLATIONS[ablation])
        x = df[feats].to_numpy(float)
        z = (x - x.mean(0)) / x.std(0)
        robust = frozenset(np.flatnonzero(out["cluster"].to_numpy() == "robust").tolist())
        other = frozenset(range(n)) - robust
        assert robust and other and z[list(robust), 0].mean() < z[list(other), 0].mean()
        centres = np.stack([z[list(robust)].mean(0), z[list(other)].mean(0)])  # a fixed point of Lloyd's steps:
        d = ((z[:, None, :] - centres[None]) ** 2).sum(-1)  # every layer nearer its own cluster's centre
        own = np.array([0 if i in robust else 1 for i in range(n)])
        assert (d[np.arange(n), own] <= d[np.arange(n), 1 - own] + 1e-12).all()


def test_paper_clusters_rejects_an_unknown_ablation():
    with pytest.raises(HilalError, match="ablation"):
        paper_clusters(pd.DataFrame({"trace": [1.0, 2.0]}), "nope", seed=0)


class PaperRun:
    """A stand-in run for ``hilal_paper``: each analog layer costs ``loss`` of the score at ``t_eval`` and
    nothing without drift (as the faithful variant judges); stages recorded."""

    def __init__(self, loss: dict, guard: bool, ablation: str) -> None:
        self.loss, self.layers, self.stages = loss, [], []
        self.cfg = MappingConfig(paper_guard=guard, ablation=ablation, drop_threshold=0.1)
        self.model, self.splits, self.baseline = None, None, 1.0

    def floor(self) -> float:
        return self.baseline - self.cfg.drop_threshold

    def timed_search(self, fn):
        return fn()

    def stage(self, key, layers, accept=None, drift=True, **kw):
        s = self.baseline - (sum(self.loss[n] for n in self.layers + layers) if drift else 0.0)
        ok = accept is None or accept(s)
        self.stages.append((list(layers), drift, ok))
        if ok:
            self.layers = self.layers + list(layers)
        return ok

    def finish(self, metrics=None, **extra):
        return SimpleNamespace(analog_layers=list(self.layers), metrics=metrics, extra=dict(extra), reps=2)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
@pytest.mark.parametrize("guard", [True, False])
def test_paper_variant_per_ablation_with_and_without_the_guard(monkeypatch, ablation, guard):
    """Each ablation tries exactly its robust cluster, in (ELI_norm, r) order, one layer per stage; the
    paper-faithful variant keeps them all (judged without drift), the guarded one rejects every stage that
    breaks the tolerance at ``t_eval`` and keeps the rest."""
    rng = np.random.default_rng(list(ABLATIONS).index(ablation))
    n = 8
    df = pd.DataFrame(rng.lognormal(size=(n, 5)), columns=["eli_norm", "r", "lambda_max", "lambda_per_param",
                                                         "trace"]).assign(layer=[f"l{i}" for i in range(n)])
    loss = {f"l{i}": float(v) for i, v in enumerate(rng.uniform(0.0, 0.06, n))}
    monkeypatch.setattr(hm_paper, "paper_descriptors", lambda run: df)
    monkeypatch.setattr(hm_paper, "noisy_scores", lambda *a, **k: np.array([0.5, 0.5]))
    run = PaperRun(loss, guard, ablation)
    res = hilal_paper(run)
    expect = paper_clusters(df, ablation, 0)
    robust = expect[expect["cluster"] == "robust"].sort_values(["eli_norm", "r"])["layer"].tolist()
    assert [s[0] for s in run.stages] == [[n] for n in robust]
    assert res.extra["variant"] == ("kit" if guard else "paper-faithful") and res.extra["ablation"] == ablation
    if not guard:
        assert res.analog_layers == robust and not any(d for _, d, _ in run.stages)
        return
    kept, total = [], 0.0
    for name in robust:  # the guard's rule, replayed by hand
        if 1.0 - (total + loss[name]) >= 0.9:
            kept.append(name)
            total += loss[name]
    assert res.analog_layers == kept and all(d for _, d, _ in run.stages)
    assert 1.0 - sum(loss[n] for n in res.analog_layers) >= run.floor()


def test_paper_guard_is_validated(resnet8_digits, digits):
    with pytest.raises(HilalError, match="paper_guard"):
        run_mapping("hilal-paper", resnet8_digits, digits, MappingConfig(paper_guard="no"), progress=False)
