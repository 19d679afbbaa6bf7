"""Noise attribution: each source of a preset alone, against the preset field by field and against the digital
model (no noise reproduces it; the deterministic sources repeat exactly, the random ones do not)."""

from __future__ import annotations

import pytest
import torch

from hilal.analog import get_preset, mappable_layers, to_analog
from hilal.attribution import IO_SOURCES, SOURCES, WEIGHT_SOURCES, attribution_table, dominant_sources, source_config
from hilal.models import build_model
from hilal.registry import HilalError

FIELDS = {"programming": ["noise_model.prog_noise_scale"], "drift": ["noise_model.drift_scale", "drift_compensation"],
          "read": ["noise_model.read_noise_scale"], "dac": ["forward.inp_res", "forward.is_perfect"],
          "adc": ["forward.out_res", "forward.is_perfect"], "output": ["forward.out_noise", "forward.is_perfect"],
          "clipping": ["forward.out_bound", "forward.bound_management", "forward.is_perfect"]}
ALL_FIELDS = sorted({f for fs in FIELDS.values() for f in fs})


def _get(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return type(obj).__name__ if path == "drift_compensation" else obj


@pytest.mark.parametrize("preset", ["pcm", "pcm_harsh"])
def test_each_source_is_the_preset_with_only_its_fields_on(preset):
    """``none`` switches every field off; each source differs from ``none`` in its own fields only, where it
    holds the preset's value; ``all`` is the preset."""
    full, none = get_preset(preset), source_config(preset, "none")
    assert {f: _get(source_config(preset, "all"), f) for f in ALL_FIELDS} == {f: _get(full, f) for f in ALL_FIELDS}
    for f in ("noise_model.prog_noise_scale", "noise_model.drift_scale", "noise_model.read_noise_scale"):
        assert _get(none, f) == 0.0
    assert none.forward.is_perfect and none.drift_compensation is None
    for source, fields in FIELDS.items():
        cfg = source_config(preset, source)
        differ = {f for f in ALL_FIELDS if _get(cfg, f) != _get(none, f)}
        assert differ == set(fields), source
        own = [f for f in fields if f != "forward.is_perfect"]
        assert all(_get(cfg, f) == _get(full, f) for f in own), source


@pytest.mark.parametrize("source", [*WEIGHT_SOURCES, *IO_SOURCES])
def test_removing_a_source_is_the_preset_without_it(source):
    """``alone=False`` holds every field of the preset except the removed source's, which is as in ``none``."""
    full, none, cfg = get_preset("pcm_harsh"), source_config("pcm_harsh", "none"), source_config("pcm_harsh", source,
                                                                                                  alone=False)
    own = [f for f in FIELDS[source] if f != "forward.is_perfect"]
    for f in ALL_FIELDS:
        if f in own:
            assert _get(cfg, f) == _get(none, f), (source, f)
        elif f != "forward.is_perfect":
            assert _get(cfg, f) == _get(full, f), (source, f)
    assert not cfg.forward.is_perfect
    with pytest.raises(HilalError, match="one source"):
        source_config("pcm", "all", alone=False)


def test_no_noise_reproduces_digital_and_only_random_sources_vary():
    """Without noise the analog network computes the digital one; the quantizing and clipping sources give the
    same output at every programming, the random ones (programming, drift, read, output noise) do not."""
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10, image_size=8).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    outs = {}
    for source in SOURCES:
        net = to_analog(model, mappable_layers(model), source_config("pcm_harsh", source)).eval()
        ys = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                net.program_analog_weights()
                net.drift_analog_weights(86400.0)
                ys.append(net(x))
        outs[source] = ys
    assert torch.allclose(outs["none"][0], ref, atol=1e-4)
    for source in ("dac", "adc", "clipping", "none"):
        assert torch.equal(outs[source][0], outs[source][1]), source
    for source in (*WEIGHT_SOURCES, "output", "all"):
        assert not torch.equal(outs[source][0], outs[source][1]), source
    for source in (*WEIGHT_SOURCES, "dac", "adc", "output"):
        assert not torch.allclose(outs[source][0], ref, atol=1e-4), source
    assert set(IO_SOURCES) | set(WEIGHT_SOURCES) | {"all", "none"} == set(SOURCES)


def test_attribution_table_measures_against_the_digital_model(resnet8_digits, digits):
    """The ``none`` rows cost nothing; the preset's all-analog drop is the drop measured directly; the
    dominant source is the single source with the largest all-analog drop."""
    from hilal.evaluate import noisy_scores
    from hilal.train import score

    tab = attribution_table(resnet8_digits, digits, "pcm_harsh", ["none", "adc", "output", "all"], [86400.0],
                            reps=2, per_layer=False)
    none = tab[tab["source"] == "none"].iloc[0]
    assert abs(none["loss_increase"]) < 1e-5 and none["accuracy_drop"] == 0
    direct = noisy_scores(to_analog(resnet8_digits, mappable_layers(resnet8_digits), "pcm_harsh"), digits, 86400.0,
                          2, 0, split="calib")
    allrow = tab[tab["source"] == "all"].iloc[0]
    assert allrow["accuracy"] == pytest.approx(float(direct.mean()), abs=1e-12)
    assert allrow["accuracy_drop"] == pytest.approx(score(resnet8_digits, digits, "calib") - direct.mean())
    dom = dominant_sources(tab).iloc[0]
    alone = tab[tab["source"].isin(["adc", "output"])].set_index("source")["accuracy_drop"]
    assert dom["dominant_alone"] == alone.idxmax() and dom["all_accuracy_drop"] == allrow["accuracy_drop"]


def test_attribution_options_are_validated(resnet8_digits, digits):
    with pytest.raises(HilalError, match="noise source"):
        attribution_table(resnet8_digits, digits, "pcm", ["wind"], [60.0], reps=2)
    with pytest.raises(HilalError, match="times"):
        attribution_table(resnet8_digits, digits, "pcm", ["all"], [0.0], reps=2)
    with pytest.raises(HilalError, match="noise source"):
        source_config("pcm", "remap")


def test_compensation_factor_is_one_before_drift_and_biased_by_the_periphery():
    """Read with exact converters, the factor grows with time since programming and is the same for every layer
    up to the spread of the drift exponents; the preset's factors (read through its converters and output noise)
    differ from it."""
    from hilal.attribution import compensation_factors

    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10, image_size=8).eval()
    times = [compensation_factors(model, "pcm_harsh", t, [("drift", True)])["alpha"].to_numpy()
             for t in (60.0, 86400.0, 365 * 86400.0)]
    assert (times[0] < times[1]).all() and (times[1] < times[2]).all()
    day = compensation_factors(model, "pcm_harsh", 86400.0, [("drift", True), ("all", True)]).pivot(
        index="layer", columns="setting", values="alpha")
    assert (day["drift"] > 1.2).all() and day["drift"].std() < 0.05 * day["drift"].mean()
    assert (day["all"] - day["drift"]).abs().max() > 0.05
    with pytest.raises(HilalError, match="drift compensation"):
        compensation_factors(model, "pcm", 60.0, [("adc", True)])
