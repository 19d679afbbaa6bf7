"""The chip cost model: tile counts against aihwkit's own split, MACs against the hook count, latency and energy
against hand computation from the sources' figures, and the hardware record of real mappings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hilal.analog import count_macs, to_analog
from hilal.hardware import Chip, chip_costs, layer_costs, layer_shapes, make_chip, mapping_cost, savings
from hilal.mapping import MappingConfig, run_mapping
from hilal.registry import HilalError
from hilal.train import FinetuneConfig


def small_net() -> nn.Module:
    # 6x6 input: conv 3->300 (k3, no padding) gives 4x4 = 16 positions; linear 300*16 -> 600
    return nn.Sequential(nn.Conv2d(3, 300, 3), nn.Flatten(), nn.Linear(300 * 16, 600))


def test_source_figures_of_the_defaults():
    chip = Chip()
    # HERMES (Le Gallo et al. 2023): 64 cores of 256x256, 16.1 TOPS and 2.48 TOPS/W at 8 bit; 2 ops per MAC
    assert chip.mvm_latency_ns == pytest.approx(64 * 2 * 65536 / 16.1e12 * 1e9) == pytest.approx(521.03, abs=0.01)
    assert chip.mvm_energy_nj == pytest.approx(131072 / 2.48e12 * 1e9) == pytest.approx(52.85, abs=0.01)
    assert chip.tiles == 64 and chip.mvm_columns == 256
    # Horowitz, ISSCC 2014 (45 nm): fp32 mult 3.7 + add 0.9 pJ; int8 0.2 + 0.03 pJ; SRAM 10 pJ per 64 bits
    assert chip.mac_pj == pytest.approx(4.6) and Chip(digital_precision="int8").mac_pj == pytest.approx(0.23)
    assert chip.weight_byte_pj == pytest.approx(1.25)
    assert chip.digital_macs_per_s == pytest.approx(33.6e9)  # Eyeriss: 168 PEs at 200 MHz
    # the tile size is the preset's, the split aihwkit applies: 256 inputs x 255 outputs
    assert (make_chip(preset="pcm").tile_rows, make_chip(preset="pcm").tile_cols) == (256, 255)


def test_tiles_and_macs_match_aihwkit_and_the_hook_count():
    net, x = small_net(), torch.zeros(2, 3, 6, 6)
    chip = make_chip(preset="pcm")
    costs = chip_costs(net, x, chip).set_index("layer")
    # conv: 27 rows, 300 cols -> 1 x 2 tiles; linear: 4800 rows, 600 cols -> 19 x 3 tiles
    assert costs.loc["0", ["rows", "cols", "activations", "tiles"]].tolist() == [27, 300, 16, 2]
    assert costs.loc["2", ["rows", "cols", "activations", "tiles"]].tolist() == [4800, 600, 1, 57]
    assert costs["macs"].to_dict() == count_macs(net, x)
    analog = to_analog(net, ["0", "2"], "pcm")
    for name in ("0", "2"):
        assert len(list(analog.get_submodule(name).analog_tiles())) == costs.loc[name, "tiles"]
    assert costs.loc["0", "utilization"] == pytest.approx(27 * 300 / (2 * 256 * 255))
    assert costs.loc["2", "utilization"] == pytest.approx(4800 * 600 / (57 * 256 * 255))


def test_latency_and_energy_by_hand():
    chip = Chip(tile_rows=4, tile_cols=3, mvm_latency_ns=100.0, mvm_energy_nj=8.0, mvm_columns=4,
                digital_mac_pj=2.0, weight_byte_pj=0.5, digital_macs_per_s=1e9)
    shapes = layer_shapes(nn.Sequential(nn.Conv1d(2, 5, 3)), torch.zeros(1, 2, 7))  # 6 rows, 5 cols, 5 positions
    c = layer_costs(shapes, chip).iloc[0]
    assert (c["rows"], c["cols"], c["activations"], c["macs"]) == (6, 5, 5, 150)
    assert c["tiles"] == 2 * 2  # ceil(6/4) row blocks x ceil(5/3) column blocks
    assert c["analog_latency_us"] == pytest.approx(5 * 100e-3)  # 5 activations, tiles in parallel
    # each activation reads 5 columns in each of 2 row blocks, at 8 nJ / 4 columns
    assert c["analog_energy_uj"] == pytest.approx(5 * 2 * 5 * 2.0e-3)
    assert c["digital_latency_us"] == pytest.approx(150 / 1e9 * 1e6)
    assert c["weight_bytes"] == 30 * 4  # fp32
    assert c["digital_energy_uj"] == pytest.approx((150 * 2.0 + 120 * 0.5) * 1e-6)


def test_mapping_record_adds_up_and_savings_are_additive():
    net, x = small_net(), torch.zeros(2, 3, 6, 6)
    chip = make_chip(preset="pcm")
    costs = chip_costs(net, x, chip)
    none, conv, both = (mapping_cost(costs, layers, chip) for layers in ([], ["0"], ["0", "2"]))
    assert none["energy_gain"] == pytest.approx(1) and none["latency_gain"] == pytest.approx(1)
    assert none["analog_tiles"] == 0 and none["tile_utilization"] is None
    assert none["digital_weight_mb"] == pytest.approx((27 * 300 + 4800 * 600) * 4 / 1e6)
    assert both["analog_tiles"] == 59 and both["fits_chip"] and both["digital_weight_mb"] == 0
    assert both["tile_utilization"] == pytest.approx((27 * 300 + 4800 * 600) / (59 * 256 * 255))
    assert conv["energy_uj"] == pytest.approx(conv["energy_analog_uj"] + conv["energy_digital_uj"])
    for objective, key in (("energy", "energy_uj"), ("latency", "latency_us")):
        save = savings(costs, objective)
        assert none[key] - both[key] == pytest.approx(save["0"] + save["2"])
        assert none[key] - conv[key] == pytest.approx(save["0"])
        assert none[key] / both[key] == pytest.approx(both[f"{key.split('_')[0]}_gain"])
    assert savings(costs, "macs") == {"0": 27 * 300 * 16, "2": 4800 * 600}
    assert not mapping_cost(costs, ["0", "2"], Chip(tiles=58, tile_rows=256, tile_cols=255))["fits_chip"]


def test_invalid_settings_are_one_line_errors():
    with pytest.raises(HilalError, match="fp32"):
        Chip(digital_precision="bf13")
    with pytest.raises(HilalError, match="valid: .*tile_rows"):
        make_chip({"tile_row": 4})
    with pytest.raises(HilalError, match="tiles"):
        Chip(tiles=0)
    with pytest.raises(HilalError, match="energy"):
        savings(chip_costs(small_net(), torch.zeros(1, 3, 6, 6), make_chip()), "power")


def test_record_of_real_mappings_and_the_budget(resnet8_digits, digits):
    """all-analog ignores a tile budget and says so, with the tile count of its real aihwkit layers;
    all-digital keeps it; an invalid objective, budget or chip setting fails before any work."""
    cfg = MappingConfig(preset="pcm_harsh", reps=2, max_tiles=3, finetune=FinetuneConfig(steps=1))
    res = run_mapping("all-analog", resnet8_digits, digits, cfg, progress=False)
    hw = res.to_dict()["hardware"]
    tiles = sum(len(list(m.analog_tiles())) for n, m in res.model.named_modules() if n in set(res.analog_layers))
    assert hw["analog_tiles"] == tiles > 3 and hw["budget"] == "not honoured" and not hw["within_budget"]
    assert hw["digital_weight_mb"] == 0 and hw["energy_digital_uj"] == 0
    dig = run_mapping("all-digital", resnet8_digits, digits, cfg, progress=False).hardware
    assert dig["budget"] == "honoured" and dig["analog_tiles"] == 0 and dig["energy_gain"] == pytest.approx(1)
    assert hw["energy_gain"] == pytest.approx(dig["energy_uj"] / hw["energy_uj"])
    for bad, match in (({"objective": "power"}, "macs"), ({"max_tiles": 0}, "max_tiles"),
                       ({"max_tiles": 2.5}, "max_tiles"), ({"chip": {"tile": 3}}, "tile_rows")):
        with pytest.raises(HilalError, match=match):
            run_mapping("all-digital", resnet8_digits, digits, MappingConfig(**bad), progress=False)
    assert math.isfinite(hw["latency_us"])


def test_lionheart_skips_candidates_over_the_tile_budget():
    """LionHeart's loop (descending MACs) with ``max_tiles`` = 4 and every candidate accepted: a (3 tiles) goes,
    b and c (2 each) would need 5 and are skipped untried, d (1) fills the budget."""
    from hilal.mapping.baselines import _greedy

    class Loop:
        def __init__(self) -> None:
            self.tiles, self.layers, self.tried = {"a": 3, "b": 2, "c": 2, "d": 1}, [], []
            self.cfg, self.method, self.progress = MappingConfig(max_tiles=4), "lionheart", False

        def floor(self) -> float:
            return 0.0

        def tiles_left(self) -> float:
            return self.cfg.max_tiles - sum(self.tiles[n] for n in self.layers)

        def stage(self, key, layers, accept=None):
            self.tried += layers
            self.layers += layers
            return True

        def finish(self, **extra):
            return extra

    run = Loop()
    extra = _greedy(run, ["a", "b", "c", "d"])
    assert run.layers == run.tried == ["a", "d"] and extra["over_budget"] == ["b", "c"] and run.honours_budget


def test_frontier_sets_by_hand():
    """Frontier of (cost, saving): {} (0, 0), {a} (1, 1), {b} (2, 3), {a, b} (3, 4); c saves nothing. Two points
    are the cheapest sets reaching half (2: {b}) and all (4: {a, b}) of the largest saving."""
    from hilal.mapping import frontier_sets

    cost, value = {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 3.0, "c": -1.0}
    assert frontier_sets(cost, value, 2) == [["b"], ["a", "b"]]
    assert frontier_sets(cost, value, 4) == [["a"], ["b"], ["a", "b"]]  # 1 and 2 reach a quarter and a half
    assert frontier_sets(cost, {"a": -1.0, "b": 0.0, "c": -2.0}, 3) == []
    with pytest.raises(HilalError, match="points"):
        frontier_sets(cost, value, 0)


def test_energy_frontier_rows_are_priced_mappings(resnet8_digits, digits):
    """Zero-shot frontier on ResNet-8: all-digital first (its accuracy the floating-point one), the sets in
    increasing energy saved, all-analog last; each row's hardware columns are mapping_cost of its layers."""
    from hilal.mapping import budget_choice, energy_frontier

    cfg = MappingConfig(preset="pcm_harsh", reps=2, objective="energy", max_tiles=6,
                        hessian={"probes": 2, "power_iters": 2, "eli_samples": 2, "max_samples": 32})
    f = energy_frontier(resnet8_digits, digits, cfg, points=3, retrain_points=False, progress=False)
    assert f["kind"].iloc[0] == "all-digital" and f["kind"].iloc[-1] == "all-analog"
    assert f["accuracy_mean"].iloc[0] == pytest.approx(f.attrs["fp_accuracy"]) and f["analog_tiles"].iloc[0] == 0
    hilal = f[f["kind"] == "hilal"]
    assert len(hilal) >= 1 and hilal["saving"].is_monotonic_increasing and hilal["eli"].is_monotonic_increasing
    costs = chip_costs(resnet8_digits, digits.example_input(2), make_chip(preset="pcm_harsh"))
    for _, row in f.iterrows():
        hw = mapping_cost(costs, row["layers"], make_chip(preset="pcm_harsh"))
        assert row["energy_uj"] == pytest.approx(hw["energy_uj"]) and row["analog_tiles"] == hw["analog_tiles"]
        assert row["within_budget"] == (hw["analog_tiles"] <= 6) and not row["retrained"]
    chosen = budget_choice(f, 6, 1.0)  # a tolerance of 100 %: the least energy within 6 tiles
    with pytest.raises(HilalError, match="points"):
        energy_frontier(resnet8_digits, digits, cfg=cfg, points=0, progress=False)
    with pytest.raises(HilalError, match="unknown objective 'power'.*energy"):  # refused when the settings are made
        MappingConfig(objective="power")
    assert chosen["energy_uj"] == f[f["analog_tiles"] <= 6]["energy_uj"].min()


def test_hilal_keeps_the_tile_budget_on_a_real_run(resnet8_digits, digits):
    """HILAL's knapsack with the energy objective and a 4-tile budget on ResNet-8: the aihwkit layers of its
    final model use at most 4 tiles, every analog layer saves energy, and the record says the budget was kept."""
    cfg = MappingConfig(preset="pcm_harsh", reps=2, max_rounds=1, patience=1, finetune=FinetuneConfig(steps=2),
                        drop_threshold=0.2, objective="energy", max_tiles=4,
                        hessian={"probes": 2, "power_iters": 2, "eli_samples": 2, "max_samples": 32})
    res = run_mapping("hilal", resnet8_digits, digits, cfg, progress=False)
    hw = res.hardware
    tiles = sum(len(list(res.model.get_submodule(n).analog_tiles())) for n in res.analog_layers)
    assert res.analog_layers and hw["analog_tiles"] == tiles <= 4 and hw["budget"] == "honoured" and hw["within_budget"]
    save = savings(chip_costs(resnet8_digits, digits.example_input(2), make_chip(preset="pcm_harsh")), "energy")
    assert all(save[n] > 0 for n in res.analog_layers) and res.to_dict()["objective"] == "energy"
