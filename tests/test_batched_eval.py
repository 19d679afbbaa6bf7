"""The batched evaluation engine gives the loop's results: per programming, to the bit, random state included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hilal.analog import get_preset, mappable_layers, to_analog
from hilal.batched_eval import unsupported
from hilal.data import load_dataset, loader
from hilal.evaluate import noisy_metrics, per_repetition
from hilal.models import model_for
from hilal.registry import HilalError

PRESETS = ("pcm", "pcm_harsh", "pcm_hilal", "ideal")


@pytest.fixture(scope="module")
def sample():
    return load_dataset("squad_sample", seed=0)


def _analog(name, splits, preset="pcm_harsh"):
    torch.manual_seed(0)
    model = model_for(name, splits).eval()
    return to_analog(model, mappable_layers(model), preset)


def _both(model, fn, reps=3, seed=0, **kw):
    """``fn``'s results and torch's random state afterwards, per engine."""
    out = {}
    for engine in ("loop", "batched"):
        torch.manual_seed(123)
        res = per_repetition(model, fn, 86400.0, reps, seed, engine=engine, **kw)
        out[engine] = (res, torch.get_rng_state())
    return out


def _assert_same(out):
    (loop, rng_loop), (batched, rng_batched) = out["loop"], out["batched"]
    assert len(loop) == len(batched)
    for a, b in zip(loop, batched, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_loop, rng_batched)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["resnet8", "resnet20", "vit_tiny"])
def test_batched_outputs_equal_the_loop(digits, name, preset):
    analog = _analog(name, digits, preset)
    assert unsupported(analog) is None
    x = next(iter(loader(digits.test, batch_size=48)))[0]
    out = _both(analog, lambda m: m(x))
    _assert_same(out)
    if preset != "ideal":  # the programmings differ from each other
        assert not torch.equal(out["loop"][0][0], out["loop"][0][1])


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_mobilebert_outputs_equal_the_loop(sample, preset):
    analog = _analog("mobilebert_tiny", sample, preset)
    batch = next(iter(loader(sample.calib, batch_size=4)))
    inputs = {k: v for k, v in batch.items() if "positions" not in k}
    _assert_same(_both(analog, lambda m: m(**inputs).start_logits, reps=2))


def test_batched_scores_equal_the_loop_with_qa_evaluator(sample):
    analog = _analog("mobilebert_tiny", sample)
    a = noisy_metrics(analog, sample, reps=2, split="calib", engine="loop")
    b = noisy_metrics(analog, sample, reps=2, split="calib", engine="batched")
    assert list(a.columns) == ["accuracy", "em", "f1"]
    assert a.equals(b)


def test_batched_noisy_metrics_equal_the_loop_with_early_stop(digits):
    analog = _analog("resnet8", digits)
    stops = []

    def stop(scores):
        stops.append(len(scores))
        return len(scores) >= 4

    rows = {}
    for engine in ("loop", "batched"):
        torch.manual_seed(7)
        rows[engine] = (noisy_metrics(analog, digits, reps=10, seed=3, stop=stop, engine=engine),
                        torch.get_rng_state())
    assert len(rows["loop"][0]) == 4 and rows["loop"][0].equals(rows["batched"][0])
    assert torch.equal(rows["loop"][1], rows["batched"][1])
    assert stops == [1, 2, 3, 4] * 2  # the test sees the scores one repetition at a time on both engines
    assert rows["loop"][0]["accuracy"].nunique() > 1


def test_batched_turns_within_memory_bound_equal_the_loop(digits):
    analog = _analog("resnet8", digits)
    x = next(iter(loader(digits.test, batch_size=32)))[0]
    _assert_same(_both(analog, lambda m: m(x), reps=4, max_bytes=4e5))


def test_unbatchable_settings_run_the_loop(digits):
    cfg = get_preset("pcm")
    cfg.forward.out_sto_round = True  # draws from torch's global stream inside the tile
    analog = _analog("resnet8", digits, cfg)
    assert "stochastic rounding" in unsupported(analog)
    x = next(iter(loader(digits.test, batch_size=16)))[0]
    _assert_same(_both(analog, lambda m: m(x), reps=2))


def test_engine_is_validated(digits):
    analog = _analog("resnet8", digits)
    with pytest.raises(HilalError, match="unknown engine 'fast'; valid choices: batched, loop"):
        noisy_metrics(analog, digits, reps=2, engine="fast")


def test_batched_scores_differ_between_programmings(digits):
    analog = _analog("resnet8", digits, "pcm_harsh")
    scores = noisy_metrics(analog, digits, reps=4)["accuracy"].to_numpy()
    assert np.isfinite(scores).all() and len(scores) == 4


def test_mapping_engine_is_validated_and_keeps_the_key(digits):
    from hilal.mapping import MappingConfig, run_mapping

    assert MappingConfig(engine="loop").key() == MappingConfig().key()  # the same scores: the same journal
    with pytest.raises(HilalError, match="unknown engine 'fast'"):
        run_mapping("all-digital", _analog("resnet8", digits), digits, MappingConfig(engine="fast"), progress=False)
