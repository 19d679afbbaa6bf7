"""aihwkit presets, conversion of chosen layers, and MAC / parameter accounting.

All presets use ``TorchInferenceRPUConfig`` (pure-PyTorch tiles): it runs on CPU and CUDA without an
aihwkit CUDA build and supports the noise model, drift compensation, IO non-idealities, weight
modifiers, clipping and remapping.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
from aihwkit.nn import AnalogConv1d, AnalogConv2d, AnalogLinear
from aihwkit.nn.conversion import convert_to_analog
from aihwkit.simulator.configs import TorchInferenceRPUConfig
from aihwkit.simulator.parameters import (
    IOParameters,
    WeightClipType,
    WeightModifierType,
    WeightRemapType,
)
from torch import nn

from hilal.device import model_device, to_device
from hilal.registry import HilalError, Registry

DIGITAL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
ANALOG_TYPES = (AnalogConv1d, AnalogConv2d, AnalogLinear)

PRESETS: Registry[Callable[[], TorchInferenceRPUConfig]] = Registry("preset")


def _base(prog_scale: float, read_scale: float, bits: int, out_noise: float) -> TorchInferenceRPUConfig:
    cfg = TorchInferenceRPUConfig()
    cfg.mapping.digital_bias = True
    cfg.mapping.weight_scaling_omega = 1.0
    cfg.mapping.weight_scaling_columnwise = True
    cfg.mapping.learn_out_scaling = True
    cfg.mapping.out_scaling_columnwise = True
    cfg.mapping.max_input_size = 256
    cfg.mapping.max_output_size = 255
    cfg.noise_model = PCMLikeNoiseModel(g_max=25.0, prog_noise_scale=prog_scale, read_noise_scale=read_scale)
    cfg.drift_compensation = GlobalDriftCompensation()
    cfg.forward = IOParameters()
    cfg.forward.out_noise = out_noise
    cfg.forward.inp_res = 1 / (2**bits - 2)
    cfg.forward.out_res = 1 / (2**bits - 2)
    cfg.remap.type = WeightRemapType.CHANNELWISE_SYMMETRIC
    cfg.clip.type = WeightClipType.FIXED_VALUE
    cfg.clip.fixed_value = 1.0
    cfg.modifier.type = WeightModifierType.MULT_NORMAL
    cfg.modifier.rel_to_actual_wmax = True
    cfg.modifier.std_dev = 0.08
    return cfg


@PRESETS.register("pcm")
def pcm() -> TorchInferenceRPUConfig:
    """IBM/lionheart's configuration: PCM noise (g_max 25 uS), global drift compensation, 8-bit DAC/ADC,
    out_noise 0.06, channel-wise remap, clip at 1, 8 % multiplicative training noise, tiles <= 256x255."""
    return _base(1.0, 1.0, 8, 0.06)


@PRESETS.register("pcm_harsh")
def pcm_harsh() -> TorchInferenceRPUConfig:
    """``pcm`` with 3x programming and read noise, 5-bit converters and out_noise 0.15: strong enough that
    the small offline ``digits`` task separates sensitive from robust layers."""
    return _base(3.0, 3.0, 5, 0.15)


@PRESETS.register("pcm_hilal")
def pcm_hilal() -> TorchInferenceRPUConfig:
    """The HILAL repository's configuration: like ``pcm`` but layer-wise symmetric remap, layer-Gaussian
    clipping at 2 sigma and additive training noise (std 0.08 of the actual w_max)."""
    cfg = _base(1.0, 1.0, 8, 0.06)
    cfg.remap.type = WeightRemapType.LAYERWISE_SYMMETRIC
    cfg.clip.type = WeightClipType.LAYER_GAUSSIAN
    cfg.clip.sigma = 2.0
    cfg.modifier.type = WeightModifierType.ADD_NORMAL
    return cfg


@PRESETS.register("ideal")
def ideal() -> TorchInferenceRPUConfig:
    """Noise-free tiles (perfect IO, no training noise, no programming noise or drift): the analog model
    computes what the digital one does. Used to check conversions."""
    from aihwkit.inference.noise.custom import StateIndependentNoiseModel

    cfg = TorchInferenceRPUConfig()
    cfg.mapping.digital_bias = True
    cfg.forward.is_perfect = True
    cfg.noise_model = StateIndependentNoiseModel(prog_noise_scale=0.0, read_noise_scale=0.0, drift_nu_mean=0.0,
                                                 drift_nu_std=0.0, drift_scale=0.0)
    cfg.drift_compensation = None
    cfg.modifier.type = WeightModifierType.NONE
    return cfg


def get_preset(preset: str | TorchInferenceRPUConfig) -> TorchInferenceRPUConfig:
    """A fresh config for a preset name (or a copy of a config passed in)."""
    if isinstance(preset, str):
        return PRESETS[preset]()
    return deepcopy(preset)


def mappable_layers(model: nn.Module) -> list[str]:
    """Names (``named_modules`` paths) of every Conv1d/Conv2d/Linear and already-analog layer, in order."""
    return [n for n, m in model.named_modules() if isinstance(m, DIGITAL_TYPES + ANALOG_TYPES) and n]


def analog_layers(model: nn.Module) -> list[str]:
    """Names of the analog layers of ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, ANALOG_TYPES)]


def check_layers(model: nn.Module, layers: Iterable[str]) -> list[str]:
    """Return ``layers`` as a list, raising a HilalError that lists the valid names for any unknown one."""
    valid = mappable_layers(model)
    layers = list(layers)
    bad = [name for name in layers if name not in valid]
    if bad:
        raise HilalError(f"unknown layer(s) {bad}; mappable layers of this model: {', '.join(valid)}")
    return layers


def select_layers(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The mappable layers of ``model`` (in model order) whose names match any of ``patterns`` (exact names or
    shell-style patterns, :mod:`fnmatch`); a pattern that matches no mappable layer is a HilalError listing them."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise HilalError(f"layers must be a non-empty list of layer names or patterns, got {patterns!r}")
    valid = mappable_layers(model)
    unmatched = [p for p in patterns if not fnmatch.filter(valid, p)]
    if unmatched:
        raise HilalError(f"layer pattern(s) {unmatched} match no mappable layer; mappable layers of this model: "
                         f"{', '.join(valid)}")
    return [n for n in valid if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def to_analog(model: nn.Module, layers: Iterable[str], preset: str | TorchInferenceRPUConfig = "pcm") -> nn.Module:
    """A copy of ``model`` in which exactly the named layers are aihwkit analog layers.

    Conversion goes through aihwkit's ``convert_to_analog`` (all other layers excluded). The model passed
    in is not modified. The result is wrapped so that ``program_analog_weights`` / ``drift_analog_weights``
    are available at its root.
    """
    layers = check_layers(model, layers)
    cfg = get_preset(preset)
    exclude = [n for n in mappable_layers(model) if n not in set(layers)]
    analog = convert_to_analog(model, cfg, exclude_modules=exclude, inplace=False)
    return analog


def output_elements(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Output elements per sample of every mappable layer the forward pass calls (summed over its calls),
    measured with forward hooks on a real input in eval mode; the count MACs and tile activations derive from."""
    found: dict[str, int] = {}
    hooks = []
    example_input = to_device(example_input, model_device(model))
    batch = _batch_of(example_input)

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            found[name] = found.get(name, 0) + int(out.numel() // batch)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, DIGITAL_TYPES + ANALOG_TYPES) and name:
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def count_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of every mappable layer, measured with forward hooks on a real input.

    Conv: output elements x (in_channels / groups) x kernel size; Linear: output elements x in_features.
    """
    mods = dict(model.named_modules())
    return {n: e * _fan_in(mods[n]) for n, e in output_elements(model, example_input).items()}


def _fan_in(mod: nn.Module) -> int:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, AnalogConv1d, AnalogConv2d)):
        k = 1
        for s in mod.kernel_size:
            k *= s
        return mod.in_channels // mod.groups * k
    return mod.in_features


def _batch_of(x: Any) -> int:
    if isinstance(x, dict):
        return next(iter(x.values())).shape[0]
    return x.shape[0]


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def count_params(model: nn.Module) -> dict[str, int]:
    """Weight-matrix parameter count of every mappable layer (the part that goes on a crossbar)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, DIGITAL_TYPES + ANALOG_TYPES) and name:
            # analog layers keep their weights in tiles (``.weight`` is None): count from the shape
            rows = mod.out_channels if hasattr(mod, "out_channels") else mod.out_features
            out[name] = int(rows * _fan_in(mod))
    return out


def analog_share(macs: dict[str, int], layers: Iterable[str]) -> float:
    """Share of all counted MACs (or parameters) that the named layers carry."""
    total = sum(macs.values())
    return float(sum(macs[n] for n in layers) / total) if total else 0.0


def analog_tiles(model: nn.Module) -> list[Any]:
    """All aihwkit inference tiles of a (partly) analog model."""
    return [m for m in model.modules() if hasattr(m, "program_weights") and hasattr(m, "drift_weights")]


def extend_analog(model: nn.Module, layers: Iterable[str], preset: str | TorchInferenceRPUConfig = "pcm") -> nn.Module:
    """A copy of a (partly) analog ``model`` in which the named layers are analog as well.

    Layers that are analog already keep their trained tiles; only the new ones are converted (through
    ``convert_to_analog`` on the layer alone). A fully digital model is converted with :func:`to_analog`.
    Cheaper than converting the whole model again when layers are added one stage at a time.
    """
    layers = check_layers(model, layers)
    if not analog_layers(model):
        return to_analog(model, layers, preset)
    out = deepcopy(model)
    for name in layers:
        mod = out.get_submodule(name)
        if isinstance(mod, ANALOG_TYPES):
            continue
        _replace(out, name, convert_to_analog(mod, get_preset(preset), ensure_analog_root=False))
    return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule at path ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def revert_to_digital(model: nn.Module, layers: Iterable[str]) -> nn.Module:
    """A copy of a (partly) analog ``model`` in which the named analog layers are digital again, with the
    weights their tiles hold (aihwkit's ``to_digital``: the tile weights times their output scales, without
    programming noise). Every other layer, analog tiles included, is copied unchanged; naming a layer that is
    digital already is an error."""
    layers = check_layers(model, layers)
    out = deepcopy(model)
    for name in layers:
        mod = out.get_submodule(name)
        if not isinstance(mod, ANALOG_TYPES):
            raise HilalError(f"layer {name!r} is not analog; analog layers of this model: "
                             f"{', '.join(analog_layers(model)) or 'none'}")
        _replace(out, name, type(mod).to_digital(mod))
    return out
