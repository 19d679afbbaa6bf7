"""Mapping methods: the prefix searches against exhaustive search, LionHeart's loop, resume, the record."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest
import torch
from torch import nn

import hilal.mapping.run as hm_run  # where the scripted tests patch the evaluation and retraining
from hilal.analog import analog_layers, count_macs, mappable_layers
from hilal.mapping import (
    METHODS,
    MappingConfig,
    _extend_prefix,
    _knapsack,
    _screened,
    fresh_pass_rate,
    pareto_sets,
    recheck,
    retrain,
    run_mapping,
    snapshot,
)
from hilal.registry import HilalError
from hilal.train import FinetuneConfig

RESULT_KEYS = {"method", "analog_layers", "analog_mac_share", "accuracy_mean", "accuracy_std", "fp_accuracy",
               "t_eval", "reps", "timings"}


def tiny_cfg(**kw) -> MappingConfig:
    base = dict(preset="pcm_harsh", reps=2, patience=1, max_rounds=2, finetune=FinetuneConfig(steps=3), seed=0)
    return MappingConfig(**{**base, **kw})


class PrefixOracle:
    """Stands in for a mapping run whose feasibility is a known monotone function of how many of the
    sensitive layers ("s*") are analog; zero-shot scores may be pessimistic by ``lag`` layers."""

    def __init__(self, feasible_upto: int, search: str, lag: int = 0, prior: float = 0.5) -> None:
        self.k, self.lag, self.layers, self.calls, self.rows = feasible_upto, lag, [], 0, []
        self.cfg = MappingConfig(search=search, recovery_prior=prior)
        self.baseline = 1.0

    def floor(self) -> float:
        return 0.5

    def _n(self, layers) -> int:
        return sum(n.startswith("s") for n in self.layers + list(layers))

    def stage(self, key, layers, accept=None, drift=True, zero_shot=False):
        self.calls += 1
        s = 1.0 if self._n(layers) <= self.k else 0.0
        self.rows.append({"zero_shot": self.screen(key, layers) if zero_shot else None, "score": s})
        ok = accept is None or accept(s)
        if ok:
            self.layers = self.layers + list(layers)
        return ok

    def screen(self, key, layers, threshold=None):
        return 1.0 if self._n(layers) <= max(self.k - self.lag, 0) else 0.0


@pytest.mark.parametrize("search", ["gallop", "bisect", "walk"])
def test_prefix_search_matches_exhaustive(search):
    for n in range(0, 9):
        names = [f"s{i}" for i in range(n)]
        for k in range(n + 1):
            run = PrefixOracle(k, search)
            _extend_prefix(run, names)
            assert run.layers == names[:k], (search, n, k)
            bound = {"walk": min(k + 1, n), "bisect": math.ceil(math.log2(n + 1)),
                     "gallop": 2 * math.ceil(math.log2(k + 1)) + 1}[search]
            assert run.calls <= max(bound, 0 if n == 0 else 1), (search, n, k, run.calls)


@pytest.mark.parametrize("lag, prior", [(0, 0.0), (0, 0.5), (1, 0.5), (2, 0.5), (2, 0.0)])
def test_screened_stages_against_exhaustive(lag, prior):
    for n in range(0, 9):
        names = [f"s{i}" for i in range(n)]
        for k in range(n + 1):
            run = PrefixOracle(k, "screen", lag, prior)
            _screened(run, ["r0", "r1", *names], 2)
            assert run.layers[:2] == ["r0", "r1"]  # the robust layers always go, with the first stage
            got = run._n([])
            assert run.layers[2:] == names[:got]
            assert got <= k  # never beyond the feasible prefix
            assert got >= k - lag
            bound = 1 if (lag, prior) == (0, 0.0) else 2 + 2 * math.ceil(math.log2(n + 1))
            assert run.calls <= bound, (n, k, run.calls)  # exact zero-shot and no optimism: one stage


def test_pareto_sets_against_every_subset():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 8)
        cost, value = [rng.uniform(-0.2, 1.0) for _ in range(n)], [rng.choice([1, 2, 3, 8]) for _ in range(n)]
        frontier = pareto_sets(cost, value)
        for c, v, items in frontier:
            assert c == pytest.approx(sum(cost[i] for i in items)) and v == sum(value[i] for i in items)
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(frontier))  # no point dominated
        for r in range(n + 1):
            for sub in itertools.combinations(range(n), r):  # every subset is matched or beaten by a point
                c, v = sum(cost[i] for i in sub), sum(value[i] for i in sub)
                assert any(fc <= c + 1e-12 and fv >= v for fc, fv, _ in frontier)
    # thinning keeps the frontier's ends and at most one set per value bin
    big = pareto_sets([0.1 + 0.01 * i for i in range(40)], [1 + i % 7 for i in range(40)], max_points=50)
    assert len(big) <= 51 and big[0][1] == 0 and big[-1][1] == sum(1 + i % 7 for i in range(40))


class KnapsackOracle:
    """A run whose true score falls by the summed loss of its analog layers (the ELI is exact); zero-shot
    scores are pessimistic by ``lag`` with standard error ``se``, and retraining recovers the lag."""

    def __init__(self, loss: dict, macs: dict, budget: float, lag: float = 0.0, se: float = 0.0,
                 trim: bool = True, tiles: dict | None = None, max_tiles: int | None = None) -> None:
        self.loss, self.macs, self.value, self.lag, self.se = loss, macs, macs, lag, se
        self.tiles = tiles or dict.fromkeys(loss, 1)
        self.layers, self.rows, self.stages, self.trims, self.rejected = [], [], 0, [], None
        self.cfg = MappingConfig(search="knapsack", drop_threshold=budget, trim=trim, max_tiles=max_tiles)
        self.baseline = 1.0

    def tiles_left(self) -> float:
        cap = self.cfg.max_tiles
        return math.inf if cap is None else cap - sum(self.tiles[n] for n in self.layers)

    def floor(self) -> float:
        return self.baseline - self.cfg.drop_threshold

    def _true(self, layers) -> float:
        return self.baseline - sum(self.loss[n] for n in self.layers + list(layers))

    def screen(self, key, layers, threshold=None, retrained=False):
        if retrained:  # the rejected stage's retrained weights: its lag is recovered
            assert set(layers) <= set(self.rejected), (layers, self.rejected)
        z = self._true(layers) - (0.0 if retrained else self.lag)
        self.rows.append({"zero_shot": z, "zero_shot_se": self.se, "score": z})
        return z

    def stage(self, key, layers, accept=None, drift=True, zero_shot=False, keep_rejected=False):
        self.stages += 1
        s = self._true(layers)
        z = s - self.lag if isinstance(zero_shot, bool) else zero_shot
        self.rows.append({"zero_shot": z, "score": s})
        ok = accept is None or accept(s)
        self.rejected = None if ok or not keep_rejected else list(layers)
        if ok:
            self.layers = self.layers + list(layers)
        return ok

    def adopt(self, key, layers, score):
        assert set(layers) <= set(self.rejected) and score == self._true(layers)
        self.trims.append(list(layers))
        self.layers, self.rejected = self.layers + list(layers), None
        return True


def best_mac_share(names, loss, macs, budget, forced=()):
    best = -1
    for r in range(len(names) + 1):
        for sub in itertools.combinations(names, r):
            if set(forced) <= set(sub) and sum(loss[n] for n in sub) <= budget:
                best = max(best, sum(macs[n] for n in sub))
    return best


@pytest.mark.parametrize("lag, trim, scan", [(0.0, True, 3), (0.3, True, 3), (0.3, False, 0)])
def test_knapsack_search_against_exhaustive(lag, trim, scan):
    rng = random.Random(1)
    for _ in range(150):
        n = rng.randint(1, 7)
        names = [f"l{i}" for i in range(n)]
        loss = {m: rng.choice([0.0, rng.uniform(0.0, 1.0)]) for m in names}
        macs = {m: rng.choice([1, 2, 4, 8]) for m in names}
        robust = sorted(names, key=loss.get)[: rng.randint(0, n)]
        budget = rng.uniform(0.2, 2.0)
        run = KnapsackOracle(loss, macs, budget, lag=lag * budget, se=lag * budget / 2, trim=trim)
        run.cfg.scan = scan
        _knapsack(run, dict(loss), robust, [m for m in names if m not in robust])
        got = sum(macs[m] for m in run.layers)
        assert len(set(run.layers)) == len(run.layers) and sum(loss[m] for m in run.layers) <= budget + 1e-9
        robust_ok = sum(loss[m] for m in robust) <= budget
        assert set(robust) <= set(run.layers) or not robust_ok  # the robust cluster goes when it fits
        optimum = best_mac_share(names, loss, macs, budget, robust if robust_ok else ())
        if lag == 0:  # exact zero-shot scores: the optimum, retraining once (a robust set that fails its
            assert got == optimum  # screen is not retrained)
            assert run.stages <= 1
        else:  # pessimistic zero-shot: at least what fits the lagged budget (near misses may add more)
            assert got >= best_mac_share(names, loss, macs, budget - lag * budget, robust if robust_ok else ())
        assert bool(run.trims) <= trim


def test_pareto_sets_under_a_capacity_against_every_subset():
    """With a capacity, every frontier point fits, its totals are its items', no point beats another, and for
    every subset that fits there is a point at most as costly with at least its value (the 2-D knapsack's
    frontier is exact, negative costs and savings included)."""
    rng = random.Random(3)
    for _ in range(150):
        n = rng.randint(0, 10)
        cost = [rng.choice([0.0, rng.uniform(-0.1, 1.0)]) for _ in range(n)]
        value = [rng.choice([-2, 1, 2, 3, 8]) for _ in range(n)]
        weight = [rng.randint(1, 4) for _ in range(n)]
        capacity = rng.randint(0, 12)
        frontier = pareto_sets(cost, value, weight=weight, capacity=capacity)
        for c, v, items in frontier:
            assert c == pytest.approx(sum(cost[i] for i in items)) and v == sum(value[i] for i in items)
            assert sum(weight[i] for i in items) <= capacity
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(frontier))
        for r in range(n + 1):
            for sub in itertools.combinations(range(n), r):
                if sum(weight[i] for i in sub) <= capacity:
                    c, v = sum(cost[i] for i in sub), sum(value[i] for i in sub)
                    assert any(fc <= c + 1e-12 and fv >= v for fc, fv, _ in frontier), (sub, frontier)
    with pytest.raises(HilalError, match="weight"):
        pareto_sets([1.0], [1.0], capacity=3)


def test_knapsack_search_under_a_tile_budget_against_exhaustive():
    """``max_tiles``: with exact zero-shot scores the search finds the subset with the most MACs among those
    within both the loss budget and the tile budget (robust cluster forced when it fits both), by
    exhaustive enumeration of up to 10 layers; it never exceeds the tile budget."""
    rng = random.Random(4)
    for _ in range(120):
        n = rng.randint(1, 10)
        names = [f"l{i}" for i in range(n)]
        loss = {m: rng.choice([0.0, rng.uniform(0.0, 1.0)]) for m in names}
        macs = {m: rng.choice([1, 2, 4, 8]) for m in names}
        tiles = {m: rng.randint(1, 4) for m in names}
        robust = sorted(names, key=loss.get)[: rng.randint(0, n)]
        budget, max_tiles = rng.uniform(0.2, 2.0), rng.randint(1, 2 * n)
        run = KnapsackOracle(loss, macs, budget, tiles=tiles, max_tiles=max_tiles)
        _knapsack(run, dict(loss), robust, [m for m in names if m not in robust])
        assert sum(tiles[m] for m in run.layers) <= max_tiles
        forced = robust if sum(loss[m] for m in robust) <= budget and sum(tiles[m] for m in robust) <= max_tiles \
            else ()
        best = -1
        for r in range(n + 1):
            for sub in itertools.combinations(names, r):
                if set(forced) <= set(sub) and sum(loss[m] for m in sub) <= budget \
                        and sum(tiles[m] for m in sub) <= max_tiles:
                    best = max(best, sum(macs[m] for m in sub))
        assert sum(macs[m] for m in run.layers) == best and run.stages <= 1


def test_knapsack_round_ends_when_its_cheapest_set_fails():
    """Expected losses add, so a round after a kept stage whose cheapest frontier set fails its screen ends
    after that one screen instead of bisecting down to it (the first round bisects: there the cheapest set,
    often the robust cluster alone, usually clears). Exact zero-shot scores; the stages found are the
    optimum, robust cluster in or (when it alone does not fit) out."""

    class Keys(KnapsackOracle):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.keys = []

        def screen(self, key, layers, threshold=None, retrained=False):
            self.keys.append(key)
            return super().screen(key, layers, threshold, retrained)

    names = [f"l{i}" for i in range(8)]
    loss = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    macs = dict.fromkeys(names, 8)
    for robust in ([], ["l6", "l7"]):  # no robust cluster, and one whose loss (1.5) is over the budget
        run = Keys(loss, macs, budget=0.35)
        _knapsack(run, dict(loss), robust, [n for n in names if n not in robust])
        assert sorted(run.layers) == ["l0", "l1"] and run.stages == 1
        last = max(int(k.split("-")[1]) for k in run.keys)
        assert [k for k in run.keys if k.startswith(f"screen-{last}-")] == [f"screen-{last}-0"]


def test_trim_keeps_the_best_subset_of_a_rejected_stage():
    """After a rejected stage, the kept subset carries the most MACs of any subset of the stage's layers
    that fits the budget left (exact scores on the retrained model), found by bisection, not by trying
    every subset; with no subset that clears the floor and adds ``gain`` MACs nothing is kept."""
    from hilal.mapping import _trim

    rng = random.Random(2)
    kept = 0
    for _ in range(300):
        n = rng.randint(1, 8)
        names = [f"l{i}" for i in range(n)]
        loss = {m: rng.uniform(0.0, 1.0) for m in names}
        macs = {m: rng.choice([1, 2, 3, 8]) for m in names}
        budget = rng.uniform(0.1, 0.9) * sum(loss.values())
        run = KnapsackOracle(loss, macs, budget)
        done = names[: rng.randint(0, n - 1)]  # already analog, from earlier stages
        run.layers = list(done)
        stage = names[len(done):]
        run.stage("s", stage, (1.0 - budget).__le__, keep_rejected=True)  # accept: floor <= score
        if not run.rejected:
            continue
        gain = rng.choice([0, 3])
        left = budget - sum(loss[m] for m in done)
        best = max((sum(macs[m] for m in sub) for r in range(1, len(stage))
                    for sub in itertools.combinations(stage, r)
                    if sum(loss[m] for m in sub) <= left and sum(macs[m] for m in sub) >= gain), default=None)
        screens = len(run.rows)
        ok = _trim(run, "t", stage, loss, run.floor(), gain)
        assert ok == (best is not None)
        if ok:
            kept += 1
            assert sum(macs[m] for m in run.trims[-1]) == best
            assert run.layers == done + run.trims[-1]
        points = len(pareto_sets([loss[m] for m in stage], [macs[m] for m in stage]))
        assert len(run.rows) - screens <= math.ceil(math.log2(points + 1))  # a bisection
    assert kept > 50


def test_unknown_method_and_search(resnet8_digits, digits):
    with pytest.raises(HilalError, match="valid choices"):
        run_mapping("greedy", resnet8_digits, digits)
    with pytest.raises(HilalError, match="gallop"):
        run_mapping("hilal", resnet8_digits, digits, MappingConfig(search="linear"))
    with pytest.raises(HilalError, match="cost.*curvature"):
        run_mapping("hilal", resnet8_digits, digits, MappingConfig(cost="hessian"))
    with pytest.raises(HilalError, match="eli_samples > 0"):
        run_mapping("hilal", resnet8_digits, digits, tiny_cfg(hessian={"probes": 2, "power_iters": 2,
                                                                       "eli_samples": 0}))


def test_rejects_models_without_layers_or_already_analog(digits, resnet8_digits):
    with pytest.raises(HilalError, match="no mappable layer"):
        run_mapping("all-digital", nn.Sequential(nn.Flatten(), nn.ReLU()), digits)
    from hilal.analog import to_analog

    with pytest.raises(HilalError, match="digital model"):
        run_mapping("all-digital", to_analog(resnet8_digits, ["fc"], "pcm"), digits)


def test_baselines_record(resnet8_digits, digits):
    d = run_mapping("all-digital", resnet8_digits, digits, tiny_cfg(), progress=False)
    assert d.analog_mac_share == 0.0 and d.analog_layers == []
    assert d.accuracy_mean == pytest.approx(d.fp_accuracy) and d.accuracy_std == pytest.approx(0.0, abs=1e-12)
    a = run_mapping("all-analog", resnet8_digits, digits, tiny_cfg(t_eval=365 * 86400.0), progress=False)
    assert a.analog_mac_share == pytest.approx(1.0) and a.analog_layers == mappable_layers(resnet8_digits)
    assert a.accuracy_mean < d.accuracy_mean - 0.05
    for r in (d, a):
        assert RESULT_KEYS <= set(r.to_dict())
        assert set(r.timings) >= {"search_s", "mapping_s", "total_s"}
    # the model passed in is left digital
    assert analog_layers(resnet8_digits) == []


def test_lionheart_loop(resnet8_digits, digits):
    res = run_mapping("lionheart", resnet8_digits, digits, tiny_cfg(drop_threshold=0.03), progress=False)
    macs = count_macs(resnet8_digits, digits.example_input(2))
    order = res.extra["order"]
    assert [macs[n] for n in order] == sorted(macs.values(), reverse=True)
    h = res.history
    assert len(h) == len(order)
    floor = res.extra["baseline_calib"] - 0.03
    assert list(h["kept"]) == [s >= floor for s in h["score"]]
    kept = [layer for layer, k in zip(h["layers"], h["kept"], strict=True) if k]
    assert sorted(res.analog_layers) == sorted(kept)
    assert res.analog_mac_share == pytest.approx(sum(macs[n] for n in kept) / sum(macs.values()))
    assert sorted(analog_layers(res.model)) == sorted(kept)


@pytest.mark.parametrize("method", ["lionheart", "all-analog", "hilal"])
def test_layers_restricts_every_method_to_its_candidates(resnet8_digits, digits, method):
    all_layers = mappable_layers(resnet8_digits)
    patterns = ["layer2.*", all_layers[-1]]
    want = [n for n in all_layers if n.startswith("layer2.") or n == all_layers[-1]]
    assert 1 < len(want) < len(all_layers)
    res = run_mapping(method, resnet8_digits, digits, tiny_cfg(layers=patterns, max_rounds=1,
                                                               hessian={"probes": 2, "power_iters": 2,
                                                                        "eli_samples": 2, "max_samples": 64}),
                      progress=False)
    assert res.extra["candidates"] == want
    assert set(res.analog_layers) <= set(want) and set(analog_layers(res.model)) <= set(want)
    if method == "lionheart":
        macs = count_macs(resnet8_digits, digits.example_input(2))
        assert res.extra["order"] == sorted(want, key=lambda n: -macs[n])
    if method == "all-analog":
        assert res.analog_layers == want
    if method == "hilal":
        assert res.metrics["layer"].tolist() == want
    # the MAC share is of the whole network, not of the candidates
    macs = count_macs(resnet8_digits, digits.example_input(2))
    assert res.analog_mac_share == pytest.approx(sum(macs[n] for n in res.analog_layers) / sum(macs.values()))


def test_layers_pattern_matching_nothing_is_named(resnet8_digits, digits):
    with pytest.raises(HilalError, match=r"\['nope\.\*'\] match no mappable layer.*fc"):
        run_mapping("lionheart", resnet8_digits, digits, tiny_cfg(layers=["layer1.*", "nope.*"]))
    with pytest.raises(HilalError, match="non-empty list"):
        run_mapping("lionheart", resnet8_digits, digits, tiny_cfg(layers=[]))


def test_retrain_keeps_best_and_respects_patience(resnet8_digits, digits):
    from hilal.analog import to_analog

    model = to_analog(resnet8_digits, mappable_layers(resnet8_digits), "pcm_harsh")
    r = retrain(model, digits, tiny_cfg(max_rounds=3, patience=1), seed=0)
    assert 1 <= r.rounds <= 3 and 0.0 <= r.score <= 1.0


def test_retrain_is_reproducible_whatever_ran_before(resnet8_digits, digits):
    """The tiles' training noise comes from torch's global generator; ``retrain`` seeds it, so a call
    gives the same weights whatever drew from it before, and another ``noise_seed`` gives other ones."""
    import torch

    from hilal.analog import to_analog

    def run(draws: int, **kw) -> tuple[float, dict[str, torch.Tensor]]:
        model = to_analog(resnet8_digits, mappable_layers(resnet8_digits), "pcm_harsh")
        torch.rand(draws)
        r = retrain(model, digits, tiny_cfg(max_rounds=1, patience=1), seed=0, **kw)
        return r.score, snapshot(model)

    (s1, w1), (s2, w2), (_, w3) = run(1), run(1000), run(1, noise_seed=5)
    assert s1 == s2 and w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_confirm_accepts_on_a_fresh_evaluation_not_the_best_round(resnet8_digits, digits, monkeypatch):
    """With ``confirm`` a stage is judged by an evaluation on seeds its rounds never drew. The evaluations
    are scripted: every retraining round scores 1 and every confirming evaluation 0, so LionHeart keeps
    every layer on its best rounds and none on the fresh evaluations."""
    import hilal.mapping as hm

    monkeypatch.setattr(hm_run, "_in_loop_score", lambda m, s, c, seed, drift: float(seed < hm.CONFIRM_SEED))
    runs = {c: run_mapping("lionheart", resnet8_digits, digits, tiny_cfg(max_rounds=1, confirm=c), progress=False)
            for c in (False, True)}
    plain, confirmed = runs[False].history, runs[True].history
    assert plain["kept"].all() and plain["score"].eq(1.0).all() and plain["best_round"].isna().all()
    assert runs[False].analog_mac_share == pytest.approx(1.0)
    assert not confirmed["kept"].any() and confirmed["score"].eq(0.0).all() and confirmed["best_round"].eq(1.0).all()
    assert runs[True].analog_layers == [] and len(confirmed) == len(plain) == len(mappable_layers(resnet8_digits))


def test_confirmed_score_is_a_fresh_evaluation_of_the_kept_model(resnet8_digits, digits):
    """The score a confirmed stage is kept on is the mean over ``reps`` programmings of the mapping it keeps,
    at the seeds ``CONFIRM_SEED`` plus the stage's seed: re-scored from the final model, it comes out the
    same."""
    from hilal.evaluate import noisy_scores
    from hilal.mapping import CONFIRM_SEED

    cfg = tiny_cfg(max_rounds=1, reps=3, confirm=True, drop_threshold=0.5)
    res = run_mapping("lionheart", resnet8_digits, digits, cfg, progress=False)
    h = res.history
    assert h["kept"].all() and h["best_round"].notna().all()
    last = len(h) - 1
    fresh = noisy_scores(res.model, digits, cfg.t_eval, cfg.reps, CONFIRM_SEED + cfg.seed + 7919 * last,
                         split="calib")
    assert h["score"].iloc[-1] == pytest.approx(float(fresh.mean()), abs=1e-12)
    assert (h["score"] != h["best_round"]).any()  # other programmings, other scores


def test_mapping_stages_distill_from_the_digital_model(resnet8_digits, digits):
    """Every retraining stage gets the digital model as teacher (``finetune_round`` refuses distillation
    without one), and distilling changes what the stage learns."""
    kw = dict(max_rounds=1, patience=1, t_eval=365 * 86400.0)
    runs = {d: run_mapping("all-analog-ft", resnet8_digits, digits, tiny_cfg(
        **kw, finetune=FinetuneConfig(steps=3, distill=d)), progress=False) for d in (0.0, 1.0)}
    assert runs[1.0].history["score"].iloc[0] != runs[0.0].history["score"].iloc[0]
    assert analog_layers(resnet8_digits) == []


def script_rounds(monkeypatch, scores) -> None:
    """Scripted retraining: each fine-tuning step adds 1 to every weight (the kept weights tell the round)
    and the evaluations return ``scores`` in turn; what stays under test is the stopping and keeping rule."""
    import torch

    script = iter(scores)

    def step(m, *a, **k):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        return 0.0

    monkeypatch.setattr(hm_run, "finetune_round", step)
    monkeypatch.setattr(hm_run, "_in_loop_score", lambda *a, **k: next(script))


@pytest.mark.parametrize("start, scores, rounds, best", [
    (None, [0.80, 0.85, 0.70, 0.60], 4, 0.85),  # the best round is kept; two rounds below it stop
    (0.90, [0.80, 0.85, 0.95, 0.99], 2, 0.90),  # no round beats the model as given: it is left as it was
    (0.50, [0.60, 0.55, 0.58, 0.52], 3, 0.60),  # round 1 beats it and is kept
])
def test_retrain_counts_the_given_score_as_round_zero(monkeypatch, start, scores, rounds, best):
    """The rounds' scores are scripted (:func:`script_rounds`)."""
    import torch

    model = nn.Sequential(nn.Linear(3, 2))
    w0 = model[0].weight.detach().clone()
    script_rounds(monkeypatch, scores)
    r = retrain(model, None, tiny_cfg(max_rounds=4, patience=2), seed=0, start=start)
    assert (r.rounds, r.score) == (rounds, best)
    kept_round = 0 if best == start else scores.index(best) + 1
    assert torch.allclose(model[0].weight, w0 + kept_round, atol=1e-5)


def test_resume_skips_finished_rounds(resnet8_digits, digits, tmp_path, monkeypatch):
    cfg = tiny_cfg(workdir=str(tmp_path), max_rounds=1)
    full = run_mapping("lionheart", resnet8_digits, digits, tiny_cfg(max_rounds=1), progress=False)

    import hilal.mapping as hm

    real, calls = hm.retrain, itertools.count()

    def flaky(*a, **k):
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hm_run, "retrain", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_mapping("lionheart", resnet8_digits, digits, cfg, progress=False)
    monkeypatch.setattr(hm_run, "retrain", real)
    resumed = run_mapping("lionheart", resnet8_digits, digits, cfg, progress=False)
    assert resumed.history["replayed"].sum() == 3
    assert resumed.analog_layers == full.analog_layers
    assert list(resumed.history["score"]) == pytest.approx(list(full.history["score"]))
    assert resumed.accuracy_mean == pytest.approx(full.accuracy_mean)
    # another version of the package's code replays nothing, and leaves the old journal as it was
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr("hilal.mapping.journal.code_fingerprint", lambda root=None: "0+changed")
    other = run_mapping("lionheart", resnet8_digits, digits, cfg, progress=False)
    assert other.history["replayed"].sum() == 0
    assert len(list(tmp_path.iterdir())) == len(before) + 1 and set(before) <= {p.name for p in tmp_path.iterdir()}


def test_the_code_fingerprint_covers_the_mapping_subpackage(tmp_path):
    """The fingerprint that keys the journal (and every cache) hashes the modules of ``hilal/mapping/`` too: a
    copy of the package fingerprints as the package does, and an edit of one mapping module changes it."""
    import shutil
    from pathlib import Path

    import hilal
    from hilal.paths import code_fingerprint

    src = Path(hilal.__file__).parent
    copies = {name: tmp_path / name / "hilal" for name in ("same", "edited")}
    for dst in copies.values():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(copies["same"]) == code_fingerprint(src)
    modules = sorted((src / "mapping").glob("*.py"))
    assert modules
    for module in modules:
        with open(copies["edited"] / "mapping" / module.name, "a") as f:
            f.write("# edited\n")
        assert code_fingerprint(copies["edited"]) != code_fingerprint(src), module.name
        code_fingerprint.cache_clear()
        (copies["edited"] / "mapping" / module.name).write_bytes(module.read_bytes())


@pytest.mark.parametrize("search", ["screen", "bisect"])
def test_hilal_offloads_a_prefix_of_the_curvature_order(resnet8_digits, digits, search):
    cfg = tiny_cfg(search=search, hessian={"probes": 8, "eli_samples": 4, "first_order_samples": 8})
    res = run_mapping("hilal", resnet8_digits, digits, cfg, progress=False)
    m = res.metrics
    assert m.loc[m["cluster"] == "robust", "eli"].mean() < m.loc[m["cluster"] == "sensitive", "eli"].mean()
    m = m.assign(key=m["eli_second"] / m["macs"])  # the default order: ascending curvature term per MAC
    robust = m[m["cluster"] == "robust"].sort_values("key", kind="stable")["layer"].tolist()
    sens = m[m["cluster"] == "sensitive"].sort_values("key", kind="stable")["layer"].tolist()
    assert res.extra["robust"] == robust and res.extra["sensitive"] == sens
    order = robust + sens
    got = set(res.analog_layers)
    assert got == set(order[: len(got)])  # robust cluster first, then the sensitive one
    if search == "bisect":
        assert set(robust) <= got  # the robust cluster is offloaded unconditionally
    h = res.history
    kept = h[h["kept"]]
    assert (kept["score"] >= kept["floor"]).all() or search == "bisect"
    assert res.timings["total_s"] >= res.timings["search_s"] + res.timings["mapping_s"]


@pytest.mark.parametrize("cost", ["curvature", "eli"])
def test_hilal_knapsack_stage_carries_the_most_macs_for_its_eli(resnet8_digits, digits, cost):
    cfg = tiny_cfg(hessian={"probes": 8, "eli_samples": 4, "first_order_samples": 8}, cost=cost)
    assert cfg.search == "knapsack" and MappingConfig().cost == "curvature"  # the defaults
    res = run_mapping("hilal", resnet8_digits, digits, cfg, progress=False)
    m = res.metrics.set_index("layer")
    h = res.history
    kept = h[h["kept"]]
    assert (kept["score"] >= kept["floor"]).all()
    stages = h[h["step"].str.startswith("stage-")]
    assert len(stages) >= 1
    robust = res.extra["robust"]
    first = stages.iloc[0]["layers"].split(",")
    if stages.iloc[0]["step"].startswith("stage-0-"):
        forced = robust
        assert set(robust) <= set(first)  # a first-round stage carries the robust cluster
    else:  # only when the robust cluster alone failed its screen; the next round searches every layer
        forced = []
        alone = h[h["layers"] == ",".join(robust)]
        assert len(alone) == 1 and alone["step"].iloc[0].startswith("screen-0-")
        assert alone["zero_shot"].iloc[0] < alone["floor"].iloc[0]
    # ... and, of all sets holding the forced layers, the most MACs for an ELI budget no larger than its own
    cost = {"curvature": "eli_second", "eli": "eli"}[cost]
    budget = m.loc[first, cost].sum()
    free = [n for n in m.index if n not in forced]
    best = max(m.loc[forced + list(sub), "macs"].sum() for r in range(len(free) + 1)
               for sub in itertools.combinations(free, r) if m.loc[forced + list(sub), cost].sum() <= budget + 1e-12)
    assert m.loc[first, "macs"].sum() == best
    assert set(res.analog_layers) == set().union(*(set(x.split(",")) for x in kept["layers"]))
    assert res.timings["total_s"] >= res.timings["search_s"] + res.timings["mapping_s"]


def test_paper_variant_and_ablations(resnet8_digits, digits):
    cfg = tiny_cfg(hessian={"probes": 4, "power_iters": 5}, ablation="trace-only", paper_guard=False)
    res = run_mapping("hilal-paper", resnet8_digits, digits, cfg, progress=False)
    m = res.metrics
    robust = m[m["cluster"] == "robust"].sort_values(["eli_norm", "r"])["layer"].tolist()
    assert res.extra["robust"] == robust
    assert sorted(res.analog_layers) == sorted(robust)  # sensitive layers are never tried
    w = dict(resnet8_digits.named_modules())
    row = m.iloc[0]
    sigma = 0.08 * float(w[row["layer"]].weight.detach().abs().max())
    assert row["eli_norm"] == pytest.approx(0.5 * sigma**2 * row["trace"] / row["params"])
    assert "accuracy_t0_mean" in res.extra and res.extra["variant"] == "paper-faithful"


def test_methods_registry():
    assert set(METHODS.names()) >= {"hilal", "hilal-paper", "hilal-zeroshot", "max-norm", "lionheart", "random",
                                    "all-analog", "all-analog-ft", "all-digital"}


def test_snapshot_round_trips_analog_weights_without_context_placeholders(resnet8_digits):
    """``snapshot``/``restore`` carry every tile weight and buffer but skip aihwkit's ``AnalogContext``
    parameters (data-less placeholders that aihwkit 1.2 refuses to clone)."""
    import torch
    from aihwkit.optim.context import AnalogContext

    from hilal.analog import to_analog
    from hilal.mapping import restore, snapshot

    model = to_analog(resnet8_digits, mappable_layers(resnet8_digits)[:3], "pcm_harsh")
    ctx = [k for k, v in model.named_parameters() if isinstance(v, AnalogContext)]
    assert ctx
    snap = snapshot(model)
    assert not any(k.endswith(c) for k in snap for c in ctx)
    before = {k: v.clone() for k, v in snap.items()}
    with torch.no_grad():
        for p in model.parameters():
            if not isinstance(p, AnalogContext):
                p.add_(1.0)
    restore(model, snap)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(KeyError):
        restore(model, {k: v for k, v in snap.items() if "tile.weight" not in k})


def test_trim_adopts_the_retrained_weights_and_resumes(resnet8_digits, digits, tmp_path):
    """A trimmed stage keeps the rejected stage's retrained model: its kept layers' tiles as trained, the
    dropped layers digital with their trained weights; journaled, so a resumed run replays it exactly."""
    import torch

    from hilal.mapping import _Run

    stage, keep = ["layer2.0.conv2", "layer3.0.conv2", "fc"], ["layer3.0.conv2", "fc"]

    def trimmed(cfg):
        run = _Run("hilal", resnet8_digits, digits, cfg, progress=False)
        with pytest.raises(HilalError, match="no rejected stage"):
            run.screen("x", keep, retrained=True)
        assert not run.stage("s", stage, lambda s: False, keep_rejected=True)
        staged, trained, seconds = run.rejected
        with pytest.raises(HilalError, match="not in the rejected stage.*layer2.0.conv2"):
            run.screen("y", ["conv1"], retrained=True)
        z = run.screen("t", keep, retrained=True)
        run.adopt("kept", keep, z)
        return run, trained, seconds

    cfg = tiny_cfg(workdir=str(tmp_path))
    run, trained, seconds = trimmed(cfg)
    assert analog_layers(run.model) == keep and run.layers == keep and run.rejected is None
    for n in keep:  # the tiles as retrained, not converted again
        for a, b in zip(run.model.get_submodule(n).get_weights(), trained.get_submodule(n).get_weights(),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = run.model.get_submodule("layer2.0.conv2")
    assert isinstance(dropped, nn.Conv2d)
    w, _ = trained.get_submodule("layer2.0.conv2").get_weights()
    torch.testing.assert_close(dropped.weight.detach(), w.view_as(dropped.weight), rtol=0, atol=0)
    assert not torch.equal(dropped.weight, resnet8_digits.get_submodule("layer2.0.conv2").weight)
    assert run.timings["mapping_s"] == pytest.approx(seconds)  # the retraining produced the kept model
    h = run.rows
    assert [r["kept"] for r in h] == [False, False, True] and h[-1]["score"] == h[1]["score"]

    again, _, _ = trimmed(cfg)  # resumed from the journal: nothing recomputed, the same model
    assert all(r["replayed"] for r in again.rows)
    from hilal.mapping import snapshot

    a, b = snapshot(again.model), snapshot(run.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_confirmed_trim_keeps_a_subset_only_on_a_fresh_evaluation(resnet8_digits, digits, monkeypatch):
    """With ``confirm``, :meth:`_Run.adopt` re-scores the trimmed model at seeds from ``CONFIRM_SEED``: the
    score it is kept on is that fresh evaluation (its screen stays as ``zero_shot``), and a subset that fails
    it is not kept: the model, its layers and the timings stay as they were, and the rejected stage stays
    available for another subset."""
    import hilal.mapping as hm
    from hilal.evaluate import inference_state, noisy_scores, program_repetition

    stage, keep = ["layer2.0.conv2", "layer3.0.conv2", "fc"], ["layer3.0.conv2", "fc"]

    def trimmed(cfg):
        run = hm._Run("hilal", resnet8_digits, digits, cfg, progress=False)
        assert not run.stage("s", stage, lambda s: False, keep_rejected=True)
        z = run.screen("t", keep, retrained=True)
        return run, z, run.adopt("kept", keep, z)

    cfg = tiny_cfg(max_rounds=1, reps=3, confirm=True, drop_threshold=1.0)  # every score clears the floor
    run, z, ok = trimmed(cfg)
    h = run.rows[-1]
    assert ok and run.layers == keep and analog_layers(run.model) == keep and run.rejected is None
    fresh = noisy_scores(run.model, digits, cfg.t_eval, cfg.reps, hm.CONFIRM_SEED + cfg.seed + 7919 * 2,
                         split="calib")
    assert h["kept"] and h["score"] == pytest.approx(float(fresh.mean()), abs=1e-12) and h["zero_shot"] == z
    # other programmings (compared on logits: the means of 3 accuracies on 360 samples can coincide)
    x = digits.calib.tensors[0][:64]

    def programmed_logits(seed):
        with inference_state(run.model), torch.no_grad():
            program_repetition(run.model, cfg.t_eval, seed, 0)
            return run.model(x)

    screened = noisy_scores(run.model, digits, cfg.t_eval, cfg.reps, cfg.seed + 7919, split="calib")
    assert float(screened.mean()) == pytest.approx(z, abs=1e-12)  # the screen's own programmings
    screen_logits = programmed_logits(cfg.seed + 7919)
    assert torch.equal(screen_logits, programmed_logits(cfg.seed + 7919))
    assert not torch.allclose(screen_logits, programmed_logits(hm.CONFIRM_SEED + cfg.seed + 7919 * 2))
    without = trimmed(replace(cfg, confirm=False))[0].rows[-1]
    assert without["score"] == without["zero_shot"] == z

    monkeypatch.setattr(hm_run, "_in_loop_score", lambda m, s, c, seed, drift: float(seed < hm.CONFIRM_SEED))
    cfg = replace(cfg, drop_threshold=0.5)  # the fresh evaluation (scripted: 0) fails the floor
    run, z, ok = trimmed(cfg)
    h = run.rows[-1]
    assert not ok and not h["kept"] and h["score"] == 0.0 and h["zero_shot"] == z
    assert run.layers == [] and analog_layers(run.model) == [] and run.rejected[0] == stage
    assert run.timings["mapping_s"] == 0.0


def test_confirmed_trim_tries_the_cleared_subsets_largest_first():
    """``_trim`` adopts the largest subset that cleared the floor on its screen; only when ``adopt`` refuses
    it (``confirm``'s fresh evaluation) does it try the smaller ones that cleared, largest first."""
    from hilal.mapping import _trim

    class Trims:
        def __init__(self, refuse):
            self.refuse, self.tried = refuse, []

        def screen(self, key, layers, threshold=None, retrained=False):
            return 1.0 if len(layers) <= 4 else 0.0  # subsets of up to four layers clear the floor of 0.5

        def adopt(self, key, layers, score):
            self.tried.append((key, len(layers)))
            return len(layers) not in self.refuse

    cost = {n: float(i + 1) for i, n in enumerate("abcdef")}  # frontier: a, ab, ..., abcde; screens: abc, abcd, abcde
    macs = dict.fromkeys(cost, 1)
    for refuse, tried, kept in (((), [4], True), ((4,), [4, 3], True), ((3, 4), [4, 3], False)):
        run = Trims(set(refuse))
        run.macs = run.value = macs
        assert _trim(run, "t", list(cost), cost, 0.5, 0.0) is kept
        assert [n for _, n in run.tried] == tried
        assert run.tried[0][0] == "t" and all(k.startswith("t-") and k.endswith("-adopt") for k, _ in run.tried[1:])


def test_scan_retrains_the_first_single_layer_near_the_floor():
    """``_scan`` screens single layers in the order given, retrains only the first whose zero-shot score is
    within one standard error of the floor, and keeps it only if retraining lifts it over the floor."""
    from hilal.mapping import _scan

    class Singles:
        def __init__(self, zero, retrained, se=0.01):
            self.zero, self.retrained, self.se = zero, retrained, se
            self.rows, self.layers, self.screened, self.staged = [], [], [], []

        def screen(self, key, layers, threshold=None):
            (n,) = layers
            self.screened.append(n)
            self.rows.append({"zero_shot_se": self.se})
            return self.zero[n]

        def stage(self, key, layers, accept=None, zero_shot=False):
            (n,) = layers
            self.staged.append(n)
            assert zero_shot == self.zero[n]
            ok = accept(self.retrained[n])
            if ok:
                self.layers.append(n)
            return ok

    floor = 0.5
    zero = {"a": 0.40, "b": 0.485, "c": 0.495, "d": 0.60}
    run = Singles(zero, {"a": 0.6, "b": 0.6, "c": 0.55, "d": 0.7})
    assert _scan(run, "s", ["a", "b", "c", "d"], floor)
    assert run.screened == ["a", "b", "c"] and run.staged == ["c"] and run.layers == ["c"]  # b: 1.5 se short
    run = Singles(zero, {"a": 0.6, "b": 0.6, "c": 0.45, "d": 0.7})
    assert not _scan(run, "s", ["c", "d"], floor)  # one retraining at most, even when it is rejected
    assert run.screened == ["c"] and run.staged == ["c"] and run.layers == []
    run = Singles(zero, {n: 1.0 for n in zero})
    assert not _scan(run, "s", ["a", "b"], floor) and run.staged == []
    assert not _scan(run, "s", [], floor)


def test_a_score_equal_to_the_floor_passes(resnet8_digits, digits):
    """Float rounding must not reject a score that equals the floor (a mean of counts over the split)."""
    import numpy as np

    from hilal.mapping import _Run

    run = _Run("lionheart", resnet8_digits, digits, tiny_cfg(), progress=False)
    run.baseline = 356 / 360
    scores = np.array([349] * 8 + [348] * 2) / 360  # mean 348.8 / 360 = baseline - 0.02 exactly
    assert float(scores.mean()) < 356 / 360 - 0.02  # the rounding this guards against
    assert float(scores.mean()) >= run.floor()
    assert 348.7 / 360 < run.floor()  # still a floor


@pytest.mark.parametrize("zero_shot, kept", [(0.99, True), (0.979, False)])
def test_stage_keeps_a_cleared_candidate_when_retraining_does_not_beat_it(resnet8_digits, digits, monkeypatch,
                                                                          zero_shot, kept):
    """A stage whose zero-shot score clears the floor is kept with the weights it had when no retraining
    round beats that score (two rounds, patience 2); one that misses the floor is rejected, its untouched
    weights kept aside for the trim. The rounds' scores are scripted (:func:`script_rounds`)."""
    import torch

    import hilal.mapping as hm

    run = hm._Run("hilal", resnet8_digits, digits, tiny_cfg(patience=2, max_rounds=6), progress=False)
    run.baseline = 1.0  # floor 0.98
    script_rounds(monkeypatch, [0.95, 0.97, 0.96, 0.95, 0.94, 0.93])
    ok = run.stage("s", ["fc"], lambda sc: sc >= run.floor(), zero_shot=zero_shot, keep_rejected=True)
    row = run.rows[-1]
    assert ok == kept and row["rounds"] == 2 and row["score"] == zero_shot
    model = run.model if kept else run.rejected[1]
    assert analog_layers(model) == ["fc"]
    assert torch.equal(model.conv1.weight, resnet8_digits.conv1.weight)  # no fine-tuning step kept


def test_recheck_rescores_the_final_mapping_on_fresh_programmings(resnet8_digits, digits):
    """recheck scores the mapped model on the calibration split over programmings the search never drew: its
    mean agrees with an independent Monte-Carlo of that model, its standard error with the spread of its
    means over seeds, and its margin is taken against the floor the search accepted the mapping at."""
    import numpy as np

    from hilal.evaluate import noisy_scores

    res = run_mapping("all-analog", resnet8_digits, digits, tiny_cfg(), progress=False)
    assert res.extra["floor"] == pytest.approx(res.extra["baseline_calib"] - tiny_cfg().drop_threshold, abs=1e-8)
    checks = [recheck(res, digits, reps=4, seed=s) for s in range(8)]
    means = np.array([c["calib_mean"] for c in checks])
    se = float(np.median([c["calib_se"] for c in checks]))
    assert 0.4 < means.std(ddof=1) / se < 2.5  # each seed draws its own programmings
    ref = noisy_scores(res.model, digits, res.t_eval, 24, seed=7, split="calib")
    assert abs(means.mean() - ref.mean()) < 4 * math.hypot(se / math.sqrt(8), ref.std(ddof=1) / math.sqrt(24))
    assert means.mean() < res.extra["baseline_calib"] - 0.05  # the analog model, not the digital one
    for c in checks:
        assert c["reps"] == 4 and c["floor"] == res.extra["floor"]
        assert c["margin"] == pytest.approx(c["calib_mean"] - c["floor"])
        assert c["z"] == pytest.approx(c["margin"] / c["calib_se"]) and c["holds_floor"] == (c["margin"] >= 0)
    # the stored (result.json) form with the model alongside gives the same check
    assert recheck(res.to_dict(), digits, reps=4, seed=3, model=res.model) == checks[3]
    assert checks[0]["accepted"] is None  # all-analog keeps no step: nothing was accepted on a score
    with pytest.raises(HilalError, match="no model= was given"):
        recheck(res.to_dict(), digits)
    with pytest.raises(HilalError, match="floor"):
        recheck({k: v for k, v in res.to_dict().items() if k != "floor"}, digits, model=res.model)
    res.model = None
    with pytest.raises(HilalError, match="model"):
        recheck(res, digits)
    d = run_mapping("all-digital", resnet8_digits, digits, tiny_cfg(), progress=False)
    with pytest.raises(HilalError, match="reps >= 2"):
        recheck(d, digits, reps=1)
    c = recheck(d, digits, reps=3)  # a digital model scores the same at every programming
    assert c["calib_se"] == 0.0 and c["z"] is None and c["holds_floor"]
    assert fresh_pass_rate(c, 10) == 1.0 and fresh_pass_rate({**c, "margin": -1e-9}, 10) == 0.0


def test_fresh_pass_rate_matches_repeated_acceptance_tests():
    """Monte-Carlo: programmings score like accuracies on 360 calibration samples, each programming with its
    own accuracy. A recheck over 4000 programmings gives the chance that a test of 10 programmings clears the
    floor; it matches the frequency over 20000 such tests, at floors around the mean, and for tests of 5."""
    import numpy as np

    rng = np.random.default_rng(0)

    def scores(n: int) -> np.ndarray:
        return rng.binomial(360, np.clip(rng.normal(0.962, 0.004, n), 0, 1)) / 360

    x = scores(4000)
    for floor in (0.958, 0.962, 0.9635, 0.966):
        check = {"margin": x.mean() - floor, "calib_se": x.std(ddof=1) / math.sqrt(len(x)), "reps": len(x)}
        for test_reps in (10, 5):
            freq = float((scores(20000 * test_reps).reshape(-1, test_reps).mean(1) >= floor - 1e-12).mean())
            assert fresh_pass_rate(check, test_reps) == pytest.approx(freq, abs=0.03), (floor, test_reps)
    assert fresh_pass_rate({"margin": 0.0, "calib_se": 0.01, "reps": 5}, 10) == pytest.approx(0.5)
    with pytest.raises(HilalError, match="test_reps must be at least 1"):
        fresh_pass_rate(check, 0)
