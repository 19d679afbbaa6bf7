"""aihwkit's torch inference tile forward, reproduced on inputs it can share: every programming of an evaluation
at once (:class:`Pass`, :func:`layer_forward`, the engine of :mod:`hilal.batched_eval`), and one input for many
programmings (:func:`fixed_input_forward`, the ELI's analog output errors). The same operations in aihwkit's
order on the same numbers, so the results are the tile's own to the bit on CPU; what is shared is only work
whose result is the same for all (an unfolded input, an input prepared once, a noise-management maximum)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from aihwkit.nn import AnalogConv2d
from aihwkit.simulator.parameters.enums import AnalogMVType, BoundManagementType, NoiseManagementType
from aihwkit.simulator.tiles.analog_mvm import AnalogMVM
from torch import nn

from hilal.analog import ANALOG_TYPES
from hilal.device import model_device, set_rng_state

PIECE_BYTES = {"cpu": 2.0**22, "cuda": 2.0**30}
"""Unfolded input handled at once per analog layer, by device type: on a CPU pieces that stay in cache are
faster than one large pass; on a GPU one large pass is."""


@dataclass
class Programming:
    """One programming of every tile: drifted weights, drift-compensation factors (``None`` without), and
    torch's global random state (:func:`hilal.device.rng_state`) of this repetition, which its evaluation
    carries on from where the programming left it."""

    weights: list[torch.Tensor]
    alphas: list[torch.Tensor | None]
    rng: tuple[torch.Tensor, torch.Tensor | None]
    device: torch.device

    def restore_rng(self) -> None:
        """Leave torch's global random state where this repetition's evaluation left it (as the loop does)."""
        set_rng_state(self.rng, self.device)

    def generator(self) -> torch.Generator:
        """A generator in this repetition's state on its device (where the tiles draw their output noise)."""
        gen = torch.Generator(device=self.device)
        gen.set_state(self.rng[1] if self.device.type == "cuda" else self.rng[0])
        return gen

    def advance(self, gen: torch.Generator) -> None:
        """Take over the state of :meth:`generator`'s generator after it drew."""
        self.rng = (self.rng[0], gen.get_state()) if self.device.type == "cuda" else (gen.get_state(), self.rng[1])


def layer_tiles(model: nn.Module) -> list[Any]:
    """The aihwkit tiles of every analog layer of ``model``, in module order."""
    return [t for m in model.modules() if isinstance(m, ANALOG_TYPES) for t in _tiles_of(m.analog_module)]


def _tiles_of(module: nn.Module) -> list[Any]:
    if hasattr(module, "array"):
        return [t for row in module.array for t in row]
    return [module]


class Pass:
    """The programmings one batched pass serves: each tile's weights stacked for them, and a generator per
    programming for the tiles' output noise."""

    def __init__(self, model: nn.Module, max_bytes: float) -> None:
        self.tiles = {id(t): i for i, t in enumerate(layer_tiles(model))}
        self.max_bytes, self.turn = max_bytes, 0  # turn: programmings per pass once one did not fit (0: all)
        self.piece_bytes = PIECE_BYTES.get(model_device(model).type, PIECE_BYTES["cuda"])
        self.key: tuple[int, ...] = ()

    def select(self, progs: Sequence[Programming]) -> None:
        """Serve ``progs`` in the next pass, drawing from their random states."""
        key = tuple(id(p) for p in progs)
        if key != self.key:
            n = len(progs[0].weights)
            self.weights = [torch.stack([p.weights[k] for p in progs]) for k in range(n)]
            self.alphas = [None if progs[0].alphas[k] is None else
                           torch.stack([p.alphas[k].reshape(()) for p in progs]) for k in range(n)]
            self.key = key
        self.progs, self.gens, self.fresh = list(progs), [p.generator() for p in progs], True


class TooBig(Exception):
    """A layer's batched activations would pass the pass's ``max_bytes``: fewer programmings per pass."""


def _replicated(x: torch.Tensor, r: int) -> bool:
    v = x.reshape(r, -1)
    return r == 1 or bool((v == v[:1]).all())


def layer_forward(layer: nn.Module, run: Pass, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for the R = ``len(run.progs)`` programmings, ``x`` holding their inputs one after the other
    along the batch dimension: aihwkit's forward of the layer per programming, in pieces of programmings
    whose unfolded inputs stay within ``run.piece_bytes``; an input the same for all is unfolded, scaled and
    quantized once for all.
    Convolutions keep the unfolded fan-in before the positions (``unfold``'s own layout), so that no copy
    is transposed and the product lands in the output's layout."""
    r, conv = len(run.progs), isinstance(layer, AnalogConv2d)
    if r > 1 and 4 * x.numel() * x.element_size() > run.max_bytes:
        raise TooBig
    b = x.shape[0] // r
    shared = run.fresh and _replicated(x, r)
    run.fresh = False
    one = _unfold(layer, x[:b]) if shared else None
    per_rep = (one if one is not None else _unfold(layer, x[:1])).numel() * (1 if shared else b)
    step = r if shared else min(r, max(1, int(run.piece_bytes // max(per_rep * x.element_size(), 1))))
    axis = -2 if conv else -1
    outs = []
    for start in range(0, r, step):
        sl = slice(start, min(r, start + step))
        xs = x[:b] if shared else x[start * b:sl.stop * b]
        cols = one if shared else _unfold(layer, xs)
        nm = _pooled_abs_max(layer, xs)
        n = 1 if shared else sl.stop - start
        lead = (n, b) if conv else (n, -1)
        outs.append(_array_forward(layer.analog_module, run, sl, cols.reshape(lead + cols.shape[axis:]),
                                   shared, axis, None if nm is None else nm.reshape(n, b, 1, -1)))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if conv:
        h = (x.shape[-2] + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) \
            // layer.stride[0] + 1
        return out.reshape(r * b, layer.out_channels, h, -1)
    return out.reshape(x.shape[:-1] + out.shape[-1:])


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv layer's input unfolded as aihwkit's unfold path does it (samples x fan-in x positions, before
    its transpose); other layers' input as it is."""
    if not isinstance(layer, AnalogConv2d):
        return x
    return nn.functional.unfold(x, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                stride=layer.stride)


def _pooled_abs_max(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The absolute maximum of every unfolded row of a single-tile conv layer's input, taken on the input
    itself (channel maximum, then max-pooling over the kernel window; padding zeros cannot raise it):
    ABS_MAX noise management without reading the unfolded copy. ``None`` where it does not apply."""
    mod = layer.analog_module
    if not isinstance(layer, AnalogConv2d) or hasattr(mod, "array") or x.dim() != 4:
        return None
    io = mod.rpu_config.forward
    if io.noise_management != NoiseManagementType.ABS_MAX or io.is_perfect or io.mv_type == AnalogMVType.IDEAL:
        return None
    peak = nn.functional.max_pool2d(x.abs().amax(1, keepdim=True), layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation)
    return torch.clamp(peak, max=io.nm_thres) if io.nm_thres > 0.0 else peak


def _along(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-output (or per-input) vector shaped to broadcast along ``axis`` of an ``ndim``-dim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _array_forward(module: nn.Module, run: Pass, sl: slice, x: torch.Tensor, shared: bool, axis: int,
                   nm: torch.Tensor | None = None) -> torch.Tensor:
    """A tile or an aihwkit tile array for the programmings ``sl`` on ``x`` (programmings first, one when
    ``shared``; features along ``axis``), outputs along ``axis``; ``nm``: the rows' noise-management scales
    where known (single tiles)."""
    if not hasattr(module, "array"):
        return _tile_forward(module, run, sl, x, shared, axis, nm)
    result = None
    for xs, row in zip(torch.split(x, module.in_sizes, dim=axis), module.array, strict=True):
        part = torch.cat([_tile_forward(t, run, sl, xs, shared, axis) for t in row], axis)
        result = part if result is None else result.add_(part)
    if module.bias is not None:
        result = result + _along(module.bias, result.dim(), axis)
    return result


def _tile_forward(tile: Any, run: Pass, sl: slice, x: torch.Tensor, shared: bool, axis: int,
                  nm: torch.Tensor | None = None) -> torch.Tensor:
    """One torch inference tile's forward in eval mode (aihwkit's order of operations: noise management,
    bound management rounds of input quantization, product, output noise and quantization; then mapping
    scales, drift compensation, learned output scales, digital bias) for the programmings ``sl`` at once."""
    k = run.tiles[id(tile)]
    w, io = run.weights[k][sl], tile.rpu_config.forward
    if io.is_perfect or io.mv_type == AnalogMVType.IDEAL:
        out = _product(x, w, axis)
    else:
        out = _managed_product(x, w, io, run.gens[sl], shared, axis, nm)
    if tile.mapping_scales is not None:
        out = out * _along(tile.get_mapping_scales(), out.dim(), axis)
    if run.alphas[k] is not None:
        out = out * run.alphas[k][sl].to(out.dtype).reshape((-1,) + (1,) * (out.dim() - 1))
    if tile.out_scaling_alpha is not None:
        out = out * _along(tile.out_scaling_alpha, out.dim(), axis)
    if tile.digital_bias:
        out = out + _along(tile.bias, out.dim(), axis)
    return out


def _product(x: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    """Each programming's weights (programmings x outputs x inputs) times its inputs, features along ``axis``
    (the same sums as aihwkit's ``input @ weight.T``)."""
    if axis == -1:
        return torch.matmul(x, w.transpose(-1, -2))
    out = x.new_empty((w.shape[0], x.shape[1], w.shape[1], x.shape[-1]))
    for i in range(w.shape[0]):  # one (outputs x inputs) @ (samples x inputs x positions) each: the fastest form
        torch.matmul(w[i], x[0 if x.shape[0] == 1 else i], out=out[i])
    return out


def _managed_product(x: torch.Tensor, w: torch.Tensor, io: Any, gens: Sequence[torch.Generator],
                     shared: bool, axis: int, nm: torch.Tensor | None = None,
                     product: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """aihwkit's IO-managed product (``AnalogMVM.matmul``) of each programming's weights, bound management
    judged per programming: a programming whose outputs clip goes another round with half the input scale,
    drawing its output noise again from its own stream. ``product``: a replacement of :func:`_product` that
    gives its results to the bit on the inputs at hand (e.g. a diagonal input's)."""
    product = product or _product
    r = w.shape[0]
    if nm is None:
        nm = AnalogMVM._compute_noise_management(input_=x, nm_type=io.noise_management, io_pars=io, axis=axis)
    n_man = io.noise_management != NoiseManagementType.NONE
    b_man = io.bound_management != BoundManagementType.NONE
    active, out = list(range(r)), None
    if isinstance(nm, torch.Tensor):
        if io.inp_noise <= 0:  # an all-zero input gives zeros, no noise drawn
            zero = (nm == 0).reshape(nm.shape[0], -1).all(1).tolist()
            active = [i for i in active if not zero[0 if shared else i]]
        nm[nm <= 0.0] = 1.0
    inp_res = io.inp_res
    if inp_res > 0:
        inp_res = (1 / inp_res if inp_res > 1.0 else inp_res) * 2.0 * io.inp_bound
    reduction = 0.5
    while active:
        reduction *= 2.0
        scale: Any = 1.0
        if n_man:
            scale = scale / (nm if shared or not isinstance(nm, torch.Tensor) else nm[active])
        if b_man:
            scale = scale / reduction if not isinstance(scale, torch.Tensor) else scale.div_(reduction)
        scaling = isinstance(scale, torch.Tensor) or scale != 1.0
        every = len(active) == r
        y = product(_prepared(x if shared or every else x[active], scale, scaling, io), w if every else w[active],
                    axis)
        clipped = _finalize(y, io, [gens[i] for i in active], axis)
        done = [not c or not b_man or reduction > io.max_bm_factor
                or (inp_res > 0.0 and reduction > io.max_bm_res / inp_res) for c in clipped]
        if scaling or io.out_scale != 1.0:
            y *= io.out_scale / scale
        keep = [j for j, d in enumerate(done) if d]
        if len(keep) == r:
            return y
        if out is None:
            out = torch.zeros((r,) + y.shape[1:], dtype=y.dtype, device=y.device)
        out[[active[j] for j in keep]] = y[keep]
        active = [a for a, d in zip(active, done, strict=True) if not d]
    if out is None:  # every programming's input was zero
        out = torch.zeros((r,) + _product(x[:1], w[:1], axis).shape[1:], dtype=x.dtype, device=x.device)
    return out


def _quantize(v: torch.Tensor, res: float, bound: float) -> torch.Tensor:
    """aihwkit's deterministic ``UniformQuantize`` of ``v``, in place."""
    res = (1 / res if res > 1.0 else res) * 2 * bound
    return v.div_(res).round_().mul_(res)


def _prepared(x: torch.Tensor, scale: Any, scaling: bool, io: Any) -> torch.Tensor:
    """The tile's input after scaling, quantization, clipping and asymmetry (``AnalogMVM._prepare_input``)."""
    bound = io.inp_bound if io.inp_bound > 0 else float("inf")
    v = x * scale if scaling else x.clone()
    if io.inp_res > 0:
        _quantize(v, io.inp_res, io.inp_bound)
    v.clamp_(-bound, bound)
    if io.inp_asymmetry != 0.0:
        v[v < 0] *= 1.0 - io.inp_asymmetry
    return v


def _finalize(y: torch.Tensor, io: Any, gens: Sequence[torch.Generator], axis: int) -> list[bool]:
    """Output asymmetry, noise (one draw per programming from its stream, in the loop's order of the
    outputs), quantization and clipping of ``y`` in place; whether each programming's outputs clipped."""
    if io.out_asymmetry != 0.0:
        y[y < 0] *= 1.0 - io.out_asymmetry
    if io.out_noise > 0.0:
        shape = y.shape[1:] if axis == -1 else y.shape[1:-2] + (y.shape[-1], y.shape[-2])
        for i, g in enumerate(gens):
            noise = torch.randn(shape, generator=g, dtype=y.dtype, device=y.device).mul_(io.out_noise)
            y[i] += noise if axis == -1 else noise.transpose(-1, -2)
    if io.out_res > 0:
        _quantize(y, io.out_res, io.out_bound)
    bound = io.out_bound if io.out_bound > 0 else float("inf")
    low, high = torch.aminmax(y.reshape(y.shape[0], -1), dim=1)  # NaN compares False: clipped, as in aihwkit
    inside = (low >= -bound) & (high <= bound)
    y.clamp_(-bound, bound)
    return [not b for b in inside.tolist()]


def unfolds(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether aihwkit's forward of ``module`` on ``x`` is an ``AnalogConv2d`` on its unfold path (the torch
    tiles' only one): the module's own ``use_indexed``, or when it leaves that open, aihwkit's rule."""
    if not isinstance(module, AnalogConv2d) or x.dim() != 4:
        return False
    indexed = module.use_indexed
    if indexed is None:
        indexed = module.analog_module.is_cuda
    return not indexed


def unfolded_bytes(module: nn.Module, x: torch.Tensor, out_shape: torch.Size) -> int:
    """Bytes of ``x`` unfolded for ``module`` (positions x fan-in per sample) where it unfolds, else 0."""
    if not unfolds(module, x):
        return 0
    positions = math.prod(out_shape[2:])
    return x.shape[0] * positions * module.in_channels * math.prod(module.kernel_size) * x.element_size()


def fixed_input_forward(module: nn.Module, x: torch.Tensor, out_shape: torch.Size,
                        cache: bool = True) -> Callable[[], torch.Tensor]:
    """A function that returns ``module(x)`` (of shape ``out_shape``) for an input that stays fixed while the
    module's tiles are programmed again and again: with ``cache``, an aihwkit ``AnalogConv2d`` on its unfold
    path gets its input unfolded once (:func:`unfolded_bytes` held) instead of at every call, then runs exactly
    the operations of its own forward on it (the same result to the bit, from the same random state); any
    other module, or any module without ``cache``, is simply called."""
    if not cache or not unfolds(module, x):
        return lambda: module(x)
    cols = nn.functional.unfold(x, kernel_size=module.kernel_size, dilation=module.dilation,
                                padding=module.padding, stride=module.stride).transpose(-1, -2)
    return lambda: module.analog_module(cols).transpose(-1, -2).view(out_shape)
