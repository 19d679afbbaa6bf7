"""Analog noise sampled through aihwkit itself, so the ELI follows any aihwkit device model: effective-weight
changes after programming and drift (:func:`weight_noise_stream`), their output changes on the calibration
inputs (:class:`WeightOutputErrors`), and the whole analog error of each layer's output, converters included
(:class:`AnalogOutputErrors`), with convolution inputs unfolded once per piece (:func:`fixed_input_forward`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hilal.analog import check_layers, to_analog
from hilal.batched_tile import fixed_input_forward, unfolded_bytes
from hilal.device import model_device, rng_state, set_rng_state
from hilal.hessian.config import (
    _apply,
)
from hilal.hessian.draws import DRAW_MODES, batched_weight_noise, draws_unsupported
from hilal.hessian.gauss_newton import GaussNewton
from hilal.hessian.graphs import held_groups
from hilal.hessian.operators import OutputOperator, OutputState
from hilal.registry import HilalError, check_choice


def _analog_weight(layer: nn.Module) -> torch.Tensor:
    """The effective weight an analog layer computes with: tile conductance weights x mapping and learned
    output scales x drift-compensation factor, tiles assembled, in the digital layer's shape."""
    mod = layer.analog_module

    def tile_weight(tile: Any) -> torch.Tensor:
        if getattr(tile, "analog_bias", False):
            raise HilalError("effective weights of tiles with an analog bias are not supported")
        w = tile.tile.weight.detach()
        scales = tile.get_scales()
        if scales is not None:
            w = w * scales.detach().to(w.device).view(-1, 1)
        if getattr(tile.rpu_config, "drift_compensation", None) is not None:
            w = w * torch.as_tensor(tile.alpha).detach().to(w.device).reshape(-1)[0]
        return w

    if hasattr(mod, "array"):  # TileModuleArray: rows of the array split the input, columns the output
        w = torch.cat([torch.cat([tile_weight(t) for t in in_tiles], 0) for in_tiles in mod.array], 1)
    else:
        w = tile_weight(mod)
    return w


def weight_noise_stream(model: nn.Module, layers: Sequence[str], preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0,
                        draws: str = "batched", start: int = 0) -> Iterator[list[torch.Tensor]]:
    """Draws of dw_l = (effective analog weight at ``t_inference``) - (digital weight) for every named layer,
    sampled through aihwkit: the layers are converted once with the preset, and each draw is a seeded
    ``program_analog_weights`` + ``drift_analog_weights`` (programming noise, drift, read noise and the
    drift compensation measured with the preset's IO). Yields one list per draw, tensors shaped like the
    digital weights, on the model's device and dtype. ``draws="batched"`` replays groups of draws at once
    (:func:`hilal.hessian.draws.batched_weight_noise`, the same numbers), ``"loop"`` programs one at a time.
    ``start``: the number of the first draw (draws ``start`` to ``start + samples - 1`` of the seed's stream)."""
    from hilal.evaluate import inference_state, program_repetition

    check_choice("draws", draws, DRAW_MODES)
    layers = check_layers(model, layers)
    analog = to_analog(model, layers, preset)
    if draws == "batched" and draws_unsupported(analog, layers) is None:
        yield from batched_weight_noise(model, layers, preset, t_inference, samples, seed, analog=analog,
                                        start=start)
        return
    mods, amods = dict(model.named_modules()), dict(analog.named_modules())
    ref = [mods[n].weight.detach() for n in layers]
    with inference_state(analog):
        for s in range(start, start + samples):
            program_repetition(analog, t_inference, seed, s)
            yield [_analog_weight(amods[n]).to(device=r.device, dtype=r.dtype).reshape(r.shape) - r
                   for n, r in zip(layers, ref, strict=True)]


def sample_weight_noise(model: nn.Module, layers: Sequence[str], preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0,
                        draws: str = "batched") -> list[list[torch.Tensor]]:
    """``samples`` draws of :func:`weight_noise_stream` as a list (samples x layers)."""
    return list(weight_noise_stream(model, layers, preset, t_inference, samples, seed, draws))


def _draw_bytes(draw: Sequence[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in draw if t is not None)


def _error(m: nn.Module, x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor | None:
    return None if d is None else _apply(m, x, d.to(x))


class WeightOutputErrors:
    """The output change dW_l x_l of every layer for each weight-noise draw (one tensor per layer,
    weight-shaped), a source of errors for :func:`output_loss_increase`: the weight-space ELI in output space,
    whose joint pass draws its signs per sample (the quadratic terms are equal: H_ll = X_l^T H_{z_l} X_l).
    The draws are read once, held in groups of at most ``hold_bytes``, and applied to each piece of
    calibration samples in turn. Iterating it instead yields every draw's errors as (batches x layers). A draw
    may leave layers out (``None``, as :func:`hilal.hessian.draws.layer_noise` does): their errors are ``None``."""

    def __init__(self, op: OutputOperator | GaussNewton, noise: Iterable[Sequence[torch.Tensor]],
                 hold_bytes: float = 2**30) -> None:
        self.op, self.noise, self.hold_bytes = op, noise, hold_bytes
        self.held: dict[int, Sequence[torch.Tensor]] = {}

    def groups(self) -> Iterator[list[int]]:
        """The draws' numbers, a group at a time (the group's draws held meanwhile)."""
        start = 0
        for group in held_groups(self.noise, _draw_bytes, self.hold_bytes):
            self.held = dict(enumerate(group, start))
            yield list(self.held)
            start += len(group)
        self.held = {}

    def chunk_errors(self, c: int, st: OutputState, group: Sequence[int]
                     ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(draw, errors of piece ``c``'s samples per layer) for every draw of ``group``."""
        with torch.no_grad():
            for s in group:
                yield s, [_error(m, x, d) for m, x, d in zip(self.op.modules, st.inputs, self.held[s], strict=True)]

    def __iter__(self) -> Iterator[list[list[torch.Tensor]]]:
        for dw in self.noise:
            with torch.no_grad():
                yield [[_error(m, x, d) for m, x, d in zip(self.op.modules, xs, dw, strict=True)]
                       for xs in self.op.inputs]


def weight_output_errors(op: OutputOperator | GaussNewton, noise: Iterable[Sequence[torch.Tensor]],
                         hold_bytes: float = 2**30) -> WeightOutputErrors:
    """The output change dW_l x_l of every layer and batch for each weight-noise draw: a
    :class:`WeightOutputErrors` (iterable as draws x batches x layers)."""
    return WeightOutputErrors(op, noise, hold_bytes)


class AnalogOutputErrors:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer, a source of errors for
    :func:`output_loss_increase` (see :func:`output_error_stream`). For each piece of calibration samples in
    turn (:meth:`chunk_errors`) every draw is programmed again (seeded per draw), and torch's random state
    continues where the previous piece left it for that draw, so each draw's converter and output noise is
    the stream one draw over all pieces in order would see. Iterating it instead yields every draw's errors
    as (batches x layers), one programming per draw."""

    def __init__(self, model: nn.Module, op: OutputOperator | GaussNewton, preset: Any = "pcm",
                 t_inference: float = 86400.0, samples: int = 16, seed: int = 0,
                 cache_bytes: float = 2**30) -> None:
        self.model, self.op = model, op
        self.analog = to_analog(model, op.layers, preset)
        self.t_inference, self.samples, self.seed, self.cache_bytes = t_inference, samples, seed, cache_bytes
        self.cursors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def groups(self) -> Iterator[list[int]]:
        """All draws in one group: a draw is regenerated, not held."""
        yield list(range(self.samples))

    def chunk_errors(self, c: int, st: OutputState, group: Sequence[int]
                     ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(draw, errors of piece ``c``'s samples per layer) for every draw of ``group``; pieces in order."""
        from hilal.evaluate import inference_state, program_repetition

        mods, amods = dict(self.model.named_modules()), dict(self.analog.named_modules())
        device = model_device(self.model)
        with torch.no_grad():
            clean = [mods[n](x) for n, x in zip(self.op.layers, st.inputs, strict=True)]
            runs, left = [], float(self.cache_bytes)
            for n, x, y in zip(self.op.layers, st.inputs, clean, strict=True):
                size = unfolded_bytes(amods[n], x, y.shape)
                cache = size <= left
                runs.append(fixed_input_forward(amods[n], x, y.shape, cache=cache))
                left -= size if cache else 0
        with inference_state(self.analog), torch.no_grad():
            for s in group:
                program_repetition(self.analog, self.t_inference, self.seed, s)
                if c > 0:
                    set_rng_state(self.cursors[s], device)
                e = [run() - y for run, y in zip(runs, clean, strict=True)]
                self.cursors[s] = rng_state(device)
                yield s, e

    def __iter__(self) -> Iterator[list[list[torch.Tensor]]]:
        op = self.op
        for s in range(self.samples):
            pieces = [dict(self.chunk_errors(c, op.state(c), [s]))[s] for c in range(len(op.chunks))]
            yield [_cat_pieces([p for p, (bc, _, _) in zip(pieces, op.chunks, strict=True) if bc == b])
                   for b in range(len(op.sizes))]


def _cat_pieces(parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return list(parts[0]) if len(parts) == 1 else [torch.cat(t) for t in zip(*parts, strict=True)]


def output_error_stream(model: nn.Module, op: OutputOperator | GaussNewton, preset: Any = "pcm",
                        t_inference: float = 86400.0, samples: int = 16, seed: int = 0, cache_bytes: float = 2**30
                        ) -> AnalogOutputErrors:
    """Draws of e_l = y_analog(x_l) - y_digital(x_l) for every layer and calibration batch (iterable as
    draws x batches x layers), sampled through aihwkit: the layers are converted once with the preset; each
    draw is a seeded programming + drift, and each analog layer then runs (in inference mode, with its
    converters and output noise) on the inputs the digital network gave it. Convolution inputs are unfolded
    once per piece of samples for all draws (:func:`fixed_input_forward`) where the unfolded copies fit in
    ``cache_bytes``; the rest unfold per draw. :func:`output_loss_increase` takes it piece by piece
    (:class:`AnalogOutputErrors`), one programming per draw and piece."""
    return AnalogOutputErrors(model, op, preset, t_inference, samples, seed, cache_bytes)
