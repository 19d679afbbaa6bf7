"""Accuracy under programming noise and drift: seeding, clean-weight restoration, tidy tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hilal.analog import analog_tiles, mappable_layers, to_analog
from hilal.evaluate import (
    ONE_DAY,
    ONE_YEAR,
    drift_table,
    inference_state,
    noisy_scores,
    program_and_drift,
    summarize,
    time_label,
)
from hilal.train import score


@pytest.fixture(scope="module")
def digital_acc(resnet8_digits, digits):
    return score(resnet8_digits, digits, "test")


@pytest.fixture(scope="module")
def harsh(resnet8_digits):
    return to_analog(resnet8_digits, mappable_layers(resnet8_digits), "pcm_harsh")


def _tile_state(model):
    return [t.tile.weight.detach().clone() for t in analog_tiles(model)]


def test_noisy_scores_seeded(harsh, digits):
    a = noisy_scores(harsh, digits, ONE_DAY, reps=3, seed=0)
    b = noisy_scores(harsh, digits, ONE_DAY, reps=3, seed=0)
    c = noisy_scores(harsh, digits, ONE_DAY, reps=3, seed=1)
    assert a.shape == (3,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 0 and len(set(a.tolist())) > 1  # repetitions are independent programmings
    assert np.all((a >= 0) & (a <= 1))


def test_sequential_stop_keeps_each_repetitions_seed(harsh, digits):
    from hilal.mapping import _decided

    full = noisy_scores(harsh, digits, ONE_DAY, reps=6, seed=4, split="calib")
    seen = []
    part = noisy_scores(harsh, digits, ONE_DAY, reps=6, seed=4, split="calib",
                        stop=lambda x: seen.append(len(x)) or len(x) == 2)
    np.testing.assert_array_equal(part, full[:2])  # stopped after two, the same two programmings
    assert seen == [1, 2]
    # the sequential test: decided only with 3+ repetitions and a mean 3 standard errors from the threshold
    assert not _decided(full[:2], 0.0)
    assert _decided(full, full.mean() - 4 * full.std(ddof=1) / np.sqrt(6))
    assert not _decided(full, full.mean() - 2 * full.std(ddof=1) / np.sqrt(6))


def test_one_year_harsh_is_clearly_below_digital(harsh, digits, digital_acc):
    year = noisy_scores(harsh, digits, ONE_YEAR, reps=3, seed=0)
    assert digital_acc > 0.9
    assert year.mean() < digital_acc - 0.1


def test_ideal_preset_matches_digital_exactly(resnet8_digits, digits, digital_acc):
    ideal = to_analog(resnet8_digits, mappable_layers(resnet8_digits), "ideal")
    s = noisy_scores(ideal, digits, ONE_YEAR, reps=2, seed=0)
    np.testing.assert_array_equal(s, [digital_acc, digital_acc])


def test_digital_model_scored_once_and_repeated(resnet8_digits, digits, digital_acc):
    np.testing.assert_array_equal(noisy_scores(resnet8_digits, digits, ONE_DAY, reps=4), [digital_acc] * 4)


def test_inference_state_restores_clean_weights(resnet8_digits, digits):
    model = to_analog(resnet8_digits, ["conv1", "layer2.0.conv2", "fc"], "pcm_harsh")
    model.train()
    clean = _tile_state(model)
    with inference_state(model):
        assert not model.training
        torch.manual_seed(0)
        program_and_drift(model, ONE_YEAR)
        noisy = _tile_state(model)
        assert any(not torch.equal(w, n) for w, n in zip(clean, noisy, strict=True))
    assert model.training
    for w, after in zip(clean, _tile_state(model), strict=True):
        assert torch.equal(w, after)
    for t in analog_tiles(model):
        assert t.programmed_weights is None and t.reference_combined_weights is None

    noisy_scores(model, digits, ONE_DAY, reps=2, seed=0)
    for w, after in zip(clean, _tile_state(model), strict=True):
        assert torch.equal(w, after)
    # an exception inside the block restores them too
    with pytest.raises(RuntimeError), inference_state(model):
        program_and_drift(model, ONE_DAY)
        raise RuntimeError("interrupted")
    for w, after in zip(clean, _tile_state(model), strict=True):
        assert torch.equal(w, after)


def test_repetitions_do_not_compound(resnet8_digits, digits):
    """Each repetition programs from the clean weights: a later call repeats the first one's numbers."""
    model = to_analog(resnet8_digits, ["conv1", "fc"], "pcm_harsh")
    first = noisy_scores(model, digits, ONE_DAY, reps=2, seed=5)
    noisy_scores(model, digits, ONE_YEAR, reps=2, seed=9)
    np.testing.assert_array_equal(noisy_scores(model, digits, ONE_DAY, reps=2, seed=5), first)


def test_drift_table_tidy_and_summary(harsh, digits):
    times = [60.0, ONE_YEAR]
    df = drift_table(harsh, digits, times=times, reps=2, seed=0, progress=False, method="all-analog")
    assert list(df.columns) == ["method", "t_inference", "rep", "accuracy"]
    assert len(df) == len(times) * 2
    assert df["t_inference"].tolist() == [60.0, 60.0, ONE_YEAR, ONE_YEAR]
    assert df["rep"].tolist() == [0, 1, 0, 1]
    assert (df["method"] == "all-analog").all()
    np.testing.assert_array_equal(df.loc[df.t_inference == ONE_YEAR, "accuracy"].to_numpy(),
                                  noisy_scores(harsh, digits, ONE_YEAR, reps=2, seed=0))

    summ = summarize(df)
    assert list(summ.columns) == ["t_inference", "mean", "std", "reps"]
    for t in times:
        acc = df.loc[df.t_inference == t, "accuracy"].to_numpy()
        row = summ.loc[summ.t_inference == t].iloc[0]
        assert row["mean"] == pytest.approx(acc.mean())
        assert row["std"] == pytest.approx(acc.std(ddof=1))
        assert row["reps"] == 2


def test_summarize_groups_by_labels():
    df = pd.DataFrame({"method": ["a", "a", "b", "b", "b"], "t_inference": [1.0] * 5,
                       "rep": [0, 1, 0, 1, 2], "accuracy": [0.5, 0.7, 0.1, 0.2, 0.6]})
    s = summarize(df, by=["method", "t_inference"])
    assert s["method"].tolist() == ["a", "b"]
    assert s["mean"].tolist() == pytest.approx([0.6, 0.3])
    assert s["std"].tolist() == pytest.approx([np.std([0.5, 0.7], ddof=1), np.std([0.1, 0.2, 0.6], ddof=1)])
    assert s["reps"].tolist() == [2, 3]


def test_time_label():
    assert time_label(ONE_DAY) == "1 day"
    assert time_label(ONE_YEAR) == "1 year"
    assert time_label(60.0) == "1 min"
    assert time_label(7200.0) == "2 h"
    assert time_label(3 * ONE_DAY) == "3 day"
    assert time_label(5.0) == "5 s"
