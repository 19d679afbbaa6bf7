"""ELI validity against its ceiling: the measured sensitivity with its draws (against the reference
single-layer measurement), split-half reliability and its ceiling (against hand computation)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from hilal.evaluate import single_layer_sensitivity
from hilal.registry import HilalError
from hilal.validity import ceiling, measured_sensitivity, split_half, validity_table


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
