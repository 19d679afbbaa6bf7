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
