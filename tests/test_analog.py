"""Conversion of chosen layers, noise-free equivalence, MAC and parameter accounting."""

from __future__ import annotations

import pytest
import torch
from aihwkit.nn import AnalogConv2d, AnalogLinear
from torch import nn

from hilal.analog import (
    PRESETS,
    analog_layers,
    analog_share,
    analog_tiles,
    count_macs,
    count_params,
    get_preset,
    mappable_layers,
    revert_to_digital,
    to_analog,
)
from hilal.models import build_model
from hilal.registry import HilalError

CHOSEN = ["conv1", "layer2.0.shortcut.0", "layer3.0.conv2", "fc"]


@pytest.fixture()
def resnet8():
    torch.manual_seed(0)
    return build_model("resnet8", in_channels=1, num_classes=10, image_size=8).eval()


def test_to_analog_converts_exactly_the_named_layers(resnet8):
    before_sd = {k: v.clone() for k, v in resnet8.state_dict().items()}
    before_types = {n: type(m) for n, m in resnet8.named_modules()}
    analog = to_analog(resnet8, CHOSEN, "pcm")
    mods = dict(analog.named_modules())
    for name in mappable_layers(resnet8):
        m = mods[name]
        if name in CHOSEN:
            assert isinstance(m, AnalogConv2d if name != "fc" else AnalogLinear), name
        else:
            assert type(m) is type(dict(resnet8.named_modules())[name]) and type(m) in (nn.Conv2d, nn.Linear)
    assert sorted(analog_layers(analog)) == sorted(CHOSEN)
    assert len(analog_tiles(analog)) >= len(CHOSEN)
    assert hasattr(analog, "program_analog_weights") and hasattr(analog, "drift_analog_weights")
    # the original is untouched: same module types, bit-identical tensors
    assert {n: type(m) for n, m in resnet8.named_modules()} == before_types
    after_sd = resnet8.state_dict()
    assert after_sd.keys() == before_sd.keys()
    for k, v in before_sd.items():
        assert torch.equal(v, after_sd[k]), k
    assert not analog_layers(resnet8)


def test_to_analog_copies_weights_into_tiles(resnet8):
    analog = to_analog(resnet8, ["fc"], "ideal")
    w, _ = dict(analog.named_modules())["fc"].get_weights()
    torch.testing.assert_close(w, resnet8.fc.weight.detach(), rtol=1e-6, atol=1e-6)


def test_to_analog_unknown_layer_lists_valid_names(resnet8):
    with pytest.raises(HilalError) as e:
        to_analog(resnet8, ["conv1", "layer9.conv"], "pcm")
    msg = str(e.value)
    assert "layer9.conv" in msg
    for name in mappable_layers(resnet8):
        assert name in msg


def test_unknown_preset_lists_choices(resnet8):
    with pytest.raises(HilalError) as e:
        to_analog(resnet8, ["fc"], "rram_magic")
    for name in ("pcm", "pcm_harsh", "pcm_hilal", "ideal"):
        assert name in str(e.value)
    assert set(PRESETS.names()) >= {"pcm", "pcm_harsh", "pcm_hilal", "ideal"}
    assert get_preset("pcm") is not get_preset("pcm")


def test_ideal_preset_reproduces_digital_outputs(resnet8):
    # trained-like BatchNorm statistics, so the comparison is not on a degenerate network
    for m in resnet8.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 1, 8, 8)
    analog = to_analog(resnet8, mappable_layers(resnet8), "ideal").eval()
    assert sorted(analog_layers(analog)) == sorted(mappable_layers(resnet8))
    with torch.no_grad():
        ref = resnet8(x)
        out = analog(x)
        analog.program_analog_weights()
        analog.drift_analog_weights(86400.0)
        drifted = analog(x)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(drifted, ref, rtol=0, atol=1e-5)


def test_noisy_preset_does_not_reproduce_digital(resnet8):
    """Control for the test above: the same comparison does fail with a noisy preset."""
    x = torch.randn(16, 1, 8, 8)
    analog = to_analog(resnet8, mappable_layers(resnet8), "pcm_harsh").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        analog.program_analog_weights()
        analog.drift_analog_weights(86400.0)
        diff = (analog(x) - resnet8(x)).abs().max()
    assert diff > 1e-3


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.c = nn.Conv2d(8, 4, (1, 3), stride=(1, 2))
        self.fc = nn.Linear(4 * 5 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.flatten(1))


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def test_count_macs_by_hand():
    model = _Small()
    x = torch.randn(3, 3, 9, 9)
    h = _conv_out(9, 3, 2, 1)  # 5
    assert h == 5
    expect = {
        "a": 8 * h * h * (3 * 3 * 3),
        "b": 8 * h * h * (8 // 4 * 3 * 3),
        "c": 4 * h * _conv_out(h, 3, 2, 0) * (8 * 1 * 3),
        "fc": 7 * 40,
    }
    assert count_macs(model, x) == expect
    assert count_macs(model, x[:1]) == expect  # per sample, independent of the batch size
    params = {"a": 8 * 3 * 9, "b": 8 * 2 * 9, "c": 4 * 8 * 3, "fc": 7 * 40}
    assert count_params(model) == params
    # an analog copy is accounted the same way
    analog = to_analog(model, ["a", "fc"], "ideal")
    assert count_macs(analog, x) == expect
    assert count_params(analog) == params
    total = sum(expect.values())
    assert analog_share(expect, ["a", "fc"]) == pytest.approx((expect["a"] + expect["fc"]) / total)
    assert analog_share(expect, []) == 0.0
    assert analog_share(expect, list(expect)) == pytest.approx(1.0)
    assert analog_share({}, []) == 0.0
    assert analog_share(params, ["b"]) == pytest.approx(144 / sum(params.values()))


def test_count_macs_resnet8_matches_formula(resnet8):
    macs = count_macs(resnet8, torch.randn(2, 1, 8, 8))
    assert list(macs) == mappable_layers(resnet8)
    assert macs["conv1"] == 16 * 8 * 8 * 9
    assert macs["layer2.0.conv1"] == 32 * 4 * 4 * 16 * 9
    assert macs["layer3.0.shortcut.0"] == 64 * 2 * 2 * 32
    assert macs["fc"] == 64 * 10
    assert count_params(resnet8)["layer3.0.conv2"] == 64 * 64 * 9


def test_revert_to_digital_keeps_the_trained_tile_weights():
    """A layer trained in analog (weights and learned column-wise output scales moved by AnalogSGD) and
    made digital again computes what its tile computes; the other layers are untouched."""
    from hilal.train import FinetuneConfig, make_optimizer

    torch.manual_seed(0)
    model = _Small()
    cfg = get_preset("ideal")
    cfg.mapping.weight_scaling_omega = 1.0
    cfg.mapping.weight_scaling_columnwise = True
    cfg.mapping.learn_out_scaling = True
    cfg.mapping.out_scaling_columnwise = True
    analog = to_analog(model, ["a", "c", "fc"], cfg)
    opt = make_optimizer(analog, FinetuneConfig(analog_lr=0.05, digital_lr=0.05))
    x = torch.randn(6, 3, 9, 9)
    for _ in range(5):
        opt.zero_grad()
        analog(x).pow(2).mean().backward()
        opt.step()
    analog.eval()
    before = {n: dict(model.named_modules())[n].weight.detach().clone() for n in ("a", "c")}
    back = revert_to_digital(analog, ["a", "c"])
    assert analog_layers(back) == ["fc"] and analog_layers(analog) == ["a", "c", "fc"]
    with torch.no_grad():
        for n in ("a", "c"):
            moved = (back.get_submodule(n).weight - before[n]).abs().max()
            assert moved > 1e-3  # training changed the weights: the check below is not on the initial ones
        torch.testing.assert_close(back(x), analog(x), rtol=0, atol=1e-5)
        h = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(back.get_submodule("c")(h), analog.get_submodule("c")(h), rtol=0, atol=1e-5)
    with pytest.raises(HilalError, match="not analog.*a, c, fc"):
        revert_to_digital(analog, ["b"])
    with pytest.raises(HilalError, match="unknown layer"):
        revert_to_digital(analog, ["zz"])


# The HILAL repository's tile configuration (anissbslh/HILAL, HILAL/models/common/gen_rpu_config.py), field by
# field as the kit's names give them: ``pcm_hilal`` must hold exactly these values.
HILAL_REPO_CONFIG = {
    "mapping.digital_bias": True, "mapping.weight_scaling_omega": 1.0, "mapping.weight_scaling_columnwise": True,
    "mapping.learn_out_scaling": True, "mapping.out_scaling_columnwise": True, "mapping.max_input_size": 256,
    "mapping.max_output_size": 255, "noise_model.g_max": 25.0, "noise_model.prog_noise_scale": 1.0,
    "noise_model.read_noise_scale": 1.0, "remap.type": "LAYERWISE_SYMMETRIC", "clip.type": "LAYER_GAUSSIAN",
    "clip.sigma": 2.0, "modifier.type": "ADD_NORMAL", "modifier.rel_to_actual_wmax": True,
    "modifier.std_dev": 0.08, "forward.out_noise": 0.06, "forward.inp_res": 1 / 254, "forward.out_res": 1 / 254,
    "drift_compensation": "GlobalDriftCompensation", "noise_model": "PCMLikeNoiseModel",
}


def _field(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "name", None) or (type(obj).__name__ if not isinstance(obj, (bool, int, float)) else obj)


def test_pcm_hilal_is_the_hilal_repositorys_configuration_and_differs_from_pcm_only_in_training(resnet8):
    """``pcm_hilal`` holds the HILAL repository's values field by field, and differs from ``pcm`` only in
    remapping, clipping and the training-noise modifier, which aihwkit applies during training (the modifier in
    the training forward, clip and remap after each analog optimizer step): at inference, after the same
    programming and drift, both give the same outputs to the bit; one analog optimizer step (learning rate 0,
    so only clip and remap act) makes their weights differ."""
    from aihwkit.optim import AnalogSGD

    from hilal.analog import get_preset

    hil, pcm = get_preset("pcm_hilal"), get_preset("pcm")
    assert {k: _field(hil, k) for k in HILAL_REPO_CONFIG} == pytest.approx(HILAL_REPO_CONFIG)
    differ = {k for k in HILAL_REPO_CONFIG if _field(hil, k) != _field(pcm, k)}
    assert differ == {"remap.type", "clip.type", "clip.sigma", "modifier.type"}

    model, x = resnet8, torch.randn(8, 1, 8, 8)
    nets = {p: to_analog(model, mappable_layers(model), p).eval() for p in ("pcm", "pcm_hilal")}
    for t in (60.0, 86400.0, 365 * 86400.0):
        out = {}
        for p, net in nets.items():
            torch.manual_seed(1)
            with torch.no_grad():
                net.program_analog_weights()
                net.drift_analog_weights(t)
                out[p] = net(x)
        assert torch.equal(out["pcm"], out["pcm_hilal"])
    weights = {}
    for p, net in nets.items():
        net.train()
        opt = AnalogSGD(net.parameters(), lr=0.0)
        net(x).sum().backward()
        opt.step()
        weights[p] = torch.cat([w.flatten() for w, _ in (t.get_weights() for t in net.analog_tiles())])
    assert not torch.allclose(weights["pcm"], weights["pcm_hilal"])
