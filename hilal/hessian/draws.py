"""Weight-noise draws of many programmings at once (:func:`batched_weight_noise`): aihwkit's per-draw path
(``program_analog_weights`` + ``drift_analog_weights`` after ``torch.manual_seed``) replayed tile by tile for a
group of draws, each draw from its own generator seeded as the loop seeds it, so every draw is the loop's to the
bit. What does not depend on the draw (conductance targets, programming-noise spreads, drift-coefficient means
and spreads) is computed once per tile, and the drift-compensation read-outs of a group run as one batched
product (:func:`hilal.batched_tile._managed_product`). Noise models the replay does not cover fall back to the
loop (:func:`draws_unsupported` says why). :func:`layer_noise` draws chosen layers alone, each from a stream
of its own (the sequential ELI's extra draws)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
from aihwkit.inference.converter.conductance import SinglePairConductanceConverter
from aihwkit.simulator.parameters.enums import AnalogMVType
from torch import nn

from hilal.analog import check_layers, to_analog
from hilal.batched_tile import _managed_product, _tiles_of, layer_tiles
from hilal.hessian.config import NOISE_DRAWS
from hilal.hessian.systematic import clamped_normal_mean, folded_exp_mean
from hilal.registry import HilalError

DRAW_MODES = NOISE_DRAWS
_ZERO_CLIP = 1e-7  # aihwkit's clip of |w| and of g / g_max


def draws_unsupported(analog: nn.Module, layers: Sequence[str]) -> str | None:
    """Why :func:`batched_weight_noise` cannot replay these layers' tiles (``None``: it can)."""
    mods = dict(analog.named_modules())
    for n in layers:
        for tile in _tiles_of(mods[n].analog_module):
            cfg = tile.rpu_config
            nm = getattr(cfg, "noise_model", None)
            if type(nm) is not PCMLikeNoiseModel:
                return f"noise model {type(nm).__name__} (only PCMLikeNoiseModel is replayed)"
            if type(nm.g_converter) is not SinglePairConductanceConverter:
                return f"conductance converter {type(nm.g_converter).__name__}"
            dc = getattr(cfg, "drift_compensation", None)
            if dc is not None and type(dc) is not GlobalDriftCompensation:
                return f"drift compensation {type(dc).__name__}"
            io = cfg.forward
            if dc is not None and not (io.is_perfect or io.mv_type == AnalogMVType.IDEAL) and (
                    io.inp_noise > 0 or io.w_noise > 0 or getattr(tile.tile, "out_noise_values", None) is not None):
                return "input, weight or per-output noise in the drift read-out"
            if getattr(tile, "analog_bias", False):
                return "tiles with an analog bias"
    return None


@dataclass
class _Tile:
    """What one tile's draws share: its reference weights' conductance targets and the draw-independent parts
    of the noise model's formulas (aihwkit's expressions, evaluated once)."""

    tile: Any
    targets: list[torch.Tensor]
    scale_ratio: torch.Tensor
    prog_sigma: list[torch.Tensor]
    mu_drift: list[torch.Tensor]
    sig_drift: list[torch.Tensor]
    positive: torch.Tensor
    alphas: dict[float, float] = field(default_factory=dict)
    """The surrogate's compensation factor per inference time (:func:`_surrogate_mean`), once computed."""


def _plan(tile: Any) -> _Tile:
    nm: PCMLikeNoiseModel = tile.rpu_config.noise_model
    ref = tile.tile.weight.detach().clone()
    targets, params = nm.g_converter.convert_to_conductances(ref)
    prog, mus, sigs = [], [], []
    for g in targets:
        mat: Any = 1
        sig_prog: Any = nm.prog_coeff[0]
        for coeff in nm.prog_coeff[1:]:
            mat *= g / nm.g_max
            sig_prog += mat * coeff
        sig_prog *= nm.g_max / nm.prog_coeff_g_max_reference
        prog.append(nm.prog_noise_scale * sig_prog)
        rel = torch.clamp(torch.abs(g / nm.g_max), min=_ZERO_CLIP)
        mus.append((-0.0155 * torch.log(rel) + 0.0244).clamp(min=0.049, max=0.1))
        sigs.append((-0.0125 * torch.log(rel) - 0.0059).clamp(min=0.008, max=0.045))
    return _Tile(tile, targets, params["scale_ratio"], prog, mus, sigs, ref > 0)


def _diagonal_product(x: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    """``x @ w^T`` for diagonal inputs ``x`` (the one-hot read-out after the tile's input scaling and
    quantization): every output is one product plus exact zeros, so this is the matmul's result to the bit."""
    d, wt = x.diagonal(0, -2, -1).unsqueeze(-1), w.transpose(-1, -2)
    out = wt.new_empty((max(d.shape[0], wt.shape[0]),) + wt.shape[1:])  # contiguous, as the matmul's
    return torch.mul(d, wt, out=out)


def _readout(tile: Any, w: torch.Tensor, gens: Sequence[torch.Generator]) -> list[torch.Tensor] | None:
    """The drift compensation's read-out forward (one-hot inputs through the tile's IO) of each draw's tile
    weights ``w`` (draws x outputs x inputs), each draw's output noise from its generator."""
    dc = tile.rpu_config.drift_compensation
    if dc is None:
        return None
    eye = dc.get_readout_tensor(w.shape[-1]).to(w)
    io = tile.rpu_config.forward
    if io.is_perfect or io.mv_type == AnalogMVType.IDEAL:
        y = torch.matmul(eye, w.transpose(-1, -2))
    else:
        y = _managed_product(eye[None], w, io, gens, True, -1, product=_diagonal_product)
    return [y[r] for r in range(len(gens))]


def _conductances(nm: PCMLikeNoiseModel, w: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``convert_to_conductances`` of each draw's weights (draws first), each draw with its own scale."""
    conv = nm.g_converter
    abs_max = torch.abs(w).amax(dim=tuple(range(1, w.dim())), keepdim=True)
    ratio = (conv.g_max - conv.g_min) / abs_max.clamp(min=_ZERO_CLIP)
    scaled = w * ratio
    return [scaled.clamp(min=0.0, max=conv.g_max) + conv.g_min,
            (-scaled).clamp(min=0.0, max=conv.g_max) + conv.g_min], ratio


def _weights(nm: PCMLikeNoiseModel, g: Sequence[torch.Tensor], ratio: torch.Tensor) -> torch.Tensor:
    g_min = nm.g_converter.g_min
    return ((g[0] - g_min) - (g[1] - g_min)) / ratio


def _randn(like: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One standard normal draw shaped like ``like`` per generator, stacked (the stream ``randn_like`` takes)."""
    out = torch.empty((len(gens),) + tuple(like.shape), dtype=like.dtype, device=like.device)
    for r, gen in enumerate(gens):
        torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device, out=out[r])
    return out


def _per_draw(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a transcendental function) applied to each draw's slice of ``x`` alone: torch's vectorized and
    scalar kernels may differ in the last bit, and which elements take which depends on the tensor's size."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        out[r] = fn(x[r])
    return out


def _program(p: _Tile, gens: Sequence[torch.Generator]) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """Programming of every draw (``apply_programming_noise``), then the compensation baseline read-out."""
    nm = p.tile.rpu_config.noise_model
    progs, nus = [], []
    noise = [(_randn(g, gens), _randn(g, gens)) for g in p.targets]  # per slice: programming, then drift nu
    for g, sp, mu, sd, (n_prog, n_nu) in zip(p.targets, p.prog_sigma, p.mu_drift, p.sig_drift, noise, strict=True):
        progs.append((g + sp * n_prog).clamp_(min=0.0))
        nus.append(torch.abs(mu + sd * n_nu).clamp(min=0.0) * nm.drift_scale)
    w = _weights(nm, progs, p.scale_ratio)
    ys = _readout(p.tile, w, gens)
    dc = p.tile.rpu_config.drift_compensation
    return w, nus, None if ys is None else [dc.readout(y) for y in ys]


def _drift(p: _Tile, w: torch.Tensor, nus: Sequence[torch.Tensor], baseline: Any, t_inference: float,
           gens: Sequence[torch.Generator], surrogate: bool = False
           ) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
    """``apply_drift_noise`` of every draw's programmed weights, then the compensation factor alpha; with
    ``surrogate``, also the draw's surrogate tile weights (:func:`surrogate_shift`):
    the programmed weights times the drift and read-noise factor of the device the reference weight's sign
    names, without the final clamp, a product of independent parts whose mean is known in closed form."""
    nm = p.tile.rpu_config.noise_model
    g_prog, ratio = _conductances(nm, w)
    t = t_inference + nm.t_0
    noise = [_randn(g[0], gens) for g in g_prog]  # per slice: read noise
    finals, factors = [], []
    for g, nu, n in zip(g_prog, nus, noise, strict=True):
        factor = _per_draw(lambda v: (t / nm.t_0) ** (-v), nu) if t > nm.t_0 else None
        g_drift = g * factor if factor is not None else g
        if t > 0:
            q_s = (0.0088 / _per_draw(lambda v: v ** 0.65, torch.abs(g) / nm.g_max).clamp(min=1e-3)).clamp(max=0.2)
            sig_noise = q_s * np.sqrt(np.log((t + nm.t_read) / (2 * nm.t_read)))
            g = g_drift + torch.abs(g_drift) * nm.read_noise_scale * sig_noise * n
            if surrogate:
                read = (sig_noise * n).mul_(nm.read_noise_scale).add_(1.0)
                factor = read.mul_(factor) if factor is not None else read
        finals.append(g.clamp(min=0.0))
        factors.append(factor)
    sur = None
    if surrogate:
        sur = w if factors[0] is None else w * torch.where(p.positive, factors[0], factors[1])
    w = _weights(nm, finals, ratio)
    current = _readout(p.tile, w, gens)
    if current is None:
        return w, None, sur
    dc = p.tile.rpu_config.drift_compensation
    return w, [dc.apply(c, b) for c, b in zip(current, baseline, strict=True)], sur


def _effective(p: _Tile, w: torch.Tensor, alphas: list[torch.Tensor] | float | None) -> torch.Tensor:
    """The weights the tile computes with per draw (as :func:`hilal.hessian.noise._analog_weight` reads them);
    ``alphas`` one compensation factor per draw, or one for all."""
    scales = p.tile.get_scales()
    if scales is not None:
        w = w * scales.detach().to(w.device, w.dtype).view(-1, 1)
    if isinstance(alphas, float):
        w = w * alphas
    elif alphas is not None:
        w = w * torch.stack([torch.as_tensor(a).detach().to(w.device).reshape(-1)[0] for a in alphas]).view(-1, 1, 1)
    return w


def _surrogate_mean(p: _Tile, t_inference: float) -> tuple[torch.Tensor, float]:
    """The closed-form mean of a tile's surrogate weights (:func:`_drift`), tile-shaped, float64, and the
    constant compensation factor the surrogate uses: the one global compensation finds for the mean weights."""
    nm = p.tile.rpu_config.noise_model
    prog = [clamped_normal_mean(g, sp) for g, sp in zip(p.targets, p.prog_sigma, strict=True)]
    w = (prog[0] - prog[1]) / p.scale_ratio.double()
    t = t_inference + nm.t_0
    if t > nm.t_0:
        rate = nm.drift_scale * float(np.log(t / nm.t_0))
        d = [folded_exp_mean(mu, sd, rate) for mu, sd in zip(p.mu_drift, p.sig_drift, strict=True)]
        mean = w * torch.where(p.positive, d[0], d[1])
    else:
        mean = w
    alpha = 1.0
    if p.tile.rpu_config.drift_compensation is not None:
        alpha = float(w.abs().sum() / mean.abs().sum().clamp(min=1e-300))
    return mean, alpha


def _converted(model: nn.Module, layers: Sequence[str], preset: Any, analog: nn.Module | None, what: str
               ) -> tuple[list[str], nn.Module, dict[str, nn.Module], dict[str, nn.Module]]:
    """The checked layers, the analog copy (``analog``, or ``model`` converted with ``preset``) and the named
    modules of both; a :class:`HilalError` naming ``what`` where :func:`draws_unsupported` gives a reason."""
    layers = check_layers(model, layers)
    analog = analog if analog is not None else to_analog(model, layers, preset)
    reason = draws_unsupported(analog, layers)
    if reason is not None:
        raise HilalError(f"{what} do not support {reason}")
    return layers, analog, dict(model.named_modules()), dict(analog.named_modules())


def surrogate_shift(model: nn.Module, layers: Sequence[str], preset: Any = "pcm", t_inference: float = 86400.0,
                    analog: nn.Module | None = None) -> list[torch.Tensor]:
    """Per layer, E[dS_l]: the mean, in closed form, of the surrogate weight change that
    :func:`layer_noise` reports beside each draw (float64, digital-weight
    shaped). A draw's first-order term is the surrogate's plus a small remainder, so E[<dW, G>] is
    <E[dS], G> plus the remainder's sampled mean."""
    layers, analog, mods, amods = _converted(model, layers, preset, analog, "closed-form surrogates")
    out = []
    for n in layers:
        tiles = {}
        for t in _tiles_of(amods[n].analog_module):
            p = _plan(t)
            mean, alpha = _surrogate_mean(p, t_inference)
            tiles[id(t)] = _effective(p, mean[None], alpha)[0]
        ref = mods[n].weight.detach()
        out.append(_assemble(amods[n].analog_module, {k: v[None] for k, v in tiles.items()})[0].reshape(ref.shape)
                   .to(ref.device) - ref.double())
    return out


def _assemble(module: nn.Module, per_tile: dict[int, torch.Tensor]) -> torch.Tensor:
    """A layer's effective weights (draws first) from its tiles' (rows of an array split the input, columns
    the output)."""
    if hasattr(module, "array"):
        return torch.cat([torch.cat([per_tile[id(t)] for t in row], 1) for row in module.array], 2)
    return per_tile[id(module)]


def group_size(model: nn.Module, layers: Sequence[str], hold_bytes: float, tensors: int = 5) -> int:
    """Draws replayed together so that a group's state (programmed weights, drift coefficients, results:
    about ``tensors`` weight-sized tensors a draw) stays within ``hold_bytes``; at least one."""
    mods = dict(model.named_modules())
    per_draw = tensors * sum(mods[n].weight.numel() * mods[n].weight.element_size() for n in layers)
    return max(1, int(hold_bytes // max(per_draw, 1)))


def batched_weight_noise(model: nn.Module, layers: Sequence[str], preset: Any = "pcm",
                         t_inference: float = 86400.0, samples: int = 16, seed: int = 0,
                         hold_bytes: float = 2**30, analog: nn.Module | None = None, start: int = 0
                         ) -> Iterator[list[torch.Tensor]]:
    """The draws of :func:`hilal.hessian.weight_noise_stream` (dw_l per layer, digital-weight shaped), equal to
    them to the bit, replayed in groups of draws (:func:`group_size`) instead of one aihwkit programming at a
    time, draws ``start`` to ``start + samples - 1``. ``analog``: the layers already converted with the
    preset. Tiles :func:`draws_unsupported` names a reason for are a :class:`HilalError`
    (``weight_noise_stream`` runs the loop for them)."""
    layers, analog, mods, amods = _converted(model, layers, preset, analog, "batched noise draws (use draws='loop')")
    ref = [mods[n].weight.detach() for n in layers]
    modules = [amods[n].analog_module for n in layers]
    plans = [_plan(t) for t in layer_tiles(analog)]  # aihwkit's order: module order
    step = group_size(model, layers, hold_bytes)
    with torch.no_grad():
        for first in range(start, start + samples, step):
            reps = range(first, min(start + samples, first + step))
            device = plans[0].targets[0].device
            gens = [torch.Generator(device=device).manual_seed(seed * 100_003 + r) for r in reps]
            layer_w, _ = _replay(plans, modules, gens, t_inference)
            for j in range(len(reps)):
                yield [w[j].to(device=r.device, dtype=r.dtype).reshape(r.shape) - r
                       for w, r in zip(layer_w, ref, strict=True)]


def _replay(plans: list[_Tile], modules: Sequence[nn.Module], gens: Sequence[torch.Generator],
            t_inference: float, surrogate: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Every tile of ``plans`` programmed, then every tile drifted, as aihwkit does, each draw from its
    generator; the effective weights of ``modules`` (draws first), and with ``surrogate`` their surrogate
    weights (:func:`_drift`) at the constant compensation factor of :func:`_surrogate_mean`."""
    programmed: list[Any] = [_program(p, gens) for p in plans]
    eff: dict[int, torch.Tensor] = {}
    sur: dict[int, torch.Tensor] = {}
    for i, p in enumerate(plans):
        w, nus, baseline = programmed[i]
        programmed[i] = None
        w, alphas, s = _drift(p, w, nus, baseline, t_inference, gens, surrogate)
        eff[id(p.tile)] = _effective(p, w, alphas)
        if s is not None:
            if t_inference not in p.alphas:
                p.alphas[t_inference] = _surrogate_mean(p, t_inference)[1]
            sur[id(p.tile)] = _effective(p, s, p.alphas[t_inference])
    return [_assemble(m, eff) for m in modules], [_assemble(m, sur) for m in modules] if surrogate else None


LAYER_STREAM = 2**40
"""Offset of a layer's own stream in :func:`layer_noise`: draw ``r`` of layer ``i`` is seeded with
``seed * 100_003 + r + (i + 1) * LAYER_STREAM``, apart from every per-draw seed of the loop."""


def layer_noise(model: nn.Module, layers: Sequence[str], active: Sequence[str], preset: Any = "pcm",
                t_inference: float = 86400.0, samples: int = 16, seed: int = 0, start: int = 0,
                hold_bytes: float = 2**30, analog: nn.Module | None = None, surrogate: bool = False
                ) -> Iterator[Any]:
    """Draws of dw_l like :func:`batched_weight_noise`'s, but only for the ``active`` layers (``None`` for the
    others), each layer's tiles from a stream of their own (:data:`LAYER_STREAM`): aihwkit's noise model and
    compensation, and so its distribution, per layer (aihwkit's draws of different tiles are independent),
    without the arithmetic of the layers left out. Not the loop's numbers: its draws pass through every tile.
    ``surrogate``: each draw is a pair, the changes and their surrogates (:func:`surrogate_shift`)."""
    layers, analog, mods, amods = _converted(model, layers, preset, analog, "batched noise draws")
    want = set(active)
    chosen = [(i, n) for i, n in enumerate(layers) if n in want]
    plans = {n: [_plan(t) for t in _tiles_of(amods[n].analog_module)] for _, n in chosen}
    tensors = 5 if not surrogate else 7
    step = group_size(model, [n for _, n in chosen], hold_bytes, tensors) if chosen else max(samples, 1)
    with torch.no_grad():
        for first in range(start, start + samples, step):
            reps = range(first, min(start + samples, first + step))
            out: list[list[torch.Tensor | None]] = [[None] * len(layers) for _ in reps]
            sur: list[list[torch.Tensor | None]] = [[None] * len(layers) for _ in reps]
            for i, n in chosen:
                device, ref = plans[n][0].targets[0].device, mods[n].weight.detach()
                gens = [torch.Generator(device=device).manual_seed(seed * 100_003 + r + (i + 1) * LAYER_STREAM)
                        for r in reps]
                (w,), s = _replay(plans[n], [amods[n].analog_module], gens, t_inference, surrogate)
                for j in range(len(reps)):
                    out[j][i] = w[j].to(device=ref.device, dtype=ref.dtype).reshape(ref.shape) - ref
                    if s is not None:
                        sur[j][i] = s[0][j].reshape(ref.shape).to(ref.device) - ref
            yield from (zip(out, sur, strict=True) if surrogate else out)
