"""ELI validity against its ceiling: the measured sensitivity with its draws (against the reference
single-layer measurement), split-half reliability and its ceiling (against hand computation)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from hilal.attribution import noise_conditions
from hilal.evaluate import single_layer_sensitivity
from hilal.registry import HilalError
from hilal.validity import (
    ceiling,
    layer_agreement,
    measured_sensitivity,
    split_half,
    validity_table,
)


def test_measured_sensitivity_is_the_single_layer_measurement_with_its_draws(resnet8_digits, digits):
    layers = ["conv1", "layer2.0.conv1", "fc"]
    ref = single_layer_sensitivity(resnet8_digits, digits, "pcm_harsh", 86400.0, reps=3, seed=4, layers=layers)
    table, draws = measured_sensitivity(resnet8_digits, digits, "pcm_harsh", 86400.0, reps=3, seed=4, layers=layers)
    pd.testing.assert_frame_equal(table, ref)
    means = draws.groupby("layer", sort=False)["loss_increase"].mean()
    np.testing.assert_allclose(means.to_numpy(), ref["loss_increase"].to_numpy(), rtol=0, atol=1e-12)
    assert len(draws) == 9 and draws["rep"].tolist() == [0, 1, 2] * 3
    with pytest.raises(HilalError, match="reps"):
        measured_sensitivity(resnet8_digits, digits, "pcm", reps=1)


def _draws(matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame([{"layer": f"l{i}", "rep": r, "loss_increase": float(v)}
                         for i, row in enumerate(matrix) for r, v in enumerate(row)])


def test_split_half_by_hand():
    """Even reps (0, 2) and odd reps (1, 3) averaged per layer, their Spearman r stepped up to 2r / (1 + r)."""
    m = np.array([[1.0, 2.0, 3.0, 0.0], [2.0, 1.0, 2.0, 4.0], [5.0, 3.0, 4.0, 6.0], [0.0, 9.0, 1.0, 0.5]])
    even, odd = m[:, [0, 2]].mean(1), m[:, [1, 3]].mean(1)
    r = spearmanr(even, odd)[0]
    assert split_half(_draws(m)) == pytest.approx(2 * r / (1 + r))
    assert split_half(_draws(np.repeat(np.arange(5.0)[:, None], 4, 1))) == pytest.approx(1.0)  # no noise at all
    flipped = np.stack([np.arange(5.0), -np.arange(5.0)], 1)  # the halves rank the layers in opposite orders
    assert split_half(_draws(flipped)) == -1.0
    with pytest.raises(HilalError, match="3 layers"):
        split_half(_draws(m[:2]))


def test_ceiling_is_the_square_root_of_the_reliability():
    assert ceiling(0.81) == pytest.approx(0.9) and ceiling(1.0) == 1.0
    assert ceiling(0.0) == 0.0 and ceiling(-0.3) == 0.0


def test_validity_table_from_done_measurements():
    """With a metric equal to the measured means its correlation is 1; with one reversed, -1; each row carries
    the reliability of its measurement and its ceiling."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 4)) + np.arange(6.0)[:, None] * 2
    draws = _draws(m)
    means = draws.groupby("layer", sort=False)["loss_increase"].mean()
    metrics = pd.DataFrame({"layer": means.index, "eli": means.to_numpy(), "trace": -means.to_numpy(),
                            "lambda_max": means.to_numpy() ** 3, "concentration": rng.normal(size=6)})
    table = validity_table({"toy": None}, None, ["pcm"], done={("toy", "pcm"): (metrics, draws)}).set_index("metric")
    assert table.loc["eli", "spearman"] == pytest.approx(1.0) and table.loc["lambda_max", "spearman"] == 1.0
    assert table.loc["trace", "spearman"] == pytest.approx(-1.0)
    rel = split_half(draws)
    assert (table["split_half"] == rel).all() and (table["ceiling"] == math.sqrt(max(rel, 0))).all()


def test_split_half_over_random_halves_is_the_mean_over_every_split():
    """With 4 repetitions there are 3 ways to halve them; many random halves average r over those 3 (each
    equally likely), then step it up; 0 halves is the even/odd split alone."""
    m = np.array([[1.0, 2.0, 3.0, 0.0], [2.0, 1.0, 2.0, 4.0], [5.0, 3.0, 4.0, 6.0], [0.0, 9.0, 1.0, 0.5],
                  [3.0, 3.5, 2.0, 1.0]])
    rs = [spearmanr(m[:, list(a)].mean(1), m[:, [c for c in range(4) if c not in a]].mean(1))[0]
          for a in ((0, 1), (0, 2), (0, 3))]
    r = float(np.mean(rs))
    assert split_half(_draws(m), halves=4000, seed=1) == pytest.approx(2 * r / (1 + r), abs=0.02)
    assert split_half(_draws(m), halves=0) == split_half(_draws(m))
    assert split_half(_draws(m), halves=0) != pytest.approx(2 * r / (1 + r), abs=0.02)  # the cases differ here
    with pytest.raises(HilalError, match="halves"):
        split_half(_draws(m), halves=-1)


def test_layer_agreement_ranks_gaps_and_z_by_hand():
    draws = _draws(np.array([[1.0, 3.0], [4.0, 6.0], [0.0, 0.0], [10.0, 12.0]]))  # means 2, 5, 0, 11
    metrics = pd.DataFrame({"layer": ["l3", "l2", "l1", "l0"], "eli": [11.0, 1.0, 8.0, 2.0],
                            "eli_se": [0.0, 1.0, 1.0, 1.0]})
    a = layer_agreement(metrics, draws).set_index("layer")
    assert a.index.tolist() == ["l0", "l1", "l2", "l3"]  # the draws' order
    assert a["measured"].tolist() == [2.0, 5.0, 0.0, 11.0]
    assert a["rank_measured"].tolist() == [3.0, 2.0, 4.0, 1.0] and a["rank_eli"].tolist() == [3.0, 2.0, 4.0, 1.0]
    # l1: ELI 8 vs 5 measured; measured se = std([4, 6]) / sqrt(2) = 1
    assert a.loc["l1", "measured_se"] == pytest.approx(1.0) and a.loc["l1", "z"] == pytest.approx(3 / math.sqrt(2))
    assert a.loc["l2", "z"] == pytest.approx(1.0) and (a["rank_gap"] == 0).all()
    swapped = metrics.assign(eli=[11.0, 1.0, 0.5, 2.0])  # l1 now ranked last by ELI, l2 third
    b = layer_agreement(swapped, draws).set_index("layer")
    assert b.loc["l1", "rank_gap"] == 2.0 and b.loc["l2", "rank_gap"] == -1.0 and b.loc["l0", "rank_gap"] == -1.0
    no_se = layer_agreement(metrics.drop(columns="eli_se"), draws)
    assert no_se["eli_se"].isna().all() and no_se["z"].isna().all()
    with pytest.raises(HilalError, match="no row"):
        layer_agreement(metrics[metrics["layer"] != "l2"], draws)
    with pytest.raises(HilalError, match="no column"):
        layer_agreement(metrics, draws, metric="trace")


def test_noise_conditions_switch_the_sources_off():
    cond = noise_conditions("pcm_harsh", removed=["clipping", "output"])
    assert list(cond) == ["pcm_harsh", "weights only", "without clipping", "without output"]
    w = cond["weights only"]
    assert w.forward.is_perfect and w.noise_model.prog_noise_scale > 0 and w.drift_compensation is not None
    assert cond["without output"].forward.out_noise == 0 and not cond["without output"].forward.is_perfect
    assert cond["without clipping"].forward.out_bound == -1.0 and cond["without clipping"].forward.out_noise > 0
    assert list(noise_conditions("pcm", removed=[])) == ["pcm", "weights only"]
    with pytest.raises(HilalError, match="unknown noise source"):
        noise_conditions("pcm_harsh", removed=["bogus"])


def test_validity_table_takes_labelled_conditions():
    """A mapping of labels to presets: each row carries its label; ``done`` is keyed by the label."""
    rng = np.random.default_rng(1)
    draws = _draws(rng.normal(size=(5, 6)) + np.arange(5.0)[:, None] * 3)
    means = draws.groupby("layer", sort=False)["loss_increase"].mean()
    metrics = pd.DataFrame({"layer": means.index, "eli": means.to_numpy(), "trace": means.to_numpy(),
                            "lambda_max": -means.to_numpy(), "concentration": means.to_numpy()})
    done = {("toy", "weights only"): (metrics, draws), ("toy", "pcm"): (metrics.assign(eli=-metrics["eli"]), draws)}
    table = validity_table({"toy": None}, None, {"pcm": "pcm", "weights only": object()}, done=done, halves=50)
    eli = table[table["metric"] == "eli"].set_index("preset")["spearman"]
    assert eli["weights only"] == pytest.approx(1.0) and eli["pcm"] == pytest.approx(-1.0)
    assert (table["split_half"] == split_half(draws, halves=50)).all()
